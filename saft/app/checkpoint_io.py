"""Checkpoints written atomically and read without executing pickled code."""
import contextlib
import os
import pickle
from pathlib import Path

import torch
from lightning_fabric.plugins.io.torch_io import TorchCheckpointIO

from saft.atomic import atomic_path
from saft.errors import ConfigError


class AtomicCheckpointIO(TorchCheckpointIO):
    """Writes a temporary file beside the target, syncs it, then renames it: a kill leaves either the old
    file or the complete new one, never a truncated file under the real name. (Lightning's own save goes
    through a temporary file in /tmp and a copy, which is not atomic across filesystems.)"""

    def save_checkpoint(self, checkpoint, path, storage_options=None) -> None:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(path) as tmp, open(tmp, "wb") as f:
            torch.save(checkpoint, f)
            f.flush()
            os.fsync(f.fileno())

    def load_checkpoint(self, path, map_location=lambda storage, loc: storage, weights_only=True):
        with _readable(path):
            return super().load_checkpoint(path, map_location=map_location, weights_only=True)


@contextlib.contextmanager
def _readable(path):
    try:
        yield
    except (pickle.UnpicklingError, RuntimeError, EOFError, OSError) as e:
        raise ConfigError(f"cannot load checkpoint {path}: {str(e).splitlines()[0]}. It is truncated, "
                          f"corrupt, or holds pickled objects that safe (weights-only) loading refuses; "
                          f"use a checkpoint written by this project") from None


def checkpoint_entry(path, key: str):
    """One top-level entry of a checkpoint, read without loading its tensors (memory-mapped)."""
    with _readable(path):
        return torch.load(path, map_location="cpu", weights_only=True, mmap=True).get(key)
