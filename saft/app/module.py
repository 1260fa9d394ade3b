"""The LightningModule: an open_clip model classifying images with a text head, and its evaluation."""
import hashlib
import math
from contextlib import contextmanager
from typing import Callable, Dict, NamedTuple, Optional, Sequence, Tuple

import re

import open_clip
import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from torch import nn
from torchmetrics.aggregation import SumMetric
from torchmetrics.classification import MulticlassAccuracy

from saft.app.clip import MAX_LOGIT_SCALE, no_weight_decay, text_head, tokenize_prompts
from saft.app.heads import LinearHead, PromptHead
from datamodules.base import class_positions
from saft.errors import ConfigError
from saft.mask import tower_of
from saft.optim import warmup_cosine


class Head(NamedTuple):
    """A classifier over image features: logits = exp(logit_scale) * features @ text (+ features @ change) (+ bias).
    ``text`` is a [embed_dim, classes] head of class-text embeddings; ``change`` and ``bias`` are a linear head's."""
    text: torch.Tensor
    change: Optional[torch.Tensor] = None
    bias: Optional[torch.Tensor] = None


class CLIPClassifier(pl.LightningModule):
    """Wraps any open_clip model. Logits = exp(logit_scale) * cos(image, class text), the scale clamped
    at ln(100) in the forward (so the stored parameter is never rewritten outside an optimizer step).

    The training head is re-encoded from the class prompts on every step while any text-tower parameter
    trains, so gradients reach the text tower (cost: one text forward and backward over
    n_classes x len(datamodule.train_templates()) prompts per step). Heads that need no gradient (evaluation,
    and training with the text tower frozen) are cached, keyed by the version counters of the text tower's
    tensors: any in-place write through torch (an optimizer step, a checkpoint restore, a delta applied) rebuilds
    them; a write through ``.data`` bypasses the counters and would not.
    BatchNorm layers (ResNet CLIPs) stay in eval mode: few-shot batches are too small to estimate their
    statistics, and running statistics that drift would change the model outside any mask.

    The baselines add a ``head`` (saft.app.heads): a linear probe or CoOp's learned prompt, which replaces the
    text head wherever it applies; ``trainable`` (regexes) narrows the trained parameters (BitFit: biases);
    ``lp_fraction`` makes the first part of training a linear probe (LP-FT): the CLIP gradients are dropped
    after each backward, so the optimizer skips those parameters (no step, no weight decay, no moments).
    ``frozen_features``: the training images are not augmented, so while the image tower is frozen each
    training image's features are computed once, alone, when it is first drawn, and reused (keyed by its bytes).
    ``trim_prompts``: the training prompts, CoOp's prompts (in training and evaluation) and FLYP's captions run
    through the text tower at their own length, not the tokenizer's context (saft.app.clip.encode_prompts); the
    zero-shot heads of the eval sets stay open_clip's.
    """

    flops_per_batch = None  # Lightning's ThroughputMonitor: samples/s and batches/s, FLOPs not counted

    def __init__(self, model: nn.Module, tokenizer: Callable, optimizer: Optional[Callable] = None,
                 towers: Sequence[str] = ("image", "text"), warmup_fraction: float = 0.1, schedule: str = "cosine",
                 identity: Optional[dict] = None, head: Optional[nn.Module] = None,
                 trainable: Sequence[str] = (), lp_fraction: float = 0.0, head_lr: Optional[float] = None,
                 head_weight_decay: Optional[float] = None, probe=None, warmup_lr: Optional[float] = None,
                 decay_exclusions: str = "open_clip", frozen_features: bool = False,
                 trim_prompts: bool = False):
        super().__init__()
        self.model, self.tokenizer, self.optimizer_factory = model, tokenizer, optimizer
        self.warmup_fraction, self.schedule, self.identity = warmup_fraction, schedule, identity
        self.head, self.lp_fraction, self.head_lr, self.head_weight_decay = head, lp_fraction, head_lr, head_weight_decay
        self.probe = probe  # fits the linear head before training (LP-FT: saft.app.probe.ConvexProbe)
        self.warmup_lr, self.decay_exclusions = warmup_lr, decay_exclusions
        self.restore_from: Optional[str] = None  # the checkpoint fit is asked to resume from; no other may load
        # Decided here, before any DDP wrap: DDP fixes the set of parameters that need gradients.
        for name, p in self.model.named_parameters():
            p.requires_grad_(optimizer is not None and tower_of(name) in towers
                             and (not trainable or any(re.search(r, name) for r in trainable)))
        if head is not None:
            head.requires_grad_(optimizer is not None)
        self.results: Dict[str, Dict[str, float]] = {}
        self._heads: Dict[str, Tuple[tuple, torch.Tensor]] = {}
        self._columns: Dict[str, Optional[list]] = {}  # eval set -> its classes' columns of the linear head
        self.probe_steps = 0  # LP-FT: optimizer steps of the linear-probe phase (set with the schedule)
        self.zero_shot = False  # True: evaluate with the text head (the reference before training)
        self.frozen_features, self.trim_prompts = frozen_features, trim_prompts
        self._features: Optional[Dict[bytes, torch.Tensor]] = None  # image bytes -> features, while fitting

    @contextmanager
    def text_head_only(self):
        """Evaluate the CLIP model's own prompt-ensemble heads, whatever head the method trains."""
        self.zero_shot = True
        try:
            yield
        finally:
            self.zero_shot = False

    # --- heads -------------------------------------------------------------------------------------
    def setup(self, stage: str) -> None:
        self.use_datamodule(self.trainer.datamodule)

    def use_datamodule(self, dm) -> None:
        """Training class prompts, eval sets and their metrics come from the datamodule."""
        self.classnames = dm.classnames()
        self.train_tokens = tokenize_prompts(self.tokenizer, self.classnames, dm.train_templates())
        self.eval_sets = dm.eval_sets()
        self.test_acc = nn.ModuleDict({s.name: MulticlassAccuracy(len(s.classnames), average="micro")
                                       for s in self.eval_sets})
        self.test_n = nn.ModuleDict({s.name: SumMetric() for s in self.eval_sets})
        self.val_acc = MulticlassAccuracy(len(self.classnames), average="micro")
        self._heads.clear()  # heads belong to the class names and templates they were built from
        self._columns.clear()

    def _text_tensors(self):
        return [t for name, t in self.model.state_dict(keep_vars=True).items() if tower_of(name) == "text"]

    @property
    def text_trains(self) -> bool:
        # Asked each step: a SAFT mask without text entries freezes the whole text tower at fit start.
        return any(t.requires_grad for t in self._text_tensors())

    def _cached_head(self, key: str, build: Callable[[], torch.Tensor]) -> torch.Tensor:
        """``build()`` once per state of the text tower (and the learned prompt): the key holds each tensor's
        identity and version."""
        tensors = self._text_tensors() + (list(self.head.parameters()) if isinstance(self.head, PromptHead) else [])
        state = tuple((id(t), t._version) for t in tensors)
        if key not in self._heads or self._heads[key][0] != state:
            with torch.no_grad():
                self._heads[key] = (state, build())
        return self._heads[key][1]

    def train_head(self) -> Head:
        """The head of the training classes."""
        if isinstance(self.head, PromptHead):
            build = lambda: self.head(self.model, self.classnames, self.trim_prompts)  # noqa: E731
            return Head(build() if torch.is_grad_enabled() else self._cached_head("train", build))
        if isinstance(self.head, LinearHead):  # the ID set's zero-shot head plus the linear head's change
            return Head(self._zero_shot_head(0), self.head.change(), self.head.bias)
        build = lambda: text_head(self.model, self.train_tokens, len(self.classnames),  # noqa: E731
                                  self.trim_prompts, self.device)
        return Head(build() if self.text_trains and torch.is_grad_enabled() else self._cached_head("train", build))

    def _zero_shot_head(self, index: int) -> torch.Tensor:
        s = self.eval_sets[index]
        return self._cached_head(f"eval/{s.name}", lambda: open_clip.build_zero_shot_classifier(
            self.model, self.tokenizer, s.classnames, s.templates, device=self.device))

    def eval_head(self, index: int) -> Head:
        """The set's zero-shot head, or what the method's head makes of it. The linear head's change is added
        to each set's own zero-shot logits (one head when the sets share templates, as ImageNet's variants do),
        so that a head of zero change, and WiSE-FT at alpha=0, is the zero-shot model on every set."""
        s = self.eval_sets[index]
        if not self.zero_shot and isinstance(self.head, PromptHead):
            return Head(self._cached_head(f"prompt/{s.name}", lambda: self.head(self.model, s.classnames,
                                                                                     self.trim_prompts)))
        columns = self._linear_columns(s)
        if columns is not None:
            return Head(self._zero_shot_head(index), self.head.change()[:, columns], self.head.bias[columns])
        return Head(self._zero_shot_head(index))

    def _linear_columns(self, s) -> Optional[list]:
        """Where an eval set's classes sit among the linear head's, when the head knows them all (ImageNet-A and -R
        hold 200 of the 1,000: their logits are the head's 200 columns, as in wise-ft); else None."""
        if self.zero_shot or not isinstance(self.head, LinearHead):
            return None
        if s.name not in self._columns:  # asked at every test batch: worked out once per set
            own = s.classes is not None and list(self.head.classnames) == list(self.classnames)
            self._columns[s.name] = s.classes if own else class_positions(self.head.classnames, s.classnames)
        return self._columns[s.name]

    def head_kind(self, s) -> str:
        """Which head evaluated an eval set (results.json records it): ``prompt`` (CoOp's), ``linear`` (the probe,
        restricted to the set's classes), or ``text`` (the prompt-ensemble head of the text tower)."""
        if not self.zero_shot and isinstance(self.head, PromptHead):
            return "prompt"
        return "linear" if self._linear_columns(s) is not None else "text"

    def on_train_epoch_start(self) -> None:
        for m in self.model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.eval()

    # --- forward and loss --------------------------------------------------------------------------
    def forward(self, images: torch.Tensor, head: Head) -> torch.Tensor:
        features = self._image_features(images)
        logits = self.logit_scale() * features @ head.text.to(features.dtype)
        if head.change is not None:
            logits = logits + features @ head.change.to(features.dtype)
        return logits if head.bias is None else logits + head.bias.to(logits.dtype)

    def logit_scale(self) -> torch.Tensor:
        return self.model.logit_scale.clamp(max=MAX_LOGIT_SCALE).exp()

    def _image_features(self, images: torch.Tensor) -> torch.Tensor:
        if self._features is None or not self.training:
            return self.model.encode_image(images, normalize=True)
        keys = [_image_key(image) for image in images]
        with torch.no_grad():  # each image alone: its features do not depend on the images beside it in a batch
            for key, image in zip(keys, images):
                if key not in self._features:
                    self._features[key] = self.model.encode_image(image[None], normalize=True)[0]
        return torch.stack([self._features[key] for key in keys])

    def on_fit_end(self) -> None:
        self._features = None

    def on_fit_start(self) -> None:
        image_frozen = not any(p.requires_grad for n, p in self.model.named_parameters() if tower_of(n) == "image")
        self._features = {} if self.frozen_features and image_frozen and not self.lp_fraction else None
        # A fresh linear head starts as the references' does; a resumed one keeps what its checkpoint restored.
        if isinstance(self.head, LinearHead) and self.restore_from is None:
            self.head.initialise(self.logit_scale().detach() * self._zero_shot_head(0))
            if self.probe is not None:
                self.probe.fit(self)

    def loss(self, batch, reduction: str = "mean") -> torch.Tensor:
        images, labels = batch
        return F.cross_entropy(self(images, self.train_head()), labels, reduction=reduction)

    def on_after_backward(self) -> None:
        if self.global_step < self.probe_steps:  # LP-FT's probe phase: CLIP is not stepped (see the class doc)
            for group in self.trainer.optimizers[0].param_groups:  # CLIP's tensors, or a mask's leaves in their place
                if not group.get("head"):
                    for p in group["params"]:
                        p.grad = None

    def per_example_loss(self, batch) -> torch.Tensor:
        """Cross-entropy of each example: what SAFT's mask scores are summed from."""
        return self.loss(batch, reduction="none")

    def training_step(self, batch, batch_idx):
        loss = self.loss(batch)
        # Decided on every rank together: a rank that raised alone would leave the others waiting in DDP's
        # all-reduce until a timeout.
        if not self.trainer.strategy.reduce_boolean_decision(bool(torch.isfinite(loss)), all=True):
            # Raised before the optimizer step: the last checkpoint on disk is the last good state.
            raise ConfigError(f"the training loss became non-finite (this rank: {loss.item()}) at step "
                              f"{self.global_step}; lower method.optimizer.lr. Checkpoints written so far are intact")
        self.log("train/loss", loss, prog_bar=True)
        return loss

    # --- evaluation --------------------------------------------------------------------------------
    def validation_step(self, batch, batch_idx):
        images, labels = batch
        self.val_acc.update(self(images, self.eval_head(0)), labels)

    def on_validation_epoch_end(self):
        self.log("val/top1", 100 * self.val_acc.compute(), prog_bar=True, sync_dist=True)  # equal on all ranks
        self.val_acc.reset()

    def test_step(self, batch, batch_idx, dataloader_idx: int = 0):
        images, labels = batch
        name = self.eval_sets[dataloader_idx].name
        self.test_acc[name].update(self(images, self.eval_head(dataloader_idx)), labels)
        self.test_n[name].update(torch.tensor(float(labels.numel()), device=self.device))

    def on_test_epoch_end(self):
        self.results = {}
        for s in self.eval_sets:
            top1 = 100 * self.test_acc[s.name].compute().item()
            self.results[s.name] = {"top1": top1, "n": int(self.test_n[s.name].compute().item()),
                                    "head": self.head_kind(s)}
            self.test_acc[s.name].reset()
            self.test_n[s.name].reset()
        prefix = "zeroshot" if self.zero_shot else "test"  # the reference before training is not the run's test
        self.log_dict({f"{prefix}/{n}/top1": r["top1"] for n, r in self.results.items()}, sync_dist=True)

    # --- checkpoints -------------------------------------------------------------------------------
    def on_save_checkpoint(self, checkpoint) -> None:
        # Read back before a resume (saft.app.run.check_resume): another config cannot continue this training.
        checkpoint["saft_run"] = self.identity

    def on_load_checkpoint(self, checkpoint) -> None:
        # The evaluated model is the one this process trained or rebuilt: Lightning also loads checkpoints nobody
        # asked for (under SLURM, any hpc_ckpt in its default_root_dir, for fit and test alike).
        if self.restore_from is None or self.trainer.state.fn != "fit":
            raise RuntimeError(f"Lightning was about to load a checkpoint into the model during "
                               f"{self.trainer.state.fn} (step {checkpoint.get('global_step')}) that this run did "
                               f"not ask for; a stray hpc_ckpt_*.ckpt in {self.trainer.default_root_dir}?")

    # --- optimisation ------------------------------------------------------------------------------
    def configure_optimizers(self):
        decay, no_decay = [], []
        for name, p in self.model.named_parameters():
            if p.requires_grad:
                # open_clip's trainer: no weight decay on gains, biases and the logit scale; wise-ft decays all.
                exempt = self.decay_exclusions == "open_clip" and no_weight_decay(name, p)
                (no_decay if exempt else decay).append(p)
        groups = [{"params": decay}, {"params": no_decay, "weight_decay": 0.0}]
        if self.head is not None:  # dense: a masked optimizer trains the whole head beside the masked model
            decay_head = {} if self.head_weight_decay is None else {"weight_decay": self.head_weight_decay}
            groups.append({"params": list(self.head.parameters()), "head": True, "dense": True, **decay_head})
        optimizer = self.optimizer_factory([g for g in groups if g["params"]])
        if self.lp_fraction:
            return self._probe_then_tune(optimizer, max(1, int(self.trainer.estimated_stepping_batches)))
        if self.schedule == "constant":
            return optimizer
        total = max(1, int(self.trainer.estimated_stepping_batches))
        warmup = int(round(self.warmup_fraction * total))
        scheduler = warmup_cosine(optimizer, total, warmup, self.warmup_lr)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step", "name": "train/lr"}}

    def _probe_then_tune(self, optimizer, total: int):
        """LP-FT's two phases in one schedule: the head alone at ``head_lr`` for the first ``probe_steps``, then
        every trained parameter at the optimizer's lr; ``schedule`` (warm-up + cosine, or constant) restarts
        with each phase."""
        self.probe_steps = int(round(self.lp_fraction * total))
        if not 0 < self.probe_steps < total:
            raise ConfigError(f"method.lp_fraction={self.lp_fraction} of {total} training steps leaves "
                              f"{self.probe_steps} probe steps and {total - self.probe_steps} fine-tuning steps; "
                              f"LP-FT needs at least one of each: train longer or choose another lp_fraction")

        def shape(step: int, length: int) -> float:
            if self.schedule == "constant":
                return 1.0
            warmup = int(round(self.warmup_fraction * length))
            if step < warmup:
                return (step + 1) / (warmup + 1)
            return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, length - warmup)))

        def clip_factor(step: int) -> float:
            return 0.0 if step < self.probe_steps else shape(step - self.probe_steps, total - self.probe_steps)

        def head_factor(step: int, lr: float) -> float:
            return (self.head_lr / lr * shape(step, self.probe_steps) if step < self.probe_steps
                    else clip_factor(step))
        factors = [(lambda s, lr=g["lr"]: head_factor(s, lr)) if g.get("head") else clip_factor
                   for g in optimizer.param_groups]
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, factors)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step", "name": "train/lr"}}


def _image_key(image: torch.Tensor) -> bytes:
    """The image's bytes (any dtype, bf16 included), shape and dtype, hashed."""
    data = image.detach().contiguous().cpu()
    digest = hashlib.blake2b(data.view(torch.uint8).numpy().tobytes(), digest_size=16)
    digest.update(f"{tuple(data.shape)} {data.dtype}".encode())
    return digest.digest()
