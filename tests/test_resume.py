"""Resuming: from any checkpoint (inside epoch 0, mid-epoch, at an epoch end, at max_steps, under 2-process DDP,
after a SIGKILL) a run finishes with weights bit-identical to the uninterrupted run and the same results.json
metrics; a checkpoint that cannot be continued exactly is refused.

Data: 6 classes x 4 shots = 24 training images, batch 8: 3 steps per epoch (DDP: 2 ranks x 12 images, batch 4).
"""
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from collections import Counter

import pytest
import torch

from conftest import FAST, ROOT, checkpoint, ckpt_masks, compose_cfg, read_results, run_script
from datamodules.base import EpochSeededSampler
from saft.app import run
from saft.callback import SparseMaskCallback
from saft.errors import ConfigError

STEPS = ["trainer.max_steps=9", "checkpoint.every_n_train_steps=1", "checkpoint.save_top_k=-1"]
METHODS = {"saft": ["sparsity=0.01", "method.optimizer.lr=0.01"],
           "full_ft": ["method=full_ft", "method.optimizer.lr=1e-4"],
           "full_ft_text": ["method=full_ft_text", "method.optimizer.lr=1e-4"],
           # the probe fitted before step 1 (5 values of C), then 9 fine-tuning steps
           "lp_ft": ["method=lp_ft", "method.optimizer.lr=1e-3", "method.probe.c_count=5"],
           # 9 steps: the probe phase is steps 1-4 (round(0.5 * 9) = 4), fine-tuning 5-9
           "lp_ft_steps": ["method=lp_ft", "method.probe=null", "method.lp_fraction=0.5", "method.optimizer.lr=1e-3",
                           "method.head_lr=0.05"],
           "coop": ["method=coop", "method.n_ctx=4", "method.optimizer.lr=0.5"]}


def _train(out, overrides=()):
    return run.train(compose_cfg(out, FAST + STEPS + list(overrides)))


def _step(run_dir, step):
    return run_dir / "checkpoints" / f"step_{step:06d}.ckpt"


def _assert_finishes_identically(reference, resumed):
    """Every tensor of the trained model (and of the method's head) bit for bit, the mask, the step count and the
    metrics."""
    ref, got = checkpoint(reference), checkpoint(resumed)
    assert got["global_step"] == ref["global_step"]
    a, b = ref["state_dict"], got["state_dict"]
    assert a.keys() == b.keys()
    differ = [n for n in a if not torch.equal(a[n], b[n])]
    assert not differ, f"{len(differ)} of {len(a)} tensors differ, e.g. {differ[:3]}"
    if "SparseMaskCallback" in ref["callbacks"]:
        masks, other = ckpt_masks(ref), ckpt_masks(got)
        assert masks.keys() == other.keys() and all(torch.equal(masks[n], other[n]) for n in masks)
    assert read_results(resumed)["metrics"] == read_results(reference)["metrics"]


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """One uninterrupted 9-step run per method, with a checkpoint after every step (made on first use)."""
    runs = {}

    def get(method):
        if method not in runs:
            out = tmp_path_factory.mktemp("reference") / method
            _train(out, METHODS[method])
            runs[method] = out
        return runs[method]
    return get


def _forbid_mask_selection(monkeypatch):
    """A resumed masked run restores its mask; selecting one again would be wrong (and slow)."""
    def fail(*args, **kwargs):
        raise AssertionError("the mask was recomputed on resume")
    monkeypatch.setattr(SparseMaskCallback, "_select", fail)


# --- the sampler -----------------------------------------------------------------------------------
def _old_epoch(n, seed, epoch):
    """A literal copy of the single-process algorithm before the sampler sharded by rank."""
    gen = torch.Generator().manual_seed(seed * 100_003 + epoch)
    return list(zip(torch.randperm(n, generator=gen).tolist(), torch.randint(0, 2**62, (n,), generator=gen).tolist()))


@pytest.mark.parametrize("world", [1, 2, 3])
def test_sampler_ranks_partition_the_padded_epoch_and_a_resume_skips_this_ranks_trained_share(world):
    n, seed, batch = 10, 7, 2
    per_rank = math.ceil(n / world)
    samplers = [EpochSeededSampler(n, seed, world, rank) for rank in range(world)]
    assert all(isinstance(s, torch.utils.data.DistributedSampler) for s in samplers)  # Lightning does not wrap it
    epochs = {}
    for epoch in (0, 1):
        for s in samplers:
            s.set_epoch(epoch)
        shares = [list(s) for s in samplers]
        assert all(len(share) == len(s) == per_rank for share, s in zip(shares, samplers))
        old = _old_epoch(n, seed, epoch)
        padded = old + old[:per_rank * world - n]  # as DistributedSampler pads: repeat the start
        assert [shares[p % world][p // world] for p in range(per_rank * world)] == padded
        assert Counter(pair for share in shares for pair in share) == Counter(padded)
        assert {i for i, _ in padded} == set(range(n))
        if world == 1:
            assert shares[0] == old  # one process: exactly the old order and augmentation seeds
        epochs[epoch] = shares
    assert epochs[0] != epochs[1]
    for rank in range(world):
        for b in (1, 2):
            s = EpochSeededSampler(n, seed, world, rank, resume_at=(1, b * batch))
            s.set_epoch(1)
            assert len(s) == per_rank  # Lightning counts the epoch's batches from the full share
            assert list(s) == epochs[1][rank][b * batch:]
            assert list(s) == epochs[1][rank]  # the skip applies once
        s = EpochSeededSampler(n, seed, world, rank, resume_at=(1, batch))
        assert list(s) == epochs[0][rank]  # another epoch is not skipped into


# --- single process --------------------------------------------------------------------------------
@pytest.mark.parametrize("method", ["saft", "full_ft"])
def test_resume_inside_epoch_0_finishes_identically(reference, tmp_path, monkeypatch, method):
    """The mask pass used to count as training batches of epoch 0 and the resume skipped too many samples."""
    ref = reference(method)
    _forbid_mask_selection(monkeypatch)
    for step in (1, 2):
        out = tmp_path / f"from_{step}"
        _train(out, METHODS[method] + [f"ckpt_path={_step(ref, step)}"])
        _assert_finishes_identically(ref, out)


@pytest.mark.parametrize("method, step", [("lp_ft", 4), ("lp_ft_steps", 2), ("lp_ft_steps", 4), ("lp_ft_steps", 6),
                                          ("coop", 4)])
def test_baselines_resume_in_any_phase_and_finish_identically(reference, tmp_path, method, step):
    """LP-FT keeps its checkpoint's head (its probe is not fitted again); LP-FT by gradient steps from inside its
    probe phase, from its last probe step and from inside fine-tuning; CoOp mid-run."""
    out = tmp_path / "resumed"
    _train(out, METHODS[method] + [f"ckpt_path={_step(reference(method), step)}"])
    _assert_finishes_identically(reference(method), out)
    assert any(k.startswith("head.") for k in checkpoint(out)["state_dict"])


@pytest.mark.parametrize("step, workers", [(3, 0), (4, 0), (8, 0), (3, 1), (5, 1)])
def test_resume_mid_epoch_or_at_an_epoch_end_finishes_identically(reference, tmp_path, monkeypatch, step, workers):
    """Step 3 ends epoch 0; 4, 5 and 8 are inside epochs 1 and 2. With a DataLoader worker the sampler is
    iterated when Lightning creates the loader's iterator, before it sets the resumed epoch on the sampler."""
    ref = reference("saft")
    _forbid_mask_selection(monkeypatch)
    out = tmp_path / "resumed"
    _train(out, METHODS["saft"] + [f"ckpt_path={_step(ref, step)}", f"dataset.datamodule.num_workers={workers}"])
    _assert_finishes_identically(ref, out)


@pytest.mark.parametrize("method", ["saft", "full_ft_text"])
def test_requeue_after_max_steps_reports_the_trained_model(tmp_path, method):
    """A run killed during its final test has last.ckpt at max_steps; the same command again trains nothing and
    must test the trained weights, not heads cached from the zero-shot test of the base model. Only the text
    tower trains, so every change of the metrics comes through the heads."""
    overrides = METHODS[method] + ["method.towers=[text]"]
    finished_dir, requeued = tmp_path / "finished", tmp_path / "requeued"
    finished = _train(finished_dir, overrides)
    assert finished["metrics"] != finished["zeroshot_metrics"]  # else stale heads would go unnoticed
    shutil.copytree(finished_dir, requeued)
    (requeued / "results.json").unlink()  # killed during the final test
    (requeued / "delta.safetensors").unlink()
    _train(requeued, overrides)  # the same command again: it resumes from its own last.ckpt
    _assert_finishes_identically(finished_dir, requeued)
    assert read_results(requeued)["num_changed"] == finished["num_changed"]


@pytest.mark.parametrize("method", ["lp_ft", "coop"])
def test_requeue_after_max_steps_reports_the_trained_head(reference, tmp_path, method):
    """Killed during the final test, the same command again must test (and save) the trained head, not a new one."""
    requeued = tmp_path / "requeued"
    shutil.copytree(reference(method), requeued)
    for name in ("results.json", "delta.safetensors", "head.safetensors"):
        (requeued / name).unlink()
    _train(requeued, METHODS[method])
    _assert_finishes_identically(reference(method), requeued)
    assert read_results(requeued)["weights_sha256"] == read_results(reference(method))["weights_sha256"]
    assert (requeued / "head.safetensors").read_bytes() == (reference(method) / "head.safetensors").read_bytes()


@pytest.mark.parametrize("change, named", [
    (["trainer.max_steps=6"], "max_steps"), (["sparsity=0.02"], "sparsity"), (["method.mask.score=fisher"], "mask.score"),
    (["method.optimizer.lr=0.05"], "lr"), (["shots=3"], "shots"), (["seed=2"], "seed"),
    (["method.optimizer.weight_decay=0.3"], "optimizer"), (["dataset.datamodule.image_size=48"], "datamodule")])
def test_resume_with_other_settings_is_refused_before_anything_is_written(reference, tmp_path, change, named):
    """Resumed with another lr or shots, a run would finish with the checkpoint's training and results.json
    would carry the new settings: silently wrong labels."""
    base = [o for o in METHODS["saft"] if not o.startswith(tuple(c.split("=")[0] + "=" for c in change))]
    with pytest.raises(ConfigError, match=rf"was trained with .*{named}.*resume with the run's own config"):
        _train(tmp_path / "b", base + change + [f"ckpt_path={_step(reference('saft'), 3)}"])
    assert not (tmp_path / "b" / "split.json").exists() and not (tmp_path / "b" / "checkpoints").exists()


@pytest.mark.parametrize("method, change, named", [("lp_ft_steps", "method.lp_fraction=0.25", "lp_fraction"),
                                                   ("lp_ft_steps", "method.head_lr=0.01", "head_lr"),
                                                   ("lp_ft", "method.probe.c_count=6", "c_count"),
                                                   ("coop", "method.n_ctx=3", "n_ctx")])
def test_resume_of_a_baseline_with_its_own_settings_changed_is_refused(reference, tmp_path, method, change, named):
    with pytest.raises(ConfigError, match=rf"was trained with .*{named}.*resume with the run's own config"):
        _train(tmp_path / "b", METHODS[method] + [change, f"ckpt_path={_step(reference(method), 3)}"])


def test_resume_inside_an_epoch_with_another_batch_size_is_refused(reference, tmp_path):
    """Another batch size is another run (part of its identity); the samples trained before a mid-epoch checkpoint
    would not be known either."""
    with pytest.raises(ConfigError, match="was trained with .*batch_size"):
        _train(tmp_path / "b", METHODS["saft"] + ["batch_size=4", f"ckpt_path={_step(reference('saft'), 4)}"])


# --- DDP and SIGKILL, through train.py -------------------------------------------------------------------
DDP = ["trainer=ddp", "trainer.accelerator=cpu", "trainer.devices=2", "model=tiny", "dataset=synthetic", "shots=4",
       "batch_size=4", "eval_batch_size=32", "dataset.datamodule.train_per_class=8",
       "dataset.datamodule.val_per_class=4", "dataset.datamodule.test_per_class=4", "trainer.max_steps=6",
       "trainer.enable_progress_bar=false", "trainer.enable_model_summary=false",
       "trainer.check_val_every_n_epoch=100", "checkpoint.every_n_train_steps=1", "checkpoint.save_top_k=-1",
       *METHODS["saft"]]


def test_ddp_resume_inside_an_epoch_finishes_identically(tmp_path):
    """2 ranks x 12 images, batch 4: 3 steps per epoch; step 4 is inside epoch 1. Lightning used to wrap the
    sampler, whose shortened list then raised IndexError, and the skip counted one rank's samples only."""
    whole, resumed = tmp_path / "whole", tmp_path / "resumed"
    run_script("train.py", [*DDP, f"hydra.run.dir={whole}"])
    loops = checkpoint(whole, "step_000004.ckpt")["loops"]["fit_loop"]
    assert loops["epoch_progress"]["current"]["completed"] == 1  # epoch 1,
    assert loops["epoch_loop.batch_progress"]["current"]["processed"] == 1  # its first of 3 batches done
    proc = run_script("train.py", [*DDP, f"hydra.run.dir={resumed}", f"ckpt_path={_step(whole, 4)}"])
    lines = (proc.stdout + proc.stderr).splitlines()  # both ranks print to the same console
    for what in ("mask of", "trained weights"):
        per_rank = [[ln.split("sha256 ")[1] for ln in lines if f"rank {rank}: {what}" in ln] for rank in (0, 1)]
        assert len(per_rank[0]) == 1 and per_rank[0] == per_rank[1], what
    _assert_finishes_identically(whole, resumed)


ARGS = ["model=tiny", "dataset=synthetic", "shots=4", "batch_size=8", "dataset.datamodule.test_per_class=5",
        "trainer.max_steps=60", "trainer.enable_progress_bar=false", "checkpoint.every_n_train_steps=1",
        "sparsity=0.01", "method.optimizer.lr=0.01"]


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
    # The same command again resumes by itself (what a SLURM requeue does); ckpt_path=last says it explicitly.
    proc = run_script("train.py", [*ARGS, f"hydra.run.dir={killed}"])
    assert "resuming the interrupted run from" in proc.stdout + proc.stderr
    _assert_finishes_identically(tmp_path / "whole", killed)
    assert checkpoint(killed)["global_step"] == 60


def test_a_requeued_job_keeps_the_earlier_attempts_metrics(tmp_path):
    """Lightning's CSV logger deletes the metrics.csv it finds; the earlier attempt's rows stay as
    metrics.attempt1.csv, and the new attempt writes metrics.csv."""
    run = tmp_path / "run"
    first = _train(run, ["logger=csv"])
    rows = (run / "csv" / "metrics.csv").read_text()
    assert "train/loss" in rows.splitlines()[0]
    (run / "results.json").unlink()  # killed during the final test: the same command again resumes
    (run / "delta.safetensors").unlink()
    _train(run, ["logger=csv"])
    assert (run / "csv" / "metrics.attempt1.csv").read_text() == rows
    again = (run / "csv" / "metrics.csv").read_text()
    assert again != rows and read_results(run)["metrics"] == first["metrics"]
    # the run's summary reaches the file too (it is logged after Lightning has finalised the logger)
    header = again.splitlines()[0].split(",")
    assert {"test/id/top1", "test/ood_mean/top1", "gain/id/top1", "num_trainable"} <= set(header)
    # a deleted earlier attempt never makes a later one overwrite another
    (run / "csv" / "metrics.attempt1.csv").rename(run / "csv" / "metrics.attempt2.csv")
    (run / "results.json").unlink()
    (run / "delta.safetensors").unlink()
    _train(run, ["logger=csv"])
    assert (run / "csv" / "metrics.attempt2.csv").read_text() == rows
    assert (run / "csv" / "metrics.attempt3.csv").read_text() == again
