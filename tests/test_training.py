"""Training through the real configs, in-process: the frozen invariant, methods, determinism (resume: test_resume.py)."""
import csv

import pytest
import torch

from conftest import FAST, changed_entries, checkpoint, ckpt_masks, ckpt_params, compose_cfg
from saft.app import run
from saft.errors import ConfigError
from saft.select import gradient_sums

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
    assert k == results["num_trainable"] == results["mask"]["mask/k"]  # the mask holds exactly k entries
    assert 0 < n_changed <= k
    assert results["num_changed"] == n_changed
    for name, idx in changed.items():
        assert name in masks and torch.isin(idx, masks[name]).all(), f"{name} changed outside the mask"
    return masks


@pytest.mark.parametrize("method", ["saft", "random_mask", "magnitude_mask"])
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


def test_magnitude_mask_holds_the_largest_pretrained_weights(tmp_path):
    from saft.mask import tower_of
    cfg, results = _train(tmp_path, "mag", ["method=magnitude_mask", "sparsity=0.01"])
    masks = ckpt_masks(checkpoint(tmp_path / "mag"))
    base = run.base_state(cfg)
    eligible = [n for n, _ in run.load_clip("saft-tiny", None, 0)[0].named_parameters() if tower_of(n) in ("image", "text")]

    def unpicked(name):
        keep = torch.ones(base[name].numel(), dtype=torch.bool)
        keep[masks.get(name, torch.tensor([], dtype=torch.long))] = False
        return base[name].reshape(-1).abs()[keep]
    picked = torch.cat([base[n].reshape(-1)[masks[n]].abs() for n in masks])
    others = torch.cat([unpicked(n) for n in eligible])
    assert picked.numel() == results["num_trainable"] == round(0.01 * (picked.numel() + others.numel()))
    assert picked.min() >= others.max()  # top-k of |weight| (ties at the threshold may go either way)


def test_eligibility_patterns_restrict_the_mask(tmp_path):
    cfg, results = _train(tmp_path, "r", ["method.mask.include=[resblocks]", "method.mask.exclude=[ln_]",
                                          "sparsity=0.01", "method.optimizer.lr=0.01"])
    masks = _assert_frozen_outside_mask(cfg, tmp_path / "r", results)
    assert all("resblocks" in n and "ln_" not in n for n in masks)
    eligible = sum(v.numel() for n, v in run.base_state(cfg).items() if "resblocks" in n and "ln_" not in n)
    assert results["num_trainable"] == round(0.01 * eligible) == results["mask"]["mask/k"]


def test_full_ft_changes_far_more_and_zeroshot_nothing(tmp_path):
    _, ft = _train(tmp_path, "ft", ["method=full_ft_text", "method.optimizer.lr=1e-3"])
    _, zs = _train(tmp_path, "zs", ["method=zeroshot"])
    assert ft["num_trainable"] == ft["num_params"] - 1
    assert ft["num_changed"] > 100 * round(0.001 * ft["num_params"])
    assert zs["num_trainable"] == 0 and zs["num_changed"] == 0
    assert set(zs["metrics"]) == {"photo", "sketch", "negative"} and zs["id"] == "photo"
    assert all(m["n"] == 24 for m in zs["metrics"].values())


def test_tower_choice_freezes_the_other_tower(tmp_path):
    cfg, results = _train(tmp_path, "img", ["method=full_ft_text", "method.towers=[image]", "method.optimizer.lr=1e-3"])
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


def test_abs_sum_scores_equal_the_full_batch_gradient_for_any_batching(tmp_path):
    """|sum g| summed over small batches equals |gradient of the summed loss over the whole set|."""
    cfg = compose_cfg(tmp_path, FAST)
    datamodule, module = run.build(cfg)
    module.use_datamodule(datamodule)
    eligible = {n: p for n, p in module.model.named_parameters() if p.requires_grad}
    items = datamodule.split["train"]
    images = torch.stack([datamodule.eval_transform(datamodule.load_image(key)) for key, _ in items])
    labels = torch.tensor([label for _, label in items])
    module.eval()
    full = dict(zip(eligible, torch.autograd.grad(module.loss((images, labels), reduction="sum"),
                                                  list(eligible.values()))))
    for size in (5, 24):
        batches = [(images[i:i + size], labels[i:i + size]) for i in range(0, len(items), size)]
        sums = gradient_sums(module.model, eligible, batches, lambda _, b: module.per_example_loss(b))
        for n, g in full.items():
            # Summation order differs, so compare at float precision relative to the tensor's scale.
            torch.testing.assert_close(sums[n].abs(), g.abs(), rtol=1e-4, atol=1e-4 * g.abs().max().item())


def test_mask_statistics_are_logged(tmp_path):
    _, results = _train(tmp_path, "s", [])
    rows = list(csv.DictReader(open(tmp_path / "s" / "csv" / "metrics.csv")))
    logged = next(r for r in rows if r.get("mask/k"))
    assert float(logged["mask/k"]) == results["num_trainable"] == results["mask"]["mask/k"]
    assert float(logged["mask/tower/image"]) + float(logged["mask/tower/text"]) == results["num_trainable"]
    assert any(key.startswith("mask/block/visual.transformer.resblocks.") for key in logged)


def test_gradient_accumulation_keeps_entries_frozen(tmp_path):
    cfg, results = _train(tmp_path, "acc", ["trainer.accumulate_grad_batches=2", "sparsity=0.01",
                                            "method.optimizer.lr=0.01", "trainer.max_steps=3"])
    _assert_frozen_outside_mask(cfg, tmp_path / "acc", results)


def test_the_scoring_batch_size_reaches_the_callback_and_is_not_part_of_the_identity(tmp_path):
    import hydra
    from saft.app.identity import run_identity
    default = compose_cfg(tmp_path / "a", FAST)
    cut = compose_cfg(tmp_path / "b", FAST + ["method.mask.batch_size=3"])
    assert hydra.utils.instantiate(cut.method.mask).batch_size == 3
    assert hydra.utils.instantiate(default.method.mask).batch_size is None
    assert run_identity(cut).hash == run_identity(default).hash  # a batch cut changes sums by float rounding only
