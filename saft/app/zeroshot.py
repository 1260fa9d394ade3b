"""The zero-shot reference of a run, measured once per base model and eval data and then read from a cache.

Every run of a sweep tests the same base model on the same test sets before it trains (``eval_zeroshot``): the
first run measures it and stores the metrics in ``$SAFT_CACHE_DIR/zeroshot/<key>.json``, later runs (of this sweep
or another) read them. The key is everything the numbers depend on:
- the model: the base weights' checksum, the architecture as built (its repr), the module class, the tokenizer;
- the data: each eval set's name, class names, templates, items and loader settings (the size and modification
  time of every item that is a file under its loader's root); the datamodule's settings outside the few-shot draw;
  the eval transform; the code that loads the images and evaluates (the source files' bytes);
- the evaluation: batch size, precision, devices; the torch and open_clip versions and the hardware kind.
A cached entry holds the same numbers a new evaluation gives (tests/test_zeroshot_cache.py); an entry without
every eval set at its full example count is measured again; ``zeroshot_cache=false`` measures anyway, and so does
a DDP run or a test loop the trainer limits (``limit_test_batches``).

Concurrent jobs are safe: a lock file makes a second job wait for the first one's result instead of measuring it
again, and entries are written whole (a temporary file renamed). A cache folder that cannot be written costs a
warning and a measurement, never the run.
"""
import fcntl
import hashlib
import inspect
import json
import logging
import os
import platform
import re
from contextlib import ExitStack, contextmanager
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
# FewShotDataModule's settings of the training side (the few-shot draw and its loader). Every other public setting
# of a datamodule or loader counts, plain values as themselves and others by their repr, so a setting nobody listed
# can only cost a miss.
_TRAINING_SIDE = ("shots", "seed", "batch_size", "num_workers", "split_file", "trainer", "train_transform",
                  "eval_transform", "eval_batch_size")
_PLAIN = (str, Path, int, float, bool, list, tuple, dict, type(None))


def cache_dir() -> Path:
    return pretrain.cache_root() / "zeroshot"


def _template_text(template) -> str:
    """A template as text: format strings are themselves, callables (open_clip's) render a placeholder."""
    return template if isinstance(template, str) else "callable:" + template("{}")


def _settings(owner) -> Dict:
    """The public settings of a datamodule or image loader, outside the few-shot draw."""
    return {k: v if isinstance(v, _PLAIN) else _ADDRESS.sub("", repr(v)) for k, v in vars(owner).items()
            if not k.startswith("_") and k not in _TRAINING_SIDE}


def _file_stats(key, root) -> Optional[list]:
    """Size and modification time of an item's file under its loader's root (None if it cannot be read)."""
    try:
        st = os.stat(Path(root) / key)
        return [st.st_size, st.st_mtime_ns]
    except (OSError, TypeError):
        return None


def _digest(value) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()


def reference_key(trainer, module, datamodule) -> str:
    """The cache key of ``module``'s current weights tested on ``datamodule``'s eval sets by ``trainer``."""
    sources = {path: _digest((_ROOT / path).read_text()) for path in _EVAL_CODE}
    sets, owners = [], {type(datamodule)}
    for s in datamodule.eval_sets():
        owner = getattr(s.load, "__self__", s.load)  # a datamodule's bound method, or a loader (ImageFolder)
        owners.add(type(owner))
        root = getattr(owner, "root", None)  # items under a root are files: their sizes and times count
        sets.append({"name": s.name, "classnames": list(s.classnames), "classes": s.classes,
                     "templates": [_template_text(t) for t in s.templates],
                     "loader": _ADDRESS.sub("", repr(getattr(s.load, "__func__", type(s.load)))),
                     "settings": _settings(owner),
                     "items": _digest([[k, label, _file_stats(k, root) if root is not None else None]
                                       for k, label in s.items])})
    for cls in owners:  # the datamodules' code renders and reads the images: their files (base classes too)
        for c in cls.__mro__:
            path = inspect.getsourcefile(c) if c.__module__.split(".")[0] == "datamodules" else None
            if path:
                sources[c.__module__] = _digest(Path(path).read_text())
    device = trainer.strategy.root_device
    hardware = (torch.cuda.get_device_name(device) if device.type == "cuda"
                else f"{device.type}:{torch.backends.cpu.get_cpu_capability()}:{platform.machine()}")
    tokenizer = module.tokenizer
    return _digest({"base": state_checksum(module.model.state_dict()), "sets": sets, "code": sources,
                    "architecture": _ADDRESS.sub("", repr(module.model)), "module": type(module).__qualname__,
                    "tokenizer": [type(tokenizer).__qualname__, getattr(tokenizer, "context_length", None)],
                    "datamodule": _settings(datamodule),
                    "transform": _ADDRESS.sub("", repr(datamodule.eval_transform)), "batch": datamodule.eval_batch_size,
                    "precision": str(trainer.precision), "world_size": trainer.world_size,
                    "num_nodes": trainer.num_nodes, "hardware": hardware, "torch": torch.__version__,
                    "open_clip": open_clip.__version__})


@contextmanager
def _locked(path: Path):
    """Hold ``path``'s lock file; a job that finds it held says so and waits."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_suffix(".lock"), "a") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            log.info("zero-shot reference: waiting for another job measuring it (%s)", path.with_suffix(".lock"))
            fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def _read(path: Path, datamodule) -> Optional[Dict]:
    """The entry's metrics, if it holds every eval set of this run with its full example count."""
    if not path.is_file():
        return None
    try:
        metrics = json.loads(path.read_text())["metrics"]
        sets = datamodule.eval_sets()
        if list(metrics) != [s.name for s in sets] or any(
                metrics[s.name]["n"] != len(s.items) or not isinstance(metrics[s.name]["top1"], float)
                or "head" not in metrics[s.name] for s in sets):
            raise ValueError("it does not hold every eval set with all its examples")
        return metrics
    except (OSError, ValueError, KeyError, TypeError) as e:
        log.warning("zero-shot cache entry %s is unusable (%s); measuring again and replacing it", path, e)
        return None


def _bypass(trainer, use_cache: bool) -> Optional[str]:
    if not use_cache:
        return "zeroshot_cache=false"
    # Under DDP the other ranks start inside the first test or fit call, so they could not be told in time
    # whether rank 0 found an entry: every rank then measures, as all ranks must run the same test loop.
    if trainer.world_size > 1:
        return "a DDP run"
    limit = trainer.limit_test_batches  # Lightning: a float is a fraction, an int (1 too) a number of batches
    if not (isinstance(limit, float) and limit == 1.0) or trainer.fast_dev_run:
        return "a test loop limited by the trainer (limit_test_batches / fast_dev_run)"
    return None


def zeroshot_metrics(trainer, module, datamodule, use_cache: bool = True) -> Tuple[Dict, str]:
    """``module``'s zero-shot metrics on the eval sets (its prompt-ensemble text heads, whatever head the method
    trains) and where they came from (``"cache"`` or ``"measured"``)."""
    reason = _bypass(trainer, use_cache)
    if reason:
        log.info("zero-shot reference: measured without the cache (%s)", reason)
        return _measure(trainer, module, datamodule), MEASURED
    path = cache_dir() / f"{reference_key(trainer, module, datamodule)}.json"
    with ExitStack() as stack:
        try:  # a concurrent job with the same key waits here for this one's result
            stack.enter_context(_locked(path))
        except OSError as e:
            log.warning("zero-shot cache %s cannot be used (%s); measuring without it", path.parent, e)
            return _measure(trainer, module, datamodule), MEASURED
        metrics = _read(path, datamodule)
        if metrics is not None:
            log.info("zero-shot reference: read from %s", path)
            return metrics, CACHED
        metrics = _measure(trainer, module, datamodule)
        try:
            _write(path, metrics)
        except OSError as e:
            log.warning("zero-shot reference not stored in %s (%s)", path, e)
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
