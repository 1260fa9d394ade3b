"""The baselines through the real configs, in-process: what each may change (bit for bit), the head saved with the
run, eval.py run_dir and WiSE-FT of a head (resumes: test_resume.py)."""
import re

import pytest
import torch
import torch.nn.functional as F

from conftest import FAST, changed_entries, checkpoint, compose_cfg, read_results, run_script
from saft.app import run
from saft.app.clip import load_clip
from saft.app.heads import PromptHead
from saft.errors import ConfigError

STEPS = ["trainer.max_steps=6", "checkpoint.every_n_train_steps=1", "checkpoint.save_top_k=-1"]
TINY_WIDTH = 64  # conf/model/open_clip/saft-tiny.json: embed_dim and text width
CLASSES = 6      # dataset=synthetic


def _train(out, overrides):
    cfg = compose_cfg(out, FAST + STEPS + list(overrides))
    return cfg, run.train(cfg)


def _train_script(out, overrides):
    """Through train.py: eval.py run_dir needs the run's .hydra/ folder."""
    run_script("train.py", FAST + STEPS + list(overrides) + [f"hydra.run.dir={out}"])
    return out, read_results(out)


def _evaluate(out, overrides):
    """eval.py; a refusal raises ConfigError with its message, as in-process runs do."""
    proc = run_script("eval.py", list(overrides) + [f"hydra.run.dir={out}"], check=False)
    if proc.returncode == 2:
        raise ConfigError(proc.stderr.strip().splitlines()[-1])
    assert proc.returncode == 0, proc.stderr[-3000:]
    return read_results(out)


def _scores(metrics):
    """Top-1 and example counts per set (what a head scored, not which head it was)."""
    return {name: (m["top1"], m["n"]) for name, m in metrics.items()}


def _base():
    return load_clip("saft-tiny", None, 0)[0].state_dict()


def _clip(ckpt):
    return {k[len("model."):]: v for k, v in ckpt["state_dict"].items() if k.startswith("model.")}


def _head(ckpt):
    return {k[len("head."):]: v for k, v in ckpt["state_dict"].items() if k.startswith("head.")}


@pytest.fixture(scope="module")
def probe(tmp_path_factory):
    return _train_script(tmp_path_factory.mktemp("probe") / "run", ["method=linear_probe", "method.optimizer.lr=0.05"])


def test_linear_probe_leaves_every_clip_weight_bit_exact_and_trains_its_head(probe):
    out, results = probe
    ckpt = checkpoint(out)
    assert ckpt["global_step"] == 6
    assert changed_entries(_base(), _clip(ckpt)) == {}
    head = _head(ckpt)
    assert head["weight"].shape == (TINY_WIDTH, CLASSES) and head["weight"].abs().sum() > 0  # it did train
    assert results["num_changed"] == 0
    assert results["num_trainable"] == results["num_head"] == TINY_WIDTH * CLASSES + CLASSES
    assert results["metrics"] != results["zeroshot_metrics"]  # else a lost head would go unnoticed below
    assert (out / "head.safetensors").is_file()


def test_eval_of_a_probe_run_reproduces_it_and_wise_ft_ends_are_exact(probe, tmp_path):
    """alpha=1 is the run, alpha=0 the zero-shot model (the probe starts at the zero-shot head), bit for bit."""
    out, results = probe
    again = _evaluate(tmp_path / "again", [f"run_dir={out}"])
    assert again["metrics"] == results["metrics"] and again["weights_sha256"] == results["weights_sha256"]
    one = _evaluate(tmp_path / "one", [f"run_dir={out}", "wise_alpha=1"])
    zero = _evaluate(tmp_path / "zero", [f"run_dir={out}", "wise_alpha=0"])
    half = _evaluate(tmp_path / "half", [f"run_dir={out}", "wise_alpha=0.5"])
    assert one["metrics"] == results["metrics"] and one["weights_sha256"] == results["weights_sha256"]
    assert _scores(zero["metrics"]) == _scores(results["zeroshot_metrics"]) and zero["num_changed"] == 0
    assert {m["head"] for m in zero["metrics"].values()} == {"linear"}  # the probe, its change scaled to 0
    assert half["weights_sha256"] not in (results["weights_sha256"], zero["weights_sha256"])
    assert half["zeroshot_metrics"] == results["zeroshot_metrics"] and half["wise_alpha"] == 0.5


def test_wise_ft_blends_the_probe_with_its_start_the_scaled_zero_shot_head(probe):
    """wise-ft's recipe: the head interpolates between its zero-shot start (exp(logit_scale) x the class-prompt
    embeddings, no bias) and the trained head, as the rest of the model does."""
    import open_clip
    from saft.app.heads import LinearHead
    from safetensors.torch import load_file
    out, _ = probe
    trained = load_file(out / "head.safetensors")
    model, _, _, tokenizer = load_clip("saft-tiny", None, 0)
    cfg = compose_cfg(out.parent / "compose", FAST)
    datamodule = run.build_datamodule(cfg)
    s = datamodule.eval_sets()[0]
    zero_shot = open_clip.build_zero_shot_classifier(model, tokenizer, s.classnames, s.templates, device="cpu")
    with torch.no_grad():
        assert torch.equal(trained["start"], model.logit_scale.exp() * zero_shot)
    head = LinearHead(TINY_WIDTH, ["x"] * CLASSES)
    run.load_head(head, out / "head.safetensors", 0.25)
    assert torch.equal(head.start, trained["start"]) and not torch.equal(trained["weight"], trained["start"])
    assert torch.allclose(head.weight, trained["start"] + 0.25 * (trained["weight"] - trained["start"]), rtol=1e-6)
    assert torch.allclose(head.bias, 0.25 * trained["bias"], rtol=1e-6, atol=0) and trained["bias"].abs().sum() > 0
    classnames = run.read_head_file(out / "head.safetensors")["classnames"]  # the run's classes, from the file
    assert len(classnames) == CLASSES and classnames != ["x"] * CLASSES


def test_eval_without_the_head_file_or_with_a_broken_one_is_refused(probe, tmp_path):
    import shutil
    out, _ = probe
    copy = tmp_path / "copy"
    shutil.copytree(out, copy, ignore=shutil.ignore_patterns("checkpoints"))
    (copy / "head.safetensors").write_bytes(b"not a tensor file")
    with pytest.raises(ConfigError, match="cannot be read as a head"):
        _evaluate(tmp_path / "broken", [f"run_dir={copy}"])
    (copy / "head.safetensors").unlink()
    with pytest.raises(ConfigError, match="head.safetensors is missing"):
        _evaluate(tmp_path / "missing", [f"run_dir={copy}"])


def test_lp_ft_by_gradient_steps_leaves_clip_unchanged_then_fine_tunes_the_image_tower(tmp_path):
    """method.probe=null, 6 steps, lp_fraction 0.5: steps 1-3 move only the head (CLIP bit-exact, no optimizer state for CLIP), steps
    4-6 the image tower as well."""
    cfg, results = _train(tmp_path / "run", ["method=lp_ft", "method.probe=null", "method.lp_fraction=0.5",
                                             "method.head_lr=0.05", "method.optimizer.lr=1e-3"])
    base = run.base_state(cfg)
    n_head = TINY_WIDTH * CLASSES + CLASSES
    heads = []
    for step in (1, 2, 3):
        ckpt = checkpoint(tmp_path / "run", f"step_{step:06d}.ckpt")
        assert changed_entries(base, _clip(ckpt)) == {}, f"CLIP changed in the probe phase (step {step})"
        state = ckpt["optimizer_states"][0]["state"]
        assert sum(s["exp_avg"].numel() for s in state.values()) == n_head  # moments of the head alone
        heads.append(_head(ckpt)["weight"])
    assert not torch.equal(heads[0], heads[2])  # the probe did train
    changed = changed_entries(base, _clip(checkpoint(tmp_path / "run", "step_000004.ckpt")))
    assert changed and all(name.startswith("visual.") for name in changed)
    assert results["num_changed"] == sum(i.numel() for i in changed_entries(base, _clip(checkpoint(tmp_path / "run"))).values())
    assert results["num_trainable"] == n_head + sum(v.numel() for k, v in base.items() if k.startswith("visual.")
                                                    and "running" not in k and "num_batches" not in k)


def test_bitfit_trains_the_bias_vectors_and_the_classifier(tmp_path):
    """As the reference (every bias plus the task classifier): the image tower's biases and the linear head move,
    nothing else; the optimizer holds exactly those tensors."""
    cfg, results = _train(tmp_path / "run", ["method=bitfit", "method.optimizer.lr=0.01"])
    base = run.base_state(cfg)
    ckpt = checkpoint(tmp_path / "run")
    changed = changed_entries(base, _clip(ckpt))
    assert changed and all(re.search(r"bias$", name) and name.startswith("visual.") for name in changed), sorted(changed)
    biases = [n for n in base if n.endswith("bias") and n.startswith("visual.")]
    n_head = TINY_WIDTH * CLASSES + CLASSES
    assert results["num_trainable"] == sum(base[n].numel() for n in biases) + n_head and results["num_head"] == n_head
    assert len(changed) > len(biases) // 2  # most bias vectors moved
    head = _head(ckpt)
    assert not torch.equal(head["weight"], head["start"]) and head["bias"].abs().sum() > 0  # the classifier trained
    state = ckpt["optimizer_states"][0]["state"]
    assert sum(s["exp_avg"].numel() for s in state.values()) == results["num_trainable"]


@pytest.fixture(scope="module")
def coop(tmp_path_factory):
    return _train_script(tmp_path_factory.mktemp("coop") / "run", ["method=coop", "method.n_ctx=4",
                                                                    "method.optimizer.lr=0.5"])


def test_coop_leaves_both_towers_bit_exact_and_eval_uses_the_learned_prompt(coop, tmp_path):
    out, results = coop
    ckpt = checkpoint(out)
    assert changed_entries(_base(), _clip(ckpt)) == {}
    assert _head(ckpt)["ctx"].shape == (4, TINY_WIDTH)
    assert results["num_changed"] == 0 and results["num_trainable"] == 4 * TINY_WIDTH
    assert results["metrics"] != results["zeroshot_metrics"]  # the learned prompt, not the templates
    # The reference before training is zero-shot CLIP with its templates, not the random initial prompt.
    assert _evaluate(tmp_path / "zeroshot", FAST)["metrics"] == results["zeroshot_metrics"]
    again = _evaluate(tmp_path / "again", [f"run_dir={out}"])
    assert again["metrics"] == results["metrics"] and again["weights_sha256"] == results["weights_sha256"]
    with pytest.raises(ConfigError, match="null for a CoOp run"):
        _evaluate(tmp_path / "wise", [f"run_dir={out}", "wise_alpha=0.5"])


def test_coop_context_started_from_words_encodes_exactly_as_those_words():
    model, _, _, tokenizer = load_clip("saft-tiny", None, 0)
    names = ["cat", "sports car", "t-shirt/top"]
    head = PromptHead(model, tokenizer, ctx_init="a photo of a")
    assert head.n_ctx == 4
    with torch.no_grad():
        expected = F.normalize(model.encode_text(tokenizer([f"a photo of a {c}." for c in names])), dim=-1).T
        assert torch.equal(head(model, names), expected)
        head.ctx.add_(0.1)
        assert not torch.equal(head(model, names), expected)


def test_coop_context_too_long_for_the_text_model_is_refused_with_the_fix():
    model, _, _, tokenizer = load_clip("saft-tiny", None, 0)  # 16-token text context
    with pytest.raises(ConfigError, match=r"lower method.n_ctx .*method.n_ctx=\d+"):
        PromptHead(model, tokenizer, n_ctx=16).tokens(["sports car"])
    with pytest.raises(ConfigError, match="shorten method.ctx_init"):
        PromptHead(model, tokenizer, ctx_init=" ".join(["photo"] * 12)).tokens(["sports car"])
    for words in (" ".join(["photo"] * 16), "   "):  # too long to leave room for a class name; no word at all
        with pytest.raises(ConfigError, match="method.ctx_init=.* must have at least one"):
            PromptHead(model, tokenizer, ctx_init=words)


def test_coop_prompt_that_cannot_fit_is_refused_before_anything_runs(tmp_path):
    """Checked for every eval set's class names when the model is built, not at the final test."""
    with pytest.raises(ConfigError, match="lower method.n_ctx"):
        _train(tmp_path / "run", ["method=coop"])  # CoOp's 16 tokens do not fit the tiny model's 16-token context
    assert not (tmp_path / "run" / "split.json").exists()


@pytest.mark.parametrize("overrides, message", [
    (["method=linear_probe", "method.towers=[image,text]"], "a list without text when method.head=linear"),
    (["method=full_ft", "+method.lp_fraction=0.5"], "0 unless method.head=linear"),
    (["method=full_ft_text", "method.towers=[]"], "a non-empty list when method.train=true and nothing else"),
    (["method=full_ft_text", "+method.probe={_target_:saft.app.probe.ConvexProbe}"], "null unless method.head=linear"),
    (["method=lp_ft", "method.lp_fraction=0.5"], "0 when method.probe is set"),
    (["method=coop", "method.n_ctx=4", "method.warmup_lr=null"], "a learning rate when method.warmup=constant"),
    (["method=full_ft", "method.towers=[image,logit_scale]"], "a list without logit_scale when method.head=linear"),
    (["method=saft", "method.towers=[image]", "+method.head=linear", "+method.probe={_target_:saft.app.probe.ConvexProbe}"],
     "null for a masked method"),
    (["method=lp_ft", "method.probe.c_low=3", "method.probe.c_high=-3"], "at most method.probe.c_high=-3"),
    (["method=coop", "method.n_ctx=0"], "method.n_ctx=0 must be a positive integer"),
    (["method=coop", "method.ctx_init=''"], "method.ctx_init='' must be null or words"),
    (["method=lp_ft", "method.probe=null", "method.lp_fraction=0.05"], "leaves 0 probe steps and 6 fine-tuning steps"),
    (["method=lp_ft", "method.probe=null", "method.lp_fraction=0.95"], "leaves 6 probe steps and 0 fine-tuning steps"),
    (["method=bitfit", "method.trainable=['(']"], "method.trainable=['('] must be a list of Python regexes"),
])
def test_baseline_settings_that_cannot_work_are_refused_before_training(tmp_path, overrides, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        _train(tmp_path / "run", overrides)
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_benchmark_arms_keep_the_probe_and_coop_frozen_and_finish_end_to_end(tmp_path):
    """The trade-off experiment trains the image tower; its probe and CoOp arms must still train no CLIP weight."""
    for arm, towers in (("linear_probe", []), ("coop", []), ("lp_ft", ["image"]), ("bitfit", ["image"])):
        cfg = compose_cfg(tmp_path / arm, ["experiment=fmnist_tradeoff", f"arm={arm}"])
        assert list(cfg.method.towers) == towers and cfg.method.name == arm
    assert compose_cfg(tmp_path / "c", ["experiment=fmnist_tradeoff", "arm=coop"]).method.ctx_init == "a photo of a"


# --- each baseline as its reference runs it -----------------------------------------------------------------
@pytest.mark.parametrize("method, clip", [("coop", None), ("saft", 1.0), ("full_ft", 1.0), ("bitfit", 1.0),
                                          ("linear_probe", 1.0), ("lp_ft", 1.0)])
def test_gradient_clipping_is_the_references_coop_is_never_clipped(tmp_path, monkeypatch, method, clip):
    """CoOp and Dassl do not clip; wise-ft (full FT, its probe, LP-FT's fine-tuning) and BitFit clip at norm 1.0.
    Counted where Lightning clips, over two training steps."""
    from pytorch_lightning.plugins.precision import Precision
    norms = []
    original = Precision.clip_grad_by_norm
    monkeypatch.setattr(Precision, "clip_grad_by_norm", lambda self, optimizer, value: (norms.append(value),
                                                                                       original(self, optimizer, value)))
    extra = ["method.n_ctx=4"] if method == "coop" else []
    _train(tmp_path / "run", [f"method={method}", "trainer.max_steps=2", *extra])
    assert norms == ([] if clip is None else [clip, clip])


def test_coop_trains_on_dassl_augmentation_and_warms_up_at_a_constant_lr(tmp_path):
    """Random resized crops of scale (0.08, 1) and horizontal flips; the first warm-up steps at 1e-5 exactly."""
    import torchvision.transforms as T
    cfg = compose_cfg(tmp_path / "run", FAST + ["method=coop", "method.n_ctx=4", "method.warmup_fraction=0.5"])
    datamodule, module = run.build(cfg)
    kinds = [type(t) for t in datamodule.train_transform.transforms]
    assert kinds[:2] == [T.RandomResizedCrop, T.RandomHorizontalFlip]  # crop, then flip, as Dassl
    assert datamodule.train_transform.transforms[0].scale == (0.08, 1.0)
    module.trainer = type("T", (), {"estimated_stepping_batches": 6})()
    config = module.configure_optimizers()
    optimizer, scheduler = config["optimizer"], config["lr_scheduler"]["scheduler"]
    lrs = []
    for _ in range(6):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    assert lrs[:3] == [1e-5] * 3 and lrs[3] == pytest.approx(2e-3) and lrs[5] < lrs[4] < lrs[3]


def test_full_ft_is_the_references_the_image_tower_under_a_zero_shot_initialised_linear_head(tmp_path):
    """wise-ft's FT: the head starts at exp(logit_scale) x the zero-shot head, trains with the image tower, and
    WiSE-FT blends both: alpha=0 is zero-shot bit for bit, alpha=1 the run."""
    out, results = _train_script(tmp_path / "run", ["method=full_ft", "method.optimizer.lr=1e-3"])
    changed = changed_entries(_base(), _clip(checkpoint(out)))
    assert changed and all(n.startswith("visual.") for n in changed)
    head = _head(checkpoint(out))
    assert not torch.equal(head["weight"], head["start"])
    assert {m["head"] for m in results["metrics"].values()} == {"linear"}
    zero = _evaluate(tmp_path / "zero", [f"run_dir={out}", "wise_alpha=0"])
    one = _evaluate(tmp_path / "one", [f"run_dir={out}", "wise_alpha=1"])
    assert _scores(zero["metrics"]) == _scores(results["zeroshot_metrics"]) and zero["num_changed"] == 0
    assert one["metrics"] == results["metrics"] and one["weights_sha256"] == results["weights_sha256"]
    from saft.app.heads import LinearHead
    blended = LinearHead(TINY_WIDTH, ["x"] * CLASSES)
    run.load_head(blended, out / "head.safetensors", 0.0)  # alpha=0: the head's start exactly, no bias
    assert torch.equal(blended.change(), torch.zeros_like(head["start"])) and not blended.bias.any()


def test_coop_reference_runs_coops_length_on_imagenet_and_the_experiments_own_in_base2new(tmp_path):
    dg = compose_cfg(tmp_path / "dg", ["experiment=imagenet_dg", "arm=coop_reference"])
    assert (dg.batch_size, dg.trainer.max_epochs, dg.trainer.max_steps) == (32, 50, -1)
    assert dg.method.name == "coop" and dg.trainer.gradient_clip_val is None
    b2n = compose_cfg(tmp_path / "b2n", ["experiment=base2new", "arm=coop_reference"])
    assert (b2n.batch_size, b2n.trainer.max_epochs, b2n.trainer.max_steps) == (128, None, 500)


def test_fitted_probe_is_the_regularised_logistic_regression_at_the_best_validation_c():
    """The folded-back weights give scikit-learn's own logits; the C kept is the first with the best validation
    accuracy; and the fit is converged: the L2-regularised objective's gradient is ~0 at the solution."""
    import numpy as np
    from sklearn.linear_model import LogisticRegression
    from saft.app.probe import fit_logistic_regression
    rng = np.random.default_rng(0)
    centres = rng.normal(size=(3, 8))
    train_y, val_y = np.repeat(np.arange(3), 20), np.repeat(np.arange(3), 10)
    train_x = centres[train_y] + rng.normal(scale=1.5, size=(60, 8)) + 0.3
    val_x = centres[val_y] + rng.normal(scale=1.5, size=(30, 8)) + 0.3
    cs = np.logspace(-4, 2, 7)
    weight, bias, c = fit_logistic_regression(train_x, train_y, val_x, val_y, cs, max_iter=1000, seed=0, classes=3)
    mean, std = train_x.mean(), train_x.std()
    accuracy = {}
    for value in cs:
        clf = LogisticRegression(C=value, max_iter=1000, tol=1e-10).fit((train_x - mean) / std, train_y)
        accuracy[value] = np.mean(clf.predict((val_x - mean) / std) == val_y)
    assert c == next(v for v in cs if accuracy[v] == max(accuracy.values()))
    assert len(set(accuracy.values())) > 1  # the choice of C matters here
    exact = LogisticRegression(C=c, max_iter=1000, tol=1e-10).fit((train_x - mean) / std, train_y)
    # scikit-learn stops L-BFGS at its default tol=1e-4 (the reference's), warm-started from the previous C: the
    # logits agree with a fit to tol=1e-10 within 5e-3 (they are O(1)).
    np.testing.assert_allclose(val_x @ weight + bias, exact.decision_function((val_x - mean) / std), atol=5e-3)
    # Convergence: d/dW [C * sum CE + |W|^2 / 2] = 0 on the standardised features.
    z = (train_x - mean) / std
    w = weight.T * std
    logits = z @ w.T + bias + w.sum(axis=1) * mean / std
    p = np.exp(logits - logits.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    grad = c * (p - np.eye(3)[train_y]).T @ z + w
    assert np.abs(grad).max() < 1e-2 * np.abs(w).max()


def test_lp_ft_starts_fine_tuning_from_the_probe_fitted_on_the_frozen_features(tmp_path):
    """After one fine-tuning step at a negligible lr, the head is the probe fitted on the training split's frozen
    features (computed here from split.json and the base model), C chosen on the validation split."""
    import numpy as np
    from saft.app.probe import _features, fit_logistic_regression
    overrides = ["method=lp_ft", "method.optimizer.lr=1e-30", "trainer.max_steps=1", "method.probe.c_count=5",
                 "method.probe.c_low=-3", "method.probe.c_high=1"]
    cfg, results = _train(tmp_path / "run", overrides)
    head = _head(checkpoint(tmp_path / "run"))
    again = compose_cfg(tmp_path / "features", FAST + STEPS + overrides + [f"split_file={tmp_path / 'run' / 'split.json'}"])
    datamodule, module = run.build(again)
    with torch.no_grad():
        train_x, train_y = _features(module, datamodule.split_dataloader("train"))
        val_x, val_y = _features(module, datamodule.split_dataloader("val"))
    weight, bias, c = fit_logistic_regression(train_x, train_y, val_x, val_y, np.logspace(-3, 1, 5), 200, cfg.seed,
                                              classes=CLASSES)
    torch.testing.assert_close(head["weight"], torch.as_tensor(weight, dtype=torch.float32), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(head["bias"], torch.as_tensor(bias, dtype=torch.float32), rtol=1e-5, atol=1e-6)
    assert not torch.equal(head["weight"], head["start"])
    base, tuned = run.base_state(cfg), _clip(checkpoint(tmp_path / "run"))
    assert max((tuned[k] - base[k]).abs().max().item() for k in base if base[k].is_floating_point()) < 1e-20


def test_probe_of_two_present_classes_pads_the_others_with_zeros_as_the_reference():
    """scikit-learn's binary model (one logit) becomes logits (0, z) of its two classes; a class without training
    examples gets zero weights and bias (transfer_learning's pad_head)."""
    import numpy as np
    from scipy.special import expit
    from sklearn.linear_model import LogisticRegression
    from saft.app.probe import fit_logistic_regression
    rng = np.random.default_rng(1)
    y = np.repeat([0, 2], 15)
    x = rng.normal(size=(30, 4)) + 2.0 * (y == 2)[:, None]
    weight, bias, c = fit_logistic_regression(x, y, x, y, [1.0], max_iter=1000, seed=0, classes=3)
    assert weight.shape == (4, 3) and not weight[:, 1].any() and bias[1] == 0
    logits = x @ weight + bias
    mean, std = x.mean(), x.std()
    p2 = LogisticRegression(C=1.0, max_iter=1000, random_state=0).fit((x - mean) / std, y).predict_proba((x - mean) / std)[:, 1]
    np.testing.assert_allclose(expit(logits[:, 2] - logits[:, 0]), p2, atol=1e-3)


def test_old_linear_heads_without_a_start_are_refused_with_the_reason(tmp_path):
    from safetensors.torch import save_file
    from saft.app.heads import LinearHead
    path = tmp_path / "head.safetensors"
    save_file({"weight": torch.zeros(TINY_WIDTH, CLASSES), "bias": torch.zeros(CLASSES)}, str(path),
              metadata={"classnames": "[]"})
    with pytest.raises(ConfigError, match="older version of this project"):
        run.load_head(LinearHead(TINY_WIDTH, ["x"] * CLASSES), path)
