"""Each example's own gradient, for the per-example scores (Σ|g|, Σg²), many examples at a time.

``torch.func``: ``vmap(grad(loss of one example))`` over chunks of a batch, so a chunk shares one forward of
whatever does not depend on the example (a CLIP's text tower over the class prompts) and runs the backward
batched. An embedding table is read through the rows the loss uses (found by one forward of the first example; a CLIP's class prompts use 13 of 49,408 token rows): every other row's gradient is exactly
zero, so only those rows get per-example gradients. Chunks are sized so their per-example gradients fit
``chunk_bytes``.
"""
from typing import Callable, Dict, Mapping, Optional

import torch
from torch import nn
from torch.func import functional_call, grad, vmap
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_map

CHUNK_BYTES = 1 << 29  # 512 MiB of per-example gradients per chunk


class _RowsRead(TorchFunctionMode):
    """``embedding(ids, weight)`` of a listed weight records its ids (``rows``), or reads ``sub`` (the listed
    rows of the weight) through ``where`` (row -> position in ``sub``)."""

    def __init__(self, weights: Mapping[int, str], rows=None, where=None, subs=None):
        super().__init__()
        self.weights, self.rows, self.where, self.subs = weights, rows, where, subs

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is nn.functional.embedding:
            ids = args[0] if args else kwargs["input"]
            weight = args[1] if len(args) > 1 else kwargs["weight"]
            name = self.weights.get(id(weight))
            if name is not None:
                options = dict(zip(("padding_idx", "max_norm", "norm_type", "scale_grad_by_freq", "sparse"), args[2:]))
                options.update({k: v for k, v in kwargs.items() if k not in ("input", "weight")})
                if options.get("padding_idx") is not None or options.get("max_norm") is not None \
                        or options.get("scale_grad_by_freq"):
                    raise OtherRows(f"{name} is read with {options}")
                if self.subs is None:
                    self.rows.setdefault(name, set()).update(ids.reshape(-1).tolist())
                else:
                    where = self.where[name][ids]
                    if bool((where < 0).any()):
                        raise OtherRows(f"{name}: rows outside those the first batch read")
                    return func(where, self.subs[name])
        return func(*args, **kwargs)


class OtherRows(Exception):
    """The loss read embedding rows outside those found, or read them in a way the row path does not take."""


class _Loss(nn.Module):
    def __init__(self, model: nn.Module, loss_fn: Callable):
        super().__init__()
        self.model, self.loss_fn = model, loss_fn

    def forward(self, batch):
        return self.loss_fn(self.model, batch)


class PerExampleGradients:
    """``grads(chunk)``: ``{name: (n, *shape)}``, each example's gradient of the eligible ``params``, an embedding's
    as ``(rows, (n, len(rows), dim))``. Raises :class:`OtherRows` or torch's own error where the loss cannot be
    taken this way (the caller then loops over examples)."""

    def __init__(self, model: nn.Module, params: Mapping[str, torch.Tensor], loss_fn: Callable,
                 chunk_bytes: int = CHUNK_BYTES):
        self.model, self.params, self.loss_fn, self.chunk_bytes = model, dict(params), loss_fn, chunk_bytes
        names = {id(p): n for n, p in params.items()}
        self.embeddings = {id(m.weight): names[id(m.weight)] for m in model.modules()
                           if isinstance(m, nn.Embedding) and id(m.weight) in names}
        self.rows: Optional[Dict[str, torch.Tensor]] = None
        self._where: Dict[str, torch.Tensor] = {}
        self._vectorised = vmap(grad(self._one, argnums=(0, 1)), in_dims=(None, None, 0))
        self._wrapper = _Loss(model, loss_fn)

    def chunk_size(self, example) -> int:
        """Examples per chunk: their per-example gradients fit ``chunk_bytes`` (at least one). ``example``: a
        batch of one, whose forward finds the embedding rows the loss reads (on the first call)."""
        if self.rows is None:
            self._find_rows(example)
        entries = sum(p.numel() for n, p in self.params.items() if n not in self.rows)
        entries += sum(len(r) * self.params[n][0].numel() for n, r in self.rows.items())
        return max(1, self.chunk_bytes // max(1, 4 * entries))

    def _find_rows(self, example) -> None:
        found: Dict[str, set] = {}
        with torch.enable_grad(), _RowsRead(self.embeddings, rows=found):  # the path the gradients will take
            self.loss_fn(self.model, example)
        self.rows = {}
        for n in self.embeddings.values():
            weight = self.params[n]
            self.rows[n] = torch.tensor(sorted(found.get(n, ())), dtype=torch.long, device=weight.device)
            self._where[n] = torch.full((weight.shape[0],), -1, dtype=torch.long, device=weight.device)
            self._where[n][self.rows[n]] = torch.arange(len(self.rows[n]), device=weight.device)

    def _one(self, tensors, rows_of, example):
        batch_of_one = tree_map(lambda x: x.unsqueeze(0) if isinstance(x, torch.Tensor) else x, example)
        # The math attention: torch.func has batching rules for its ops, not for the fused CPU kernel.
        with _RowsRead(self.embeddings, where=self._where, subs=rows_of), sdpa_kernel(SDPBackend.MATH):
            return functional_call(self._wrapper, tensors, (batch_of_one,), strict=False).sum()

    def grads(self, chunk) -> Dict[str, object]:
        if self.rows is None:
            raise ValueError("PerExampleGradients.grads() before chunk_size(): the embedding rows are not known")
        dense = {f"model.{n}": p.detach() for n, p in self.params.items() if n not in self.rows}
        subs = {n: self.params[n].detach()[r] for n, r in self.rows.items()}
        grads, row_grads = self._vectorised(dense, subs, chunk)
        out = {n[len("model."):]: g for n, g in grads.items()}
        out.update({n: (self.rows[n], g) for n, g in row_grads.items()})
        return out
