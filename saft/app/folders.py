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
    return _UNSAFE.sub("-", text).strip("-") or "-"


def swept_keys(sweep_dir) -> Optional[Set[str]]:
    """The keys a multirun sweeps (``seed=1,2,3`` on its command line or in ``hydra.sweeper.params``), read from
    the ``multirun.yaml`` Hydra's sweeper saves before its jobs start; None where there is none."""
    saved = Path(str(sweep_dir)) / "multirun.yaml"
    if not saved.is_file():
        return None
    hydra = OmegaConf.load(saved).hydra
    raw = [*hydra.overrides.task, *(f"{k}={v}" for k, v in (hydra.sweeper.get("params") or {}).items())]
    return {o.key_or_group for o in OverridesParser.create().parse_overrides(raw) if o.is_sweep_override()}


def job_folder(overrides, exclude, sweep_dir) -> str:
    """A sweep job's folder: ``key-value`` of each value swept (the key's last part), e.g.
    ``arm-saft_lr_scale-3_seed-1``; every override when the swept keys are unknown; cut at MAX_NAME characters with
    a hash of the whole name kept at the end. No job number: a sweep run again with more values keeps the folders
    of the jobs it had (``finished=skip`` finds them)."""
    swept, parts = swept_keys(sweep_dir), []
    for override in overrides:
        key, _, value = str(override).partition("=")
        key = key.lstrip("+~")
        if key not in set(exclude) and not key.startswith("hydra.") and (swept is None or key in swept):
            parts.append(f"{_safe(key.rsplit('.', 1)[-1])}-{_safe(value)}")
    name = "_".join(parts) or "job"
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
