"""A run stopped by a signal exits non-zero, says so, saves last.ckpt, requeues where SLURM or submitit can, and
the same command resumes it to the weights of an uninterrupted run (saft.app.signals)."""
import os
import re
import signal
import subprocess
import sys
import time

import pytest

from conftest import ROOT, checkpoint, read_results, run_script

ARGS = ["model=tiny", "dataset=synthetic", "shots=4", "batch_size=8", "dataset.datamodule.test_per_class=5",
        "trainer.max_steps=40", "trainer.enable_progress_bar=false", "checkpoint.every_n_train_steps=1",
        "sparsity=0.01", "method.optimizer.lr=0.01"]
SLURM = {"SLURM_NTASKS": "1", "SLURM_JOB_ID": "4242", "SLURM_JOB_NAME": "train", "SLURM_PROCID": "0",
         "SLURM_LOCALID": "0", "SLURM_NODEID": "0", "SLURM_NODELIST": "localhost"}
# What submitit's job environment binds to USR2 (its JobEnvironment.checkpoint_and_try_requeue), played here: it
# records the call and exits as submitit does after requeueing.
SUBMITIT = """
import runpy, signal, sys
def checkpoint_and_try_requeue(signum, frame):
    open(marker, "w").write(f"requeued after {signal.Signals(signum).name}")
    sys.exit(-1)
signal.signal(signal.SIGUSR2, checkpoint_and_try_requeue)
signal.signal(signal.SIGTERM, lambda *a: None)   # submitit bypasses SIGTERM
marker, sys.argv = sys.argv[1], sys.argv[2:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


@pytest.fixture(scope="module")
def whole(tmp_path_factory):
    out = tmp_path_factory.mktemp("whole") / "run"
    run_script("train.py", [*ARGS, f"hydra.run.dir={out}"])
    return out


def _start(command, out, env=None, step=5):
    """Start a run and wait until it has trained ``step`` steps (its step checkpoint exists)."""
    log = out.parent / f"{out.name}.log"
    proc = subprocess.Popen(command, cwd=ROOT, env={**os.environ, "WANDB_MODE": "disabled", "OMP_NUM_THREADS": "1",
                                                    **(env or {})},
                            stdout=open(log, "w"), stderr=subprocess.STDOUT)
    deadline = time.time() + 120
    while not (out / "checkpoints" / f"step_{step:06d}.ckpt").exists():
        assert proc.poll() is None and time.time() < deadline, log.read_text()[-3000:]
        time.sleep(0.01)
    return proc, log


def _train(out):
    return [sys.executable, str(ROOT / "train.py"), *ARGS, f"hydra.run.dir={out}"]


def _resumes_to_the_whole_run(out, whole):
    proc = run_script("train.py", [*ARGS, f"hydra.run.dir={out}"])
    assert "resuming the interrupted run from" in proc.stdout + proc.stderr
    assert read_results(out)["weights_sha256"] == read_results(whole)["weights_sha256"]
    assert read_results(out)["metrics"] == read_results(whole)["metrics"]


def test_sigterm_stops_saves_exits_non_zero_and_the_same_command_resumes(whole, tmp_path):
    out = tmp_path / "run"
    proc, log = _start(_train(out), out)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=120) == 128 + signal.SIGTERM
    stderr = log.read_text()
    assert "stopped by SIGTERM at step" in stderr and "run the same command again" in stderr
    assert not (out / "results.json").exists() and 5 <= checkpoint(out)["global_step"] < 40
    _resumes_to_the_whole_run(out, whole)


def test_slurm_requeue_signal_saves_and_requeues_without_hpc_checkpoints(whole, tmp_path):
    """Lightning's SLURM signal (USR1): no hpc_ckpt (Lightning's own requeue is off), last.ckpt saved and
    ``scontrol requeue`` run for the job (a stand-in scontrol records it)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "scontrol").write_text(f"#!/bin/sh\necho \"$@\" > {tmp_path / 'scontrol.txt'}\n")
    (bin_dir / "scontrol").chmod(0o755)
    out = tmp_path / "run"
    proc, log = _start(_train(out), out, env={**SLURM, "PATH": f"{bin_dir}:{os.environ['PATH']}"})
    proc.send_signal(signal.SIGUSR1)
    assert proc.wait(timeout=120) == 128 + signal.SIGUSR1, log.read_text()[-2000:]
    assert (tmp_path / "scontrol.txt").read_text().split() == ["requeue", "4242"]
    assert "requeued SLURM job 4242" in log.read_text()
    assert not list(out.rglob("hpc_ckpt_*")) and (out / "checkpoints" / "last.ckpt").is_file()
    _resumes_to_the_whole_run(out, whole)


@pytest.mark.parametrize("sent", [signal.SIGUSR2, signal.SIGTERM])
def test_under_submitit_the_run_saves_then_submitit_requeues(whole, tmp_path, sent):
    out, marker = tmp_path / "run", tmp_path / "requeued.txt"
    wrapper = tmp_path / "submitit_job.py"
    wrapper.write_text(SUBMITIT)
    proc, log = _start([sys.executable, str(wrapper), str(marker), *_train(out)[1:]], out)
    proc.send_signal(sent)
    assert proc.wait(timeout=120) == 255  # submitit's exit after a requeue
    assert marker.read_text() == f"requeued after {signal.Signals(sent).name}", log.read_text()[-2000:]
    assert f"stopped by {signal.Signals(sent).name} at step" in log.read_text() and "submitit requeues" in log.read_text()
    assert (out / "checkpoints" / "last.ckpt").is_file() and not (out / "results.json").exists()
    _resumes_to_the_whole_run(out, whole)


def test_sigterm_during_the_benchmark_pretraining_exits_non_zero_and_caches_nothing(tmp_path):
    cache = tmp_path / "cache"
    log = tmp_path / "log"
    proc = subprocess.Popen([sys.executable, str(ROOT / "train.py"), "trainer.enable_progress_bar=false",
                             f"hydra.run.dir={tmp_path / 'run'}"], cwd=ROOT, stdout=open(log, "w"),
                            stderr=subprocess.STDOUT, env={**os.environ, "SAFT_CACHE_DIR": str(cache),
                                                        "WANDB_MODE": "disabled", "OMP_NUM_THREADS": "1"})
    deadline = time.time() + 180
    while "pretraining" not in log.read_text():
        assert proc.poll() is None and time.time() < deadline, log.read_text()[-3000:]
        time.sleep(0.05)
    time.sleep(3)  # into the training loop
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=120) == 128 + signal.SIGTERM
    assert "stopped by SIGTERM" in log.read_text()
    assert not [p for p in cache.rglob("*") if p.is_file()] and not (tmp_path / "run" / "results.json").exists()


def test_ddp_ranks_stop_together_on_a_signal_to_one(whole, tmp_path):
    """Rank 0 alone is signalled: both ranks stop after the same step (no hang in DDP's next all-reduce)."""
    out = tmp_path / "run"
    command = _train(out) + ["trainer=ddp", "trainer.accelerator=cpu", "trainer.devices=2"]
    proc, log = _start(command, out)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=120) == 128 + signal.SIGTERM, log.read_text()[-2000:]
    steps = re.findall(r"error: stopped by SIGTERM at step (\d+)", log.read_text())
    assert len(steps) == 2 and steps[0] == steps[1], steps  # both ranks, at the same step
    step = checkpoint(out)["global_step"]
    assert step == int(steps[0]) and 5 <= step < 40
    proc = run_script("train.py", _train(out)[2:] + ["trainer=ddp", "trainer.accelerator=cpu", "trainer.devices=2"])
    assert checkpoint(out)["global_step"] == 40 and (out / "results.json").is_file()
