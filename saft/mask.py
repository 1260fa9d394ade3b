"""Pure tensor math of SAFT masks: scores, exact top-k selection, random masks, statistics.

No Lightning here. A mask is a dict ``{param_name: LongTensor}`` of sorted flat indices into the
parameter, holding only parameters with at least one selected entry.
"""
import math
import numbers
import re
import warnings
from collections import Counter
from typing import Dict, List, Mapping, Sequence

import torch

from saft.errors import ConfigError

SCORES = ("abs_sum", "sum_abs", "fisher")
SCOPES = ("global", "per_tensor")
TOWERS = ("image", "text", "logit_scale")

Scores = Dict[str, torch.Tensor]
Mask = Dict[str, torch.Tensor]


def tower_of(name: str) -> str:
    """The tower an open_clip parameter belongs to (CLIP and CustomTextCLIP naming)."""
    if name.startswith("visual."):
        return "image"
    if name in ("logit_scale", "logit_bias"):
        return "logit_scale"
    return "text"


def block_of(name: str) -> str:
    """Group a parameter into the block it lives in, e.g. ``visual.transformer.resblocks.3``."""
    match = re.match(r"(.*?\.resblocks\.\d+)\.", name)
    if match:
        return match.group(1)
    return re.sub(r"\.(weight|bias)$", "", name)


def check_patterns(include: Sequence[str] = (), exclude: Sequence[str] = ()) -> None:
    for pattern in [*include, *exclude]:
        try:
            re.compile(pattern)
        except (re.error, TypeError) as e:
            raise ConfigError(f"mask include/exclude pattern {pattern!r} is not a Python regex: {e}") from None


def is_eligible(name: str, include: Sequence[str] = (), exclude: Sequence[str] = ()) -> bool:
    """Matches an ``include`` regex (when any are given) and no ``exclude`` regex."""
    if include and not any(re.search(p, name) for p in include):
        return False
    return not any(re.search(p, name) for p in exclude)


def accumulate_scores(scores: Scores, grads: Mapping[str, torch.Tensor], score: str) -> None:
    """Add gradients (one example's; for ``abs_sum`` a batch's sum is the same) into the running per-entry
    scores (in place).

    ``abs_sum`` accumulates signed sums (take ``finalize_scores`` after the last batch, and after any
    cross-process sum), ``sum_abs`` accumulates |g| and ``fisher`` accumulates g**2.
    """
    if score not in SCORES:
        raise ValueError(f"unknown mask score {score!r}; choose one of {SCORES}")
    for name, g in grads.items():
        g = g.detach().float()
        term = g if score == "abs_sum" else g.abs() if score == "sum_abs" else g * g
        if name in scores:
            scores[name].add_(term)
        else:
            scores[name] = term.clone()


def finalize_scores(scores: Scores, score: str) -> Scores:
    """|sum g| for ``abs_sum`` (in place); the accumulated values unchanged for the other scores."""
    return {n: s.abs_() if score == "abs_sum" else s for n, s in scores.items()}


def check_sparsity(sparsity) -> None:
    if isinstance(sparsity, bool) or not isinstance(sparsity, numbers.Real) or not 0.0 < sparsity <= 1.0:
        raise ConfigError(f"sparsity={sparsity!r} must be a number in (0, 1], e.g. sparsity=0.001")


def num_selected(sparsity: float, n_eligible: int) -> int:
    """k = round(sparsity * N), the exact number of entries a mask holds (at least 1)."""
    check_sparsity(sparsity)
    k = int(round(sparsity * n_eligible))
    if k < 1:
        # round() takes halves to even, so 0.5 / N would still select nothing; 1 / N selects one entry.
        raise ConfigError(f"sparsity={sparsity} selects round({sparsity} x {n_eligible}) = 0 of the {n_eligible} "
                          f"eligible entries; use sparsity >= {_round_up(1 / n_eligible)}")
    return k


def _round_up(x: float) -> str:
    """``x`` to two significant digits, rounded up, so the value printed is never below ``x``."""
    exponent = math.floor(math.log10(x)) - 1
    return f"{math.ceil(x / 10 ** exponent) * 10 ** exponent:.2g}"


def check_finite(scores: Scores) -> None:
    """A NaN or inf score would make the selection meaningless (NaN compares false with everything)."""
    for name, s in scores.items():
        bad = int((~torch.isfinite(s)).sum())
        if bad:
            raise ConfigError(f"the mask scores of {name} hold {bad} non-finite values (NaN or inf): the loss or "
                              f"its gradient overflowed on the scoring data. Check the inputs and the base weights "
                              f"(a diverged checkpoint?) and that the loss is finite on every example")


def _kth_largest(flats: Sequence[torch.Tensor], k: int, total: int) -> torch.Tensor:
    """The exact k-th largest value across ``flats``. A strided sample of ~1M values gives a bound that
    about 2k entries exceed; only those are ranked (everything, should the sample have misled)."""
    sample = torch.cat([f[:: max(1, total // 2**20)] for f in flats]).float()
    lower = torch.quantile(sample, max(0.0, 1 - 2 * k / total)) if sample.numel() < 2**24 else -math.inf
    candidates = torch.cat([f[f >= lower] for f in flats])
    if candidates.numel() < k:
        candidates = torch.cat(flats)
    return torch.topk(candidates, k, sorted=False).values.min()


def _take_topk(tensors: Sequence[torch.Tensor], k: int) -> List[torch.Tensor]:
    """Flat indices of the k largest values across ``tensors`` (one sorted index tensor per input).

    Ties at the threshold go to the earlier tensor, then the lower index: ``torch.topk`` does not say
    which of equal values it returns, so it only finds the threshold.
    """
    flats = [t.reshape(-1) for t in tensors]
    total = sum(f.numel() for f in flats)
    if k <= 0:
        return [torch.empty(0, dtype=torch.long, device=f.device) for f in flats]
    if k >= total:
        return [torch.arange(f.numel(), device=f.device) for f in flats]
    threshold = _kth_largest(flats, k, total)
    chosen = [torch.nonzero(f > threshold).flatten() for f in flats]
    room = k - sum(c.numel() for c in chosen)
    for i, f in enumerate(flats):
        if room <= 0:
            break
        ties = torch.nonzero(f == threshold).flatten()[:room]
        chosen[i] = torch.sort(torch.cat([chosen[i], ties])).values
        room -= ties.numel()
    return chosen


def _split_k(sizes: Mapping[str, int], k: int) -> Dict[str, int]:
    """Split k across tensors in proportion to their size (largest remainder, sums to exactly k). Integer
    arithmetic, so equal remainders tie exactly and go to the earlier tensor."""
    names, total = list(sizes), sum(sizes.values())
    parts = [divmod(k * sizes[n], total) for n in names]
    out = [quotient for quotient, _ in parts]
    for i in sorted(range(len(names)), key=lambda i: (-parts[i][1], i))[: k - sum(out)]:
        out[i] += 1
    return dict(zip(names, out))


def select_topk(scores: Scores, k: int, scope: str = "global") -> Mask:
    """Exactly k entries with the largest scores: over all tensors (``global``) or with k split across
    tensors by size (``per_tensor``). Deterministic: ties go to the earlier tensor, then lower index."""
    if scope not in SCOPES:
        raise ValueError(f"unknown mask scope {scope!r}; choose one of {SCOPES}")
    check_finite(scores)
    names = list(scores)
    if scope == "per_tensor":
        ks = _split_k({n: scores[n].numel() for n in names}, k)
        chosen = [_take_topk([scores[n]], ks[n])[0] for n in names]
    else:
        chosen = _take_topk([scores[n] for n in names], k)
    mask = {n: idx for n, idx in zip(names, chosen) if idx.numel() > 0}
    selected = sum(int(idx.numel()) for idx in mask.values())
    if selected != min(k, sum(s.numel() for s in scores.values())):
        raise RuntimeError(f"the mask holds {selected} entries instead of k={k}: a bug in saft.mask, please report it")
    zero = sum(int((scores[n].reshape(-1)[idx] == 0).sum()) for n, idx in mask.items())
    if zero:
        warnings.warn(f"{zero} of the {k} selected entries have a score of exactly 0 (no gradient signal); "
                      f"they were taken in parameter order")
    return mask


def random_scores(shapes: Mapping[str, torch.Size], seed: int) -> Scores:
    """Uniform random scores: their top-k is a uniformly random mask drawn with ``seed``."""
    gen = torch.Generator().manual_seed(seed)
    return {n: torch.rand(shape, generator=gen) for n, shape in shapes.items()}


def flatten_mask(mask: Mask, sizes: Mapping[str, int]) -> torch.Tensor:
    """The mask as one sorted vector of indices into the concatenation of ``sizes`` (in order)."""
    parts, offset = [], 0
    for n, size in sizes.items():
        if n in mask:
            parts.append(mask[n].cpu() + offset)
        offset += size
    return torch.cat(parts) if parts else torch.empty(0, dtype=torch.long)


def unflatten_mask(flat: torch.Tensor, sizes: Mapping[str, int]) -> Mask:
    """Inverse of ``flatten_mask``."""
    mask, offset = {}, 0
    for n, size in sizes.items():
        part = flat[(flat >= offset) & (flat < offset + size)] - offset
        if part.numel():
            mask[n] = part
        offset += size
    return mask


def mask_stats(mask: Mask, sizes: Mapping[str, int]) -> Dict[str, int]:
    """k (the entries the mask holds), N and selected entries per tower and per block, as flat ``mask/...``
    keys for a logger."""
    selected = {n: int(idx.numel()) for n, idx in mask.items()}
    stats = {"mask/k": sum(selected.values()), "mask/N": int(sum(sizes.values()))}
    per_tower, per_block = Counter(), Counter()
    for n, count in selected.items():
        per_tower[tower_of(n)] += count
        per_block[block_of(n)] += count
    for tower in TOWERS:
        stats[f"mask/tower/{tower}"] = per_tower.get(tower, 0)
    stats.update({f"mask/block/{b}": c for b, c in sorted(per_block.items())})
    return stats
