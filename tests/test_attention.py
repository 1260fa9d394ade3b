"""BatchFirstAttention computes what nn.MultiheadAttention computes, with any projection frozen or trainable."""
import copy

import pytest
import torch
from torch import nn

from saft.app.attention import BatchFirstAttention, use_batch_first_attention
from saft.app.clip import load_clip

TOL = dict(rtol=1e-5, atol=1e-6)


def _pair(frozen_in_proj: bool, seed: int = 0):
    torch.manual_seed(seed)
    stock = nn.MultiheadAttention(32, 4, batch_first=True)
    stock.in_proj_weight.requires_grad_(not frozen_in_proj)
    fast = copy.deepcopy(stock)
    assert use_batch_first_attention(fast) == 1 and type(fast) is BatchFirstAttention
    return stock, fast


def _run(attn, x, mask):
    x = x.clone().requires_grad_(True)
    out = attn(x, x, x, need_weights=False, attn_mask=mask)[0]
    (out * torch.linspace(-1, 1, out.numel()).view_as(out)).sum().backward()
    grads = {n: p.grad for n, p in attn.named_parameters() if p.requires_grad}
    return out.detach(), x.grad, grads


@pytest.mark.parametrize("frozen", [True, False])
@pytest.mark.parametrize("mask", ["none", "causal_float", "causal_bool"])
def test_outputs_and_every_gradient_match_the_stock_module(frozen, mask):
    stock, fast = _pair(frozen)
    x = torch.randn(3, 7, 32)
    masks = {"none": None, "causal_bool": torch.ones(7, 7, dtype=torch.bool).triu(1),
             "causal_float": torch.full((7, 7), float("-inf")).triu(1)}  # open_clip's text mask
    a, b = _run(stock, x, masks[mask]), _run(fast, x, masks[mask])
    torch.testing.assert_close(b[0], a[0], **TOL)
    torch.testing.assert_close(b[1], a[1], **TOL)
    assert b[2].keys() == a[2].keys() and ("in_proj_weight" in a[2]) is not frozen
    for name in a[2]:
        torch.testing.assert_close(b[2][name], a[2][name], **TOL)


def test_calls_it_does_not_cover_take_the_stock_path_bit_for_bit():
    stock, fast = _pair(False)
    q, kv = torch.randn(2, 5, 32), torch.randn(2, 6, 32)
    padding = torch.zeros(2, 5, dtype=torch.bool)
    padding[:, -1] = True
    per_head = torch.zeros(2 * 4, 5, 5)
    for args, kwargs in (((q, kv, kv), {}), ((q, q, q), {"key_padding_mask": padding}),
                         ((q, q, q), {"need_weights": True}), ((q, q, q), {"attn_mask": per_head})):
        a, b = stock(*args, **kwargs), fast(*args, **kwargs)
        assert torch.equal(a[0], b[0]) and (a[1] is None) == (b[1] is None)


def test_load_clip_switches_every_attention_and_keeps_the_state_dict():
    stock = load_clip("saft-tiny", None, 0)[0]
    fast = load_clip("saft-tiny", None, 0, batch_first_attention=True)[0]
    kinds = {type(m) for m in fast.modules() if isinstance(m, nn.MultiheadAttention)}
    assert kinds == {BatchFirstAttention} and sum(isinstance(m, nn.MultiheadAttention) for m in fast.modules()) == 4
    a, b = stock.state_dict(), fast.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_the_whole_model_trains_the_same_with_most_of_it_frozen():
    """SAFT's situation: a few tensors train, every in-projection is frozen, the input needs a gradient."""
    stock = load_clip("saft-tiny", None, 0)[0]
    fast = load_clip("saft-tiny", None, 0, batch_first_attention=True)[0]
    images, tokens = torch.randn(4, 3, 32, 32), torch.randint(1, 400, (6, 16))
    grads = []
    for model in (stock, fast):
        for name, p in model.named_parameters():
            p.requires_grad_(name.endswith(("conv1.weight", "mlp.c_fc.weight", "token_embedding.weight")))
        logits = model.encode_image(images, normalize=True) @ model.encode_text(tokens, normalize=True).T
        logits.logsumexp(-1).sum().backward()
        grads.append({n: p.grad for n, p in model.named_parameters() if p.requires_grad})
    assert len(grads[0]) == 2 + 4  # conv1, the token embedding and the MLPs of saft-tiny's 2 + 2 blocks
    for name in grads[0]:
        torch.testing.assert_close(grads[1][name], grads[0][name], **TOL)


def test_bf16_autocast_and_eval_mode_match_the_stock_module():
    stock, fast = _pair(True)
    x = torch.randn(2, 9, 32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        a, b = stock(x, x, x, need_weights=False)[0], fast(x, x, x, need_weights=False)[0]
    assert a.dtype == b.dtype == torch.bfloat16
    torch.testing.assert_close(b.float(), a.float(), rtol=2e-2, atol=2e-2)  # bf16's 8-bit mantissa
    stock.eval(), fast.eval()
    with torch.no_grad():  # the stock module's own inference fast path
        torch.testing.assert_close(fast(x, x, x, need_weights=False)[0], stock(x, x, x, need_weights=False)[0], **TOL)
