"""Checkpoint writes that survive kills, and files that are safe to load (kill and resume: test_resume.py)."""
import os
import shutil

from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from conftest import checkpoint, run_script
from layouts import make_coop
from saft.app.checkpoint_io import AtomicCheckpointIO


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


QUICK = ["model=tiny", "dataset=synthetic", "shots=4", "dataset.datamodule.test_per_class=3", "trainer.max_steps=3", "trainer.enable_progress_bar=false",
         "checkpoint.every_n_train_steps=1"]


def _fails(script, args, message):
    proc = run_script(script, args, check=False)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert message in proc.stderr and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    return proc


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    out = tmp_path_factory.mktemp("finished") / "run"
    run_script("train.py", [*QUICK, f"hydra.run.dir={out}"])
    return out


def test_corrupt_or_unsafe_checkpoints_get_one_message(finished, tmp_path):
    truncated = tmp_path / "truncated.ckpt"
    truncated.write_bytes((finished / "checkpoints" / "last.ckpt").read_bytes()[:5000])
    _fails("train.py", [*QUICK, f"ckpt_path={truncated}", f"hydra.run.dir={tmp_path / 'a'}"],
           "cannot load checkpoint")
    unsafe = tmp_path / "unsafe.ckpt"
    torch.save({"state_dict": {}, "payload": Path(".")}, unsafe)  # an arbitrary pickled object
    _fails("train.py", [*QUICK, f"ckpt_path={unsafe}", f"hydra.run.dir={tmp_path / 'b'}"], "refuses")
    bad_weights = tmp_path / "weights.pt"
    bad_weights.write_bytes(b"not a checkpoint")
    _fails("train.py", [*QUICK, f"model.pretrained={bad_weights}", f"hydra.run.dir={tmp_path / 'c'}"],
           "cannot load model.pretrained")


def test_corrupt_delta_and_delta_for_another_base(finished, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(finished, broken)
    data = (broken / "delta.safetensors").read_bytes()
    (broken / "delta.safetensors").write_bytes(data[: len(data) // 2])
    _fails("eval.py", [f"run_dir={broken}", f"hydra.run.dir={tmp_path / 'e1'}"], "cannot read delta file")
    other = tmp_path / "other_base"
    shutil.copytree(finished, other)
    saved = OmegaConf.load(other / ".hydra" / "config.yaml")
    saved.model.init_seed = 7  # the same architecture, other weights
    OmegaConf.save(saved, other / ".hydra" / "config.yaml")
    _fails("eval.py", [f"run_dir={other}", f"hydra.run.dir={tmp_path / 'e2'}"], "was made for another base model")


def test_unreadable_image_stops_the_run_and_names_the_file(tmp_path):
    make_coop(tmp_path, "dtd")
    victim = tmp_path / "dtd" / "images" / "Forest" / "test_0.jpg"
    victim.write_bytes(b"\xff\xd8 truncated jpeg")
    _fails("eval.py", ["model=tiny", "dataset=dtd", f"data_dir={tmp_path}", "num_workers=0", f"hydra.run.dir={tmp_path / 'e'}"],
           f"cannot read image {victim}")


def test_diverging_loss_stops_with_the_step_and_keeps_the_checkpoints(tmp_path):
    proc = _fails("train.py", [*QUICK, "trainer.max_steps=30", "method=full_ft", "method.optimizer.lr=1e30",
                               "trainer.gradient_clip_val=null", f"hydra.run.dir={tmp_path}"],
                  "the training loss became")
    step = int(proc.stderr.split(" at step ")[1].split(";")[0])
    assert step >= 1
    assert checkpoint(tmp_path)["global_step"] == step  # the last good state, loadable
    assert not (tmp_path / "results.json").exists()


def test_a_failing_multirun_job_does_not_stop_the_others(tmp_path):
    proc = run_script("train.py", ["-m", "sparsity=5,0.01", *QUICK, f"hydra.sweep.dir={tmp_path}"], check=False)
    assert proc.returncode != 0
    done = [p.parent for p in tmp_path.glob("*/results.json")]
    failed = [p.parent for p in tmp_path.glob("*/error.txt")]
    assert len(done) == 1 and done[0].name == "sparsity-0.01"
    assert len(failed) == 1 and "must be a number in (0, 1]" in (failed[0] / "error.txt").read_text()


def test_unknown_group_option_is_reported_by_hydra_without_a_traceback(tmp_path):
    for bad in ("method=nosuch", "dataset=nosuch", "model=nosuch"):
        proc = run_script("train.py", ["model=tiny", "dataset=synthetic", bad, f"hydra.run.dir={tmp_path}"],
                          check=False)
        assert proc.returncode != 0 and "Could not find" in proc.stderr and "Traceback" not in proc.stderr


@pytest.mark.parametrize("umask, mode", [(0o002, "0o664"), (0o027, "0o640")])
def test_a_runs_files_follow_the_users_umask(tmp_path, umask, mode):
    """Labmates on a shared filesystem read each other's runs: every file a run writes (the delta and head that
    safetensors creates 0600 on its own, checkpoints, results) gets the mode the umask gives a new file."""
    old = os.umask(umask)
    try:
        run_script("train.py", [*QUICK, "method=lp_ft", f"hydra.run.dir={tmp_path / 'run'}"])
    finally:
        os.umask(old)
    files = [p for p in (tmp_path / "run").rglob("*") if p.is_file()]
    assert {"delta.safetensors", "head.safetensors", "results.json", "last.ckpt"} <= {p.name for p in files}
    assert {str(p): oct(p.stat().st_mode & 0o777) for p in files} == {str(p): mode for p in files}
