"""Every config group option composes with the real configs and instantiates objects that behave as the run
needs: the method's optimizer and learning rate, the trainer's accelerator, strategy, precision and checkpoint
writer, loggers that write into the run dir, datamodules that read from data_dir, architectures open_clip
knows; and top-level keys (sparsity, seed, shots, lr_scale) reach the objects that use them."""
from pathlib import Path

import hydra
import open_clip
import pytest
import pytorch_lightning as pl
import torch
from omegaconf import OmegaConf
from pytorch_lightning.accelerators import CPUAccelerator, CUDAAccelerator
from pytorch_lightning.plugins.precision import MixedPrecision
from pytorch_lightning.strategies import DDPStrategy, SingleDeviceStrategy

import saft.app.clip  # noqa: F401  (registers the project's open_clip architectures)
from conftest import CONF, FAST, compose_cfg
from saft import mask as M
from saft.app.checkpoint_io import AtomicCheckpointIO
from saft.app.validate import validate
from saft.callback import SparseMaskCallback
from saft.errors import ConfigError
from saft.optim import MaskedAdamW

GROUPS = {g: sorted(p.stem for p in (Path(CONF) / g).glob("*.yaml"))
          for g in ("model", "dataset", "method", "trainer", "logger")}
ARMS = sorted(p.stem for p in (Path(CONF) / "arm").glob("*.yaml"))


def test_every_group_has_the_options_the_docs_promise():
    assert {"tiny", "vit_b16", "fmnist_clip"} <= set(GROUPS["model"])
    assert {"saft", "full_ft", "random_mask", "magnitude_mask", "zeroshot", "linear_probe", "lp_ft", "bitfit", "coop"} <= set(GROUPS["method"])
    assert {"default", "cpu", "gpu", "ddp"} <= set(GROUPS["trainer"])
    assert {"csv", "wandb"} <= set(GROUPS["logger"])
    assert {"synthetic", "fmnist_styles"} <= set(GROUPS["dataset"])


def _optimizer(method_cfg):
    """The method's optimizer, built as the run builds it, over one small parameter."""
    return hydra.utils.instantiate(method_cfg.optimizer)([torch.nn.Parameter(torch.zeros(3))])


def _check_method(cfg, tmp_path, option):
    method = cfg.method
    if not method.train:
        assert method.get("optimizer") is None and not method.get("mask") and not list(method.towers)
        return
    optimizer = _optimizer(method)
    # A masked method needs MaskedAdamW (any other optimizer would write unselected entries); full FT a
    # plain optimizer that updates every entry.
    assert isinstance(optimizer, MaskedAdamW) == bool(method.get("mask"))
    assert isinstance(optimizer, torch.optim.Optimizer)
    # lr = the method's base lr x lr_scale, whatever the base.
    scaled = compose_cfg(tmp_path / "scaled", [f"method={option}", "lr_scale=0.25"])
    lr, scaled_lr = optimizer.param_groups[0]["lr"], _optimizer(scaled.method).param_groups[0]["lr"]
    assert 0 < lr < 1 and scaled_lr == pytest.approx(0.25 * lr)
    if method.get("mask"):
        callback = hydra.utils.instantiate(method.mask)
        assert isinstance(callback, SparseMaskCallback)
        # The top-level keys are the callback's (test_top_level_keys_flow_... overrides them).
        assert (callback.sparsity, callback.seed) == (cfg.sparsity, cfg.seed)
        assert callback.selection == {"random_mask": "random", "magnitude_mask": "magnitude"}.get(option, "gradient")


def _check_trainer(cfg, tmp_path, option):
    gpu = torch.cuda.is_available()
    # ddp on CPUs (gloo): Lightning builds the strategy without launching processes; gpu without a GPU:
    # the same settings on the CPU.
    overrides = {"accelerator": "cpu"} if option == "ddp" or (option == "gpu" and not gpu) else {}
    trainer = hydra.utils.instantiate(cfg.trainer, logger=False, default_root_dir=str(tmp_path), **overrides)
    assert isinstance(trainer, pl.Trainer)
    expected_accelerator = CPUAccelerator if option in ("cpu", "ddp") or not gpu else CUDAAccelerator
    assert isinstance(trainer.accelerator, expected_accelerator)
    if option == "ddp":
        assert isinstance(trainer.strategy, DDPStrategy) and trainer.num_devices == 2
    else:
        assert isinstance(trainer.strategy, SingleDeviceStrategy) and trainer.num_devices == 1
    if option == "gpu":  # bf16 autocast over fp32 weights, as masked methods require
        assert isinstance(trainer.precision_plugin, MixedPrecision) and trainer.precision == "bf16-mixed"
    else:
        assert not isinstance(trainer.precision_plugin, MixedPrecision) and trainer.precision == "32-true"
    assert isinstance(trainer.strategy.checkpoint_io, AtomicCheckpointIO)  # kill-safe checkpoint files
    assert trainer.gradient_clip_val == 1.0 and trainer.gradient_clip_algorithm == "norm"  # SAFT's


def _check_logger(cfg, tmp_path, option):
    logger = hydra.utils.instantiate(cfg.logger)
    assert isinstance(logger, pl.loggers.Logger)
    assert Path(logger.save_dir) == tmp_path  # inside the run's own output dir
    if option == "csv":
        logger.log_metrics({"probe": 3.5}, step=0)
        logger.save()
        (metrics,) = tmp_path.glob("**/metrics.csv")
        assert "probe" in metrics.read_text() and "3.5" in metrics.read_text()
    if option == "wandb":
        assert isinstance(logger, pl.loggers.WandbLogger)
        assert logger._wandb_init["mode"] == "disabled"  # WANDB_MODE (conftest) decides, offline by default


def _check_dataset(cfg, tmp_path, option):
    empty = Path(cfg.data_dir)
    datamodule = hydra.utils.instantiate(cfg.dataset.datamodule)
    assert datamodule.shots == cfg.shots and datamodule.seed == cfg.seed
    if option == "synthetic":
        datamodule.check()  # procedural: needs no files
        assert len(datamodule.split["train"]) == cfg.shots * len(datamodule.all_classnames())
    elif option == "fmnist_styles":
        from datamodules import fmnist_styles as fm
        if fm.DEBIAN_DIR.is_dir():
            datamodule.check()  # Debian's package serves any data_dir
            assert (empty / "FashionMNIST" / "raw").is_dir()
        else:
            with pytest.raises(ConfigError, match="apt-get install dataset-fashion-mnist"):
                datamodule.check()
    else:  # a CoOp dataset or ImageNet: read from data_dir, with a message that names the path
        with pytest.raises(ConfigError, match=str(empty)):
            datamodule.check()


def _check_model(cfg, option):
    arch = open_clip.get_model_config(cfg.model.name)
    assert arch is not None, f"open_clip does not know {cfg.model.name}"
    if option == "vit_b16":
        return  # test_vit_b16_uses_the_quickgelu_architecture
    model = open_clip.create_model(cfg.model.name)  # the small project architectures, random init
    image_entries = sum(p.numel() for n, p in model.named_parameters() if n.startswith("visual."))
    assert 0 < image_entries < sum(p.numel() for p in model.parameters())  # both towers
    if option == "fmnist_clip":  # its yaml: image tower 1.04 M entries, so 0.1% = 1,035
        assert round(image_entries / 1e4) / 100 == 1.04 and M.num_selected(0.001, image_entries) == 1035


@pytest.mark.parametrize("config_name", ["train", "eval"])
@pytest.mark.parametrize("group, option", [(g, o) for g, opts in GROUPS.items() for o in opts])
def test_option_composes_and_instantiates(tmp_path, monkeypatch, config_name, group, option):
    data_dir = [f"data_dir={tmp_path / 'no_data'}"] if group == "dataset" else []  # a folder without data
    named = ["dataset.name=mine"] if option == "imagefolder" else []  # its default name is refused (validate)
    cfg = compose_cfg(tmp_path, [f"{group}={option}", *data_dir, *named], config_name)
    with monkeypatch.context() as m:  # the GPU trainer's config is checked as on a machine with a GPU
        m.setattr(torch.cuda, "is_available", lambda: True)
        validate(cfg)  # the run's own checks accept every option
    if config_name == "eval":  # the same group configs as train (checked below): instantiating is enough
        node = {"method": cfg.method.get("optimizer"), "trainer": cfg.trainer, "logger": cfg.logger,
                "dataset": cfg.dataset.datamodule, "model": None}[group]
        if node is not None:
            kwargs = {"accelerator": "cpu", "logger": False} if group == "trainer" else {}
            assert hydra.utils.instantiate(node, **kwargs) is not None
        if group == "method" and cfg.method.get("mask"):
            assert isinstance(hydra.utils.instantiate(cfg.method.mask), SparseMaskCallback)
    elif group == "method":
        _check_method(cfg, tmp_path, option)
    elif group == "trainer":
        _check_trainer(cfg, tmp_path, option)
    elif group == "logger":
        _check_logger(cfg, tmp_path, option)
    elif group == "dataset":
        _check_dataset(cfg, tmp_path, option)
    elif group == "model":
        _check_model(cfg, option)


def test_eval_config_is_the_train_config_without_training(tmp_path):
    train, evaluate = (OmegaConf.to_container(compose_cfg(tmp_path, [], name), resolve=False)
                       for name in ("train", "eval"))
    assert evaluate.pop("run_dir") is None and evaluate.pop("wise_alpha") is None
    assert {k: v for k, v in evaluate.items() if k not in ("method", "hydra")} == \
        {k: v for k, v in train.items() if k not in ("method", "hydra")}
    assert not evaluate["method"]["train"] and evaluate["method"]["optimizer"] is None
    assert evaluate["method"]["mask"] is None and train["method"]["train"]


def test_vit_b16_uses_the_quickgelu_architecture(tmp_path):
    """OpenAI's ViT-B/16 weights were trained with QuickGELU: a plain ViT-B-16 loads them without a warning
    and computes the wrong activation."""
    cfg = compose_cfg(tmp_path, ["model=vit_b16"])
    assert open_clip.get_model_config(cfg.model.name)["quick_gelu"] is True
    assert cfg.model.pretrained in open_clip.list_pretrained_tags_by_model(cfg.model.name)


def test_top_level_keys_flow_into_callback_optimizer_and_datamodule(tmp_path):
    cfg = compose_cfg(tmp_path, FAST + ["sparsity=0.05", "shots=3", "seed=7", "lr_scale=2"])
    callback = hydra.utils.instantiate(cfg.method.mask)
    assert (callback.sparsity, callback.seed) == (0.05, 7)
    default = compose_cfg(tmp_path / "default", FAST)
    assert _optimizer(cfg.method).param_groups[0]["lr"] == \
        pytest.approx(2 * _optimizer(default.method).param_groups[0]["lr"])
    datamodule = hydra.utils.instantiate(cfg.dataset.datamodule)
    assert (datamodule.shots, datamodule.seed) == (3, 7)
    assert len(datamodule.split["train"]) == 6 * 3
    other_seed = hydra.utils.instantiate(compose_cfg(tmp_path / "s8", FAST + ["shots=3", "seed=8"]).dataset.datamodule)
    assert other_seed.split["train"] != datamodule.split["train"]  # the seed draws the few shots


EXCLUDED = ["visual.conv1.weight", "visual.positional_embedding", "positional_embedding", "token_embedding.weight"]
ELIGIBLE = ["visual.transformer.resblocks.0.attn.in_proj_weight", "visual.proj", "ln_final.bias"]


@pytest.fixture(scope="module")
def baseline(tmp_path_factory):
    """The experiment with its default arm (SAFT as published)."""
    return compose_cfg(tmp_path_factory.mktemp("saft"), ["experiment=fmnist_tradeoff", "arm=saft"])


def _swept_arms(experiment: str):
    return OmegaConf.load(Path(CONF) / "experiment" / f"{experiment}.yaml").hydra.sweeper.params.arm.split(",")


TRADEOFF_ARMS = _swept_arms("fmnist_tradeoff")


def test_every_arm_is_swept_by_an_experiment():
    assert set(ARMS) == set(TRADEOFF_ARMS) | set(_swept_arms("imagenet_dg"))


def _without_clipping(cfg):
    """The config outside the method, its budget and the gradient clipping (which each method's reference decides)."""
    trainer = {k: v for k, v in cfg.trainer.items() if k != "gradient_clip_val"}
    return {**{k: v for k, v in cfg.items() if k not in ("method", "sparsity", "hydra")}, "trainer": trainer}


@pytest.mark.parametrize("arm", TRADEOFF_ARMS)
def test_every_arm_sets_its_method_and_keeps_the_experiment_settings(tmp_path, baseline, arm):
    cfg = compose_cfg(tmp_path, ["experiment=fmnist_tradeoff", f"arm={arm}"])
    # Everything but the method and its budget is the experiment's, the same in every arm.
    assert _without_clipping(cfg) == _without_clipping(baseline)
    assert cfg.trainer.gradient_clip_val == cfg.method.gradient_clip_val
    # The probe and CoOp train no CLIP weight; FLYP trains the text tower too (its loss is contrastive).
    towers = {"linear_probe": [], "coop": [], "flyp": ["image", "text", "logit_scale"]}.get(arm, list(baseline.method.towers))
    assert list(cfg.method.towers) == towers
    assert cfg.method.schedule == baseline.method.schedule == "constant"  # so warm-ups (each method's own) are moot
    optimizer = _optimizer(cfg.method)
    if arm in ("full_ft", "full_ft_text", "linear_probe", "lp_ft", "bitfit", "coop", "flyp"):
        assert cfg.method.name == arm and not cfg.method.get("mask") and not isinstance(optimizer, MaskedAdamW)
        return
    callback = hydra.utils.instantiate(cfg.method.mask)
    assert isinstance(optimizer, MaskedAdamW)
    assert callback.selection == ("random" if arm == "random_mask" else "gradient")
    no_embed = arm.startswith("saft_no_embed")
    assert all(M.is_eligible(n, callback.include, callback.exclude) != no_embed for n in EXCLUDED)
    assert all(M.is_eligible(n, callback.include, callback.exclude) for n in ELIGIBLE)
    assert callback.sparsity == pytest.approx(baseline.method.mask.sparsity * (10 if arm.endswith("1pct") else 1))
