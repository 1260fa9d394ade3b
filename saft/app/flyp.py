"""FLYP (Goyal et al., CVPR 2023, "Finetune like you pretrain"): fine-tune both towers with CLIP's contrastive
loss on (image, class caption) pairs, then classify with the zero-shot head of the fine-tuned text tower."""
from typing import List, Sequence

import numpy as np
import torch
from open_clip.loss import ClipLoss

from saft.app.clip import encode_prompts
from saft.app.heads import LinearHead
from saft.app.module import CLIPClassifier
from saft.errors import ConfigError


class FLYPClassifier(CLIPClassifier):
    """The training loss is open_clip's ``ClipLoss`` between the batch's images and one caption per image: the
    image's class in a template of the dataset's zero-shot head, drawn per image and step. FLYP's data hold every
    (image, template) pair, shuffled, so an image meets a random template each time it is drawn. A caption of the
    same class as another image of the batch is a negative for that image, as in FLYP. Evaluation is the parent's:
    the zero-shot heads re-encoded from the fine-tuned text tower."""

    def __init__(self, model, tokenizer, optimizer=None, towers: Sequence[str] = ("image", "text"), head=None,
                 **kwargs):
        super().__init__(model, tokenizer, optimizer, towers=towers, head=head, **kwargs)
        if head is not None:
            kind = "linear" if isinstance(head, LinearHead) else "prompt"
            raise ConfigError(f"method.head={kind} must be text for method=flyp: FLYP classifies with the zero-shot "
                              f"head of its fine-tuned text tower, e.g. method.head=text")
        if optimizer is not None and not self.text_trains:
            # A frozen text tower would make this another method (contrast against fixed captions), unnoticed when
            # an experiment freezes the towers of every arm.
            raise ConfigError(f"method.towers={list(towers)} must let text parameters train for method=flyp "
                              f"(method.trainable too): its contrastive loss fine-tunes both towers, e.g. "
                              f"method.towers=[image,text,logit_scale]")

    def use_datamodule(self, dm) -> None:
        super().use_datamodule(dm)
        # FLYP's captions come from the templates of its zero-shot head (ImageNet: OpenAI's 80), not from the
        # dataset's train_templates (one for ImageNet, where the parent re-encodes classes x templates each step).
        self.caption_templates, self.caption_seed = list(dm.templates()), dm.seed

    def captions(self, labels: torch.Tensor) -> List[str]:
        """One caption per example. The draw is a function of the seed, the optimizer step and the rank alone, so a
        resumed run draws what the uninterrupted one did."""
        rng = np.random.default_rng((self.caption_seed, self.global_step, self.global_rank))
        picks = rng.integers(len(self.caption_templates), size=len(labels))
        out = []
        for label, pick in zip(labels.tolist(), picks.tolist()):
            template, name = self.caption_templates[pick], self.classnames[label]
            out.append(template.format(name) if isinstance(template, str) else template(name))
        return out

    def loss(self, batch) -> torch.Tensor:
        images, labels = batch
        tokens = self.tokenizer(self.captions(labels))
        image_features = self.model.encode_image(images, normalize=True)
        text_features = encode_prompts(self.model, tokens, self.trim_prompts, self.device)
        # Under DDP the features of every rank are gathered: the loss contrasts the global batch, as FLYP's
        # single-process DataParallel run did. Gradients flow through this rank's own features (open_clip's
        # default), so DDP's average over ranks is the global loss's gradient / world size.
        contrastive = ClipLoss(rank=self.trainer.global_rank, world_size=self.trainer.world_size)
        return contrastive(image_features, text_features, self.logit_scale())

    def per_example_loss(self, batch) -> torch.Tensor:
        raise ConfigError("method.mask.selection=gradient cannot score a mask for method=flyp: the contrastive loss "
                          "has no per-example terms (each image's depends on the whole batch); FLYP fine-tunes every "
                          "entry, e.g. method.mask=null")
