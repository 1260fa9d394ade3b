"""A Hydra callback that refuses, before Hydra writes anything, to reuse the folder of a finished run.

Hydra saves ``.hydra/config.yaml`` into the output dir before the task starts; without this guard a
mistyped ``hydra.run.dir`` would overwrite the config that ``eval.py run_dir=...`` reads back.
"""
import sys
from pathlib import Path

from hydra.experimental.callback import Callback

from saft.results import RESULTS


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
        sweep = Path(config.hydra.sweep.dir)
        if sweep.is_dir() and any(sweep.glob(f"**/{RESULTS}")):
            _refuse(f"{sweep} already holds finished runs; choose another hydra.sweep.dir so they are not "
                    f"overwritten")
