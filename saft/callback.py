"""Lightning plumbing of SAFT: select the mask at ``on_fit_start``, mask gradients after every backward.

The math lives in ``saft.mask``; the optimizer that never writes an unselected entry in ``saft.optim``.
"""
import logging
from typing import Dict, Optional, Sequence

import pytorch_lightning as pl
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from saft.errors import ConfigError
from saft.delta import state_checksum
from saft.mask import (SCOPES, SCORES, Mask, accumulate_scores, finalize_scores, flatten_mask,
                       is_eligible, mask_stats, num_selected, random_scores, select_topk, unflatten_mask)
from saft.optim import MaskedAdamW

log = logging.getLogger(__name__)
SELECTIONS = ("gradient", "random")


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


class SparseMaskCallback(pl.Callback):
    """Selects exactly k = round(sparsity * N_eligible) entries and lets only those train.

    ``selection=gradient`` scores entries on the whole few-shot training set (SAFT);
    ``selection=random`` draws them uniformly with ``seed`` (the random-mask ablation). Eligible
    entries: parameters of the trained towers matching ``include`` (if given) and no ``exclude`` regex.
    The mask is part of the callback state, so a resumed run restores it instead of recomputing it.
    """

    def __init__(self, sparsity: float = 0.001, selection: str = "gradient", score: str = "abs_sum",
                 scope: str = "global", include: Sequence[str] = (), exclude: Sequence[str] = (),
                 seed: int = 0):
        for value, allowed, key in ((selection, SELECTIONS, "selection"), (score, SCORES, "score"),
                                    (scope, SCOPES, "scope")):
            if value not in allowed:
                raise ConfigError(f"method.mask.{key}={value!r} is not one of {allowed}")
        if not isinstance(sparsity, (int, float)) or not 0 < sparsity <= 1:
            raise ConfigError(f"sparsity={sparsity!r} must be a number in (0, 1], e.g. sparsity=0.001")
        self.sparsity, self.selection, self.score, self.scope = float(sparsity), selection, score, scope
        self.include, self.exclude, self.seed = list(include), list(exclude), seed
        self.masks: Optional[Mask] = None
        self.stats: Dict[str, int] = {}

    @property
    def settings(self):
        return dict(sparsity=self.sparsity, selection=self.selection, score=self.score, scope=self.scope,
                    include=self.include, exclude=self.exclude, seed=self.seed)

    # --- mask selection ----------------------------------------------------------------------------
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        trainable = {n: p for n, p in pl_module.model.named_parameters() if p.requires_grad}
        eligible = {n: p for n, p in trainable.items() if is_eligible(n, self.include, self.exclude)}
        if not eligible:
            raise ConfigError("no parameter is eligible for the mask: check method.towers and "
                              "method.mask.include / exclude")
        sizes = {n: p.numel() for n, p in eligible.items()}
        k = num_selected(self.sparsity, sum(sizes.values()))
        if k < 1:
            raise ConfigError(f"sparsity={self.sparsity} selects round({self.sparsity} x {sum(sizes.values())}) = 0 "
                              f"entries; use sparsity >= {0.5 / sum(sizes.values()):.2g}")
        if self.masks is None:
            self.masks = self._select(trainer, pl_module, eligible, k)
        elif set(self.masks) - set(eligible) or sum(i.numel() for i in self.masks.values()) != k:
            raise ConfigError("the mask restored from the checkpoint does not fit this model and config "
                              "(different towers, patterns or sparsity?); resume with the run's own config")
        self.stats = mask_stats(self.masks, sizes, k)
        # Per-rank fingerprint in each rank's log: masks must be identical on every rank.
        log.info("rank %d: mask of %d entries, sha256 %s", trainer.global_rank, k, state_checksum(self.masks))
        for optimizer in trainer.optimizers:
            if not isinstance(optimizer, MaskedAdamW):
                raise ConfigError(f"a masked method needs saft.optim.MaskedAdamW, which never writes an "
                                  f"unselected entry; got {type(optimizer).__name__}")
            optimizer.set_masks({eligible[n]: idx for n, idx in self.masks.items()})
        self._masked = [(trainable[n], idx.to(pl_module.device)) for n, idx in self.masks.items()]
        self._freeze_unselected(trainer, pl_module, trainable)
        if trainer.logger is not None:
            trainer.logger.log_metrics({k_: float(v) for k_, v in self.stats.items()}, step=0)

    def _freeze_unselected(self, trainer, pl_module, trainable) -> None:
        """Tensors without a selected entry stop requiring gradients, so autograd computes no weight
        gradient for them (and none of the text tower's when it has no selected entry). DDP fixed its set
        of parameters when it wrapped the model, so the model is wrapped again."""
        for name, p in trainable.items():
            if name not in self.masks:
                p.requires_grad_(False)
        strategy = trainer.strategy
        if isinstance(strategy.model, DistributedDataParallel):
            strategy.model = strategy._setup_model(pl_module)
            strategy._register_ddp_hooks()
        elif trainer.world_size > 1:
            raise ConfigError(f"masked methods support the ddp strategies; got {type(strategy).__name__}")

    def _select(self, trainer, pl_module, eligible, k) -> Mask:
        sizes = {n: p.numel() for n, p in eligible.items()}
        if self.selection == "random":
            scores = random_scores({n: p.shape for n, p in eligible.items()}, self.seed)
        else:
            loader = trainer.datamodule.mask_dataloader(trainer.global_rank, trainer.world_size)
            scores = self.gradient_scores(loader, pl_module, eligible, trainer.strategy.batch_to_device)
        flat = flatten_mask(select_topk(scores, k, self.scope), sizes).to(pl_module.device)
        if _distributed():
            # Every rank computed the same selection; rank 0's copy is sent so they cannot differ.
            dist.broadcast(flat, src=0)
        return unflatten_mask(flat.cpu(), sizes)

    def gradient_scores(self, loader, pl_module, eligible, to_device=lambda batch: batch):
        """Scores of one pass over ``loader`` (this rank's share of the whole training set, evaluation
        transforms), in fp32, summed over ranks."""
        was_training = pl_module.training
        pl_module.eval()
        pl_module.zero_grad(set_to_none=True)
        # For abs_sum, autograd's own accumulation into .grad is the running sum: no second buffer.
        scores = {} if self.score == "abs_sum" else {n: torch.zeros_like(p, dtype=torch.float32)
                                                      for n, p in eligible.items()}
        for batch in loader:
            pl_module.loss(to_device(batch), reduction="sum").backward()
            if self.score != "abs_sum":
                accumulate_scores(scores, {n: p.grad for n, p in eligible.items() if p.grad is not None},
                                  self.score)
                pl_module.zero_grad(set_to_none=True)
        if self.score == "abs_sum":
            scores = {n: p.grad.float() if p.grad is not None else torch.zeros_like(p, dtype=torch.float32)
                      for n, p in eligible.items()}
        pl_module.zero_grad(set_to_none=True)
        pl_module.train(was_training)
        if _distributed():
            for s in scores.values():
                dist.all_reduce(s, op=dist.ReduceOp.SUM)
        return finalize_scores(scores, self.score)

    # --- training ----------------------------------------------------------------------------------
    def on_after_backward(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # Linear, so also right for unscaled fp16 grads and for unreduced micro-batch grads.
        for p, idx in self._masked:
            if p.grad is not None:
                flat = p.grad.view(-1)
                kept = flat[idx]
                flat.zero_()
                flat[idx] = kept

    # --- checkpoint state --------------------------------------------------------------------------
    def state_dict(self):
        return {"masks": {n: i.cpu() for n, i in (self.masks or {}).items()}, "settings": self.settings}

    def load_state_dict(self, state_dict):
        if state_dict["settings"] != self.settings:
            raise ConfigError(f"the checkpoint's mask was selected with {state_dict['settings']}, but this "
                              f"run asks for {self.settings}; resume with the run's own config")
        self.masks = dict(state_dict["masks"])
