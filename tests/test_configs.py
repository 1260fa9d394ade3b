"""Every config group option composes with the real configs and instantiates its objects."""
from pathlib import Path

import hydra
import pytest
import pytorch_lightning as pl

from conftest import CONF, FAST, compose_cfg
from saft.callback import SparseMaskCallback

GROUPS = {g: sorted(p.stem for p in (Path(CONF) / g).glob("*.yaml"))
          for g in ("model", "dataset", "method", "trainer", "logger")}


def test_every_group_has_the_options_the_docs_promise():
    assert {"tiny", "vit_b16", "fmnist_clip"} <= set(GROUPS["model"])
    assert {"saft", "full_ft", "random_mask", "zeroshot"} <= set(GROUPS["method"])
    assert {"default", "cpu", "gpu", "ddp"} <= set(GROUPS["trainer"])
    assert {"csv", "wandb"} <= set(GROUPS["logger"])
    assert {"synthetic", "fmnist_styles"} <= set(GROUPS["dataset"])


@pytest.mark.parametrize("config_name", ["train", "eval"])
@pytest.mark.parametrize("group, option", [(g, o) for g, opts in GROUPS.items() for o in opts])
def test_option_composes_and_instantiates(tmp_path, config_name, group, option):
    cfg = compose_cfg(tmp_path, [f"{group}={option}"], config_name)
    assert cfg.sparsity == 0.001 and cfg.shots == 16 and cfg.seed == 1
    if group == "method":
        method = cfg.method
        assert method.name == option
        if method.train:
            assert hydra.utils.instantiate(method.optimizer).func.__name__ in ("MaskedAdamW", "AdamW")
        if method.get("mask"):
            callback = hydra.utils.instantiate(method.mask)
            assert isinstance(callback, SparseMaskCallback) and callback.sparsity == cfg.sparsity
            assert callback.selection == ("random" if option == "random_mask" else "gradient")
    elif group == "trainer" and option != "gpu":
        trainer = hydra.utils.instantiate(cfg.trainer, accelerator="cpu", logger=False)
        assert isinstance(trainer, pl.Trainer)
    elif group == "logger":
        logger = hydra.utils.instantiate(cfg.logger)
        assert isinstance(logger, pl.loggers.Logger)
    elif group == "dataset":
        datamodule = hydra.utils.instantiate(cfg.dataset.datamodule)
        assert datamodule.shots == cfg.shots and datamodule.seed == cfg.seed
    elif group == "model":
        assert cfg.model.name in ("saft-tiny", "ViT-B-16-quickgelu", "saft-fmnist")


def test_eval_config_defaults_to_zero_shot(tmp_path):
    cfg = compose_cfg(tmp_path, [], "eval")
    assert cfg.method.name == "zeroshot" and cfg.run_dir is None


def test_vit_b16_uses_the_quickgelu_architecture(tmp_path):
    cfg = compose_cfg(tmp_path, ["model=vit_b16"])
    assert cfg.model.name == "ViT-B-16-quickgelu" and cfg.model.pretrained == "openai"


def test_sparsity_and_shots_flow_into_callback_and_datamodule(tmp_path):
    cfg = compose_cfg(tmp_path, FAST + ["sparsity=0.05", "shots=3", "seed=7"])
    assert hydra.utils.instantiate(cfg.method.mask).sparsity == 0.05
    datamodule = hydra.utils.instantiate(cfg.dataset.datamodule)
    assert (datamodule.shots, datamodule.seed) == (3, 7)
    assert len(datamodule.split["train"]) == 6 * 3


ARMS = {"full_ft": ("full_ft", 0.001, None), "saft": ("saft", 0.001, []),
        "saft_no_embed": ("saft", 0.001, ["conv1", "embedding"]),
        "saft_no_embed_1pct": ("saft", 0.01, ["conv1", "embedding"]), "random_mask": ("random_mask", 0.001, [])}


@pytest.mark.parametrize("arm", sorted(p.stem for p in (Path(CONF) / "arm").glob("*.yaml")))
def test_every_arm_sets_its_method_and_keeps_the_experiment_settings(tmp_path, arm):
    cfg = compose_cfg(tmp_path, ["experiment=fmnist_tradeoff", f"arm={arm}"])
    method, sparsity, exclude = ARMS[arm]
    assert (cfg.method.name, cfg.sparsity) == (method, sparsity)
    assert (list(cfg.method.mask.exclude) if cfg.method.mask else None) == exclude
    assert list(cfg.method.towers) == ["image"] and cfg.method.schedule == "constant" and cfg.shots == 64
    assert set(cfg.hydra.sweeper.params.arm.split(",")) == set(ARMS)
