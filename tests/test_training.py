"""Training through the real configs, in-process: the frozen invariant, methods, determinism, resume."""
import csv

import pytest
import torch

from conftest import FAST, changed_entries, checkpoint, ckpt_masks, ckpt_params, compose_cfg, read_results
from saft.app import run
from saft.callback import SparseMaskCallback
from saft.errors import ConfigError
from saft.mask import select_topk

EVERY_STEP = ["checkpoint.every_n_train_steps=1"]


def test_impossible_sparsity_and_low_precision_weights_are_refused(tmp_path):
    with pytest.raises(ConfigError, match="selects round"):
        _train(tmp_path, "tiny_k", ["sparsity=1e-9"])
    with pytest.raises(ConfigError, match="masked methods need fp32 weights"):
        _train(tmp_path, "bf16", ["trainer.precision=bf16-true"])


def _train(tmp_path, name, overrides):
    cfg = compose_cfg(tmp_path / name, FAST + EVERY_STEP + list(overrides))
    return cfg, run.train(cfg)


def _assert_frozen_outside_mask(cfg, out_dir, results):
    ckpt = checkpoint(out_dir)
    assert ckpt["global_step"] == cfg.trainer.max_steps
    masks = ckpt_masks(ckpt)
    k = sum(i.numel() for i in masks.values())
    changed = changed_entries(run.base_state(cfg), ckpt_params(ckpt))
    n_changed = sum(i.numel() for i in changed.values())
    assert 0 < n_changed <= k == results["num_trainable"]
    assert results["num_changed"] == n_changed
    for name, idx in changed.items():
        assert name in masks and torch.isin(idx, masks[name]).all(), f"{name} changed outside the mask"
    return masks


@pytest.mark.parametrize("method", ["saft", "random_mask"])
def test_entries_outside_the_mask_stay_bit_exact(tmp_path, method):
    """AdamW weight decay, gradient clipping and bf16 autocast all on."""
    cfg, results = _train(tmp_path, method, [f"method={method}", "sparsity=0.01", "trainer.precision=bf16-mixed",
                                             "trainer.gradient_clip_val=0.05", "method.optimizer.weight_decay=0.5",
                                             "method.optimizer.lr=0.01"])
    n_eligible = results["num_params"] - 1  # every entry but the frozen logit scale
    assert results["num_trainable"] == round(0.01 * n_eligible)
    _assert_frozen_outside_mask(cfg, tmp_path / method, results)


@pytest.mark.parametrize("score, scope", [("sum_abs", "global"), ("fisher", "per_tensor"), ("abs_sum", "per_tensor")])
def test_every_score_and_scope_trains_exactly_k_entries_of_its_own_mask(tmp_path, score, scope):
    # Several scoring batches: with one batch, sum |g|, sum g^2 and |sum g| rank entries alike.
    common = ["sparsity=0.005", "method.optimizer.lr=0.01", "eval_batch_size=5"]
    cfg, results = _train(tmp_path, "r", common + [f"method.mask.score={score}", f"method.mask.scope={scope}"])
    masks = _assert_frozen_outside_mask(cfg, tmp_path / "r", results)
    _train(tmp_path, "default", common)
    default = ckpt_masks(checkpoint(tmp_path / "default"))
    assert masks.keys() != default.keys() or any(not torch.equal(masks[n], default[n]) for n in masks)
    if scope == "per_tensor":  # every tensor of the towers gets its share of k
        assert len(masks) >= 0.9 * sum(1 for v in run.base_state(cfg).values() if 0.005 * v.numel() >= 1)


def test_eligibility_patterns_restrict_the_mask(tmp_path):
    cfg, results = _train(tmp_path, "r", ["method.mask.include=[resblocks]", "method.mask.exclude=[ln_]",
                                          "sparsity=0.01", "method.optimizer.lr=0.01"])
    masks = _assert_frozen_outside_mask(cfg, tmp_path / "r", results)
    assert all("resblocks" in n and "ln_" not in n for n in masks)
    eligible = sum(v.numel() for n, v in run.base_state(cfg).items() if "resblocks" in n and "ln_" not in n)
    assert results["num_trainable"] == round(0.01 * eligible) == results["mask"]["mask/k"]


def test_full_ft_changes_far_more_and_zeroshot_nothing(tmp_path):
    _, ft = _train(tmp_path, "ft", ["method=full_ft", "method.optimizer.lr=1e-3"])
    _, zs = _train(tmp_path, "zs", ["method=zeroshot"])
    assert ft["num_trainable"] == ft["num_params"] - 1
    assert ft["num_changed"] > 100 * round(0.001 * ft["num_params"])
    assert zs["num_trainable"] == 0 and zs["num_changed"] == 0
    assert set(zs["metrics"]) == {"photo", "sketch", "negative"} and zs["id"] == "photo"
    assert all(m["n"] == 24 for m in zs["metrics"].values())


def test_tower_choice_freezes_the_other_tower(tmp_path):
    cfg, results = _train(tmp_path, "img", ["method=full_ft", "method.towers=[image]", "method.optimizer.lr=1e-3"])
    changed = changed_entries(run.base_state(cfg), ckpt_params(checkpoint(tmp_path / "img")))
    assert changed and all(n.startswith("visual.") for n in changed)


def test_same_seed_same_split_mask_and_metrics_other_seed_differs(tmp_path):
    runs = {name: _train(tmp_path, name, [f"seed={seed}"]) for name, seed in (("a", 1), ("b", 1), ("c", 2))}
    masks = {name: ckpt_masks(checkpoint(tmp_path / name)) for name in runs}
    splits = {name: (tmp_path / name / "split.json").read_text() for name in runs}
    assert splits["a"] == splits["b"] != splits["c"]
    assert masks["a"].keys() == masks["b"].keys()
    assert all(torch.equal(masks["a"][n], masks["b"][n]) for n in masks["a"])
    assert runs["a"][1]["metrics"] == runs["b"][1]["metrics"]


def test_gradient_scores_equal_the_full_batch_gradient(tmp_path):
    """Scores accumulated over small batches equal |gradient of the summed loss over the whole set|."""
    cfg = compose_cfg(tmp_path, FAST + ["eval_batch_size=5"])
    datamodule, module = run.build(cfg)
    module.use_datamodule(datamodule)
    eligible = {n: p for n, p in module.model.named_parameters() if p.requires_grad}
    callback = SparseMaskCallback(sparsity=0.01)
    scores = callback.gradient_scores(datamodule.mask_dataloader(), module, eligible)
    items = datamodule.split["train"]
    images = torch.stack([datamodule.eval_transform(datamodule.load_image(key)) for key, _ in items])
    labels = torch.tensor([label for _, label in items])
    module.zero_grad(set_to_none=True)
    module.eval()
    module.loss((images, labels), reduction="sum").backward()
    for n, p in eligible.items():
        # Summation order differs, so compare at float precision relative to the tensor's scale.
        torch.testing.assert_close(scores[n], p.grad.abs(), rtol=1e-4, atol=1e-4 * p.grad.abs().max().item())
    reference = select_topk({n: p.grad.abs() for n, p in eligible.items()}, 20)
    mask = select_topk(scores, 20)
    overlap = sum(torch.isin(mask[n], reference[n]).sum().item() for n in mask if n in reference)
    assert overlap >= 18  # near-ties may swap under float summation order


def test_mask_statistics_are_logged(tmp_path):
    _, results = _train(tmp_path, "s", [])
    rows = list(csv.DictReader(open(tmp_path / "s" / "csv" / "metrics.csv")))
    logged = next(r for r in rows if r.get("mask/k"))
    assert float(logged["mask/k"]) == results["num_trainable"] == results["mask"]["mask/k"]
    assert float(logged["mask/tower/image"]) + float(logged["mask/tower/text"]) == results["num_trainable"]
    assert any(key.startswith("mask/block/visual.transformer.resblocks.") for key in logged)


@pytest.mark.parametrize("resume_step", [3, 4, 8])
def test_resume_restores_the_mask_and_finishes_identically(tmp_path, monkeypatch, resume_step):
    """24 images, batch 8: 3 steps per epoch. Step 3 ends an epoch; 4 and 8 are mid-epoch."""
    common = ["trainer.max_steps=9", "checkpoint.save_top_k=-1"]
    _train(tmp_path, "full", common)
    mid = tmp_path / "full" / "checkpoints" / f"step_{resume_step:06d}.ckpt"

    def no_recompute(*args, **kwargs):
        raise AssertionError("the mask was recomputed on resume")
    monkeypatch.setattr(SparseMaskCallback, "_select", no_recompute)
    _, resumed_results = _train(tmp_path, "resumed", common + [f"ckpt_path={mid}"])
    full, resumed = checkpoint(tmp_path / "full", "last.ckpt"), checkpoint(tmp_path / "resumed", "last.ckpt")
    assert resumed["global_step"] == full["global_step"] == 9
    assert all(torch.equal(ckpt_masks(full)[n], ckpt_masks(resumed)[n]) for n in ckpt_masks(full))
    final_full, final_resumed = ckpt_params(full), ckpt_params(resumed)
    assert all(torch.equal(final_full[n], final_resumed[n]) for n in final_full)
    assert resumed_results["metrics"] == read_results(tmp_path / "full")["metrics"]


def test_resume_with_another_length_is_refused(tmp_path):
    _train(tmp_path, "a", ["trainer.max_steps=3"])
    with pytest.raises(ConfigError, match="resume with the run's own trainer settings"):
        _train(tmp_path, "b", ["trainer.max_steps=6", f"ckpt_path={tmp_path / 'a' / 'checkpoints' / 'last.ckpt'}"])


def test_gradient_accumulation_keeps_entries_frozen(tmp_path):
    cfg, results = _train(tmp_path, "acc", ["trainer.accumulate_grad_batches=2", "sparsity=0.01",
                                            "method.optimizer.lr=0.01", "trainer.max_steps=3"])
    _assert_frozen_outside_mask(cfg, tmp_path / "acc", results)


def test_after_backward_keeps_only_selected_gradients_so_clipping_sees_only_them(tmp_path):
    cfg = compose_cfg(tmp_path, FAST)
    datamodule, module = run.build(cfg)
    module.use_datamodule(datamodule)
    batch = next(iter(datamodule.mask_dataloader()))
    module.loss(batch).backward()
    dense = {n: p.grad.clone() for n, p in module.model.named_parameters() if p.grad is not None}
    names = ["visual.conv1.weight", "transformer.resblocks.0.mlp.c_fc.weight"]
    params = dict(module.model.named_parameters())
    callback = SparseMaskCallback()
    callback.masks = {n: torch.tensor([0, 5, 17]) for n in names}
    callback._masked = [(params[n], callback.masks[n]) for n in names]
    callback.on_after_backward(None, module)
    for n in names:
        kept = params[n].grad.view(-1)
        assert torch.equal(kept[callback.masks[n]], dense[n].view(-1)[callback.masks[n]])
        assert kept.count_nonzero() <= 3
    expected = torch.cat([dense[n].view(-1)[callback.masks[n]] for n in names]).norm()
    for n, p in params.items():  # what SAFT's freezing does to tensors without selected entries
        if n not in names:
            p.grad = None
    norm = torch.nn.utils.clip_grad_norm_(module.model.parameters(), max_norm=1e-6)
    torch.testing.assert_close(norm, expected)


def test_resume_with_other_mask_settings_is_refused(tmp_path):
    _train(tmp_path, "a", ["trainer.max_steps=6", "checkpoint.save_top_k=-1"])
    with pytest.raises(ConfigError, match="resume with the run's own config"):
        _train(tmp_path, "b", ["trainer.max_steps=6", "sparsity=0.01",
                               f"ckpt_path={tmp_path / 'a' / 'checkpoints' / 'step_000003.ckpt'}"])
