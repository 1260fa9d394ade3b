"""The zero-shot reference of a run, measured once per base model and eval data and then read from a cache.

Every run of a sweep tests the same base model on the same test sets before it trains (``eval_zeroshot``): the
first run measures it and stores the metrics in ``$SAFT_CACHE_DIR/zeroshot/<key>.json``, later runs (of this sweep
or another) read them. The key is everything the numbers depend on: the base weights' checksum; each eval set's
name, class names, templates and items (with the size and modification time of items that are files); the
datamodule's settings outside the few-shot draw; the eval transform; the code that loads the images and evaluates (the source files' bytes); the evaluation's batch size,
precision, devices and world size; the torch and open_clip versions and the hardware kind. A cached entry holds
the same numbers a new evaluation gives (tests/test_zeroshot_cache.py); ``zeroshot_cache=false`` measures anyway.

Concurrent jobs are safe: a lock file makes a second job wait for the first one's result instead of measuring it
again, and entries are written whole (a temporary file renamed). A DDP run measures without the cache (see
:func:`zeroshot_metrics`).
"""
import fcntl
import hashlib
import inspect
import json
import logging
import os
import platform
import re
from contextlib import contextmanager
from pathlib import Path
from typing import Dict, Optional, Tuple

import open_clip
import torch

from saft.app import pretrain
from saft.atomic import atomic_path
from saft.delta import state_checksum

log = logging.getLogger(__name__)
MEASURED, CACHED = "measured", "cache"
# The code an evaluation runs besides the datamodules' (their classes' files are added): the test loop and heads,
# model loading.
_EVAL_CODE = ("saft/app/module.py", "saft/app/heads.py", "saft/app/clip.py", "saft/app/attention.py")
_ROOT = Path(__file__).resolve().parents[2]
_ADDRESS = re.compile(r" at 0x[0-9a-fA-F]+")  # a function's repr names its address, which differs per process
# FewShotDataModule's settings of the training side (the few-shot draw and its loader); every other plain setting
# of a datamodule (image size, test sizes, styles, roots) counts, so a setting nobody listed can only cost a miss.
_TRAINING_SIDE = ("shots", "seed", "batch_size", "num_workers", "split_file", "trainer")


def cache_dir() -> Path:
    return pretrain.cache_root() / "zeroshot"


def _template_text(template) -> str:
    """A template as text: format strings are themselves, callables (open_clip's) render a placeholder."""
    return template if isinstance(template, str) else "callable:" + template("{}")


def _file_stats(key) -> Optional[list]:
    if isinstance(key, str) and os.sep in key:
        try:
            st = os.stat(key)
            return [st.st_size, st.st_mtime_ns]
        except OSError:
            return None
    return None


def _digest(value) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()


def reference_key(trainer, module, datamodule) -> str:
    """The cache key of ``module``'s current weights tested on ``datamodule``'s eval sets by ``trainer``."""
    sources = {path: _digest((_ROOT / path).read_text()) for path in _EVAL_CODE}
    sets, loaders = [], {type(datamodule)}
    for s in datamodule.eval_sets():
        loader = getattr(s.load, "__self__", None)
        if loader is not None:
            loaders.add(type(loader))
        sets.append({"name": s.name, "classnames": list(s.classnames), "classes": s.classes,
                     "templates": [_template_text(t) for t in s.templates],
                     "loader": _ADDRESS.sub("", repr(getattr(s.load, "__func__", s.load))),
                     "items": _digest([[k, label, _file_stats(k)] for k, label in s.items])})
    for cls in loaders:  # the datamodules' code renders and reads the images: their files (base classes too)
        for c in cls.__mro__:
            path = inspect.getsourcefile(c) if c.__module__.split(".")[0] == "datamodules" else None
            if path:
                sources[c.__module__] = _digest(Path(path).read_text())
    device = trainer.strategy.root_device
    hardware = (torch.cuda.get_device_name(device) if device.type == "cuda"
                else f"{device.type}:{torch.backends.cpu.get_cpu_capability()}:{platform.machine()}")
    settings = {k: v for k, v in vars(datamodule).items() if not k.startswith("_") and k not in _TRAINING_SIDE
                and isinstance(v, (str, int, float, bool, list, tuple, dict, type(None)))}
    return _digest({"base": state_checksum(module.model.state_dict()), "sets": sets, "code": sources,
                    "datamodule": settings,
                    "transform": _ADDRESS.sub("", repr(datamodule.eval_transform)), "batch": datamodule.eval_batch_size,
                    "precision": str(trainer.precision), "world_size": trainer.world_size,
                    "num_nodes": trainer.num_nodes, "hardware": hardware, "torch": torch.__version__,
                    "open_clip": open_clip.__version__})


@contextmanager
def _locked(path: Path):
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_suffix(".lock"), "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def _read(path: Path) -> Optional[Dict]:
    if not path.is_file():
        return None
    try:
        entry = json.loads(path.read_text())
        return entry["metrics"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        log.warning("zero-shot cache entry %s is unreadable (%s); measuring again and replacing it", path, e)
        return None


def zeroshot_metrics(trainer, module, datamodule, use_cache: bool = True) -> Tuple[Dict, str]:
    """``module``'s zero-shot metrics on the eval sets (its prompt-ensemble text heads, whatever head the method
    trains) and where they came from (``"cache"`` or ``"measured"``)."""
    # Under DDP the other ranks start inside the first test or fit call, so they could not be told in time
    # whether rank 0 found an entry: every rank then measures, as all ranks must run the same test loop.
    if not use_cache or trainer.world_size > 1:
        return _measure(trainer, module, datamodule), MEASURED
    path = cache_dir() / f"{reference_key(trainer, module, datamodule)}.json"
    with _locked(path):  # a concurrent job with the same key waits here for this one's result
        metrics = _read(path)
        if metrics is not None:
            log.info("zero-shot reference: read from %s", path)
            return metrics, CACHED
        metrics = _measure(trainer, module, datamodule)
        _write(path, metrics)
        return metrics, MEASURED


def _measure(trainer, module, datamodule) -> Dict:
    with module.text_head_only():
        trainer.test(module, datamodule=datamodule, verbose=False)
    return dict(module.results)


def _write(path: Path, metrics: Dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps({"metrics": metrics}, indent=1) + "\n")
    log.info("zero-shot reference: measured and stored in %s", path)
