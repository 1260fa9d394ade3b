"""open_clip model loading (tags, local files, seeded random init) and text classifier heads."""
import math
import os
from pathlib import Path
from typing import Optional, Sequence

import open_clip
import torch
import torch.nn.functional as F
import torchvision
from open_clip.transformer import text_global_pool

from saft.app import CONF_DIR
from saft.app.attention import use_batch_first_attention
from saft.errors import ConfigError

# Architectures this project defines (e.g. the tiny test model) live beside the model configs.
MAX_LOGIT_SCALE = math.log(100)  # CLIP caps exp(logit_scale) at 100
ARCH_DIR = CONF_DIR / "model" / "open_clip"
open_clip.add_model_config(ARCH_DIR)


def load_clip(name: str, pretrained: Optional[str] = None, init_seed: int = 0,
              force_quick_gelu: bool = False, batch_first_attention: bool = False):
    """Return ``(model, train_transform, eval_transform, tokenizer)`` for an open_clip architecture.

    ``pretrained`` is an open_clip tag (e.g. ``openai``), a local checkpoint file, or None for a random
    init drawn with ``init_seed`` (the same base model for every training seed). ``batch_first_attention``
    runs the self-attention layers through :class:`saft.app.attention.BatchFirstAttention` (faster with frozen
    projections; off in configs saved before it existed, so their runs evaluate as they trained).
    """
    if name not in open_clip.list_models():
        raise ConfigError(f"unknown open_clip architecture {name!r}; add a JSON config to {ARCH_DIR} "
                          f"or pick one of open_clip.list_models()")
    looks_like_path = pretrained is not None and (os.sep in pretrained or Path(pretrained).suffix)
    if looks_like_path and not Path(pretrained).is_file():
        raise ConfigError(f"model.pretrained={pretrained!r} is not a file; give an existing checkpoint "
                          f"path or an open_clip tag such as 'openai'")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(init_seed)
        try:
            model, train_tf, eval_tf = open_clip.create_model_and_transforms(
                name, pretrained=pretrained, force_quick_gelu=force_quick_gelu)
        except Exception as e:  # open_clip raises bare RuntimeErrors for unreadable or mismatched files
            if not looks_like_path:
                raise
            raise ConfigError(f"cannot load model.pretrained={pretrained} into {name}: "
                              f"{str(e).splitlines()[0][:300]}. The file is truncated, corrupt, not a CLIP "
                              f"state dict, or made for another architecture") from None
    if batch_first_attention:
        use_batch_first_attention(model)
    return model, train_tf, eval_tf, open_clip.get_tokenizer(name)


def no_weight_decay(name: str, p: torch.nn.Parameter) -> bool:
    """open_clip's exclusion rule: gains, biases and the logit scale are not decayed. Decay pulls a
    parameter towards 0, which for the logit scale means towards temperature 1, against what it learns."""
    return p.ndim < 2 or "bn" in name or "ln" in name or "bias" in name or "logit_scale" in name


def augmented_transform(model, scale: Sequence[float], hflip: bool):
    """open_clip's training transform with another crop scale, and a horizontal flip after the crop when asked
    (CoOp's Dassl: random resized crops of scale (0.08, 1) and flips), at the model's size and normalisation."""
    cfg = model.visual.preprocess_cfg
    transform = open_clip.image_transform(cfg["size"], is_train=True, mean=cfg["mean"], std=cfg["std"],
                                          interpolation=cfg["interpolation"], aug_cfg={"scale": tuple(scale)})
    if hflip:
        transform.transforms.insert(1, torchvision.transforms.RandomHorizontalFlip())
    return transform


def tokenize_prompts(tokenizer, classnames: Sequence[str], templates: Sequence) -> torch.Tensor:
    """Tokens of every (class, template) prompt, class-major, as open_clip orders them."""
    texts = [t.format(c) if isinstance(t, str) else t(c) for c in classnames for t in templates]
    return tokenizer(texts)


def prompt_length(model, tokens: torch.Tensor) -> int:
    """How many leading positions decide the prompts' features: through the last prompt's end-of-text token when the
    text tower is causal and pools there (open_clip's CLIP), else the whole context. Under a causal mask no position
    sees the padding after it, so the positions past the longest prompt change nothing but the cost."""
    pool = getattr(model, "text_pool_type", None)
    if getattr(model, "attn_mask", None) is None or pool not in ("argmax", "eos"):
        return tokens.shape[1]
    ends = tokens.argmax(dim=-1) if pool == "argmax" else (tokens == model.text_eos_id).int().argmax(dim=-1)
    return int(ends.max()) + 1 if len(tokens) else tokens.shape[1]


def encode_prompts(model, tokens: torch.Tensor, trim: bool = False, device=None) -> torch.Tensor:
    """``model.encode_text(tokens, normalize=True)``; with ``trim``, over the prompts' own length
    (:func:`prompt_length`): the same features to float rounding, at a fraction of the cost when the prompts are
    shorter than the context (ViT-B/16's 77 tokens; "a photo of a dog." is 7). ``device``: where the tokens go
    once cut (tokens kept on the CPU are measured there, without waiting for an accelerator)."""
    cut = cut_prompts(model, tokens, trim).to(device or tokens.device)
    if cut.shape[1] == tokens.shape[1]:
        return model.encode_text(cut, normalize=True)
    return F.normalize(encode_embedded_text(model, model.token_embedding(cut), cut), dim=-1)


def cut_prompts(model, tokens: torch.Tensor, trim: bool) -> torch.Tensor:
    """``tokens`` cut to :func:`prompt_length` when ``trim`` (on the CPU this waits for no accelerator)."""
    return tokens[:, :prompt_length(model, tokens)] if trim else tokens


def encode_embedded_text(model, embeddings: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """open_clip's ``CLIP.encode_text`` from the token embeddings on (the same operations in the same order, so
    embeddings looked up from ``tokens`` give ``encode_text(tokens)`` bit for bit); ``tokens`` find the pooled
    position. Embeddings shorter than the context run over the first positions of the positional embedding and of
    the causal mask (:func:`encode_prompts`)."""
    cast_dtype = model.transformer.get_cast_dtype()
    position, mask = model.positional_embedding, model.attn_mask
    length = embeddings.shape[1]
    if length < position.shape[0]:
        position, mask = position[:length], mask[:length, :length]
    x = embeddings.to(cast_dtype) + position.to(cast_dtype)
    x = model.transformer(x, attn_mask=mask)
    x = model.ln_final(x)
    x = text_global_pool(x, tokens, model.text_pool_type, eos_token_id=getattr(model, "text_eos_id", None))
    if model.text_projection is not None:
        x = model.text_projection(x) if isinstance(model.text_projection, torch.nn.Linear) else x @ model.text_projection
    return x


def text_head(model, tokens: torch.Tensor, num_classes: int, trim: bool = False, device=None) -> torch.Tensor:
    """Differentiable [embed_dim, num_classes] head: the same math as
    ``open_clip.build_zero_shot_classifier`` (normalise, average templates, normalise) with gradients; ``trim``
    and ``device`` as :func:`encode_prompts`'s."""
    emb = encode_prompts(model, tokens, trim, device)
    emb = emb.reshape(num_classes, -1, emb.shape[-1])
    return F.normalize(emb.mean(dim=1), dim=-1).T
