"""Runs as the report sees them: read, identified, grouped into configurations, labelled.

Two runs are one configuration when their identities (``saft.app.identity``) agree on everything but the seed;
two runs with the same identity are duplicates (one is kept, the other listed). A row is labelled by the identity
keys that vary among the configurations of its method, so a new option shows up in labels without being listed.
"""
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Sequence, Tuple

from omegaconf import OmegaConf

from saft.app.identity import Identity, digest, run_identity, without
from saft.app.results import ERROR, RESULTS, summary

# The learning rate a trade-off curve runs over: the method's lr and the shared scale that sets it.
LR_KEYS = ("lr_scale", "method.optimizer.lr")
_PREFIXES = ("method.optimizer.", "method.", "dataset.datamodule.", "trainer.", "model.")


@dataclass
class Runs:
    finished: List[dict] = field(default_factory=list)
    failed: List[Tuple[Path, str]] = field(default_factory=list)
    unfinished: List[Path] = field(default_factory=list)
    planned: List[dict] = field(default_factory=list)  # failed and unfinished runs: their summary and identity
    duplicates: List[Tuple[str, str]] = field(default_factory=list)  # (left-out run dir, the kept run's dir)
    bases: Dict[str, List[str]] = field(default_factory=dict)  # model -> its base checksums, where runs differ


def _identified(run: dict, config: Path) -> dict:
    """A run with its identity: the one results.json recorded, or (older runs) derived from its saved config. Which
    keys are the method's is read again from the saved config when it gives the recorded identity, so runs made
    before a rule of ``saft.app.identity`` changed are compared as new runs are."""
    fresh = run_identity(OmegaConf.load(config))
    if "identity" not in run:
        return {**run, **fresh.as_results()}
    return {**run, "method_keys": fresh.method_keys} if fresh.settings == run["identity"] else run


def collect(dirs: Sequence[Path]) -> Runs:
    runs = Runs()
    for root in dirs:
        for config in sorted(Path(root).glob("**/.hydra/config.yaml")):
            run_dir = config.parent.parent
            if (run_dir / RESULTS).is_file():
                runs.finished.append(_identified({**json.loads((run_dir / RESULTS).read_text()), "dir": str(run_dir)},
                                                 config))
                continue
            if (run_dir / ERROR).is_file():
                runs.failed.append((run_dir, (run_dir / ERROR).read_text().strip()))
            else:
                runs.unfinished.append(run_dir)
            cfg = OmegaConf.load(config)
            runs.planned.append({**summary(cfg), **run_identity(cfg).as_results(), "dir": str(run_dir)})
    runs.finished, runs.bases = apart_by_base(runs.finished)
    runs.finished, runs.duplicates = without_duplicates(without_reevaluations(runs.finished))
    return runs


def apart_by_base(finished: List[dict]) -> Tuple[List[dict], Dict[str, List[str]]]:
    """The config names a model, but a machine that rebuilds it (the benchmark CLIP) can get other bits: where
    the runs of one model started from different weights (results.json ``base_sha256``), ``model.base_sha256``
    joins their identity, so they are other configurations (labelled by it) and never seeds of one."""
    by_model: Dict[str, set] = {}
    for r in finished:
        by_model.setdefault(r["identity"].get("model.name", r.get("model")), set()).add(r.get("base_sha256"))
    mixed = {model: sorted(b or "unrecorded" for b in bases) for model, bases in by_model.items() if len(bases) > 1}
    out = []
    for r in finished:
        if r["identity"].get("model.name", r.get("model")) in mixed:
            identity = dict(sorted({**r["identity"], "model.base_sha256": r.get("base_sha256") or "unrecorded"}.items()))
            r = {**r, **Identity(identity, r.get("seed_keys", ["seed"]), r.get("method_keys", [])).as_results()}
        out.append(r)
    return out, mixed


def without_reevaluations(finished: List[dict]) -> List[dict]:
    """``eval.py run_dir=RUN`` on RUN's own data without ``wise_alpha`` has RUN's identity: it measures RUN again.
    It stays when RUN is not in the report."""
    trained = {r["identity_hash"] for r in finished if not r.get("run_dir")}
    return [r for r in finished if not (r.get("run_dir") and r["identity_hash"] in trained)]


def without_duplicates(finished: List[dict]) -> Tuple[List[dict], List[Tuple[str, str]]]:
    """One run per identity (configuration and seed) and experiment: a repeat would count as another seed. (Two
    experiments may run one configuration, e.g. each ablation's default point: each keeps its run.)"""
    kept: Dict[tuple, dict] = {}
    duplicates = []
    for r in finished:
        first = kept.setdefault((r["identity_hash"], r.get("experiment")), r)
        if first is not r:
            duplicates.append((r.get("dir", "?"), first.get("dir", "?")))
    return list(kept.values()), duplicates


def settings(run: dict) -> dict:
    """The run's identity without the seed: what the seeds of one configuration share."""
    return without(run["identity"], run.get("seed_keys", ["seed"]))


def config_key(run: dict, skip: Sequence[str] = ()) -> str:
    """A configuration's key; ``skip``: keys (or key prefixes ending in '.') left out, e.g. what a curve runs over."""
    return digest({k: v for k, v in settings(run).items() if not _skipped(k, skip)})


def context_key(run: dict) -> str:
    """What a run is compared within: its identity (seed included) without the method's keys and WiSE-FT's alpha."""
    return digest(without(run["identity"], [*run.get("method_keys", []), "wise_alpha"]))


def groups(runs: Sequence[dict], planned: Sequence[dict] = (), skip: Sequence[str] = ()) -> Dict[str, List[dict]]:
    """Configuration key -> its runs, one per seed (two experiments that ran one configuration count its seed
    once); planned runs give empty groups."""
    out: Dict[str, List[dict]] = {}
    for r in planned:
        out.setdefault(config_key(r, skip), [])
    seen = set()
    for r in runs:
        key = config_key(r, skip)
        if (key, r["identity_hash"]) in seen:
            continue
        seen.add((key, r["identity_hash"]))
        out.setdefault(key, []).append(r)
    return out


def short(key: str) -> str:
    """A key as a row label shows it: ``lr`` for ``method.optimizer.lr``, ``dataset`` for ``dataset.name``."""
    if key.count(".") == 1 and key.endswith(".name"):
        return key[:-len(".name")]
    for prefix in _PREFIXES:
        if key.startswith(prefix):
            return key[len(prefix):]
    return key


def _partition(runs: Sequence[dict], key: str) -> Tuple:
    """How ``key`` splits ``runs``: each run's group number."""
    first: Dict[str, int] = {}
    return tuple(first.setdefault(json.dumps(settings(r).get(key), sort_keys=True), len(first)) for r in runs)


def _same_information(runs: Sequence[dict], a: str, b: str) -> bool:
    """Whether ``b`` repeats ``a`` over ``runs``: the same values (``sparsity`` and the mask's ``sparsity`` it sets),
    or numbers at one ratio (``lr`` = base lr x ``lr_scale``). Two settings that merely vary together in a sweep
    (the mask's exclusions and its sparsity) are both shown."""
    pairs = [(settings(r).get(a), settings(r).get(b)) for r in runs]
    if all(x == y for x, y in pairs):
        return True
    numbers = [(x, y) for x, y in pairs if isinstance(x, (int, float)) and isinstance(y, (int, float))
               and not isinstance(x, bool) and not isinstance(y, bool) and x and y]
    if len(numbers) < len(pairs) or _partition(runs, a) != _partition(runs, b):
        return False
    ratios = [y / x for x, y in numbers]
    return max(ratios) - min(ratios) <= 1e-9 * max(abs(q) for q in ratios)


def _skipped(key: str, skip: Sequence[str]) -> bool:
    return any(key == s or s.endswith(".") and key.startswith(s) for s in skip)


def varying(runs: Sequence[dict], skip: Sequence[str] = ()) -> Dict[str, List[str]]:
    """Method -> the identity keys (but ``skip``) whose values differ among its configurations (the seed aside).
    Keys that repeat one another (``lr_scale`` and the ``lr`` it sets, ``shots`` and the datamodule's: see
    :func:`_same_information`) show once: by the shortest name, the outermost key of those."""
    by_method: Dict[str, List[dict]] = {}
    for r in runs:
        by_method.setdefault(_method(r), []).append(r)
    found: Dict[str, List[str]] = {}
    for method, members in by_method.items():
        keys = sorted({k for r in members for k in settings(r) if not _skipped(k, skip)},
                      key=lambda k: (len(short(k)), k.count("."), k))
        chosen: List[str] = []
        for key in keys:
            if (key != "method.name" and len(set(_partition(members, key))) > 1
                    and not any(_same_information(members, c, key) for c in chosen)):
                chosen.append(key)
        found[method] = sorted(chosen, key=lambda k: (short(k), k))
    return found


def _method(run: dict) -> str:
    return run["identity"].get("method.name", run.get("method", "?"))


def _show(value) -> str:
    if isinstance(value, float):
        return f"{value:.3g}"
    if isinstance(value, bool) or value is None:
        return json.dumps(value)
    return value if isinstance(value, str) else json.dumps(value, separators=(",", ":"))


def label(run: dict, keys: Dict[str, Sequence[str]], extra: Sequence[str] = ()) -> str:
    """The method, then ``name=value`` for each key that varies among its method's configurations (``keys``, from
    :func:`varying`) and each of ``extra`` the run has (a training run has no ``wise_alpha``)."""
    own = [*keys.get(_method(run), []), *(k for k in extra if k not in keys.get(_method(run), []))]
    names = [short(k) for k in own]
    shown = [f"{short(k) if names.count(short(k)) == 1 else k}={_show(settings(run)[k])}"
             for k in own if k in settings(run)]
    return ", ".join([_method(run)] + shown)


def tidy(finished: Sequence[dict]) -> List[dict]:
    """One flat row per finished run, as wise-ft's results lines: its folder, its configuration's label (as the
    tables show it), what it is, every identity key (``cfg/<key>``), its counts and checksums, and its metrics:
    ``top1/<set>``, ``zeroshot/top1/<set>``, ``id_top1``, ``ood_mean_top1`` and the changes from zero-shot."""
    keys = varying(finished)
    rows = []
    for r in finished:
        row = {"dir": r.get("dir"), "label": label(r, keys), "method": r.get("method"),
               "dataset": r.get("dataset"), "model": r.get("model"), "shots": r.get("shots"), "seed": r.get("seed"),
               "wise_alpha": r.get("wise_alpha"), "experiment": r.get("experiment"), "id": r.get("id"),
               "ood": " ".join(r.get("ood", [])), "id_top1": r["metrics"].get(r["id"], {}).get("top1"),
               "ood_mean_top1": r.get("ood_mean_top1")}
        before = r.get("zeroshot_metrics") or {}
        if r["id"] in before:
            row["id_gain"] = row["id_top1"] - before[r["id"]]["top1"]
            ood = [r["metrics"][s]["top1"] - before[s]["top1"] for s in r["ood"] if s in before and s in r["metrics"]]
            row["ood_change"] = sum(ood) / len(ood) if ood and len(ood) == len(r["ood"]) else None
        row.update({f"top1/{s}": m.get("top1") for s, m in r["metrics"].items()})
        row.update({f"zeroshot/top1/{s}": m.get("top1") for s, m in before.items()})
        row.update({k: r.get(k) for k in ("num_params", "num_trainable", "num_changed", "weights_sha256",
                                          "base_sha256", "identity_hash", "config_hash", "zeroshot_from")})
        row.update({f"cfg/{k}": v if isinstance(v, (int, float, str)) or v is None else json.dumps(v)
                    for k, v in r["identity"].items()})
        rows.append(row)
    return rows
