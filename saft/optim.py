"""An AdamW that updates only the selected entries of each parameter and keeps state only for them.

Why not torch's AdamW with masked gradients: decoupled weight decay multiplies every parameter that has
a gradient, so frozen entries would drift. Here an entry outside the mask is never written, whatever the
weight decay, and the moment buffers hold k values instead of a dense copy of the model.
"""
import math
from typing import Dict, Iterable, Mapping, Optional

import torch

from saft.errors import ConfigError


class MaskedAdamW(torch.optim.Optimizer):
    """AdamW (decoupled weight decay, as ``torch.optim.AdamW``) restricted to masked entries.

    The mask arrives after construction through ``set_masks`` (Lightning builds optimizers before
    ``on_fit_start``, where the SAFT callback selects the mask). Parameters without a mask entry are
    never touched, except in a param group marked ``dense=True`` (e.g. a classifier head beside the masked
    model), whose parameters are updated in full, as ``torch.optim.AdamW`` would.
    """

    def __init__(self, params: Iterable, lr: float = 1e-3, betas=(0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 1e-2):
        if lr < 0 or eps < 0 or weight_decay < 0 or not all(0 <= b < 1 for b in betas):
            raise ValueError(f"invalid MaskedAdamW hyper-parameters lr={lr} betas={betas} eps={eps} "
                             f"weight_decay={weight_decay}")
        super().__init__(params, dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay))
        self.masks: Optional[Dict[torch.Tensor, torch.Tensor]] = None
        self.targets: Dict[torch.Tensor, torch.Tensor] = {}  # leaf of k gradients -> the parameter it updates

    @classmethod
    def from_mask(cls, model: torch.nn.Module, mask: Mapping[str, torch.Tensor], **kwargs) -> "MaskedAdamW":
        """An optimizer over the parameters of ``model`` that ``mask`` (``{name: flat indices}``, as
        :func:`saft.select_mask` returns) selects entries of, with its mask set. ``kwargs``: lr, betas, eps,
        weight_decay (decay applies to the selected entries only)."""
        params = dict(model.named_parameters())
        unknown = sorted(set(mask) - set(params))
        if unknown:
            raise ConfigError(f"the mask names parameters this model does not have: {unknown[:3]}")
        for name, idx in mask.items():
            _check_indices(name, params[name], idx)
        optimizer = cls([params[n] for n in mask], **kwargs)
        optimizer.set_masks({params[n]: idx for n, idx in mask.items()})
        return optimizer

    def set_masks(self, masks: Dict[torch.Tensor, torch.Tensor]) -> None:
        """``{parameter: sorted flat indices}``; every parameter must belong to this optimizer."""
        own = {p for group in self.param_groups for p in group["params"]}
        dense = {p for group in self.param_groups if group.get("dense") for p in group["params"]}
        if any(p in dense for p in masks):
            raise ValueError("a masked parameter is in a dense param group; a parameter is either masked or dense")
        if any(p not in own for p in masks):
            raise ValueError("a masked parameter is not in this optimizer's parameter groups "
                             "(is its tower frozen?)")
        if any(not p.is_contiguous() for p in masks):
            raise ConfigError("a masked parameter is not contiguous in memory (channels_last?): mask indices are "
                              "flat row-major positions; call model.to(memory_format=torch.contiguous_format)")
        self.masks = {p: idx.to(p.device) for p, idx in masks.items()}

    def use_sparse_gradients(self, leaves: Dict[torch.Tensor, torch.Tensor]) -> None:
        """``{masked parameter: leaf}``, a leaf being a tensor of the parameter's k selected entries whose
        ``.grad`` holds their gradients (:mod:`saft.sparse_grad`). Each leaf takes its parameter's place in the
        param groups, so clipping, gradient scaling and ``zero_grad`` see the k gradients and the state dict keeps
        its layout (a dense run's checkpoint resumes here and back); the step writes the parameter."""
        self._swap(leaves)
        self.targets.update({leaf: p for p, leaf in leaves.items()})

    def use_dense_gradients(self) -> None:
        """Undoes :meth:`use_sparse_gradients`: the parameters are back in their places, with their state."""
        self._swap(self.targets)
        self.targets = {}

    def _swap(self, places: Dict[torch.Tensor, torch.Tensor]) -> None:
        for group in self.param_groups:
            group["params"] = [places.get(p, p) for p in group["params"]]
        for old, new in places.items():
            if old in self.state:
                self.state[new] = self.state.pop(old)

    @torch.no_grad()
    def step(self, closure=None):
        if self.masks is None:
            raise RuntimeError("MaskedAdamW.step() was called before set_masks(): add the SAFT mask "
                               "callback (saft.callback.SparseMaskCallback) to the trainer")
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            lr, (beta1, beta2), eps, wd = group["lr"], group["betas"], group["eps"], group["weight_decay"]
            for p in group["params"]:
                target = self.targets.get(p, p)
                idx = slice(None) if group.get("dense") else self.masks.get(target)
                if idx is None or p.grad is None:
                    continue
                flat = target.view(-1)
                grad = p.grad if target is not p else p.grad.reshape(-1)[idx]
                state = self.state[p]
                if not state:
                    state["step"] = torch.tensor(0.0)
                    state["exp_avg"] = torch.zeros_like(grad, memory_format=torch.preserve_format)
                    state["exp_avg_sq"] = torch.zeros_like(grad, memory_format=torch.preserve_format)
                state["step"] += 1
                step = state["step"].item()
                exp_avg, exp_avg_sq = state["exp_avg"], state["exp_avg_sq"]
                # Same operations, in the same order, as torch's single-tensor AdamW.
                value = flat[idx]
                if wd != 0:
                    value.mul_(1 - lr * wd)
                exp_avg.lerp_(grad, 1 - beta1)
                exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
                step_size = lr / (1 - beta1 ** step)
                denom = (exp_avg_sq.sqrt() / (1 - beta2 ** step) ** 0.5).add_(eps)
                value.addcdiv_(exp_avg, denom, value=-step_size)
                flat[idx] = value
        return loss


def _check_indices(name: str, param: torch.Tensor, idx) -> None:
    """A mask entry must be sorted, distinct, in-range flat indices into a parameter that trains."""
    problem = None
    if not isinstance(idx, torch.Tensor) or idx.ndim != 1 or idx.dtype.is_floating_point or idx.dtype == torch.bool:
        shape = tuple(idx.shape) if isinstance(idx, torch.Tensor) else type(idx).__name__
        problem = (f"is {shape} of {getattr(idx, 'dtype', '')}, not a 1-D tensor of flat integer indices "
                   f"(a boolean mask m becomes m.flatten().nonzero().flatten())")
    elif idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= param.numel()):
        problem = f"holds indices outside [0, {param.numel()}), the parameter's number of entries"
    elif idx.numel() > 1 and not bool((idx[1:] > idx[:-1]).all()):
        problem = "is not sorted without repeats (torch.unique(idx) gives that)"
    elif not param.requires_grad:
        problem = "selects entries of a parameter that does not require grad (frozen): they would never train"
    if problem:
        raise ConfigError(f"mask[{name!r}] {problem}")


def warmup_cosine(optimizer, total: int, warmup: int, warmup_lr: Optional[float] = None):
    """A warm-up over ``warmup`` steps, then cosine decay to 0 at step ``total``. The warm-up is linear, or, with
    ``warmup_lr``, constant at that learning rate (Dassl's ConstantWarmupScheduler, which CoOp uses)."""
    if warmup_lr is not None and warmup > 0:
        def factor(step: int, lr: float) -> float:
            if step < warmup:
                return warmup_lr / lr
            return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))
        return torch.optim.lr_scheduler.LambdaLR(optimizer, [(lambda step, lr=g["lr"]: factor(step, lr))
                                                             for g in optimizer.param_groups])
    cosine = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(1, total - warmup))
    if warmup == 0:
        return cosine
    warm = torch.optim.lr_scheduler.LinearLR(optimizer, 1.0 / (warmup + 1), total_iters=warmup)
    return torch.optim.lr_scheduler.SequentialLR(optimizer, [warm, cosine], milestones=[warmup])
