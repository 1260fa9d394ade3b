"""Checks that must run before Hydra writes anything: a Hydra callback for the entry configs.

Hydra saves ``.hydra/config.yaml`` into the output dir before the task starts; without these guards a
mistyped ``hydra.run.dir`` would overwrite the config that ``eval.py run_dir=...`` reads back, and a
multirun with re-launched DDP ranks would run every sweep twice.
"""
import os
import sys
from pathlib import Path

from hydra.experimental.callback import Callback

from saft.errors import ConfigError
from saft.app.results import RESULTS


def check_multirun_strategy(cfg) -> None:
    """Lightning's ``ddp`` re-launches the script; under ``-m`` each rank would run its own sweep
    (Lightning #11300, hydra #2070). Ranks started by SLURM or torchrun are fine."""
    strategy = str(cfg.trainer.get("strategy", ""))
    if (strategy.startswith("ddp") and "spawn" not in strategy
            and "SLURM_NTASKS" not in os.environ and "LOCAL_RANK" not in os.environ):
        raise ConfigError("-m (multirun) with trainer.strategy=ddp is broken upstream: Lightning re-launches "
                          "the script and each rank runs its own copy of the sweep. Use "
                          "trainer.strategy=ddp_spawn locally, or a SLURM launcher (one job per sweep point)")


def _refuse(message: str) -> None:
    print(f"error: {message}", file=sys.stderr)
    sys.exit(2)


class KeepFinishedRuns(Callback):
    def on_run_start(self, config, **kwargs) -> None:
        out = Path(config.hydra.run.dir)
        if (out / RESULTS).exists():
            _refuse(f"{out} already holds finished results ({RESULTS}); choose another hydra.run.dir so "
                    f"they are not overwritten")

    def on_multirun_start(self, config, **kwargs) -> None:
        try:
            check_multirun_strategy(config)
        except ConfigError as e:
            _refuse(str(e))
        sweep = Path(config.hydra.sweep.dir)
        if sweep.is_dir() and any(sweep.glob(f"**/{RESULTS}")):
            _refuse(f"{sweep} already holds finished runs; choose another hydra.sweep.dir so they are not "
                    f"overwritten")
