"""The fine-tuned model as a sparse difference from its base: compute, save, load, apply, checksum.

Works on any state mapping ``{name: tensor}``: pass ``model.state_dict()`` to include buffers (BatchNorm
statistics change in train mode even where no weight trains), so base + delta is the fine-tuned model bit for
bit. A saved delta records the sha256 of its base; :func:`apply_delta` checks it when given.
"""
import hashlib
from typing import Dict, Mapping, Optional, Tuple

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
    """Entries of ``final`` whose bits differ from ``base``, per tensor that has any."""
    if set(base) != set(final) or any(base[n].shape != final[n].shape for n in base):
        raise ValueError("base and final states have different tensor names or shapes")
    delta = {}
    for name, b in base.items():
        f = final[name].detach().cpu()
        idx = torch.nonzero(_bits(b.cpu()) != _bits(f)).flatten()
        if idx.numel():
            delta[name] = (idx, f.reshape(-1)[idx].clone())
    return delta


def interpolate_delta(delta: Delta, base: Mapping[str, torch.Tensor], alpha: float) -> Delta:
    """WiSE-FT (Wortsman et al., 2022) in weight space: base + alpha * (fine-tuned - base), as a delta over the
    same entries. ``torch.lerp`` is exact at the ends: alpha=0 gives the base's bits, alpha=1 the delta's."""
    if not 0.0 <= alpha <= 1.0:
        raise ConfigError(f"wise_alpha={alpha} must be a number in [0, 1], e.g. wise_alpha=0.5")
    out = {}
    for name, (idx, val) in delta.items():
        start = base[name].detach().reshape(-1)[idx.to(base[name].device)].to(val)
        mixed = torch.lerp(start, val, alpha) if val.is_floating_point() else (val if alpha == 1 else start)
        keep = _bits(mixed) != _bits(start)  # entries the blend leaves at their base value drop out
        if keep.any():
            out[name] = (idx[keep], mixed[keep])
    return out


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


def save_delta(path, delta: Delta, metadata: Optional[Mapping[str, str]] = None,
               base: Optional[Mapping[str, torch.Tensor]] = None) -> None:
    """``<name>.idx`` / ``<name>.val`` tensors plus string metadata (with ``base_sha256`` when ``base`` is
    given), written atomically."""
    metadata = {k: str(v) for k, v in (metadata or {}).items()}
    if base is not None:
        metadata["base_sha256"] = state_checksum(base)
    tensors = {}
    for name, (idx, val) in delta.items():
        tensors[f"{name}.idx"], tensors[f"{name}.val"] = idx.contiguous(), val.contiguous()
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata=metadata)


def load_delta(path) -> Tuple[Delta, Dict[str, str]]:
    """Read a delta without executing any code (safetensors); one clear error if unreadable or malformed."""
    def broken(why: str) -> ConfigError:
        return ConfigError(f"cannot read delta file {path}: {why}. It is missing, truncated, corrupt or not a "
                           f"delta written by saft; re-run training or copy the file again")
    try:
        with safe_open(str(path), framework="pt") as f:
            metadata, tensors = f.metadata() or {}, {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError, ValueError) as e:
        raise broken(str(e)) from None
    names = {k.rsplit(".", 1)[0] for k in tensors}
    delta = {}
    for n in sorted(names):
        idx, val = tensors.get(f"{n}.idx"), tensors.get(f"{n}.val")
        if idx is None or val is None:
            raise broken(f"{n!r} lacks its .idx or .val tensor")
        if idx.dtype != torch.int64 or idx.ndim != 1 or val.ndim != 1 or idx.numel() != val.numel():
            raise broken(f"{n!r} needs 1-D int64 indices and as many values")
        if idx.numel() and (int(idx.min()) < 0 or not bool((idx[1:] > idx[:-1]).all())):
            raise broken(f"the indices of {n!r} are negative or not sorted and distinct")
        delta[n] = (idx, val)
    return delta, metadata


def apply_delta(model: torch.nn.Module, delta: Delta, base_sha256: Optional[str] = None) -> None:
    """Write the delta's values into ``model``'s parameters and buffers in place. Names, index ranges,
    dtypes and (when ``base_sha256`` is given, e.g. from the delta's metadata) the base checksum are checked
    before anything is written."""
    tensors = dict(model.state_dict(keep_vars=True))
    if base_sha256 is not None and state_checksum(tensors) != base_sha256:
        raise ConfigError("the delta was made for another base model (its base_sha256 differs from this "
                          "model's); apply it to the weights it was trained from")
    for name, (idx, val) in delta.items():
        if name not in tensors:
            raise ConfigError(f"the delta changes {name!r}, which this model does not have: it was made for "
                              f"another base model")
        if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= tensors[name].numel()):
            raise ConfigError(f"the delta indexes outside {name!r}: it was made for another base model")
        if not tensors[name].is_contiguous():
            raise ConfigError(f"{name!r} is not contiguous in memory (channels_last?); apply the delta before "
                              f"changing the model's memory format")
        if val.dtype != tensors[name].dtype:
            raise ConfigError(f"the delta holds {val.dtype} values for {name!r}, which is {tensors[name].dtype}")
    with torch.no_grad():
        for name, (idx, val) in delta.items():
            t = tensors[name]
            t.view(-1)[idx.to(t.device)] = val.to(t.device)
