"""The names of output folders, as config resolvers: short, readable, and safe to pass back unquoted.

Hydra's ``override_dirname`` joins every override with ``=`` and ``,``: a dozen overrides pass the filesystem's
255-byte limit, and ``run_dir=...`` of such a folder needs quoting. The full overrides stay in each job's
``.hydra/overrides.yaml``; the folder name only has to tell the jobs apart and be read at a glance.
"""
import hashlib
import re
from pathlib import Path
from typing import Optional, Set

from hydra.core.hydra_config import HydraConfig
from hydra.core.override_parser.overrides_parser import OverridesParser
from omegaconf import OmegaConf

MAX_NAME = 96          # characters of a job folder's name
_UNSAFE = re.compile(r"[^A-Za-z0-9._+-]+")  # what a shell or Hydra's override grammar would need quoted


def _safe(text: str) -> str:
    """``text`` where a shell and Hydra take it unquoted, else its safe characters and a short hash of it, so that
    two values never share a name (``a/b`` and ``a-b``, ``[a,b]`` and ``a,b``)."""
    if text and not _UNSAFE.search(text):
        return text
    return f"{_UNSAFE.sub('-', text).strip('-')}-{hashlib.sha256(text.encode()).hexdigest()[:4]}".lstrip("-")


def swept_keys(sweep_dir) -> Optional[Set[str]]:
    """The keys a multirun sweeps (``seed=1,2,3`` on its command line or in ``hydra.sweeper.params``), read from
    the ``multirun.yaml`` Hydra's sweeper saves before its jobs start; None where there is none."""
    saved = Path(str(sweep_dir)) / "multirun.yaml"
    if not saved.is_file():
        return None
    hydra = OmegaConf.load(saved).hydra
    raw = [*hydra.overrides.task, *(f"{k}={v}" for k, v in (hydra.sweeper.get("params") or {}).items())]
    return {o.key_or_group for o in OverridesParser.create().parse_overrides(raw) if o.is_sweep_override()}


def _part(key: str, value: str) -> str:
    if key == "run_dir":  # eval.py: the evaluated run, by its folder's name
        return f"run-{_safe(Path(value).name)}"
    return f"{_safe(key.rsplit('.', 1)[-1])}-{_safe(value)}"


def job_folder(num, overrides, sweep_dir, params) -> str:
    """A sweep job's folder: ``key-value`` of each value swept, in key order (the key's last part), e.g.
    ``arm-saft_lr_scale-3_seed-1``; cut at MAX_NAME characters with a hash of the whole name kept at the end.
    The same sweep command (in any order of its arguments, with more values) gives its jobs the same folders, so
    ``finished=skip`` finds them; a sweep of other keys (``seed=1`` where it swept ``seed=1,2``) names them anew.
    Without Hydra's multirun.yaml (the Optuna sweeper) the swept keys are ``hydra.sweeper.params`` and the job
    number comes first: a search may try one point twice."""
    swept = swept_keys(sweep_dir)
    numbered = swept is None
    swept = set(params or {}) if swept is None else swept
    parts = []
    for override in overrides:
        key, _, value = str(override).partition("=")
        key = key.lstrip("+~")
        if key in swept and not key.startswith("hydra."):  # swept, even a key override_dirname leaves out
            parts.append((key, _part(key, value)))
    name = "_".join(([str(num)] if numbered else []) + [part for _, part in sorted(parts)]) or "job"
    if len(name) > MAX_NAME:
        name = f"{name[:MAX_NAME - 9]}-{hashlib.sha256(name.encode()).hexdigest()[:8]}"
    return name


def eval_subject(run_dir, dataset_name) -> str:
    """What eval.py evaluates, as ``<dataset>/<run folder>`` (``<dataset>/zeroshot`` without run_dir). The dataset
    is the run's own unless this call names one (``dataset=...``): the composed default is not what is tested."""
    if not run_dir:
        return f"{_safe(str(dataset_name))}/zeroshot"
    chosen = [o.split("=", 1)[1] for o in HydraConfig.get().overrides.task if o.startswith("dataset=")]
    if not chosen:
        saved = Path(str(run_dir)) / ".hydra" / "config.yaml"
        # an unreadable run dir is refused with its own message once the app starts (compose_for_run)
        chosen = [OmegaConf.load(saved).dataset.name] if saved.is_file() else [dataset_name]
    return f"{_safe(str(chosen[0]))}/{_safe(Path(str(run_dir)).name)}"


def register() -> None:
    OmegaConf.register_new_resolver("job_folder", job_folder, replace=True)
    OmegaConf.register_new_resolver("eval_subject", eval_subject, replace=True)
