"""Trainable classifier heads of the baselines: a linear probe on the image features and CoOp's learned prompt.

Both are ``nn.Module``s beside the CLIP model (never inside it: the delta, the mask and ``num_changed`` stay about
CLIP's own entries) and are saved with a run as ``head.safetensors``.
"""
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from saft.app.clip import cut_prompts, encode_embedded_text
from saft.errors import ConfigError


class LinearHead(nn.Module):
    """The robust fine-tuning papers' classifier (wise-ft's ``ClassificationHead``): logits = image features @
    ``weight`` + ``bias`` on the normalised features, ``weight`` ([embed_dim, classes]) starting at exp(logit_scale) x
    the zero-shot text head and ``bias`` at zero. So its gradients, its learning rate and its weight decay (towards
    zero) are the references'.

    ``start`` keeps the weight it started from. The module computes the logits as the zero-shot logits plus
    ``features @ (weight - start) + bias``: equal to the references' up to rounding, and exactly the zero-shot model at
    the start (``weight - start`` is then 0 bit for bit), and so at WiSE-FT's alpha=0 (alpha blends ``start`` and
    ``weight``). On an eval set whose classes are some of its own it takes their columns; other sets keep the text
    head (saft.app.module)."""

    def __init__(self, embed_dim: int, classnames: Sequence[str]):
        super().__init__()
        self.classnames = list(classnames)
        self.weight = nn.Parameter(torch.zeros(embed_dim, len(classnames)))
        self.bias = nn.Parameter(torch.zeros(len(classnames)))
        self.register_buffer("start", torch.zeros(embed_dim, len(classnames)))

    @torch.no_grad()
    def initialise(self, start: torch.Tensor) -> None:
        """Start at ``start`` (the scaled zero-shot head of the training classes), with no bias."""
        self.start.copy_(start)
        self.weight.copy_(start)
        self.bias.zero_()

    def change(self) -> torch.Tensor:
        """``weight - start``: what training added to the zero-shot head, in logits per unit of feature."""
        return self.weight - self.start


class PromptHead(nn.Module):
    """CoOp (Zhou et al., 2022): ``n_ctx`` learned context vectors replace the prompt's words, the class name
    comes last ("[SOS] ctx_1 ... ctx_n classname. [EOS]"), and the class head is the normalised text features of
    these prompts. ``ctx_init`` ("a photo of a") starts the context at those words' token embeddings, so
    the initial prompt encodes exactly as the text "a photo of a <class>." does; otherwise the context is drawn
    from N(0, 0.02²) as in CoOp."""

    def __init__(self, model: nn.Module, tokenizer, n_ctx: int = 16, ctx_init: Optional[str] = None):
        super().__init__()
        missing = [a for a in ("token_embedding", "positional_embedding", "transformer", "ln_final", "attn_mask")
                   if not hasattr(model, a)]
        if missing:
            raise ConfigError(f"method=coop needs an open_clip CLIP with its own text transformer; this model has "
                              f"no {', '.join(missing)} (a Hugging Face text tower cannot take learned context)")
        self.tokenizer = tokenizer
        embedding = model.token_embedding
        if ctx_init is not None:
            length = tokenizer.context_length
            tokens = tokenizer([ctx_init], context_length=4 * length)
            n_ctx = int(tokens.argmax(dim=-1)) - 1  # the words between [SOS] and [EOS]
            if not 0 < n_ctx <= length - 3:
                raise ConfigError(f"method.ctx_init={ctx_init!r} has {n_ctx} tokens; it must have at least one and "
                                  f"leave room for a class name in the {length}-token text context, "
                                  f"e.g. method.ctx_init='a photo of a'")
            tokens = tokens[:, :length]
            with torch.no_grad():
                ctx = embedding(tokens.to(embedding.weight.device))[0, 1:1 + n_ctx].clone()
            self.prefix_text, self.init_text = ctx_init, True
        else:
            self.init_text = False
            ctx = torch.empty(n_ctx, embedding.weight.shape[1]).normal_(std=0.02)
            self.prefix_text = " ".join(["X"] * n_ctx)  # placeholders whose embeddings are replaced
        self.n_ctx = n_ctx
        self.ctx = nn.Parameter(ctx.float())
        self._tokens = {}

    def tokens(self, classnames: Sequence[str]) -> torch.Tensor:
        key = tuple(classnames)
        if key not in self._tokens:
            texts = [f"{self.prefix_text} {c}." for c in classnames]
            length = self.tokenizer.context_length
            tokens = self.tokenizer(texts, context_length=4 * length)  # long enough to count what would be cut
            needed = int((tokens > 0).sum(dim=-1).max())
            if needed > length:
                fix = (f"shorten method.ctx_init by {needed - length} tokens or more" if self.init_text else
                       f"lower method.n_ctx by {needed - length} or more, e.g. "
                       f"method.n_ctx={max(1, self.n_ctx - (needed - length))}")
                raise ConfigError(f"CoOp's prompt of {self.n_ctx} context tokens plus the longest class name "
                                  f"({max(classnames, key=len)!r}) needs {needed} tokens and this model's text context "
                                  f"holds {length}; {fix}")
            self._tokens[key] = tokens[:, :length].contiguous()
        return self._tokens[key]

    def forward(self, model: nn.Module, classnames: Sequence[str], trim: bool = False) -> torch.Tensor:
        """The [embed_dim, classes] head of ``classnames`` under the learned prompt (differentiable in ``ctx``);
        ``trim``: the prompts run at their own length (saft.app.clip.encode_prompts)."""
        tokens = cut_prompts(model, self.tokens(classnames), trim).to(self.ctx.device)
        words = model.token_embedding(tokens)
        ctx = self.ctx.to(words.dtype).unsqueeze(0).expand(len(classnames), -1, -1)
        embeddings = torch.cat([words[:, :1], ctx, words[:, 1 + self.n_ctx:]], dim=1)
        return F.normalize(encode_embedded_text(model, embeddings, tokens), dim=-1).T


def build_head(method, model: nn.Module, tokenizer, classnames: Sequence[str], embed_dim: int) -> Optional[nn.Module]:
    """The head ``method.head`` names (``text``: none, the prompt-ensemble text head of the CLIP model)."""
    kind = method.get("head", "text")
    if kind == "linear":
        return LinearHead(embed_dim, classnames)
    if kind == "prompt":
        return PromptHead(model, tokenizer, method.get("n_ctx", 16), method.get("ctx_init"))
    return None
