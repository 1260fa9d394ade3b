"""Contrastive pretraining of a small CLIP on captioned, styled Fashion-MNIST (the CPU benchmark's base).

The optimisation follows open_clip's trainer (``src/open_clip_train/main.py`` and ``train.py``): AdamW with
no weight decay on gains, biases and the logit scale, and a learned temperature clamped in place to
[0, ln 100] after every optimizer step. The token embedding stays at its random init (see
``ContrastivePretraining``); open_clip trains it unless told to lock the text tower.

The result is an ordinary open_clip checkpoint file, loaded through ``model.pretrained`` like any other.
``model.pretrained=auto`` with a ``model.pretrain`` block names the file after a hash of that block in
``$SAFT_CACHE_DIR`` (default ``~/.cache/saft``) and builds it there when it is missing. Rebuild with
``python -m saft.app.pretrain`` (or delete the file).
"""
import hashlib
import json
import logging
import os
from pathlib import Path
from typing import Dict, Mapping

import numpy as np
import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from omegaconf import DictConfig, OmegaConf
from torch.utils.data import DataLoader, Dataset

from datamodules.base import key_rng
from datamodules.fmnist_styles import CLASSNAMES, STYLES, caption, load_fashion_mnist, render
from saft.atomic import atomic_path
from saft.app import CONF_DIR
from saft.app.clip import MAX_LOGIT_SCALE, load_clip, no_weight_decay
from saft.app.progress import progress_bars
from saft.app.signals import StopOnSignal, owned
from saft.errors import ConfigError
from saft.optim import warmup_cosine

log = logging.getLogger(__name__)

# The training recipe's version, part of every cache name: a change to how pretraining trains (not only to its
# settings) must not be served a file the old code built. 1: weight decay 0.1 on every parameter, the
# temperature among them, which the decay held near its init of 1/0.07. 2: open_clip's weight-decay
# exclusions and clamp.
RECIPE_VERSION = 2
WEIGHT_DECAY = 0.1


def cache_path(name: str, spec: Mapping) -> Path:
    """The cached checkpoint of ``name`` pretrained with ``spec``: named by a hash of the settings that change
    the weights (where the data comes from does not), the recipe's version included even when ``spec`` does
    not name it, so that no file of an older recipe matches."""
    spec = {"version": RECIPE_VERSION, **{k: v for k, v in spec.items() if k not in ("data_dir", "download")}}
    digest = hashlib.sha256(json.dumps({"arch": name, **spec}, sort_keys=True).encode()).hexdigest()[:12]
    return cache_root() / f"{name}-{digest}.pt"


def cache_root() -> Path:
    """Where built artifacts are kept between runs: ``$SAFT_CACHE_DIR``, by default ``~/.cache/saft``."""
    return Path(os.environ.get("SAFT_CACHE_DIR", Path.home() / ".cache" / "saft"))


class StyledCaptions(Dataset):
    """Item i: training image i mod n in a style drawn (with ``style_weights``) from i and the seed, and
    the index of its caption "a <style> of a <class>." among len(STYLES) x 10 captions."""

    def __init__(self, images, labels, style_weights: Mapping[str, float], seed: int, length: int, transform):
        self.images, self.labels, self.transform, self.length, self.seed = images, labels, transform, length, seed
        weights = np.array([style_weights.get(s, 0.0) for s in STYLES], dtype=np.float64)
        self.cumulative = np.cumsum(weights / weights.sum())

    def __len__(self):
        return self.length

    def __getitem__(self, i):
        rng = key_rng(f"pretrain/{self.seed}/{i}")
        style = int(np.searchsorted(self.cumulative, rng.random(), side="right").clip(0, len(STYLES) - 1))
        n = i % len(self.images)
        image = render(self.images[n], STYLES[style], rng)
        return self.transform(image), style * len(CLASSNAMES) + int(self.labels[n])


class ContrastivePretraining(pl.LightningModule):
    """CLIP's two-way contrastive loss over the 50 distinct captions: images -> captions is a 50-way
    cross-entropy; captions -> images spreads each caption's target over every image carrying it (plain
    CLIP loss would treat identical captions in a batch as negatives)."""

    def __init__(self, model, tokens: torch.Tensor, lr: float, steps: int, warmup: int):
        super().__init__()
        self.model, self.lr, self.steps, self.warmup = model, lr, steps, warmup
        self.register_buffer("tokens", tokens)
        # The token embedding (6.3 M of the 8.2 M entries) stays at its random init: 50 fixed captions need
        # no new word vectors, and skipping it halves the optimizer's work on a CPU.
        model.token_embedding.weight.requires_grad_(False)

    def training_step(self, batch, batch_idx):
        images, captions = batch
        image = self.model.encode_image(images, normalize=True)
        text = self.model.encode_text(self.tokens, normalize=True)
        # No clamp here: optimizer_step keeps the stored parameter within [0, ln 100], as open_clip does.
        logits = self.model.logit_scale.exp() * image @ text.T
        to_text = F.cross_entropy(logits, captions)
        present = torch.unique(captions)
        targets = (captions[None, :] == present[:, None]).float()
        to_image = F.cross_entropy(logits.T[present], targets / targets.sum(1, keepdim=True))
        loss = (to_text + to_image) / 2
        self.log("pretrain/loss", loss, prog_bar=True)
        return loss

    def configure_optimizers(self):
        trained = [(n, p) for n, p in self.model.named_parameters() if p.requires_grad]
        groups = [{"params": [p for n, p in trained if no_weight_decay(n, p)], "weight_decay": 0.0},
                  {"params": [p for n, p in trained if not no_weight_decay(n, p)], "weight_decay": WEIGHT_DECAY}]
        optimizer = torch.optim.AdamW(groups, lr=self.lr)
        schedule = warmup_cosine(optimizer, self.steps, self.warmup)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}

    def optimizer_step(self, *args, **kwargs):
        """The step, then open_clip's clamp of the learned temperature. Here rather than in another hook:
        Lightning calls on_before_zero_grad inside the closure, after this batch's forward and before its
        backward, so before the step; on_train_batch_end comes after the callbacks' own (a checkpoint there
        would save an unclamped scale). This hook wraps optimizer.step() itself."""
        super().optimizer_step(*args, **kwargs)
        with torch.no_grad():
            self.model.logit_scale.clamp_(0, MAX_LOGIT_SCALE)


def pretrain(name: str, out: Path, data_dir: str, steps: int, batch_size: int, lr: float, seed: int,
             style_weights: Mapping[str, float], train_size: int = 50000, download: bool = False,
             version: int = RECIPE_VERSION) -> Path:
    """Train ``name`` from a seeded random init and save it as an open_clip checkpoint at ``out``.
    ``version`` is the recipe's (``RECIPE_VERSION``); only the current one can be built."""
    if version != RECIPE_VERSION:
        raise ConfigError(f"model.pretrain.version={version}: this code builds only recipe version "
                          f"{RECIPE_VERSION} (older recipes were replaced, see saft/app/pretrain.py)")
    log.info("pretraining %s for %d steps into %s (once; it is cached)", name, steps, out)
    pl.seed_everything(seed, workers=True)
    model, train_tf, _, tokenizer = load_clip(name, None, init_seed=seed)
    images, labels, _, _ = load_fashion_mnist(data_dir, download)
    data = StyledCaptions(images[:train_size], labels[:train_size], style_weights, seed, steps * batch_size, train_tf)
    tokens = tokenizer([caption(s, c) for s in STYLES for c in CLASSNAMES])
    module = ContrastivePretraining(model, tokens, lr, steps, warmup=max(1, steps // 20))
    trainer = pl.Trainer(max_steps=steps, accelerator="auto", devices=1, logger=False, enable_checkpointing=False,
                         enable_model_summary=False, enable_progress_bar=True, gradient_clip_val=1.0,
                         callbacks=[StopOnSignal(), *progress_bars()])  # a signal: exit non-zero, nothing cached
    with owned():
        trainer.fit(module, DataLoader(data, batch_size=batch_size, shuffle=False, num_workers=0))
    out.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(out) as tmp:
        torch.save({"state_dict": model.state_dict()}, tmp)
    return out


def resolve_pretrained(model_cfg: Mapping) -> Dict:
    """Arguments for ``load_clip``: ``pretrained=auto`` becomes the cached file, built if missing."""
    if isinstance(model_cfg, DictConfig):
        model_cfg = OmegaConf.to_container(model_cfg, resolve=True)
    # trim_prompts is how the module runs the text tower (run.build), not how the model is built
    args = {k: v for k, v in model_cfg.items() if k not in ("pretrain", "trim_prompts")}
    spec = model_cfg.get("pretrain")
    if args.get("pretrained") == "auto":
        if not spec:
            raise ConfigError("model.pretrained=auto needs a model.pretrain block (see conf/model/fmnist_clip.yaml)")
        spec = dict(spec)
        path = cache_path(args["name"], spec)
        if not path.is_file():
            pretrain(args["name"], path, **spec)
        args["pretrained"] = str(path)
    return args


def main() -> None:
    """Rebuild the benchmark's pretrained CLIP with the settings of conf/model/fmnist_clip.yaml."""
    from hydra import compose, initialize_config_dir
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose(config_name="train", overrides=["model=fmnist_clip"])
    spec = OmegaConf.to_container(cfg.model.pretrain, resolve=True)
    path = cache_path(cfg.model.name, spec)
    pretrain(cfg.model.name, path, **spec)
    print(path)


if __name__ == "__main__":
    main()
