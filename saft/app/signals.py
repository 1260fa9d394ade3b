"""What a signal does to a run: stop at a step boundary, save, requeue where a scheduler can, exit non-zero.

While Lightning runs (training, evaluation, the benchmark CLIP's pretraining) this app owns three signals:

- ``SIGUSR1`` and ``SIGUSR2``, the requeue signals: Lightning's SLURM default (``#SBATCH --signal=USR1@90``) and
  submitit's (``hydra/launcher=slurm`` asks SLURM for ``USR2`` before a time-out);
- ``SIGTERM``: pre-emption, ``scancel``, ``kill``, a container stopping.

On any of them training stops after the current optimizer step, on every rank together (an evaluation stops
after the current batch, each rank on its own signal: SLURM signals every task); ``last.ckpt`` is saved
(training only); under submitit the job is requeued by submitit's own handler (for ``SIGTERM`` too: submitit itself
ignores it; submitit then exits with its own status, 255), elsewhere under SLURM a requeue signal runs ``scontrol
requeue``; the process says so and exits with status 128 + the signal number. The requeued job, or the same
command run again, resumes from ``last.ckpt``. Signals are owned for the whole job (:func:`owned`, around
``train``/``evaluate``), so one that arrives between Lightning's calls stops the run at the next step as well.
Lightning's own SLURM requeue is switched off (:func:`cluster_plugins`), so it never writes ``hpc_ckpt`` files.
"""
import logging
import os
import signal
import subprocess
import sys
import threading
from contextlib import contextmanager
from pathlib import Path
from typing import Optional

import pytorch_lightning as pl
from lightning_fabric.plugins.environments import SLURMEnvironment
from pytorch_lightning.utilities.exceptions import SIGTERMException

log = logging.getLogger(__name__)
OWNED = (signal.SIGTERM, signal.SIGUSR1, signal.SIGUSR2)
REQUEUE = (signal.SIGUSR1, signal.SIGUSR2)


class RunStopped(SystemExit):
    """Raised inside Lightning's loops when a signal stops the run; the process exits with 128 + signum."""

    def __init__(self, signum: int, message: str):
        super().__init__(128 + signum)
        self.signum, self.message = signum, message


def cluster_plugins() -> list:
    """Under SLURM, Lightning's environment without its auto-requeue (no USR1 handler, no ``hpc_ckpt``)."""
    return [SLURMEnvironment(auto_requeue=False)] if SLURMEnvironment.detect() else []


def _submitit_requeue(handler) -> bool:
    """submitit's handler (``JobEnvironment``'s ``checkpoint_and_try_requeue``) is bound to USR2 in its jobs."""
    return getattr(handler, "__name__", "") == "checkpoint_and_try_requeue"


class _Owner:
    """The process's signal state while a job runs: our handler notes the signal; the handlers that were there
    before (submitit's, the defaults) come back when the job ends, however it ends."""

    def __init__(self):
        self.received: Optional[int] = None
        self.previous = {}
        self.depth = 0

    def note(self, signum, frame) -> None:
        log.warning("received %s: stopping after the current step", signal.Signals(signum).name)
        self.received = signum

    def install(self) -> None:
        """Bind our handler (again: Lightning binds its own SIGTERM handler whenever a fit or test starts)."""
        if self.depth and threading.current_thread() is threading.main_thread():
            for s in OWNED:
                signal.signal(s, self.note)

    @contextmanager
    def owned(self):
        """Own the signals for a job (nested uses are one): a Lightning stop on SIGTERM that slipped through
        (Lightning's handler is bound for a moment before ours is rebound) exits non-zero too."""
        outermost = self.depth == 0 and threading.current_thread() is threading.main_thread()
        if outermost:
            self.received, self.previous = None, {s: signal.getsignal(s) for s in OWNED}
        self.depth += 1
        self.install()
        try:
            yield
        except SIGTERMException:
            message = "stopped by SIGTERM (Lightning's handler); run the same command again to resume"
            print(f"error: {message}", file=sys.stderr, flush=True)
            raise RunStopped(signal.SIGTERM, message) from None
        finally:
            self.depth -= 1
            if outermost:
                for s, handler in self.previous.items():
                    signal.signal(s, handler if handler is not None else signal.SIG_DFL)


OWNER = _Owner()
owned = OWNER.owned


class StopOnSignal(pl.Callback):
    """Stops a Lightning run on a signal noted while :func:`owned` is active. ``checkpoint``: where an interrupted
    fit saves its state (``None``: nothing to save)."""

    def __init__(self, checkpoint: Optional[Path] = None):
        self.checkpoint = checkpoint
        self._step_at_batch_start = 0

    # Lightning binds its own SIGTERM handler when a fit or test starts (after ``on_fit_start``, where the mask is
    # scored); ours goes back in once Lightning's is there, and Lightning's teardown restores ours.
    def on_train_start(self, trainer, pl_module):
        OWNER.install()

    def on_test_start(self, trainer, pl_module):
        OWNER.install()

    def _stop_now(self, trainer) -> bool:
        stop = OWNER.received is not None
        if trainer.world_size > 1:  # every rank stops at the same step, or DDP's next all-reduce would hang
            stop = trainer.strategy.reduce_boolean_decision(stop, all=False)
        return stop

    # --- where a run stops -------------------------------------------------------------------------
    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self._step_at_batch_start = trainer.global_step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step == self._step_at_batch_start:
            return  # inside gradient accumulation: only an optimizer step is a state to resume from
        if self._stop_now(trainer):
            saved = None
            if self.checkpoint is not None:
                trainer.save_checkpoint(self.checkpoint, weights_only=False)
                saved = self.checkpoint
            self._finish(trainer, saved)

    def on_test_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0):
        # Each rank decides alone: DDP ranks hold different numbers of test batches (no padded repeats), so a
        # collective here would not match up. SLURM signals every task of a job.
        if OWNER.received is not None:
            self._finish(trainer, None)

    def _finish(self, trainer, saved: Optional[Path]) -> None:
        signum = OWNER.received or signal.SIGTERM  # a rank that got none stops with the others
        name = signal.Signals(signum).name
        where = f"at step {trainer.global_step}" if trainer.state.fn == "fit" else "during evaluation"
        kept = f"; saved {saved}" if saved else ""
        submitit = _submitit_requeue(OWNER.previous.get(signal.SIGUSR2))
        requeued = "; submitit requeues the job" if submitit else self._requeue(signum) if trainer.is_global_zero else ""
        message = (f"stopped by {name} {where}{kept}{requeued}. The run is not finished: run the same command again "
                   f"(same hydra.run.dir) to resume it")
        log.warning(message)
        print(f"error: {message}", file=sys.stderr, flush=True)
        if submitit:
            OWNER.previous[signal.SIGUSR2](signum, None)  # requeues and exits (status 255), or raises if it may not
        raise RunStopped(signum, message)

    @staticmethod
    def _requeue(signum: int) -> str:
        job = os.environ.get("SLURM_JOB_ID")
        if not job or signum not in REQUEUE:
            return ""
        array = os.environ.get("SLURM_ARRAY_JOB_ID")
        job = f"{array}_{os.environ['SLURM_ARRAY_TASK_ID']}" if array else job
        result = subprocess.call(["scontrol", "requeue", job])
        return f"; requeued SLURM job {job}" if result == 0 else f"; 'scontrol requeue {job}' failed ({result})"
