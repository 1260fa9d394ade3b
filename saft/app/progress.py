"""Progress display that suits where the output goes: Lightning's bar in a terminal, plain lines in a log."""
import logging
import sys
import time
from datetime import timedelta

from pytorch_lightning.callbacks import ProgressBar, TQDMProgressBar
from pytorch_lightning.utilities.data import extract_batch_size

log = logging.getLogger(__name__)


def progress_bars() -> list:
    """In a terminal, Lightning's bar. In a log file (a sweep, CI, SLURM) a bar's redraws run together with
    cursor escapes into lines thousands of characters long, so :class:`ProgressLines` prints lines instead."""
    return [TQDMProgressBar()] if sys.stdout.isatty() else [ProgressLines()]


class ProgressLines(ProgressBar):
    """One greppable line every ``trainer.log_every_n_steps`` optimizer steps and at the last one, e.g.
    ``step 150/300 (50%) | train/loss 1.234 | lr 1.00e-05 | 812.3 samples/s | ETA 0:00:41``, from rank 0."""

    def __init__(self) -> None:
        super().__init__()
        self._enabled = True

    def disable(self) -> None:
        self._enabled = False

    def enable(self) -> None:
        self._enabled = True

    def on_train_start(self, trainer, pl_module) -> None:
        self._started, self._first_step, self._samples, self._printed = time.monotonic(), trainer.global_step, 0, None

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self._samples += extract_batch_size(batch)
        step = trainer.global_step
        total = trainer.max_steps if trainer.max_steps > 0 else trainer.estimated_stepping_batches
        if not self._enabled or step in (0, self._printed) or (step % trainer.log_every_n_steps and step < total):
            return
        self._printed = step
        elapsed, done = time.monotonic() - self._started, step - self._first_step
        fields = [f"step {step}/{total} ({100 * step / max(total, 1):.0f}%)"]
        fields += [f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}"
                   for k, v in self.get_metrics(trainer, pl_module).items() if k != "v_num"]
        if trainer.optimizers:
            fields.append(f"lr {trainer.optimizers[0].param_groups[0]['lr']:.2e}")
        fields.append(f"{self._samples / max(elapsed, 1e-9):.1f} samples/s")
        eta = elapsed / max(done, 1) * max(total - step, 0)
        fields.append(f"ETA {timedelta(seconds=round(eta))}")
        log.info(" | ".join(fields))

    def on_test_start(self, trainer, pl_module) -> None:
        self._tested = time.monotonic()
        if self._enabled:
            batches = sum(trainer.num_test_batches) if trainer.num_test_batches else 0
            log.info("testing: %d eval sets, %d batches", len(trainer.test_dataloaders or []), batches)

    def on_test_end(self, trainer, pl_module) -> None:
        if self._enabled:
            log.info("tested in %s", timedelta(seconds=round(time.monotonic() - self._tested)))
