"""Prompts trimmed to their own length (model.trim_prompts) encode as open_clip's full-context encode_text does."""
import pytest
import torch

from saft.app.clip import encode_prompts, load_clip, prompt_length, text_head, tokenize_prompts
from saft.app.heads import PromptHead
from tests.conftest import FAST, compose_cfg

TOL = dict(rtol=1e-5, atol=1e-6)
CLASSES = ["circle", "square", "ankle boot"]
TEMPLATES = ("a photo of a {}.", "a picture of a {} shape.")


def _model(batch_first: bool = True):
    model, _, _, tokenizer = load_clip("saft-tiny", None, 0, batch_first_attention=batch_first)
    return model, tokenizer


def _text_grads(model, features):
    model.zero_grad()
    (features * torch.linspace(-1, 1, features.numel()).view_as(features)).sum().backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("batch_first", [True, False])
def test_trimmed_features_and_gradients_equal_the_full_context_ones(batch_first):
    model, tokenizer = _model(batch_first)
    tokens = tokenize_prompts(tokenizer, CLASSES, TEMPLATES)
    length = prompt_length(model, tokens)
    assert length == int(tokens.argmax(dim=-1).max()) + 1 < tokens.shape[1]  # the test trims something
    full = model.encode_text(tokens, normalize=True)
    trimmed = encode_prompts(model, tokens, trim=True)
    torch.testing.assert_close(trimmed, full, **TOL)
    assert not torch.equal(trimmed, full) or length == tokens.shape[1]  # another computation, not the same one
    a, b = _text_grads(model, full), _text_grads(model, encode_prompts(model, tokens, trim=True))
    assert a.keys() == b.keys() and "positional_embedding" in a
    for name in a:  # float32 sums in another order: each tensor's gradient agrees to 1e-5 of its largest entry
        assert (b[name] - a[name]).abs().max() <= 1e-5 * a[name].abs().max(), name
    # positions past the longest prompt get no gradient either way: the causal mask hides them
    assert not b["positional_embedding"][length:].any() and not a["positional_embedding"][length:].any()


def test_untrimmed_prompts_are_open_clips_encode_text_bit_for_bit():
    model, tokenizer = _model()
    tokens = tokenize_prompts(tokenizer, CLASSES, TEMPLATES)
    assert torch.equal(encode_prompts(model, tokens, trim=False), model.encode_text(tokens, normalize=True))
    head = text_head(model, tokens, len(CLASSES))
    assert torch.equal(head, text_head(model, tokens, len(CLASSES), trim=False))
    torch.testing.assert_close(text_head(model, tokens, len(CLASSES), trim=True), head, **TOL)


def test_a_tower_that_is_not_causal_or_pools_elsewhere_keeps_the_whole_context():
    model, tokenizer = _model()
    tokens = tokenize_prompts(tokenizer, CLASSES, TEMPLATES)
    model.text_pool_type = "last"  # the pooled position is the context's last one: every position matters
    assert prompt_length(model, tokens) == tokens.shape[1]
    assert torch.equal(encode_prompts(model, tokens, trim=True), model.encode_text(tokens, normalize=True))
    model.text_pool_type = "argmax"
    model.attn_mask = None  # no causal mask: every position sees the padding
    assert prompt_length(model, tokens) == tokens.shape[1]


def test_coops_trimmed_prompts_give_the_same_head_and_context_gradient():
    model, tokenizer = _model()
    head = PromptHead(model, tokenizer, n_ctx=4)
    assert prompt_length(model, head.tokens(CLASSES)) < tokenizer.context_length
    grads = []
    for trim in (False, True):
        head.ctx.grad = None
        out = head(model, CLASSES, trim=trim)
        (out * torch.linspace(-1, 1, out.numel()).view_as(out)).sum().backward()
        grads.append((out.detach(), head.ctx.grad.clone()))
    torch.testing.assert_close(grads[1][0], grads[0][0], **TOL)
    assert (grads[1][1] - grads[0][1]).abs().max() <= 1e-5 * grads[0][1].abs().max()


@pytest.mark.parametrize("setting", [None, False])
def test_the_model_config_switch_reaches_the_training_head(tmp_path, setting):
    from saft.app.run import build
    overrides = [] if setting is None else [f"model.trim_prompts={str(setting).lower()}"]
    datamodule, module = build(compose_cfg(tmp_path, FAST + ["method=full_ft_text"] + overrides))
    module.use_datamodule(datamodule)
    trim = setting is None  # on in every model config; false: the whole context
    assert module.trim_prompts is trim
    tokens, n = module.train_tokens, len(module.classnames)
    expected = {t: text_head(module.model, tokens, n, trim=t) for t in (False, True)}
    assert not torch.equal(expected[False], expected[True])  # the two paths can be told apart
    assert torch.equal(module.train_head().text, expected[trim])


@pytest.mark.parametrize("trim", [True, False])
def test_coops_training_and_eval_heads_take_the_switch(tmp_path, trim):
    from saft.app.run import build
    datamodule, module = build(compose_cfg(tmp_path, FAST + ["method=coop", "method.n_ctx=4",
                                                             f"model.trim_prompts={str(trim).lower()}"]))
    module.use_datamodule(datamodule)
    for names, head in ((module.classnames, module.train_head()), (module.eval_sets[1].classnames,
                                                                    module.eval_head(1))):
        expected = {t: module.head(module.model, names, trim=t) for t in (False, True)}
        assert not torch.equal(expected[False], expected[True])
        assert torch.equal(head.text, expected[trim])


def test_a_run_with_trimmed_prompts_trains_as_the_full_context_run_does(tmp_path):
    """SAFT with text entries in its mask (per_tensor), so the text tower runs every step: the same mask (up to a
    near-tie), the same weights to float rounding."""
    from saft.app import run
    from tests.conftest import checkpoint, ckpt_masks, ckpt_params
    common = FAST + ["sparsity=0.01", "method.mask.scope=per_tensor", "eval_zeroshot=false"]
    runs = {}
    for trim in (True, False):
        results = run.train(compose_cfg(tmp_path / str(trim), common + [f"model.trim_prompts={str(trim).lower()}"]))
        runs[trim] = results, checkpoint(tmp_path / str(trim))
    masks, other = ckpt_masks(runs[True][1]), ckpt_masks(runs[False][1])
    assert any(n.startswith(("transformer", "token_embedding", "positional_embedding")) for n in masks)
    assert masks.keys() == other.keys()
    swapped = sum(len(set(masks[n].tolist()) ^ set(other[n].tolist())) for n in masks)
    assert swapped <= 2  # a float near-tie at the threshold at most
    a, b = ckpt_params(runs[True][1]), ckpt_params(runs[False][1])
    assert a.keys() == b.keys()
    differ = False
    for n in a:
        x, y = a[n].reshape(-1), b[n].reshape(-1)
        selected = [torch.zeros(len(x), dtype=torch.bool) for _ in range(2)]
        if n in masks:
            selected[0][masks[n]], selected[1][other[n]] = True, True
        assert torch.equal(x[~(selected[0] | selected[1])], y[~(selected[0] | selected[1])]), n  # frozen in both
        both = selected[0] & selected[1]
        torch.testing.assert_close(x[both], y[both], rtol=0, atol=1e-6, msg=n)  # Adam steps of ~lr; rounding only
        differ |= not torch.equal(x[both], y[both])
    assert differ  # the switch took effect: another computation
    for name, m in runs[True][0]["metrics"].items():
        assert abs(m["top1"] - runs[False][0]["metrics"][name]["top1"]) <= 100 / m["n"]
