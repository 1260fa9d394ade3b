"""One evaluation contract: the model evaluated is the one this process trained or rebuilt (never a checkpoint
Lightning picks), the zero-shot reference is measured on exactly the images evaluated, every head applies to any
eval set whose classes it knows (through the subset's columns), and results.json says which head evaluated each set.
"""
import json
import shutil

import pytest
import torch

from conftest import FAST, compose_cfg, read_results, run_script
from layouts import make_imagenet
from saft.app import run
from saft.delta import state_checksum
from saft.errors import ConfigError

STEPS = ["trainer.max_steps=4", "checkpoint.every_n_train_steps=2", "checkpoint.save_top_k=-1"]
IMAGENET = ["model=tiny", "model.pretrained=null", "dataset=imagenet", "trainer=cpu", "trainer.max_steps=3",
            "batch_size=4", "eval_batch_size=8", "num_workers=0", "shots=2", "trainer.enable_progress_bar=false",
            "trainer.check_val_every_n_epoch=100"]
SLURM = {"SLURM_NTASKS": "1", "SLURM_JOB_ID": "4242", "SLURM_JOB_NAME": "train", "SLURM_PROCID": "0",
         "SLURM_LOCALID": "0", "SLURM_NODEID": "0", "SLURM_NODELIST": "localhost"}


@pytest.fixture(scope="module")
def imagenet(tmp_path_factory):
    data = tmp_path_factory.mktemp("data")
    make_imagenet(data)
    return data


def _script(script, out, overrides, **kwargs):
    return run_script(script, list(overrides) + [f"hydra.run.dir={out}"], **kwargs)


# --- heads on eval sets whose classes are some of the training classes --------------------------------
def test_a_linear_head_takes_the_columns_of_imagenet_a_and_r(imagenet, tmp_path):
    """A holds stingray and robin (training classes 2, 3), R goldfish and stingray (1, 2): a probe's logits there
    are its own columns, as in wise-ft; the text head would make them zero-shot's."""
    cfg = compose_cfg(tmp_path / "probe", IMAGENET + [f"data_dir={imagenet}", "method=linear_probe"])
    datamodule, module = run.build(cfg)
    module.use_datamodule(datamodule)
    with torch.no_grad():
        module.head.weight.normal_()
        module.head.bias.normal_()
    sets = {s.name: (i, s) for i, s in enumerate(module.eval_sets)}
    for name, columns in (("imagenet_a", [2, 3]), ("imagenet_r", [1, 2]), ("imagenet", [0, 1, 2, 3])):
        index, s = sets[name]
        assert s.classes == columns
        text, change, bias = module.eval_head(index)
        assert torch.equal(text, module._zero_shot_head(index))  # the set's own zero-shot head, plus the columns
        assert torch.equal(change, module.head.change()[:, columns]) and torch.equal(bias, module.head.bias[columns])
        assert module.head_kind(s) == "linear"
    with module.text_head_only():
        assert module.eval_head(sets["imagenet_a"][0]).change is None and module.head_kind(sets["imagenet_a"][1]) == "text"


def test_probe_results_name_the_head_of_every_set_and_eval_reproduces_them(imagenet, tmp_path):
    out = tmp_path / "probe"
    _script("train.py", out, IMAGENET + [f"data_dir={imagenet}", "method=linear_probe", "method.optimizer.lr=0.5"])
    results = read_results(out)
    assert {s: m["head"] for s, m in results["metrics"].items()} == {
        "imagenet": "linear", "imagenet_v2": "linear", "imagenet_sketch": "linear", "imagenet_a": "linear",
        "imagenet_r": "linear"}
    assert all(m["head"] == "text" for m in results["zeroshot_metrics"].values())
    _script("eval.py", tmp_path / "eval", [f"run_dir={out}"])
    again = read_results(tmp_path / "eval")
    assert again["metrics"] == results["metrics"] and again["weights_sha256"] == results["weights_sha256"]


def test_a_probe_evaluated_on_other_classes_keeps_its_head_and_uses_the_text_head_there(imagenet, tmp_path):
    """The probe's head file is read with its own classes (it was refused as corrupt on another dataset)."""
    out = tmp_path / "probe"
    _script("train.py", out, FAST + ["method=linear_probe", "method.optimizer.lr=0.5"])
    _script("eval.py", tmp_path / "eval", [f"run_dir={out}", "dataset=imagenet", f"data_dir={imagenet}"])
    results = read_results(tmp_path / "eval")
    assert set(results["metrics"]) >= {"imagenet", "imagenet_a"}
    assert all(m["head"] == "text" for m in results["metrics"].values())


def test_a_probe_with_other_eval_datasets_uses_the_text_head_there(imagenet, tmp_path):
    """eval_datasets' sets carry label positions of their own dataset, never columns of this run's head."""
    results = run.train(compose_cfg(tmp_path / "run", FAST + ["method=linear_probe", "eval_datasets=[imagenet]",
                                                              f"data_dir={imagenet}"]))
    heads = {s: m["head"] for s, m in results["metrics"].items()}
    assert heads == {"photo": "linear", "sketch": "linear", "negative": "linear", "imagenet": "text",
                     "imagenet_v2": "text", "imagenet_sketch": "text", "imagenet_a": "text", "imagenet_r": "text"}


def test_a_masked_method_with_a_linear_head_trains_the_head(tmp_path):
    cfg = compose_cfg(tmp_path / "run", FAST + ["method.towers=[image]", "+method.head=linear", "sparsity=0.01",
                                                "method.optimizer.lr=0.05"])
    results = run.train(cfg)
    head = read_results(tmp_path / "run")
    from safetensors.torch import load_file
    tensors = load_file(tmp_path / "run" / "head.safetensors")
    assert tensors["weight"].abs().sum() > 0 and tensors["bias"].abs().sum() > 0
    assert results["num_trainable"] == results["mask"]["mask/k"] + results["num_head"] == head["num_trainable"]
    assert results["num_changed"] <= results["mask"]["mask/k"]  # CLIP itself moved only inside the mask


@pytest.mark.parametrize("method, wd, expected", [("linear_probe", 0.5, 0.5), ("linear_probe", 0.0, 0.0),
                                                  ("lp_ft", 0.3, 0.3), ("full_ft", 0.2, 0.2)])
def test_the_linear_heads_weight_decay_is_the_configured_one(tmp_path, method, wd, expected):
    """The head decays as its optimizer is configured (wise-ft decays every parameter, the head included), unless
    method.head_weight_decay says otherwise."""
    def head_group(overrides):
        cfg = compose_cfg(tmp_path / "run", FAST + [f"method={method}", "method.schedule=constant", *overrides])
        optimizer = run.build(cfg)[1].configure_optimizers()
        (group,) = [g for g in optimizer.param_groups if g.get("head")]
        return group
    assert head_group([f"method.optimizer.weight_decay={wd}"])["weight_decay"] == expected
    assert head_group(["method.head_weight_decay=0.2"])["weight_decay"] == 0.2


# --- the zero-shot reference is of the images evaluated ------------------------------------------------
@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    out = tmp_path_factory.mktemp("trained") / "run"
    _script("train.py", out, FAST + STEPS + ["method.optimizer.lr=0.02", "sparsity=0.01"])
    return out


def test_eval_on_other_data_measures_its_own_zero_shot_reference(trained, tmp_path):
    """The README's "other eval data" command with wise_alpha=0 evaluates the zero-shot model: no gain at all."""
    _script("eval.py", tmp_path / "e", [f"run_dir={trained}", "wise_alpha=0", "dataset=synthetic",
                                        "dataset.datamodule.test_per_class=9"])
    results = read_results(tmp_path / "e")
    assert all(m["n"] == 54 for m in results["zeroshot_metrics"].values())
    assert results["metrics"] == results["zeroshot_metrics"]


def test_eval_on_the_runs_own_data_reuses_its_reference(trained, tmp_path):
    """A marked reference in the run's results.json tells reuse from measuring again."""
    run_dir = tmp_path / "run"
    shutil.copytree(trained, run_dir, ignore=shutil.ignore_patterns("checkpoints"))
    results = read_results(run_dir)
    results["zeroshot_metrics"]["photo"]["top1"] = 12.345
    (run_dir / "results.json").write_text(json.dumps(results))
    _script("eval.py", tmp_path / "e", [f"run_dir={run_dir}", "wise_alpha=0.5"])
    assert read_results(tmp_path / "e")["zeroshot_metrics"]["photo"]["top1"] == 12.345
    _script("eval.py", tmp_path / "other", [f"run_dir={run_dir}", "dataset=synthetic",
                                            "dataset.datamodule.val_per_class=2"])  # same test images, other identity
    assert read_results(tmp_path / "other")["zeroshot_metrics"] == read_results(trained)["zeroshot_metrics"]
    _script("eval.py", tmp_path / "none", [f"run_dir={trained}", "dataset=synthetic",
                                           "dataset.datamodule.test_per_class=9", "eval_zeroshot=false"])
    assert "zeroshot_metrics" not in read_results(tmp_path / "none")


def test_wise_alpha_without_a_run_is_refused(tmp_path):
    proc = _script("eval.py", tmp_path / "e", FAST + ["wise_alpha=0.5"], check=False)
    assert proc.returncode == 2 and "wise_alpha=0.5 must be null without run_dir" in proc.stderr
    assert not (tmp_path / "e" / "results.json").exists()


def test_full_ft_of_some_parameters_composes_as_documented(tmp_path):
    results = run.train(compose_cfg(tmp_path / "run", FAST + ["method=full_ft", "method.trainable=[ln_]"]))
    from saft.delta import load_delta
    delta, _ = load_delta(tmp_path / "run" / "delta.safetensors")
    assert delta and all("ln_" in name for name in delta)
    assert results["num_trainable"] < results["num_params"] / 100


# --- SLURM: no checkpoint nobody asked for becomes the evaluated model -----------------------------------
def test_a_run_dir_holding_an_hpc_checkpoint_evaluates_its_own_model(trained, tmp_path):
    """Under SLURM Lightning loads the newest hpc_ckpt_N.ckpt of its root dir into the model for fit and test
    alike; here it lies in the run dir (another run's step-2 state) and must change nothing."""
    reference = tmp_path / "reference"
    _script("train.py", reference, FAST + STEPS)
    out = tmp_path / "slurm"
    out.mkdir()
    shutil.copy(trained / "checkpoints" / "step_000002.ckpt", out / "hpc_ckpt_1.ckpt")
    proc = _script("train.py", out, FAST + STEPS, env=SLURM)
    results, expected = read_results(out), read_results(reference)
    assert results["weights_sha256"] == expected["weights_sha256"]
    assert results["zeroshot_metrics"] == expected["zeroshot_metrics"] and results["metrics"] == expected["metrics"]
    assert "ignoring" in proc.stdout + proc.stderr and "hpc_ckpt_1.ckpt" in proc.stdout + proc.stderr
    assert sorted(p.name for p in out.glob("hpc_ckpt_*")) == ["hpc_ckpt_1.ckpt"]  # and none written


def test_signal_handlers_are_given_back_after_a_run_fails_or_finishes(tmp_path):
    import signal
    from saft.app.signals import OWNED
    before = {s: signal.getsignal(s) for s in OWNED}
    with pytest.raises(ConfigError, match="non-finite"):
        run.train(compose_cfg(tmp_path / "nan", FAST + ["method=full_ft", "method.optimizer.lr=1e30",
                                                        "trainer.gradient_clip_val=null"]))
    assert {s: signal.getsignal(s) for s in OWNED} == before
    run.train(compose_cfg(tmp_path / "ok", FAST))
    assert {s: signal.getsignal(s) for s in OWNED} == before


def test_a_checkpoint_lightning_loads_unasked_is_refused(trained, tmp_path):
    """The guard behind it: a restore outside the resume the run asked for stops the run."""
    cfg = compose_cfg(tmp_path / "run", FAST + STEPS)
    datamodule, module = run.build(cfg)
    trainer = run.make_trainer(cfg, [], run.run_identity(cfg), "eval")
    with pytest.raises(RuntimeError, match="did not ask for"):
        trainer.test(module, datamodule=datamodule, ckpt_path=str(trained / "checkpoints" / "step_000002.ckpt"),
                     verbose=False)
    assert state_checksum(module.model.state_dict()) == state_checksum(run.base_state(cfg))


def test_resume_from_an_old_checkpoint_without_identity_is_refused(trained, tmp_path):
    ckpt = torch.load(trained / "checkpoints" / "step_000002.ckpt", weights_only=True)
    ckpt["saft_run"] = {"method": "saft", "lr": 0.02}  # what earlier versions stored
    torch.save(ckpt, tmp_path / "old.ckpt")
    with pytest.raises(ConfigError, match="was trained with"):
        run.train(compose_cfg(tmp_path / "run", FAST + STEPS + [f"ckpt_path={tmp_path / 'old.ckpt'}"]))
