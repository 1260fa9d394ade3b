"""What a masked training run guarantees, checked through the real configs and a real Trainer: the mask is
the exact top-k of its score, clipping sees only selected gradients, nothing outside the mask moves (BatchNorm
statistics included), and the optimizer's groups and schedule are what the docs say."""
import math

import pytest
import pytorch_lightning as pl
import torch
from pytorch_lightning.plugins import MixedPrecision

from conftest import FAST, checkpoint, ckpt_masks, ckpt_params, compose_cfg, read_results, run_script
from saft.app import run
from saft.callback import SparseMaskCallback
from saft.optim import MaskedAdamW, warmup_cosine

EVERY_STEP = ["checkpoint.every_n_train_steps=1"]


def _train(tmp_path, name, overrides):
    cfg = compose_cfg(tmp_path / name, FAST + EVERY_STEP + list(overrides))
    return cfg, run.train(cfg)


def _reference_scores(cfg, score):
    """Each score from its definition, one training example at a time (float64 sums)."""
    datamodule, module = run.build(cfg)
    module.use_datamodule(datamodule)
    module.eval()
    params = {n: p for n, p in module.model.named_parameters() if p.requires_grad}
    sums = {n: torch.zeros_like(p, dtype=torch.float64) for n, p in params.items()}
    for key, label in datamodule.split["train"]:
        image = datamodule.eval_transform(datamodule.load_image(key))[None]
        grads = torch.autograd.grad(module.loss((image, torch.tensor([label]))), list(params.values()))
        for n, g in zip(params, grads):
            g = g.double()
            sums[n] += g if score == "abs_sum" else g.abs() if score == "sum_abs" else g * g
    return {n: s.abs() for n, s in sums.items()}


def _reference_topk(scores, k, scope):
    """Global: one stable descending sort over the tensors in order (ties: earlier tensor, lower index).
    Per tensor: k split by size with the largest remainder, then the same within each tensor."""
    names = list(scores)
    if scope == "per_tensor":
        sizes = [scores[n].numel() for n in names]
        quotas = [k * s / sum(sizes) for s in sizes]
        ks = [int(q) for q in quotas]
        for i in sorted(range(len(names)), key=lambda i: (ks[i] - quotas[i], i))[: k - sum(ks)]:
            ks[i] += 1
        return {(n, int(i)) for n, kn in zip(names, ks) for i in
                torch.sort(scores[n].reshape(-1), descending=True, stable=True).indices[:kn]}
    flat = torch.cat([scores[n].reshape(-1) for n in names])
    offsets = torch.tensor([0] + [scores[n].numel() for n in names]).cumsum(0)
    chosen = torch.sort(flat, descending=True, stable=True).indices[:k]
    which = torch.searchsorted(offsets, chosen, right=True) - 1
    return {(names[t], int(i - offsets[t])) for t, i in zip(which.tolist(), chosen.tolist())}


@pytest.mark.parametrize("score, scope", [("abs_sum", "global"), ("sum_abs", "global"), ("fisher", "per_tensor")])
def test_the_trained_mask_is_the_exact_topk_of_its_score(tmp_path, score, scope):
    cfg, results = _train(tmp_path, "r", ["sparsity=0.002", "eval_batch_size=5", "eval_zeroshot=false",
                                          "trainer.max_steps=1", f"method.mask.score={score}",
                                          f"method.mask.scope={scope}"])
    masks = ckpt_masks(checkpoint(tmp_path / "r"))
    k = results["num_trainable"]
    n_eligible = results["num_params"] - 1  # all but the frozen logit scale
    assert k == round(0.002 * n_eligible) == sum(i.numel() for i in masks.values())
    scores = _reference_scores(cfg, score)
    reference = _reference_topk(scores, k, scope)
    got = {(n, int(i)) for n, idx in masks.items() for i in idx}
    differ = got ^ reference
    # fp32 sums vs the fp64 reference may swap entries that tie at the threshold to rounding, nothing else
    threshold = min(float(scores[n].reshape(-1)[i]) for n, i in reference)
    assert len(differ) <= 4 and all(abs(float(scores[n].reshape(-1)[i]) - threshold) <= 1e-4 * threshold
                                    for n, i in differ), differ


def test_clipping_sees_only_the_selected_gradients(tmp_path, monkeypatch):
    """Through Lightning's own hook order: the norm the optimizer steps with is the clip value exactly,
    which only holds if the mask was applied before the clipping norm was taken."""
    seen = []
    step = MaskedAdamW.step

    def recording_step(self, closure=None):
        # Lightning's closure runs forward, backward (on_after_backward: the mask) and then the clipping.
        with torch.enable_grad():
            loss = closure()
        grads = [p.grad.reshape(-1) for g in self.param_groups for p in g["params"] if p.grad is not None]
        with_grad = [(p.grad.reshape(-1), idx) for p, idx in self.masks.items() if p.grad is not None]
        outside = sum(int(torch.count_nonzero(g)) - int(torch.count_nonzero(g[idx])) for g, idx in with_grad)
        seen.append((torch.cat(grads).norm().item(), outside))
        step(self)
        return loss
    monkeypatch.setattr(MaskedAdamW, "step", recording_step)
    _train(tmp_path, "c", ["sparsity=0.01", "trainer.gradient_clip_val=1e-4", "trainer.max_steps=3"])
    assert len(seen) == 3
    for norm, outside in seen:
        assert outside == 0
        assert norm == pytest.approx(1e-4, rel=1e-3)


def test_weight_decay_groups_follow_open_clip(tmp_path):
    cfg = compose_cfg(tmp_path, FAST + ["method=full_ft_text", "method.schedule=constant",
                                        "method.towers=[image,text,logit_scale]"])
    datamodule, module = run.build(cfg)
    decay, no_decay = module.configure_optimizers().param_groups
    names = {id(p): n for n, p in module.model.named_parameters()}
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    decayed = {names[id(p)] for p in decay["params"]}
    assert "visual.conv1.weight" in decayed and "token_embedding.weight" in decayed
    assert all(module.model.get_parameter(n).ndim >= 2 for n in decayed)
    assert {names[id(p)] for p in no_decay["params"]} == {
        n for n, p in module.model.named_parameters() if n not in decayed}
    assert {"logit_scale", "visual.class_embedding", "ln_final.weight", "visual.ln_post.bias"} <= {
        names[id(p)] for p in no_decay["params"]}


def test_warmup_then_cosine_schedule_shape():
    optimizer = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.5)
    schedule = warmup_cosine(optimizer, total=20, warmup=4)
    lrs = []
    for _ in range(20):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        schedule.step()
    expected = [0.5 * (t + 1) / 5 for t in range(4)] + [0.5 * (1 + math.cos(math.pi * t / 16)) / 2 for t in range(16)]
    assert lrs == pytest.approx(expected, abs=1e-12)
    assert max(lrs) == pytest.approx(0.5) and lrs[4] == pytest.approx(0.5)


def test_the_logit_scale_trains_when_asked_and_alone_under_a_mask_on_it(tmp_path):
    cfg, results = _train(tmp_path, "ls", ["method.towers=[image,text,logit_scale]", "sparsity=1",
                                           "method.mask.include=['^logit_scale$']", "method.optimizer.lr=0.05",
                                           "eval_zeroshot=false"])
    base = run.base_state(cfg)
    final = ckpt_params(checkpoint(tmp_path / "ls"))
    assert results["num_trainable"] == 1 and results["num_changed"] == 1
    assert final["logit_scale"] != base["logit_scale"]
    assert all(torch.equal(final[n], base[n]) for n in base if n != "logit_scale")


def test_fp16_mixed_precision_with_its_gradient_scaler_keeps_entries_frozen(tmp_path):
    """Lightning turns ``16-mixed`` into bf16 on a CPU, so the fp16 plugin and its GradScaler are given
    explicitly: gradients reach on_after_backward scaled, and masking them there must still be exact."""
    cfg = compose_cfg(tmp_path, FAST + ["sparsity=0.01", "method.optimizer.lr=0.01"])
    datamodule, module = run.build(cfg)
    base = {n: t.clone() for n, t in module.model.state_dict().items()}
    callback = SparseMaskCallback(sparsity=0.01, model_attr="model")
    scales = []

    class Spy(pl.Callback):
        def on_after_backward(self, trainer, pl_module):
            scales.append(trainer.precision_plugin.scaler.get_scale())
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 12)
    trainer = pl.Trainer(max_steps=4, accelerator="cpu", callbacks=[callback, Spy()], logger=False,
                         plugins=[MixedPrecision("16-mixed", "cpu", scaler)], enable_progress_bar=False,
                         enable_checkpointing=False, gradient_clip_val=1.0, default_root_dir=str(tmp_path))
    trainer.fit(module, datamodule=datamodule)
    assert scales and all(s > 1 for s in scales)  # the scaler was really in the loop
    final, moved = module.model.state_dict(), 0
    for n, b in base.items():
        outside = torch.ones(b.numel(), dtype=torch.bool)
        if n in callback.masks:
            outside[callback.masks[n]] = False
        assert torch.equal(final[n].reshape(-1)[outside], b.reshape(-1)[outside]), n
        moved += int((final[n] != b).sum())
    assert 0 < moved <= callback.stats["mask/k"] and all(v.dtype == torch.float32 for v in final.values())


@pytest.mark.parametrize("method", ["saft", "full_ft"])
def test_batchnorm_statistics_of_a_resnet_clip_stay_frozen_and_eval_reproduces(tmp_path, method):
    out = tmp_path / method
    run_script("train.py", ["model=tiny_rn", "dataset=synthetic", "shots=4", "batch_size=8", "trainer.max_steps=4",
                            f"method={method}", "sparsity=0.01", "eval_zeroshot=false",
                            "dataset.datamodule.test_per_class=3", "trainer.enable_progress_bar=false",
                            f"hydra.run.dir={out}"])
    cfg = compose_cfg(tmp_path / "cfg", ["model=tiny_rn"])
    base, final = run.base_state(cfg), ckpt_params(checkpoint(out))
    buffers = [n for n in base if "running_" in n or "num_batches_tracked" in n]
    assert buffers and all(torch.equal(final[n], base[n]) for n in buffers)
    assert read_results(out)["num_changed"] > 0
    run_script("eval.py", [f"run_dir={out}", f"hydra.run.dir={tmp_path / 'e'}"])
    assert read_results(tmp_path / "e")["metrics"] == read_results(out)["metrics"]
    assert read_results(tmp_path / "e")["weights_sha256"] == read_results(out)["weights_sha256"]


def test_non_finite_base_weights_stop_the_mask_pass_with_the_tensor_named(tmp_path):
    from saft.app.clip import load_clip
    model = load_clip("saft-tiny")[0]
    with torch.no_grad():
        model.visual.proj[0, 0] = float("nan")
    torch.save(model.state_dict(), tmp_path / "nan.pt")
    proc = run_script("train.py", ["model=tiny", "dataset=synthetic", "shots=4", "eval_zeroshot=false",
                                   f"model.pretrained={tmp_path / 'nan.pt'}", f"hydra.run.dir={tmp_path / 'r'}"],
                      check=False)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "non-finite values (NaN or inf)" in proc.stderr and "mask scores of" in proc.stderr
    assert not (tmp_path / "r" / "checkpoints").exists()


def test_full_ft_decays_every_parameter_as_wise_ft_does(tmp_path):
    """decay_exclusions=none (full FT, its head included): one decayed group holds every trained parameter."""
    cfg = compose_cfg(tmp_path, FAST + ["method=full_ft", "method.schedule=constant"])
    module = run.build(cfg)[1]
    groups = [g for g in module.configure_optimizers().param_groups if g["params"]]
    trained = [p for p in module.model.parameters() if p.requires_grad]
    clip_groups = [g for g in groups if not g.get("head")]
    assert len(clip_groups) == 1 and clip_groups[0]["weight_decay"] == 0.1
    assert {id(p) for p in clip_groups[0]["params"]} == {id(p) for p in trained}
    assert any(p.ndim < 2 for p in trained)  # biases and gains are among the decayed
    (head,) = [g for g in groups if g.get("head")]
    assert head["weight_decay"] == 0.1
