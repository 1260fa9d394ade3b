"""Checks of a composed run config, before any data or model is loaded: each problem is one ``ConfigError``
that says what is wrong and how to fix it."""
from pathlib import Path

from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig

from saft.app.guards import check_multirun_strategy
from saft.app.results import RESULTS
from saft.errors import ConfigError


def output_dir() -> Path:
    return Path(HydraConfig.get().runtime.output_dir)


def validate(cfg: DictConfig) -> None:
    """Cheap checks of user input, before any data or model is touched."""
    if isinstance(cfg.shots, bool) or not isinstance(cfg.shots, int) or cfg.shots < 1:
        raise ConfigError(f"shots={cfg.shots!r} must be a positive integer (examples per class), e.g. shots=16")
    if isinstance(cfg.sparsity, bool) or not isinstance(cfg.sparsity, (int, float)) or not 0 < cfg.sparsity <= 1:
        raise ConfigError(f"sparsity={cfg.sparsity!r} must be a number in (0, 1], e.g. sparsity=0.001")
    out = output_dir()
    if (out / RESULTS).exists():
        raise ConfigError(f"{out} already holds finished results ({RESULTS}); choose another hydra.run.dir "
                          f"so they are not overwritten")
    ckpt = cfg.get("ckpt_path")
    if ckpt and ckpt != "last" and not Path(ckpt).is_file():
        raise ConfigError(f"ckpt_path={ckpt} is not a file; give a checkpoint of this run "
                          f"(<run>/checkpoints/last.ckpt) or ckpt_path=last to resume in the same hydra.run.dir")
    precision = str(cfg.trainer.get("precision", "32-true"))
    if cfg.method.get("mask") and precision.endswith("-true") and precision != "32-true":
        raise ConfigError(f"trainer.precision={precision} stores the weights in low precision, which changes "
                          f"every entry; masked methods need fp32 weights: use bf16-mixed or 16-mixed")
    if HydraConfig.get().mode == RunMode.MULTIRUN:
        check_multirun_strategy(cfg)
