"""``select_mask``: SAFT's sparse mask for any PyTorch model, from per-example gradient scores.

Every score is a sum over training examples, so the mask does not depend on how ``batches`` is cut, nor
on how many processes share the data (their sums are added before the selection):

- ``abs_sum``  |sum_i g_i|   the magnitude of the full-data gradient (the paper's criterion). Linear in
  the examples, so one backward of the batch's summed loss gives every example's share at once.
- ``sum_abs``  sum_i |g_i|   and ``fisher``  sum_i g_i**2 (empirical Fisher diagonal). Not linear: each
  example needs its own gradient (``torch.func`` per-example gradients in chunks, :mod:`saft.per_example`).
"""
import logging
from collections import Counter
from typing import Callable, Dict, Iterable, Mapping, Optional, Sequence

import torch
from torch import nn

from saft.errors import ConfigError
from saft.mask import (SCORES, Mask, Scores, accumulate_scores, check_patterns, finalize_scores, is_eligible,
                       num_selected, select_topk)
from saft.per_example import CHUNK_BYTES, OtherRows, PerExampleGradients

log = logging.getLogger(__name__)

LossFn = Callable[[nn.Module, object], torch.Tensor]


def eligible_parameters(model: nn.Module, include: Sequence[str] = (),
                        exclude: Sequence[str] = ()) -> Dict[str, nn.Parameter]:
    """Parameters with ``requires_grad`` whose name matches an ``include`` regex (if any) and no ``exclude``."""
    return {n: p for n, p in model.named_parameters() if p.requires_grad and is_eligible(n, include, exclude)}


def _slice(batch, start: int, stop: int):
    """Examples ``start:stop`` of a batch of tensors (nested in tuples, lists and dicts), as a batch."""
    if isinstance(batch, torch.Tensor):
        return batch[start:stop]
    if isinstance(batch, Mapping):
        return {k: _slice(v, start, stop) for k, v in batch.items()}
    if isinstance(batch, (tuple, list)):
        return type(batch)(_slice(v, start, stop) for v in batch)
    return batch


def _example(batch, i: int):
    """Example ``i`` of a batch, as a batch of one."""
    return _slice(batch, i, i + 1)


def rebatch(batches: Iterable, size: int) -> Iterable:
    """``batches`` cut into batches of at most ``size`` examples: the scores are sums over examples, so this changes
    them only by float rounding, and bounds the scoring pass's activations (its peak memory)."""
    for batch in batches:
        leaves = list(_leaves(batch))
        if not leaves or any(not isinstance(x, torch.Tensor) or x.ndim == 0 for x in leaves):
            raise ConfigError("method.mask.batch_size cuts the scoring batches into smaller ones, so a batch must be "
                              "tensors with a batch dimension (in tuples, lists or dicts); set "
                              "method.mask.batch_size=null to score the loader's batches as they are")
        for start in range(0, len(leaves[0]), size):
            yield _slice(batch, start, start + size)


def _leaves(batch):
    if isinstance(batch, Mapping):
        for v in batch.values():
            yield from _leaves(v)
    elif isinstance(batch, (tuple, list)):
        for v in batch:
            yield from _leaves(v)
    else:
        yield batch


def _batch_size(batch) -> int:
    """Examples in a batch, for the per-example scores: every leaf must be a tensor cut along dim 0."""
    leaves = list(_leaves(batch))
    other = next((x for x in leaves if not isinstance(x, torch.Tensor)), None)
    if other is not None or not leaves:
        raise ConfigError(f"per-example scores (sum_abs, fisher) cut batches into examples, so a batch must be "
                          f"tensors (in tuples, lists or dicts); it holds {type(other).__name__}. Use abs_sum, or "
                          f"turn that field into a tensor")
    return len(leaves[0])


def _per_example_losses(loss_fn: LossFn, model: nn.Module, batch) -> torch.Tensor:
    losses = loss_fn(model, batch)
    if losses.ndim != 1:
        raise ConfigError(f"loss_fn must return one loss per example (a 1-D tensor); got shape "
                          f"{tuple(losses.shape)}. Use reduction='none'")
    return losses


def gradient_sums(model: nn.Module, params: Mapping[str, torch.Tensor], batches: Iterable, loss_fn: LossFn,
                  score: str = "abs_sum", chunk_bytes: int = CHUNK_BYTES) -> Scores:
    """Per-entry sums over every example of ``batches``, in fp32: signed gradients for ``abs_sum`` (take
    :func:`saft.mask.finalize_scores` after any sum across processes), |g| for ``sum_abs``, g**2 for ``fisher``.

    The model runs in eval mode (no dropout noise, no BatchNorm statistics update); the modes of its modules
    and every ``.grad`` are as before the call. For fp32 parameters ``abs_sum`` accumulates in ``.grad`` as
    training does, so the pass holds one gradient per eligible entry (plus the running sums for ``sum_abs`` and
    ``fisher``), no more. A parameter stored in another dtype (bf16, fp16) has each batch's gradient added into an
    fp32 sum instead: accumulated in its own dtype, the sum would round differently for every cut of the data.
    ``sum_abs`` and ``fisher`` take each example's gradient with ``torch.func`` (:mod:`saft.per_example`), chunks
    of examples whose gradients fit ``chunk_bytes``, or, for a loss that cannot be vectorised (or
    ``chunk_bytes=0``), one backward per example.
    """
    if score not in SCORES:
        raise ConfigError(f"unknown mask score {score!r}; choose one of {SCORES}")
    every = dict(model.named_parameters())
    saved_grads = {n: p.grad for n, p in every.items()}
    modes = {m: m.training for m in model.modules()}
    low = {n for n, p in params.items() if p.dtype != torch.float32} if score == "abs_sum" else set(params)
    sums = {n: torch.zeros_like(p, dtype=torch.float32) for n, p in params.items() if n in low}  # in params' order
    seen = 0
    vectorised = PerExampleGradients(model, params, loss_fn, chunk_bytes) if score != "abs_sum" and chunk_bytes else None
    model.eval()
    try:
        for p in every.values():
            p.grad = None
        for batch in batches:
            seen += 1
            if score == "abs_sum":  # linear: autograd's own accumulation into .grad is the running sum
                _per_example_losses(loss_fn, model, batch).sum().backward()
                for n in low:
                    if params[n].grad is not None:
                        sums[n].add_(params[n].grad.float())
                        params[n].grad = None
                continue
            size, done = _batch_size(batch), 0
            while vectorised is not None and done < size:
                try:
                    chunk = _slice(batch, done, done + vectorised.chunk_size(_example(batch, 0)))
                    grads = vectorised.grads(chunk)
                except (OtherRows, RuntimeError, NotImplementedError) as error:
                    log.warning("per-example scores: one backward per example from here (the loss cannot be "
                                "vectorised with torch.func: %s)", str(error).splitlines()[0][:200])
                    vectorised = None
                    break
                _accumulate_per_example(sums, grads, score)  # outside the try: a chunk is added whole or not at all
                done += _batch_size(chunk)
            for i in range(done, size):
                _per_example_losses(loss_fn, model, _example(batch, i)).sum().backward()
                accumulate_scores(sums, {n: p.grad for n, p in params.items() if p.grad is not None}, score)
                for p in every.values():
                    p.grad = None
        if score == "abs_sum":
            sums = {n: sums[n] if n in low else p.grad.float() if p.grad is not None
                    else torch.zeros_like(p, dtype=torch.float32) for n, p in params.items()}
    finally:
        for n, p in every.items():
            p.grad = saved_grads[n]
        for m, training in modes.items():
            m.train(training)
    if not seen:
        raise ConfigError("the scoring batches held no example: give select_mask the training data")
    return sums


def _accumulate_per_example(sums: Scores, grads, score: str) -> None:
    grads = {name: g if isinstance(g, tuple) else (None, g) for name, g in grads.items()}
    # Autograd can hand one gradient tensor to two parameters (``a + b``): squared in place for each, it would be
    # squared twice. Such tensors are summed out of place.
    storages = Counter(g.untyped_storage().data_ptr() for _, g in grads.values())
    of = torch.abs if score == "sum_abs" else torch.square
    for name, (rows, g) in grads.items():
        if g.stride(0) == 0:  # one gradient for every example (torch.func expands it): a tensor the loss reads
            term = of(g[0].float()) * len(g)  # without the example, or not at all
        else:
            g = g.detach().float().contiguous()  # contiguous: no two entries share memory
            private = storages[g.untyped_storage().data_ptr()] <= 1
            term = of(g, out=g if private else None).sum(0)  # in place where it may: no second chunk-sized buffer
        if rows is None:
            sums[name].add_(term)
        elif len(rows):  # an embedding: only the rows the loss reads have a gradient (none, if it is not read)
            sums[name].view(sums[name].shape[0], -1).index_add_(0, rows, term.reshape(len(rows), -1))


def select_mask(model: nn.Module, batches: Iterable, loss_fn: LossFn, sparsity: float = 0.001,
                score: str = "abs_sum", scope: str = "global", include: Sequence[str] = (),
                exclude: Sequence[str] = (), *, all_reduce: Optional[Callable[[torch.Tensor], None]] = None) -> Mask:
    """SAFT's mask: the k = round(sparsity * N_eligible) eligible entries with the largest score.

    ``loss_fn(model, batch)`` returns the per-example losses (1-D). Eligible: parameters with
    ``requires_grad`` matching ``include``/``exclude`` (regexes on ``named_parameters()`` names).
    ``scope`` is ``global`` (one top-k over all eligible entries) or ``per_tensor`` (k split by size).
    ``all_reduce`` sums a tensor in place across processes (e.g. ``torch.distributed.all_reduce``), for
    data sharded over ranks. Returns ``{name: sorted LongTensor of flat indices}``, exactly k entries in all.
    """
    check_patterns(include, exclude)
    params = eligible_parameters(model, include, exclude)
    if not params:
        raise ConfigError("no parameter is eligible for the mask: none requires grad and matches "
                          f"include={list(include)} / exclude={list(exclude)}")
    k = num_selected(sparsity, sum(p.numel() for p in params.values()))
    sums = gradient_sums(model, params, batches, loss_fn, score)
    if all_reduce is not None:
        for s in sums.values():
            all_reduce(s)
    return select_topk(finalize_scores(sums, score), k, scope)
