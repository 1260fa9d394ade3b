"""What a signal does to a run: stop at a step boundary, save, requeue where a scheduler can, exit non-zero.

While Lightning runs (training, evaluation, the benchmark CLIP's pretraining) this app owns three signals:

- ``SIGUSR1`` and ``SIGUSR2``, the requeue signals: Lightning's SLURM default (``#SBATCH --signal=USR1@90``) and
  submitit's (``hydra/launcher=slurm`` asks SLURM for ``USR2`` before a time-out);
- ``SIGTERM``: pre-emption, ``scancel``, ``kill``, a container stopping.

On any of them training stops after the current optimizer step, on every rank together (an evaluation stops
after the current batch, each rank on its own signal: SLURM signals every task); ``last.ckpt`` is saved
(training only); under submitit the job is requeued by submitit's own handler (for ``SIGTERM`` too: submitit itself
ignores it), elsewhere under SLURM a requeue signal runs ``scontrol requeue``; then the process exits with status
128 + the signal number and says so. The requeued job, or the same command run again, resumes from ``last.ckpt``.
Lightning's own SLURM requeue is switched off (:func:`cluster_plugins`), so it never writes ``hpc_ckpt`` files.
"""
import logging
import os
import signal
import subprocess
import sys
import threading
from pathlib import Path
from typing import Optional

import pytorch_lightning as pl
from lightning_fabric.plugins.environments import SLURMEnvironment

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


class StopOnSignal(pl.Callback):
    """``checkpoint``: where to save the state of an interrupted fit (``None``: nothing to save)."""

    def __init__(self, checkpoint: Optional[Path] = None):
        self.checkpoint = checkpoint
        self.received: Optional[int] = None
        self._previous = {}
        self._step_at_batch_start = 0

    # Lightning installs its own SIGTERM handler when a fit or test starts (after ``setup`` and ``on_fit_start``,
    # where the mask is scored): ours goes in at ``setup`` and again once Lightning's is in.
    def setup(self, trainer, pl_module, stage):
        self._install()

    def on_train_start(self, trainer, pl_module):
        self._install()

    def on_test_start(self, trainer, pl_module):
        self._install()

    def teardown(self, trainer, pl_module, stage):
        self._restore()

    def on_exception(self, trainer, pl_module, exception):
        self._restore()

    def _install(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return
        for s in OWNED:
            current = signal.getsignal(s)
            if current != self._note and s not in self._previous:
                self._previous[s] = current
            signal.signal(s, self._note)

    def _restore(self) -> None:
        if threading.current_thread() is threading.main_thread():
            for s, handler in self._previous.items():
                signal.signal(s, handler if handler is not None else signal.SIG_DFL)
        self._previous = {}

    def _note(self, signum, frame) -> None:
        log.warning("received %s: stopping after the current step", signal.Signals(signum).name)
        self.received = signum

    def _stop_now(self, trainer) -> bool:
        stop = self.received is not None
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
        if self.received is not None:
            self._finish(trainer, None)

    def _finish(self, trainer, saved: Optional[Path]) -> None:
        signum = self.received or signal.SIGTERM  # a rank that got none stops with the others
        name = signal.Signals(signum).name
        where = f"at step {trainer.global_step}" if trainer.state.fn == "fit" else "during evaluation"
        kept = f"; saved {saved}" if saved else ""
        requeued = self._requeue(signum, trainer) if trainer.is_global_zero else ""
        message = (f"stopped by {name} {where}{kept}{requeued}. The run is not finished: run the same command again "
                   f"(same hydra.run.dir) to resume it")
        log.warning(message)
        print(f"error: {message}", file=sys.stderr, flush=True)
        raise RunStopped(signum, message)

    def _requeue(self, signum: int, trainer) -> str:
        submitit = self._previous.get(signal.SIGUSR2)
        if _submitit_requeue(submitit):
            print(f"error: stopped by {signal.Signals(signum).name}; submitit requeues the job", file=sys.stderr,
                  flush=True)
            submitit(signum, None)  # requeues and exits, or raises when it may not requeue
        job = os.environ.get("SLURM_JOB_ID")
        if job and signum in REQUEUE:
            array = os.environ.get("SLURM_ARRAY_JOB_ID")
            job = f"{array}_{os.environ['SLURM_ARRAY_TASK_ID']}" if array else job
            result = subprocess.call(["scontrol", "requeue", job])
            return f"; requeued SLURM job {job}" if result == 0 else f"; 'scontrol requeue {job}' failed ({result})"
        return ""
