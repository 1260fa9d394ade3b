"""Self-attention that keeps its batch-first layout, so that a frozen in-projection is still one GEMM.

``nn.MultiheadAttention(batch_first=True)`` transposes its input to (L, N, E) before the in-projection. When the
projection weight is frozen and the input needs a gradient, autograd then computes the input's gradient as a
batched matmul over an expanded copy of the weight instead of one GEMM: a ViT-B/16 block with a frozen
in-projection ran forward and backward 1.5x slower than with a trainable one. SAFT freezes most in-projections,
and the probe, CoOp, BitFit and the frozen towers freeze them all. :class:`BatchFirstAttention` computes the same
attention without the transpose (equal to the stock module to float rounding; tests/test_attention.py); any call
it does not cover (cross-attention, padding masks, attention weights, separate k/v projections) goes to the stock
forward.
"""
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn


class BatchFirstAttention(nn.MultiheadAttention):
    """``nn.MultiheadAttention`` with the same parameters (names, shapes, state dict) and a batch-first
    self-attention path: one in-projection GEMM on (N, L, E), PyTorch's scaled dot-product attention, one
    out-projection GEMM."""

    def forward(self, query, key, value, key_padding_mask=None, need_weights=True, attn_mask=None,
                average_attn_weights=True, is_causal=False):
        mask = self._float_mask(attn_mask, query)
        if not (self.batch_first and self._qkv_same_embed_dim and self.bias_k is None and not self.add_zero_attn
                and query is key and key is value and query.dim() == 3 and key_padding_mask is None
                and not need_weights and not is_causal and mask is not False):
            return super().forward(query, key, value, key_padding_mask=key_padding_mask, need_weights=need_weights,
                                   attn_mask=attn_mask, average_attn_weights=average_attn_weights,
                                   is_causal=is_causal)
        n, length, embed = query.shape
        qkv = F.linear(query, self.in_proj_weight, self.in_proj_bias)
        q, k, v = qkv.view(n, length, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask,
                                             dropout_p=self.dropout if self.training else 0.0)
        out = out.transpose(1, 2).reshape(n, length, embed)
        return F.linear(out, self.out_proj.weight, self.out_proj.bias), None

    @staticmethod
    def _float_mask(attn_mask: Optional[torch.Tensor], query: torch.Tensor):
        """The stock module's (L, L) mask as an additive float mask (a boolean True is a masked position, the
        opposite of SDPA's booleans); ``False`` for a mask this path does not take (3-D, per head, broadcast)."""
        if attn_mask is None:
            return None
        length = query.shape[1]
        if attn_mask.shape != (length, length) or not (attn_mask.dtype == torch.bool or attn_mask.is_floating_point()):
            return False  # the stock module checks (and refuses) other shapes
        if attn_mask.dtype == torch.bool:
            return torch.zeros(attn_mask.shape, dtype=query.dtype, device=query.device).masked_fill_(
                attn_mask, float("-inf"))
        return attn_mask.to(query.dtype)


def use_batch_first_attention(model: nn.Module) -> int:
    """Switch every stock batch-first ``nn.MultiheadAttention`` of ``model`` to :class:`BatchFirstAttention` in
    place (parameters untouched); returns how many were switched."""
    switched = 0
    for m in model.modules():
        if type(m) is nn.MultiheadAttention and m.batch_first:
            m.__class__ = BatchFirstAttention
            switched += 1
    return switched
