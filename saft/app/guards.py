"""Checks that must run before Hydra writes anything: a Hydra callback for the entry configs.

Hydra saves ``.hydra/config.yaml`` into the output dir before the task starts; without these guards a
mistyped ``hydra.run.dir`` would overwrite the config that ``eval.py run_dir=...`` reads back, and a
multirun with re-launched DDP ranks would run every sweep twice.
"""
import os
import shutil
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


SAVED = ".hydra.finished"  # a finished run's own .hydra while Hydra writes the new attempt's over it


def _keep_saved_configs(job_dirs) -> None:
    """``finished=skip``: Hydra saves each job's config before the job can see that it is finished, so the
    finished runs' configs (what ``eval.py run_dir=`` reads) are put aside now and put back at job start."""
    for out in job_dirs:
        if (out / RESULTS).is_file() and (out / ".hydra").is_dir() and not (out / SAVED).exists():
            shutil.copytree(out / ".hydra", out / SAVED)


def _put_back(out: Path) -> None:
    if (out / SAVED).is_dir():
        shutil.rmtree(out / ".hydra", ignore_errors=True)
        (out / SAVED).rename(out / ".hydra")


class KeepFinishedRuns(Callback):
    def on_run_start(self, config, **kwargs) -> None:
        out = Path(config.hydra.run.dir)
        if (out / RESULTS).exists():
            if config.get("finished") != "skip":
                _refuse(f"{out} already holds finished results ({RESULTS}); choose another hydra.run.dir so "
                        f"they are not overwritten, or finished=skip to skip it when it is this run")
            _keep_saved_configs([out])

    def on_multirun_start(self, config, **kwargs) -> None:
        try:
            check_multirun_strategy(config)
        except ConfigError as e:
            _refuse(str(e))
        sweep = Path(config.hydra.sweep.dir)
        finished = [p.parent for p in sweep.glob(f"**/{RESULTS}")] if sweep.is_dir() else []
        if finished and config.get("finished") != "skip":
            _refuse(f"{sweep} already holds finished runs; choose another hydra.sweep.dir so they are not "
                    f"overwritten, or run the same command with finished=skip to run only the jobs not finished")
        _keep_saved_configs(finished)

    def on_job_start(self, config, **kwargs) -> None:
        _put_back(Path(config.hydra.runtime.output_dir))

    def on_multirun_end(self, config, **kwargs) -> None:
        for saved in Path(config.hydra.sweep.dir).glob(f"**/{SAVED}"):  # finished runs this sweep has no job for
            _put_back(saved.parent)
