"""Progress display that suits where the output goes."""
import sys

from pytorch_lightning.callbacks import TQDMProgressBar

LOG_REFRESH = 50  # batches between redraws when the output is a log file


def progress_bars() -> list:
    """In a terminal, Lightning's default bar (none added). In a log file (a sweep, CI, SLURM) every redraw is
    another line, so the bar redraws every ``LOG_REFRESH`` batches instead of every batch."""
    return [TQDMProgressBar()] if sys.stdout.isatty() else [TQDMProgressBar(refresh_rate=LOG_REFRESH)]
