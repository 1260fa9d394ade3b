"""A run's identity: everything that decides what it trains and evaluates, derived from its composed config.

The identity is the run's resolved config, flattened to dotted keys, minus the few keys declared in ``IGNORED``
(each with the reason it cannot change what is trained or evaluated), with the values of ``LOCATIONS`` (where
files lie) left out and ``CONTENT`` files counted by their bytes. results.json, the resume check, the report and
wandb all read it from here, so a new config option is part of every run's identity without anyone listing it.

Three rules keep it about what runs, not what was typed:
- a null and a missing key mean the same to the code (``cfg.get``), so nulls are dropped;
- a number is a number: ``lr_scale=1`` (a sweep) and ``lr_scale: 1.0`` (the config) are one value;
- a top-level value that only method configs interpolate (``${sparsity}`` in ``conf/method/saft.yaml``) counts
  only where this run's config interpolates it: full fine-tuning has no mask, so its runs do not differ by
  ``sparsity``. Every other top-level key (``seed``, ``eval_datasets``) always counts: code may read it directly.
"""
import fnmatch
import hashlib
import json
import re
from functools import lru_cache
from pathlib import Path
from typing import Any, Dict, List, Mapping, NamedTuple, Sequence

from omegaconf import DictConfig, OmegaConf

from saft.app import CONF_DIR

IGNORED = {  # patterns on flat keys (a key matches its own name, anything below it, or an fnmatch pattern)
    "hydra": "Hydra's output folders, launcher and job settings",
    "finished": "what a job does when its dir already holds this run's results; it never changes them",
    "ckpt_path": "where a resume starts from; the resume check compares the identities themselves",
    "run_dir": "eval.py: the folder of the evaluated run (its settings are the rest of this identity)",
    "optimized_metric": "adds a validation pass after the test, for a search; what is trained and tested is unchanged",
    "experiment_name": "a label for sweep folders and report tables; an experiment's settings are keys of their own",
    "eval_zeroshot": "adds the zero-shot reference measurement; the trained model and its metrics are unchanged",
    "zeroshot_cache": "where the zero-shot reference comes from; a cached one holds the numbers a new test gives",
    "*num_workers": "augmentations are seeded per sample (EpochSeededSampler), so the worker count changes no batch",
    "*eval_batch_size": "evaluation and the mask's scoring pass see every example once whatever the batch; the "
                        "batch cut changes results only by float rounding",
    "model.batch_first_attention": "the same attention computed without a transpose: results differ by float rounding "
                                   "only (tests/test_attention.py), so older runs resume and report with newer ones",
    "model.trim_prompts": "the training prompts run without the padding after their end-of-text tokens, which a causal "
                          "text tower never attends to: results differ by float rounding only (tests/test_prompts.py)",
    "method.mask.batch_size": "the scoring pass sums over every example whatever the batch (as *eval_batch_size)",
    "method.mask.sparse_grads": "the k selected entries' gradients formed alone or gathered from the dense ones: "
                                "training differs by float rounding only (tests/test_sparse_grad.py)",
    "logger": "where metrics are logged",
    "checkpoint": "when and where checkpoints are written; the final state is always saved",
    "trainer.enable_progress_bar": "display only",
    "trainer.enable_model_summary": "display only",
    "trainer.log_every_n_steps": "how often metrics are logged",
    "*download": "whether missing files may be fetched; the files are the same",
}
# Objects in a list (``trainer.plugins``) that cannot change results, by ``_target_``.
IGNORED_TARGETS = {"saft.app.checkpoint_io.AtomicCheckpointIO": "how checkpoint files are written (atomically)"}
# Paths: the same files in another place are the same data.
LOCATIONS = ("data_dir", "*.data_dir", "dataset.datamodule.root", "dataset.datamodule.variant_dirs.*")
# Files whose content is the setting: a copy elsewhere is the same run, an edited file another.
CONTENT = ("split_file", "dataset.datamodule.split_file")
LOCATION = "<location>"
_REFERENCE = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}")
# A key outside method/ that takes its value from the method (trainer.gradient_clip_val: ${method.gradient_clip_val})
# is the method's setting: runs of two methods are compared in one context whatever each sets it to.
_METHOD_VALUE = re.compile(r"\$\{method\.[A-Za-z0-9_.]+\}")


class Identity(NamedTuple):
    settings: Dict[str, Any]   # flat dotted key -> resolved value
    seed_keys: List[str]       # the keys that carry the seed (``seed`` and what interpolates it)
    method_keys: List[str]     # the keys only the method reads (``method.*`` and what only it interpolates)

    @property
    def hash(self) -> str:
        return digest(self.settings)

    @property
    def config_hash(self) -> str:
        """What the seeds of one configuration share."""
        return digest(without(self.settings, self.seed_keys))

    def as_results(self) -> Dict[str, Any]:
        """The keys results.json records."""
        return {"identity": self.settings, "identity_hash": self.hash, "config_hash": self.config_hash,
                "seed_keys": self.seed_keys, "method_keys": self.method_keys}


def digest(settings: Mapping[str, Any]) -> str:
    """A short, stable hash of settings (12 hex digits of sha256 over their sorted JSON)."""
    return hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest()[:12]


def without(settings: Mapping[str, Any], keys: Sequence[str]) -> Dict[str, Any]:
    drop = set(keys)
    return {k: v for k, v in settings.items() if k not in drop}


def _matches(key: str, patterns) -> bool:
    return any(key == p or key.startswith(p + ".") or fnmatch.fnmatchcase(key, p) for p in patterns)


def _flatten(node, prefix: str = "") -> Dict[str, Any]:
    if isinstance(node, Mapping) and node:
        out = {}
        for k, v in node.items():
            out.update(_flatten(v, f"{prefix}.{k}" if prefix else str(k)))
        return out
    return {prefix: node}


def _canonical(value):
    """Integral floats as ints (never bools), in lists too; objects of ``IGNORED_TARGETS`` left out of lists."""
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, list):
        return [_canonical(v) for v in value
                if not (isinstance(v, Mapping) and v.get("_target_") in IGNORED_TARGETS)]
    if isinstance(value, Mapping):
        return {k: _canonical(v) for k, v in value.items()}
    return value


def _file_digest(path) -> str:
    try:
        return "sha256:" + hashlib.sha256(Path(path).read_bytes()).hexdigest()[:12]
    except OSError:
        return f"missing:{path}"  # validation names the missing file before anything runs


def _strings(value):
    if isinstance(value, str):
        yield value
    elif isinstance(value, (list, tuple)):
        for v in value:
            yield from _strings(v)
    elif isinstance(value, Mapping):
        for v in value.values():
            yield from _strings(v)


@lru_cache(maxsize=1)
def _method_handles() -> frozenset:
    """Top-level keys that only method configs (``conf/method/``) interpolate, comments and ignored groups
    (``logger``, ``hydra``) aside."""
    where: Dict[str, set] = {}
    for path in CONF_DIR.rglob("*.yaml"):
        group = path.relative_to(CONF_DIR).parts[0]
        if _matches(group, IGNORED):
            continue
        for line in path.read_text().splitlines():
            for name in _REFERENCE.findall(line.split("#", 1)[0]):
                where.setdefault(name, set()).add(group)
    return frozenset(name for name, groups in where.items() if groups == {"method"})


def _references(raw: Mapping[str, Any]) -> Dict[str, List[str]]:
    """Top-level key -> the kept flat keys whose unresolved value interpolates it."""
    refs: Dict[str, List[str]] = {}
    for key, value in raw.items():
        for text in _strings(value):
            for name in _REFERENCE.findall(text):
                refs.setdefault(name, []).append(key)
    return refs


def run_identity(cfg: DictConfig) -> Identity:
    """The identity of the run ``cfg`` (a composed train or eval config, with or without ``hydra``, e.g. a run's
    ``.hydra/config.yaml``). Each kept key is resolved on its own: an ignored key (``checkpoint.dirpath`` names
    Hydra's output dir) is never resolved, so a saved config gives the same identity outside Hydra."""
    raw = {k: v for k, v in _flatten(OmegaConf.to_container(OmegaConf.masked_copy(cfg, [k for k in cfg if k != "hydra"]),
                                                            resolve=False)).items() if not _matches(k, IGNORED)}
    refs = _references(raw)
    settings = {}
    for key in sorted(raw):
        if key in _method_handles() and not refs.get(key):
            continue  # a method's value this run's method does not use
        value = OmegaConf.select(cfg, key, throw_on_resolution_failure=True)
        value = OmegaConf.to_container(value, resolve=True) if OmegaConf.is_config(value) else value
        for flat_key, flat_value in (_flatten(value, key) if isinstance(value, dict) else {key: value}).items():
            if flat_value is None:
                continue
            if _matches(flat_key, CONTENT):
                flat_value = _file_digest(flat_value)
            elif _matches(flat_key, LOCATIONS):
                flat_value = LOCATION
            settings[flat_key] = _canonical(flat_value)
    seed_keys = [k for k in settings if k == "seed" or k in refs.get("seed", []) and raw.get(k) == "${seed}"]
    method_keys = [k for k in settings if k.startswith("method.") or _METHOD_VALUE.fullmatch(str(raw.get(k)))
                   or (k in refs and all(r.startswith("method.") for r in refs[k]))]
    return Identity(dict(sorted(settings.items())), seed_keys, method_keys)


def differences(saved: Mapping[str, Any], wanted: Mapping[str, Any]) -> List[str]:
    """Keys whose values differ (a key present in one only counts)."""
    return sorted(k for k in set(saved) | set(wanted) if saved.get(k) != wanted.get(k))
