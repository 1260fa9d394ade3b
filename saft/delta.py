"""The fine-tuned model as a sparse difference from its base: compute, save, load, apply, checksum."""
import hashlib
from typing import Dict, Mapping, Tuple

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from saft.atomic import atomic_path
from saft.errors import ConfigError

Delta = Dict[str, Tuple[torch.Tensor, torch.Tensor]]  # name -> (flat int64 indices, final values)
_INT_OF = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def _bits(t: torch.Tensor) -> torch.Tensor:
    """The raw bit pattern, so "changed" means any bit differs (-0.0 vs 0.0, NaN payloads)."""
    return t.detach().reshape(-1).view(_INT_OF[t.element_size()])


def compute_delta(base: Mapping[str, torch.Tensor], final: Mapping[str, torch.Tensor]) -> Delta:
    """Entries of ``final`` whose bits differ from ``base``, per parameter that has any."""
    delta = {}
    for name, b in base.items():
        f = final[name].detach().cpu()
        idx = torch.nonzero(_bits(b.cpu()) != _bits(f)).flatten()
        if idx.numel():
            delta[name] = (idx, f.reshape(-1)[idx].clone())
    return delta


def num_changed(delta: Delta) -> int:
    return sum(int(idx.numel()) for idx, _ in delta.values())


def state_checksum(state: Mapping[str, torch.Tensor]) -> str:
    """sha256 over names, shapes, dtypes and bytes, in name order."""
    h = hashlib.sha256()
    for name in sorted(state):
        t = state[name].detach().cpu().contiguous()
        h.update(f"{name}:{tuple(t.shape)}:{t.dtype};".encode())
        h.update(_bits(t).numpy().tobytes())
    return h.hexdigest()


def save_delta(path, delta: Delta, metadata: Mapping[str, str]) -> None:
    """``<name>.idx`` / ``<name>.val`` tensors plus string metadata, written atomically."""
    tensors = {}
    for name, (idx, val) in delta.items():
        tensors[f"{name}.idx"], tensors[f"{name}.val"] = idx.contiguous(), val.contiguous()
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata={k: str(v) for k, v in metadata.items()})


def load_delta(path) -> Tuple[Delta, Dict[str, str]]:
    """Read a delta without executing any code (safetensors); one clear error if unreadable."""
    try:
        with safe_open(str(path), framework="pt") as f:
            metadata, tensors = f.metadata() or {}, {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError, ValueError) as e:
        raise ConfigError(f"cannot read delta file {path}: {e}. It is missing, truncated or not a "
                          f"safetensors file; re-run training or copy the file again") from None
    names = {k.rsplit(".", 1)[0] for k in tensors}
    return {n: (tensors[f"{n}.idx"], tensors[f"{n}.val"]) for n in names}, metadata


def apply_delta(model: torch.nn.Module, delta: Delta) -> None:
    """Write the delta's values into ``model`` in place; names and index ranges are checked first."""
    params = dict(model.named_parameters())
    for name, (idx, val) in delta.items():
        if name not in params:
            raise ConfigError(f"the delta changes parameter {name!r}, which this model does not have: "
                              f"it was made for another base model")
        if idx.numel() and int(idx.max()) >= params[name].numel():
            raise ConfigError(f"the delta indexes past the end of {name!r}: it was made for another base model")
    with torch.no_grad():
        for name, (idx, val) in delta.items():
            params[name].view(-1)[idx.to(params[name].device)] = val.to(params[name])
