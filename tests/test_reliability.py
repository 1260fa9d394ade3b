"""Runs that survive kills, and files that are safe to load."""
import os
import signal
import subprocess
import sys
import time

import torch

from conftest import ROOT, checkpoint, ckpt_params, read_results, run_script
from saft.checkpoint_io import AtomicCheckpointIO

ARGS = ["shots=4", "batch_size=8", "dataset.datamodule.test_per_class=5", "trainer.max_steps=60", "trainer.enable_progress_bar=false",
        "checkpoint.every_n_train_steps=1", "sparsity=0.01", "method.optimizer.lr=0.01"]


def test_sigkill_then_resume_matches_an_uninterrupted_run(tmp_path):
    run_script("train.py", [*ARGS, f"hydra.run.dir={tmp_path / 'whole'}"])
    killed = tmp_path / "killed"
    env = {**os.environ, "WANDB_MODE": "disabled", "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, str(ROOT / "train.py"), *ARGS, f"hydra.run.dir={killed}"],
                            cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while not (killed / "checkpoints" / "step_000013.ckpt").exists():  # 3 steps per epoch: mid-epoch
        assert proc.poll() is None and time.time() < deadline, "the run ended before it could be killed"
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (killed / "results.json").exists()
    step_at_kill = checkpoint(killed)["global_step"]
    assert 12 <= step_at_kill < 60  # last.ckpt is written just after step_000013.ckpt
    run_script("train.py", [*ARGS, f"hydra.run.dir={killed}", "ckpt_path=last"])  # the documented resume
    whole, resumed = checkpoint(tmp_path / "whole"), checkpoint(killed)
    assert resumed["global_step"] == whole["global_step"] == 60
    assert all(torch.equal(ckpt_params(whole)[n], ckpt_params(resumed)[n]) for n in ckpt_params(whole))
    assert read_results(killed)["metrics"] == read_results(tmp_path / "whole")["metrics"]


def test_checkpoint_writes_are_atomic(tmp_path, monkeypatch):
    io = AtomicCheckpointIO()
    target = tmp_path / "last.ckpt"
    io.save_checkpoint({"w": torch.ones(3)}, target)

    def crash(*args, **kwargs):
        raise KeyboardInterrupt  # as if killed while writing
    monkeypatch.setattr(torch, "save", crash)
    try:
        io.save_checkpoint({"w": torch.zeros(3)}, target)
    except KeyboardInterrupt:
        pass
    assert torch.equal(io.load_checkpoint(target)["w"], torch.ones(3))  # the old file is intact
