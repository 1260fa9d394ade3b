"""FLYP (method=flyp, saft/app/flyp.py) through the real configs: the loss is open_clip's ClipLoss on the batch's
images and one caption of each image's class; under DDP it contrasts the global batch; a run trains both towers and
the logit scale, evaluates with the text head, and eval.py, WiSE-FT and a resume reproduce it bit for bit; input that
would make it another method is refused before training.

Data: 6 classes x 4 shots = 24 training images, batch 8: 3 steps per epoch, and every batch repeats a class."""
from types import SimpleNamespace

import pytest
import pytorch_lightning as pl
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from open_clip.loss import ClipLoss

from conftest import FAST, changed_entries, checkpoint, compose_cfg, read_results, run_script
from datamodules.synthetic import SyntheticDataModule
from saft.app import run
from saft.app.clip import load_clip
from saft.app.flyp import FLYPClassifier
from saft.errors import ConfigError

# lr 1e-3: 9 steps on the tiny random model then move the metrics, which the WiSE-FT checks need.
FLYP = ["method=flyp", "method.optimizer.lr=1e-3", "trainer.max_steps=9", "checkpoint.every_n_train_steps=1",
        "checkpoint.save_top_k=-1"]


def _features(model, tokenizer, images, captions):
    """Normalised image and caption features, computed here as open_clip's CLIP forward does."""
    return (F.normalize(model.encode_image(images), dim=-1),
            F.normalize(model.encode_text(tokenizer(captions)), dim=-1))


def _scores(metrics):
    return {name: (m["top1"], m["n"]) for name, m in metrics.items()}


@pytest.mark.parametrize("trim", [False, True])
def test_the_loss_is_clip_loss_of_the_batch_images_and_a_caption_of_each_images_class(tmp_path, trim):
    """Every training step's loss is ClipLoss(images, captions, exp(logit_scale)): same-class captions of the batch are
    negatives (ClipLoss's labels are the diagonal). Captions take the zero-shot head's templates (3 here, where the
    dataset's train_templates has 1), drawn anew at every step, and the same draw when asked again at that step.
    Bit for bit with the captions at the full context; to float rounding with them trimmed (model.trim_prompts), where
    the text transformer sees only the captions' own positions."""
    cfg = compose_cfg(tmp_path, FAST + ["method=flyp", "trainer.max_steps=3", f"model.trim_prompts={str(trim).lower()}"])
    datamodule, module = run.build(cfg)
    model, tokenizer = module.model, module.tokenizer
    names, templates = datamodule.classnames(), list(datamodule.templates())
    lengths = []  # the positions the text transformer runs over, at each call
    model.transformer.register_forward_pre_hook(lambda m, args: lengths.append(args[0].shape[1]))
    assert len(templates) == 3 and len(datamodule.train_templates()) == 1
    assert float(model.logit_scale.detach()) < 4.6  # below the clamp at ln(100): exp(logit_scale) is the scale used
    steps, used, draws = [], set(), []

    class Check(pl.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            images, labels = batch
            assert len(set(labels.tolist())) < len(labels)  # a class twice: its captions are each other's negatives
            captions = pl_module.captions(labels)
            assert captions == pl_module.captions(labels)
            tokens = tokenizer(captions)
            self.length = int(tokens.argmax(dim=-1).max()) + 1 if trim else tokens.shape[1]
            assert self.length < tokens.shape[1] or not trim  # trimming has something to cut
            draws.append(pl_module.captions(torch.arange(len(names))))
            for caption, label in zip(captions, labels.tolist()):
                options = [t.format(names[label]) for t in templates]
                assert caption in options
                used.add(options.index(caption))
            with torch.no_grad():
                self.expected = ClipLoss()(*_features(model, tokenizer, images, captions), model.logit_scale.exp())

        def on_before_backward(self, trainer, pl_module, loss):
            steps.append((loss.detach(), self.expected))
            assert lengths[-1] == self.length  # the loss's own text forward, after the expectation's

    trainer = pl.Trainer(accelerator="cpu", devices=1, max_steps=3, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
                         callbacks=[Check()])
    trainer.fit(module, datamodule=datamodule)
    assert len(steps) == 3
    for loss, expected in steps:
        if trim:
            torch.testing.assert_close(loss, expected, rtol=1e-5, atol=0)
        else:
            assert torch.equal(loss, expected), (loss, expected)
    assert steps[0][0] != steps[1][0]  # the model trained between the steps
    assert used == {0, 1, 2} and draws[0] != draws[1] != draws[2]  # a new draw at every step


def _rank_loss(rank, world, init_file, images, labels, out):
    """One DDP rank: its half of the batch through FLYP's loss, with the trainer's rank and world size."""
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    torch.set_num_threads(1)
    model, _, _, tokenizer = load_clip("saft-tiny", None, 0)
    module = FLYPClassifier(model, tokenizer)
    module.use_datamodule(SyntheticDataModule(shots=4))
    module.trainer = SimpleNamespace(global_rank=rank, world_size=world, global_step=0)
    half = slice(rank * len(labels) // world, (rank + 1) * len(labels) // world)
    with torch.no_grad():
        loss = module.loss((images[half], labels[half]))
    torch.save({"loss": loss, "captions": module.captions(labels[half])}, f"{out}/{rank}.pt")
    dist.destroy_process_group()


def test_under_ddp_each_rank_contrasts_the_global_batch(tmp_path):
    """FLYP's reference ran one process (DataParallel) over the whole batch; under DDP the features of every rank are
    gathered, so each rank's loss is ClipLoss of the global batch, not of its own half."""
    images, labels = torch.randn(8, 3, 32, 32, generator=torch.Generator().manual_seed(0)), torch.arange(8) % 6
    mp.spawn(_rank_loss, args=(2, tmp_path / "init", images, labels, tmp_path), nprocs=2)
    ranks = [torch.load(tmp_path / f"{r}.pt") for r in (0, 1)]
    model, _, _, tokenizer = load_clip("saft-tiny", None, 0)
    with torch.no_grad():
        image_features, text_features = _features(model, tokenizer, images, ranks[0]["captions"] + ranks[1]["captions"])
        scale = model.logit_scale.exp()
        expected = ClipLoss()(image_features, text_features, scale)
        own_half = ClipLoss()(image_features[:4], text_features[:4], scale)
    for r in ranks:
        torch.testing.assert_close(r["loss"], expected, rtol=1e-5, atol=1e-6)
    assert not torch.isclose(own_half, expected)  # else the check could not tell a gathered loss from a local one


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A 9-step FLYP run through train.py (eval.py run_dir needs its .hydra/), a checkpoint after every step."""
    out = tmp_path_factory.mktemp("flyp") / "run"
    run_script("train.py", FAST + FLYP + [f"hydra.run.dir={out}"])
    return out, read_results(out)


def _evaluate(out, overrides):
    run_script("eval.py", list(overrides) + [f"hydra.run.dir={out}"])
    return read_results(out)


def test_a_run_trains_both_towers_and_the_scale_and_evaluates_with_the_text_head(trained):
    out, results = trained
    assert results["method"] == "flyp" and checkpoint(out)["global_step"] == 9
    assert {m["head"] for r in (results["metrics"], results["zeroshot_metrics"]) for m in r.values()} == {"text"}
    assert results["metrics"] != results["zeroshot_metrics"]  # else the WiSE-FT checks below could not fail
    base = load_clip("saft-tiny", None, 0)[0].state_dict()
    trained_state = {k[len("model."):]: v for k, v in checkpoint(out)["state_dict"].items() if k.startswith("model.")}
    changed = changed_entries(base, trained_state)
    assert any(n.startswith("visual.") for n in changed) and "token_embedding.weight" in changed
    assert "logit_scale" in changed
    assert results["num_trainable"] == results["num_params"]
    assert results["num_changed"] == sum(i.numel() for i in changed.values())


def test_eval_of_the_run_reproduces_it_and_wise_ft_ends_are_exact(trained, tmp_path):
    out, results = trained
    again = _evaluate(tmp_path / "again", [f"run_dir={out}"])
    assert again["metrics"] == results["metrics"] and again["weights_sha256"] == results["weights_sha256"]
    one = _evaluate(tmp_path / "one", [f"run_dir={out}", "wise_alpha=1"])
    assert one["metrics"] == results["metrics"] and one["weights_sha256"] == results["weights_sha256"]
    zero = _evaluate(tmp_path / "zero", [f"run_dir={out}", "wise_alpha=0"])
    assert _scores(zero["metrics"]) == _scores(results["zeroshot_metrics"]) and zero["num_changed"] == 0


def test_a_resumed_run_finishes_with_the_uninterrupted_runs_weights(trained, tmp_path):
    """From step 4 (inside epoch 1): the data order and the captions drawn after it are the uninterrupted run's."""
    out, results = trained
    resumed = tmp_path / "resumed"
    run_script("train.py", FAST + FLYP + [f"hydra.run.dir={resumed}",
                                          f"ckpt_path={out / 'checkpoints' / 'step_000004.ckpt'}"])
    ref, got = checkpoint(out)["state_dict"], checkpoint(resumed)["state_dict"]
    assert ref.keys() == got.keys() and not [n for n in ref if not torch.equal(ref[n], got[n])]
    again = read_results(resumed)
    assert again["metrics"] == results["metrics"] and again["weights_sha256"] == results["weights_sha256"]


@pytest.mark.parametrize("overrides, message", [
    (["method.towers=[image]"], r"method.towers=\['image'\] must let text parameters train for method=flyp"),
    (["method.trainable=[visual]"], "must let text parameters train for method=flyp"),
    (["+method.head=linear", "method.towers=[image]"], "method.head=linear must be text for method=flyp"),
])
def test_flyp_without_its_text_tower_or_with_another_head_is_refused_before_anything_runs(tmp_path, overrides,
                                                                                         message):
    with pytest.raises(ConfigError, match=message):
        run.train(compose_cfg(tmp_path, FAST + ["method=flyp", *overrides]))
    assert not (tmp_path / "split.json").exists()


def test_a_gradient_mask_is_refused_before_any_training_step(tmp_path):
    """SAFT's scores sum per-example gradients; FLYP's loss has no per-example terms."""
    mask = "method.mask={_target_:saft.callback.SparseMaskCallback,sparsity:0.01,model_attr:model}"
    with pytest.raises(ConfigError, match="cannot score a mask for method=flyp"):
        run.train(compose_cfg(tmp_path, FAST + ["method=flyp", mask, "method.optimizer._target_=saft.optim.MaskedAdamW",
                                                "eval_zeroshot=false"]))
    assert not list(tmp_path.glob("**/*.ckpt"))


@pytest.mark.parametrize("experiment", ["fmnist_tradeoff", "imagenet_dg"])
def test_the_arm_trains_flyps_towers_whatever_the_experiment_trains(tmp_path, experiment):
    cfg = compose_cfg(tmp_path, [f"experiment={experiment}", "arm=flyp"])
    assert cfg.method.module == "saft.app.flyp.FLYPClassifier" and cfg.method.name == "flyp"
    assert list(cfg.method.towers) == ["image", "text", "logit_scale"]
    assert cfg.method.optimizer.lr == pytest.approx(1e-5) and cfg.method.optimizer.weight_decay == 0.1


def test_ddp_run_ends_with_the_same_weights_on_both_ranks(tmp_path):
    """2 CPU processes (gloo), 2 x batch 4: the gathered loss runs inside Lightning's DDP."""
    ddp = [o for o in FAST if not o.startswith(("trainer=", "batch_size="))]
    proc = run_script("train.py", ddp + FLYP + ["trainer=ddp", "trainer.accelerator=cpu", "trainer.devices=2",
                                                "batch_size=4", f"hydra.run.dir={tmp_path}"])
    lines = (proc.stdout + proc.stderr).splitlines()
    per_rank = [[ln.split("sha256 ")[1] for ln in lines if f"rank {rank}: trained weights" in ln] for rank in (0, 1)]
    assert len(per_rank[0]) == 1 and per_rank[0] == per_rank[1]
    assert read_results(tmp_path)["method"] == "flyp"
