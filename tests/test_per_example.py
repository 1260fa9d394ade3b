"""The per-example scores (sum_abs, fisher) by torch.func equal one backward per example (the implementation
before it), embedding rows included, and a loss that cannot be vectorised falls back to that loop."""
import logging

import pytest
import torch
from torch import nn

from conftest import FAST, compose_cfg
from saft.app import run
from saft.mask import finalize_scores, select_topk
from saft.per_example import PerExampleGradients
from saft.select import eligible_parameters, gradient_sums


@pytest.fixture(scope="module")
def clip(tmp_path_factory):
    cfg = compose_cfg(tmp_path_factory.mktemp("pe"), FAST)
    datamodule, module = run.build(cfg)
    module.use_datamodule(datamodule)
    return module, list(datamodule.mask_dataloader())


@pytest.mark.parametrize("score", ["sum_abs", "fisher"])
@pytest.mark.parametrize("chunk_bytes", [1 << 29, 1 << 21])  # whole batches, and chunks of a few examples
def test_vectorised_scores_equal_one_backward_per_example(clip, score, chunk_bytes, caplog):
    module, batches = clip
    params = eligible_parameters(module.model)
    loss = lambda _, b: module.per_example_loss(b)  # noqa: E731
    with caplog.at_level(logging.WARNING, logger="saft.select"):
        fast = gradient_sums(module.model, params, batches, loss, score, chunk_bytes=chunk_bytes)
    assert not caplog.records  # no fallback: the vectorised path ran
    if chunk_bytes < 1 << 29:
        assert PerExampleGradients(module.model, params, loss, chunk_bytes).chunk_size(batches[0]) < len(batches[0][1])
    slow = gradient_sums(module.model, params, batches, loss, score, chunk_bytes=0)
    for name in params:
        # (rtol: another summation order; atol: entries whose exact gradient is 0, e.g. the key bias, are rounding noise)
        torch.testing.assert_close(fast[name], slow[name], rtol=1e-4, atol=1e-6 * float(slow[name].abs().max()),
                                   msg=name)
    rows = (slow["token_embedding.weight"] != 0).any(1)
    assert 0 < int(rows.sum()) < rows.numel() // 10  # the prompts read a few rows; the rest score exactly 0
    assert torch.equal((fast["token_embedding.weight"] != 0).any(1), rows)
    k = sum(p.numel() for p in params.values()) // 200
    a, b = select_topk(finalize_scores(fast, score), k), select_topk(finalize_scores(slow, score), k)
    differ = sum(int((~torch.isin(a[n], b[n])).sum()) for n in a) if a.keys() == b.keys() else k
    assert differ <= 2  # at most a float near-tie at the threshold


def test_a_linear_head_leaves_the_text_tower_one_zero_gradient(tmp_path, caplog):
    """Under a linear head the text tower is not read: torch.func expands its zero gradient over the examples, which
    the in-place sums once refused (SAFT with method.head=linear and sum_abs crashed at the mask)."""
    cfg = compose_cfg(tmp_path, FAST + ["+method.head=linear"])
    datamodule, module = run.build(cfg)
    module.use_datamodule(datamodule)
    params, batches = eligible_parameters(module.model), list(datamodule.mask_dataloader())
    loss = lambda _, b: module.per_example_loss(b)  # noqa: E731
    caplog.clear()  # open_clip's warning of a random init
    with caplog.at_level(logging.WARNING, logger="saft.select"):
        fast = gradient_sums(module.model, params, batches, loss, "sum_abs")
    assert not caplog.records  # no fallback: the vectorised path ran
    slow = gradient_sums(module.model, params, batches, loss, "sum_abs", chunk_bytes=0)
    text = [n for n in params if not n.startswith("visual.")]
    assert text and not any(fast[n].any() for n in text)
    for name in params:
        torch.testing.assert_close(fast[name], slow[name], rtol=1e-4, atol=1e-6 * float(slow[name].abs().max()),
                                   msg=name)


def test_a_loss_that_cannot_be_vectorised_falls_back_to_one_backward_per_example(caplog):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 3))
    x, y = torch.randn(10, 4), torch.randint(0, 3, (10,))

    def loss(m, batch):
        inputs, labels = batch
        if float(inputs.sum()) > 1e9:  # data-dependent Python control flow: torch.func cannot batch it
            raise AssertionError
        return nn.functional.cross_entropy(m(inputs), labels, reduction="none")
    params = eligible_parameters(model)
    with caplog.at_level(logging.WARNING, logger="saft.select"):
        fast = gradient_sums(model, params, [(x, y)], loss, "fisher")
    assert "one backward per example" in caplog.text
    slow = gradient_sums(model, params, [(x, y)], loss, "fisher", chunk_bytes=0)
    for name in params:
        torch.testing.assert_close(fast[name], slow[name])


@pytest.mark.parametrize("score", ["sum_abs", "fisher"])
def test_gradients_torch_func_returns_expanded_or_shared(score, caplog):
    """Gradients torch.func returns in shapes the in-place sums once mishandled, each summed as the loop sums it, with
    no fallback and no error: one gradient expanded over the examples (stride 0: a tensor the loss does not read, or
    reads without the example), an embedding whose rows the loss never reads, a gradient whose entries share memory
    (a tensor read through a sum), and one gradient tensor for two parameters added to one output (fisher squared
    it twice)."""
    torch.manual_seed(0)
    model = nn.ModuleDict({"fc": nn.Linear(4, 3), "unused": nn.Linear(4, 2), "unread": nn.Embedding(5, 2)})
    for name, shape in (("offset", 3), ("gain", 3), ("a", (1, 3)), ("b", (1, 3))):  # a, b: the shape of an
        model.register_parameter(name, nn.Parameter(torch.randn(shape)))           # example's logits (no reduction)
    x, y = torch.randn(10, 4), torch.randint(0, 3, (10,))

    def loss(m, batch):
        inputs, labels = batch
        logits = m["fc"](inputs) * m.gain.sum() + m.a + m.b
        return nn.functional.cross_entropy(logits, labels, reduction="none") + (m.offset ** 2).sum()
    params = eligible_parameters(model)
    with caplog.at_level(logging.WARNING, logger="saft.select"):
        fast = gradient_sums(model, params, [(x, y)], loss, score)
    assert not caplog.records  # the vectorised path ran
    slow = gradient_sums(model, params, [(x, y)], loss, score, chunk_bytes=0)
    assert not fast["unused.weight"].any() and not fast["unused.bias"].any() and not fast["unread.weight"].any()
    for name in params:
        torch.testing.assert_close(fast[name], slow[name], msg=name)
    offset = model.offset.detach()
    torch.testing.assert_close(fast["offset"], 10 * (2 * offset).abs() ** (1 if score == "sum_abs" else 2))
    assert fast["a"].sum() > 0 and torch.equal(fast["a"], fast["b"])
