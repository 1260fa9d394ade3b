"""Every user-facing config key is checked before any data or model is loaded: a bad value is one line,
``error: <key>=<value> must be <what>, e.g. <key>=<example>``, exit status 2, no traceback, nothing written."""
import re
from pathlib import Path

import pytest
import torch
from hydra.core.override_parser.overrides_parser import OverridesParser

from conftest import CONF, FAST, compose_cfg, run_script
from saft.app.validate import validate
from saft.errors import ConfigError

FMNIST = ["model=fmnist_clip"]  # the model config with a pretrain block
# (extra overrides on top of FAST, the key the message must name)
BAD = [
    # top level
    (["seed=-1"], "seed"), (["seed=true"], "seed"), (["seed=1.5"], "seed"), (["seed=4294967296"], "seed"),
    (["~seed"], "seed"),
    (["shots=0"], "shots"), (["shots=true"], "shots"),
    (["sparsity=0"], "sparsity"), (["sparsity=1.5"], "sparsity"), (["sparsity=nan"], "sparsity"),
    (["protocol=half"], "protocol"),
    (["eval_datasets=[no_such_set]"], "eval_datasets"), (["eval_datasets=dtd"], "eval_datasets"),
    (["eval_datasets=[dtd,dtd]"], "eval_datasets"),
    (["lr_scale=-1"], "lr_scale"), (["lr_scale=0"], "lr_scale"), (["lr_scale=abc"], "lr_scale"),
    (["lr_scale=inf"], "lr_scale"),
    (["eval_zeroshot=1"], "eval_zeroshot"),
    (["optimized_metric=test/top1"], "optimized_metric"),  # a search optimises validation, never a test set
    (["batch_size=0"], "batch_size"), (["eval_batch_size=-2"], "eval_batch_size"),
    (["num_workers=-1"], "num_workers"), (["num_workers=2.0"], "num_workers"),
    (["split_file=/no/such/split.json"], "split_file"),
    (["ckpt_path=/no/such/last.ckpt"], "ckpt_path"),
    (["data_dir=5"], "data_dir"),
    (["+extra=${no_such_key}"], "extra"),  # an interpolation that cannot be resolved
    # trainer
    (["trainer.max_steps=0"], "trainer.max_steps"), (["trainer.max_steps=-1"], "trainer.max_steps"),
    (["trainer.max_steps=-1", "trainer.max_epochs=0"], "trainer.max_epochs"),
    (["trainer.max_epochs=2.5"], "trainer.max_epochs"),
    (["trainer.precision=half"], "trainer.precision"), (["trainer.precision=8"], "trainer.precision"),
    (["trainer.precision=bf16-true"], "trainer.precision"),  # masked method: fp32 weights
    (["trainer.gradient_clip_val=-1"], "trainer.gradient_clip_val"),
    (["trainer.gradient_clip_algorithm=l2"], "trainer.gradient_clip_algorithm"),
    (["trainer.accumulate_grad_batches=0"], "trainer.accumulate_grad_batches"),
    (["trainer.check_val_every_n_epoch=0"], "trainer.check_val_every_n_epoch"),
    (["trainer.log_every_n_steps=0"], "trainer.log_every_n_steps"),
    (["trainer.devices=0"], "trainer.devices"), (["trainer.devices=two"], "trainer.devices"),
    (["trainer.accelerator=npu"], "trainer.accelerator"),
    (["+trainer.strategy=5"], "trainer.strategy"),
    (["trainer.deterministic=maybe"], "trainer.deterministic"),
    (["trainer._target_=pytorch_lightning.NoSuchTrainer"], "trainer._target_"),
    # method
    (["method.train=1"], "method.train"),
    (["method.optimizer.lr=-0.1"], "method.optimizer.lr"), (["method.optimizer.lr=${nope}"], "method.optimizer.lr"),
    (["method.optimizer.weight_decay=-0.1"], "method.optimizer.weight_decay"),
    (["method.optimizer.betas=[0.9,1.0]"], "method.optimizer.betas"),
    (["method.optimizer.betas=[0.9]"], "method.optimizer.betas"),
    (["method.optimizer.eps=0"], "method.optimizer.eps"),
    (["+method.optimizer.momentum=-1"], "method.optimizer.momentum"),
    (["method.optimizer._target_=torch.optim.AdamW"], "method.optimizer._target_"),  # masked: MaskedAdamW
    (["method=full_ft", "method.optimizer._target_=torch.optim.NoSuchOptimizer"], "method.optimizer._target_"),
    (["method=full_ft", "method.optimizer=null"], "method.optimizer"),
    (["method.warmup_fraction=1"], "method.warmup_fraction"),
    (["method.warmup_fraction=-0.1"], "method.warmup_fraction"),
    (["method.schedule=linear"], "method.schedule"),
    (["method.towers=[image,audio]"], "method.towers"), (["method.towers=[]"], "method.towers"),
    (["method.towers=image"], "method.towers"),
    (["method.mask.selection=best"], "method.mask.selection"), (["method.mask.score=l2"], "method.mask.score"),
    (["method.mask.scope=layer"], "method.mask.scope"),
    (["method.mask.include=['(']"], "method.mask.include"), (["method.mask.exclude=['[a-']"], "method.mask.exclude"),
    (["method.mask.exclude=conv1"], "method.mask.exclude"),
    (["method.mask.seed=-1"], "method.mask.seed"), (["method.mask.sparsity=2"], "method.mask.sparsity"),
    # checkpoint
    (["checkpoint.every_n_train_steps=0"], "checkpoint.every_n_train_steps"),
    (["checkpoint.save_top_k=-2"], "checkpoint.save_top_k"),
    # model
    (["model.name=''"], "model.name"), (["model.pretrained=5"], "model.pretrained"),
    (["model.init_seed=-1"], "model.init_seed"), (["model.force_quick_gelu=yes"], "model.force_quick_gelu"),
    (["model.batch_first_attention=yes"], "model.batch_first_attention"), (["zeroshot_cache=maybe"], "zeroshot_cache"),
    ([*FMNIST, "model.pretrain.steps=0"], "model.pretrain.steps"),
    ([*FMNIST, "model.pretrain.batch_size=0"], "model.pretrain.batch_size"),
    ([*FMNIST, "model.pretrain.lr=0"], "model.pretrain.lr"),
    ([*FMNIST, "model.pretrain.seed=-3"], "model.pretrain.seed"),
    ([*FMNIST, "model.pretrain.version=1"], "model.pretrain.version"),  # an older recipe, no longer built
    ([*FMNIST, "model.pretrain.style_weights.photo=-1"], "model.pretrain.style_weights"),
    ([*FMNIST, "+model.pretrain.style_weights.skecth=1"], "model.pretrain.style_weights"),
    ([*FMNIST, "model.pretrain.style_weights={photo:0,sketch:0,negative:0,noisy:0,painting:0}"],
     "model.pretrain.style_weights"),
    ([*FMNIST, "~model.pretrain"], "model.pretrained"),  # auto needs the pretrain block
    # dataset
    (["dataset.datamodule.train_per_class=0"], "dataset.datamodule.train_per_class"),
    (["dataset.datamodule.val_per_class=-1"], "dataset.datamodule.val_per_class"),
    (["dataset.datamodule.test_per_class=0"], "dataset.datamodule.test_per_class"),
    (["dataset.datamodule.image_size=0"], "dataset.datamodule.image_size"),
    (["dataset.datamodule.num_workers=-1"], "dataset.datamodule.num_workers"),
    (["dataset.datamodule.batch_size=0"], "dataset.datamodule.batch_size"),
    (["dataset=fmnist_styles", "dataset.datamodule.test_size=0"], "dataset.datamodule.test_size"),
    (["dataset=fmnist_styles", "dataset.datamodule.download=yes"], "dataset.datamodule.download"),
    (["dataset=fmnist_styles", "dataset.datamodule.id_style=cartoon"], "dataset.datamodule.id_style"),
    (["dataset=imagenet", "dataset.datamodule.templates=fancy"], "dataset.datamodule.templates"),
    (["dataset=imagenet", "+dataset.datamodule.variant_dirs.imagenet_z=x"], "dataset.datamodule.variant_dirs"),
    (["dataset=dtd", "dataset.datamodule.dataset=no_such_set"], "dataset.datamodule.dataset"),
]


def _compose(tmp_path, overrides, config_name="train"):
    """FAST plus ``overrides`` (FAST's synthetic-data keys dropped when they pick another dataset)."""
    other_dataset = any(o.startswith("dataset=") for o in overrides)
    base = [o for o in FAST if not (other_dataset and o.startswith("dataset"))]
    return compose_cfg(tmp_path, [*base, *overrides], config_name)


def test_the_fast_config_passes(tmp_path):
    validate(_compose(tmp_path, []))


@pytest.mark.parametrize("overrides, key", BAD, ids=[" ".join(o) for o, _ in BAD])
def test_bad_value_is_one_line_naming_the_key(tmp_path, overrides, key):
    cfg = _compose(tmp_path, overrides)
    with pytest.raises(ConfigError, match=rf"^{re.escape(key)}[= ]") as e:
        validate(cfg)
    assert "\n" not in str(e.value)


def test_message_says_what_and_gives_an_example(tmp_path):
    with pytest.raises(ConfigError) as e:
        validate(_compose(tmp_path, ["lr_scale=-1"]))
    assert str(e.value) == "lr_scale=-1 must be a number > 0, e.g. lr_scale=1.0"
    with pytest.raises(ConfigError) as e:
        validate(_compose(tmp_path, ["method.mask.exclude=[conv1,'(']"]))
    message = str(e.value)  # names the bad pattern and what re says about it
    assert message.startswith("method.mask.exclude=['conv1', '('] must be") and "'('" in message
    assert "missing )" in message and "e.g. method.mask.exclude=" in message
    with pytest.raises(ConfigError) as e:
        validate(_compose(tmp_path, ["method.optimizer.lr='${mul:1e-3,${no_such_key}}'"]))
    assert str(e.value).startswith("method.optimizer.lr=${mul:1e-3,${no_such_key}} cannot be resolved")
    assert "no_such_key" in str(e.value)


GOOD = [["seed=0"], ["trainer.max_steps=-1", "trainer.max_epochs=3"], ["trainer.precision=16"],
        ["trainer.precision=bf16-mixed"], ["trainer.devices=auto"], ["trainer.gradient_clip_val=null"],
        ["trainer.check_val_every_n_epoch=null"], ["method=full_ft", "trainer.precision=bf16-true"],
        ["method.towers=[image,logit_scale]"], ["method.mask.include=[visual,'^text\\.']"],
        ["eval_datasets=[dtd,oxford_pets]"], ["lr_scale=3"], ["sparsity=1"], ["ckpt_path=last"], ["method=zeroshot"],
        ["checkpoint.save_top_k=-1"], ["+method.optimizer.momentum=0"]]


@pytest.mark.parametrize("overrides", GOOD, ids=lambda o: " ".join(o))
def test_good_values_pass(tmp_path, overrides):
    validate(_compose(tmp_path, overrides))


@pytest.mark.parametrize("overrides", [["trainer.devices=-1"], ["trainer.devices=[0,1]"], ["trainer.max_epochs=-1"],
                                       ["checkpoint.every_n_train_steps=null"]])
def test_values_lightning_accepts_pass(tmp_path, overrides):
    validate(_compose(tmp_path, overrides))


def test_a_gpu_accelerator_without_a_gpu_is_refused_before_the_model_loads(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    for accelerator in ("gpu", "cuda"):
        with pytest.raises(ConfigError, match=f"^trainer.accelerator='{accelerator}' must be available"):
            validate(_compose(tmp_path, [f"trainer.accelerator={accelerator}"]))


def _options(group):
    return sorted(p.stem for p in (Path(CONF) / group).glob("*.yaml"))


CHOICES = [f"{g}={o}" for g in ("method", "model", "dataset", "trainer", "logger") for o in _options(g)] + \
          [f"+arm={a}" for a in _options("arm")] + [f"experiment={e}" for e in _options("experiment")]


@pytest.mark.parametrize("config_name", ["train", "eval"])
@pytest.mark.parametrize("choice", CHOICES)
def test_every_config_option_passes(tmp_path, monkeypatch, choice, config_name):
    """The rules accept the project's own configs (validate reads no data, so ImageNet/CoOp need no files;
    the GPU configs are checked as on a machine with a GPU)."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    named = ["dataset.name=mine"] if choice == "dataset=imagefolder" else []  # its default name is refused
    validate(compose_cfg(tmp_path, [choice, *named], config_name))


@pytest.mark.parametrize("experiment", _options("experiment"))
def test_every_sweep_point_of_an_experiment_passes(tmp_path, monkeypatch, experiment):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # the paper's experiments run on GPUs
    params = compose_cfg(tmp_path, [f"experiment={experiment}"]).hydra.sweeper.params
    parser = OverridesParser.create()
    for key, values in params.items():
        override = parser.parse_overrides([f"{key}={values}"])[0]
        points = list(override.sweep_string_iterator()) if override.is_sweep_override() else [str(values)]
        assert points
        for value in points:
            validate(compose_cfg(tmp_path, [f"experiment={experiment}", f"{key}={value}"]))


# --- through train.py, as a user runs it -------------------------------------------------------------
QUICK = ["model=tiny", "dataset=synthetic", "trainer.enable_progress_bar=false", "dataset.datamodule.train_per_class=8"]


@pytest.mark.parametrize("arg, message", [
    ("lr_scale=-1", "error: lr_scale=-1 must be a number > 0, e.g. lr_scale=1.0"),
    ("trainer.max_steps=0", "error: trainer.max_steps=0 must be a positive integer or -1"),
    ("method.mask.include=['(']", "error: method.mask.include=['('] must be a list of Python regexes"),
    ("batch_size=0", "error: batch_size=0 must be a positive integer, e.g. batch_size=32"),
])
def test_train_py_refuses_bad_input_in_one_line_and_writes_nothing(tmp_path, arg, message):
    proc = run_script("train.py", [*QUICK, arg, f"hydra.run.dir={tmp_path}"], check=False)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert message in proc.stderr and "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines()[-1].startswith(message)  # the last line, and the only one about it
    assert not (tmp_path / "results.json").exists() and not list(tmp_path.glob("**/*.ckpt"))
    assert not (tmp_path / "split.json").exists()  # stopped before any data was drawn
