"""SAFT for any LightningModule: select the mask at ``on_fit_start``, keep only its gradients after every
backward, and let :class:`saft.optim.MaskedAdamW` write only its entries.

What it needs from the LightningModule:
- ``per_example_loss(batch)``: one loss per example (a 1-D tensor), for gradient masks;
- scoring data: ``mask_dataloader(rank, world_size)`` on the datamodule or the module (this rank's share of
  the training set, fixed order) or else the datamodule's / module's ``train_dataloader()``;
- every optimizer a :class:`MaskedAdamW` (other optimizers would write unselected entries).
The math is in ``saft.select`` and ``saft.mask``.
"""
import logging
from typing import Dict, Optional, Sequence

import pytorch_lightning as pl
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from saft.delta import state_checksum
from saft.errors import ConfigError
from saft.mask import (SCOPES, SCORES, Mask, check_patterns, check_sparsity, flatten_mask, mask_stats, num_selected,
                       random_scores, select_topk, unflatten_mask)
from saft.optim import MaskedAdamW
from saft.select import eligible_parameters, rebatch, select_mask
from saft.sparse_grad import Leaf, SparseGradients

log = logging.getLogger(__name__)
SELECTIONS = ("gradient", "random", "magnitude")


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


class SparseMaskCallback(pl.Callback):
    """Selects exactly k = round(sparsity * N_eligible) entries and lets only those train.

    ``selection=gradient`` scores entries on the whole few-shot training set (SAFT);
    ``selection=random`` draws them uniformly with ``seed`` (the random-mask ablation);
    ``selection=magnitude`` takes the entries of largest pre-trained |weight| (no data seen). Eligible
    entries: parameters of the trained towers matching ``include`` (if given) and no ``exclude`` regex.
    The mask is part of the callback state, so a resumed run restores it instead of recomputing it.
    ``model_attr`` names the LightningModule's attribute that holds the network to sparsify (``None``: the
    LightningModule itself); mask names are relative to it.
    ``sparse_grads``: autograd forms only the k selected entries' gradients (``saft.sparse_grad``; the same
    training to float rounding, without a dense weight gradient); ``False`` keeps the dense gradients and masks
    them after each backward, as runs before the switch did (bit for bit).
    """

    def __init__(self, sparsity: float = 0.001, selection: str = "gradient", score: str = "abs_sum",
                 scope: str = "global", include: Sequence[str] = (), exclude: Sequence[str] = (),
                 seed: int = 0, model_attr: Optional[str] = None, batch_size: Optional[int] = None,
                 sparse_grads: bool = True):
        for value, allowed, key in ((selection, SELECTIONS, "selection"), (score, SCORES, "score"),
                                    (scope, SCOPES, "scope")):
            if value not in allowed:
                raise ConfigError(f"method.mask.{key}={value!r} is not one of {allowed}")
        check_sparsity(sparsity)
        check_patterns(include, exclude)
        self.sparsity, self.selection, self.score, self.scope = float(sparsity), selection, score, scope
        self.include, self.exclude, self.seed, self.model_attr = list(include), list(exclude), seed, model_attr
        if batch_size is not None and (isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1):
            raise ConfigError(f"method.mask.batch_size={batch_size!r} must be a positive integer (or null: the "
                              f"scoring loader's batches)")
        self.batch_size = batch_size  # the scoring pass's batches are cut to this many examples (peak memory)
        self.sparse_grads = bool(sparse_grads)
        self.masks: Optional[Mask] = None
        self.stats: Dict[str, int] = {}
        self._leaves: Dict[torch.nn.Parameter, Leaf] = {}
        self._routing: Optional[SparseGradients] = None
        self._routing_on = False

    @property
    def settings(self):
        return dict(sparsity=self.sparsity, selection=self.selection, score=self.score, scope=self.scope,
                    include=self.include, exclude=self.exclude, seed=self.seed)

    # --- mask selection ----------------------------------------------------------------------------
    def network(self, pl_module: pl.LightningModule) -> torch.nn.Module:
        return getattr(pl_module, self.model_attr) if self.model_attr else pl_module

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        network = self.network(pl_module)
        trainable = {n: p for n, p in network.named_parameters() if p.requires_grad}
        eligible = eligible_parameters(network, self.include, self.exclude)
        if not eligible:
            raise ConfigError("no parameter is eligible for the mask: check method.towers and "
                              "method.mask.include / exclude")
        sizes = {n: p.numel() for n, p in eligible.items()}
        k = num_selected(self.sparsity, sum(sizes.values()))
        if self.masks is None:
            self.masks = self._select(trainer, pl_module, eligible, k)
        self._check(self.masks, sizes, k)
        self.stats = mask_stats(self.masks, sizes)
        # Per-rank fingerprint in each rank's log: masks must be identical on every rank.
        log.info("rank %d: mask of %d entries, sha256 %s", trainer.global_rank, k, state_checksum(self.masks))
        for optimizer in trainer.optimizers:
            if not isinstance(optimizer, MaskedAdamW):
                raise ConfigError(f"a masked method needs saft.optim.MaskedAdamW, which never writes an "
                                  f"unselected entry; got {type(optimizer).__name__}")
            optimizer.set_masks({eligible[n]: idx for n, idx in self.masks.items()})
        # The dense path's gradients to mask after each backward (with sparse gradients there are none).
        self._masked = [] if self.sparse_grads else [(trainable[n], idx.to(pl_module.device))
                                                     for n, idx in self.masks.items()]
        if self.sparse_grads:
            self._leaves = {trainable[n]: Leaf(trainable[n], idx) for n, idx in self.masks.items()}
            for optimizer in trainer.optimizers:
                optimizer.use_sparse_gradients({p: leaf.values for p, leaf in self._leaves.items()})
            self._routing = SparseGradients(self._leaves)
        self._freeze_unselected(trainer, pl_module, trainable)
        if trainer.logger is not None:
            trainer.logger.log_metrics({k_: float(v) for k_, v in self.stats.items()}, step=0)

    @staticmethod
    def _check(masks: Mask, sizes: Dict[str, int], k: int) -> None:
        """Fresh or restored, a mask must hold exactly k distinct, in-range entries of eligible tensors."""
        if set(masks) - set(sizes) or sum(int(i.numel()) for i in masks.values()) != k or any(
                i.numel() and (int(i.min()) < 0 or int(i.max()) >= sizes[n] or not bool((i[1:] > i[:-1]).all()))
                for n, i in masks.items()):
            raise ConfigError(f"the mask does not fit this model and config (it must hold k={k} sorted, distinct "
                              f"entries of eligible tensors; other towers, patterns or sparsity?); resume with the "
                              f"run's own config")

    def _freeze_unselected(self, trainer, pl_module, trainable) -> None:
        """Tensors without a selected entry stop requiring gradients, so autograd computes no weight
        gradient for them (and none of the text tower's when it has no selected entry). DDP fixed its set
        of parameters when it wrapped the model, so the model is wrapped again."""
        for name, p in trainable.items():
            if name not in self.masks:
                p.requires_grad_(False)
        strategy = trainer.strategy
        if isinstance(strategy.model, DistributedDataParallel):
            leaves = {id(p) for p in self._leaves}  # their k gradients are all-reduced after each backward
            DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(
                pl_module, [n for n, p in pl_module.named_parameters() if id(p) in leaves])
            dense = [p for p in pl_module.parameters() if p.requires_grad and id(p) not in leaves]
            if dense:
                strategy.model = strategy._setup_model(pl_module)
                strategy._register_ddp_hooks()
            else:  # nothing left for DDP to reduce (it refuses such a model): the steps call the module itself
                strategy.model = pl_module
            log.info("rank %d: DDP reduces %d dense tensors; the %d masked tensors' %d gradient values are "
                     "all-reduced after each backward", trainer.global_rank, len(dense), len(self._leaves),
                     sum(leaf.idx.numel() for leaf in self._leaves.values()))
        elif trainer.world_size > 1:
            raise ConfigError(f"masked methods support the ddp strategies; got {type(strategy).__name__}")

    def _select(self, trainer, pl_module, eligible, k) -> Mask:
        if self.selection == "random":
            mask = select_topk(random_scores({n: p.shape for n, p in eligible.items()}, self.seed), k, self.scope)
        elif self.selection == "magnitude":
            mask = select_topk({n: p.detach().abs().float().cpu() for n, p in eligible.items()}, k, self.scope)
        else:
            to_device = trainer.strategy.batch_to_device
            batches = self.scoring_batches(trainer, pl_module)
            mask = select_mask(self.network(pl_module), rebatch(batches, self.batch_size) if self.batch_size else batches,
                               lambda _, batch: pl_module.per_example_loss(to_device(batch)), self.sparsity,
                               self.score, self.scope, self.include, self.exclude,
                               all_reduce=dist.all_reduce if _distributed() else None)
        sizes = {n: p.numel() for n, p in eligible.items()}
        flat = flatten_mask(mask, sizes).to(pl_module.device)
        if _distributed():
            # Every rank computed the same selection; rank 0's copy is sent so they cannot differ.
            dist.broadcast(flat, src=0)
        return unflatten_mask(flat.cpu(), sizes)

    @staticmethod
    def scoring_batches(trainer: pl.Trainer, pl_module: pl.LightningModule):
        """This rank's share of the training set: ``mask_dataloader(rank, world_size)`` where defined; else the
        whole training loader on every rank (the sums then count each example world_size times, which
        scales every score alike and leaves the top-k unchanged)."""
        for owner in (trainer.datamodule, pl_module):
            if owner is not None and hasattr(owner, "mask_dataloader"):
                return owner.mask_dataloader(trainer.global_rank, trainer.world_size)
        return (trainer.datamodule or pl_module).train_dataloader()

    # --- training ----------------------------------------------------------------------------------
    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if self._routing is not None and not self._routing_on:
            self._routing.__enter__()
            self._routing_on = True

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self._stop_routing()

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        self._stop_routing()  # a batch Lightning skipped (on_train_batch_start returned -1) has no batch end

    def on_exception(self, trainer, pl_module, exception) -> None:
        self._stop_routing()

    def _stop_routing(self) -> None:
        if self._routing_on:
            self._routing.__exit__(None, None, None)
            self._routing_on = False

    def _reduce_sparse_gradients(self) -> None:
        """Under DDP (which ignores the masked tensors) the k gradients of every masked tensor are averaged over
        the ranks in one collective, after each backward: before fp16's gradient scaler looks for infs, so every
        rank skips or takes the same step. Averaging again what an earlier micro-batch averaged changes nothing
        (to rounding), so accumulated gradients come out as DDP's."""
        if not self._leaves or not _distributed():
            return
        leaves = [leaf.values for leaf in self._leaves.values()]
        # Zeros for a leaf without a gradient, so every rank sends the same collective, plus one flag per leaf: a
        # leaf no rank gave a gradient keeps none (the optimizer skips it, as it does on one device).
        flat = torch.cat([v.grad.reshape(-1) if v.grad is not None else torch.zeros_like(v) for v in leaves]
                         + [torch.tensor([float(v.grad is not None) for v in leaves], dtype=leaves[0].dtype,
                                         device=leaves[0].device)])
        dist.all_reduce(flat)
        parts = flat.split([v.numel() for v in leaves] + [len(leaves)])
        for v, part, flag in zip(leaves, parts, parts[-1].tolist()):
            v.grad = (part / dist.get_world_size()).view_as(v) if flag else None

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        if self._routing is not None:
            self._routing.check()

    def on_fit_end(self, trainer, pl_module) -> None:
        self._stop_routing()
        for optimizer in trainer.optimizers:
            if isinstance(optimizer, MaskedAdamW):
                optimizer.use_dense_gradients()
        if self._leaves:
            DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(pl_module, [])
        self._leaves, self._routing = {}, None

    def on_after_backward(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._reduce_sparse_gradients()
        # Dense path. Linear, so also right for unscaled fp16 grads and for unreduced micro-batch grads.
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
