"""The zero-shot reference is measured once per base model and eval data, then read from $SAFT_CACHE_DIR."""
import fcntl
import json
import os
import subprocess
import sys
import time

import pytorch_lightning as pl

from conftest import FAST, ROOT, compose_cfg, read_results, run_script
from saft.app import run
from saft.app.zeroshot import CACHED, MEASURED, cache_dir, reference_key, zeroshot_metrics

TRAIN = FAST + ["method=full_ft_text", "trainer.max_steps=2"]


def _parts(tmp_path, overrides=()):
    cfg = compose_cfg(tmp_path / "run", TRAIN + list(overrides))
    datamodule, module = run.build(cfg)
    trainer = pl.Trainer(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
                         enable_model_summary=False, default_root_dir=str(tmp_path / "lightning"))
    return trainer, module, datamodule


def test_second_run_reads_the_reference_the_first_measured_and_it_equals_a_fresh_test(tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    env = {"SAFT_CACHE_DIR": str(cache)}
    first = tmp_path / "seed1"
    run_script("train.py", TRAIN + ["seed=1", f"hydra.run.dir={first}"], env=env)
    second = tmp_path / "seed2_lr3"  # another training of the same base model on the same test sets
    run_script("train.py", TRAIN + ["seed=2", "lr_scale=3", f"hydra.run.dir={second}"], env=env)
    fresh = tmp_path / "fresh"
    run_script("train.py", TRAIN + ["seed=2", "lr_scale=3", "zeroshot_cache=false", f"hydra.run.dir={fresh}"],
               env=env)
    a, b, c = read_results(first), read_results(second), read_results(fresh)
    assert (a["zeroshot_from"], b["zeroshot_from"], c["zeroshot_from"]) == (MEASURED, CACHED, MEASURED)
    assert b["zeroshot_metrics"] == c["zeroshot_metrics"] == a["zeroshot_metrics"]  # exact floats
    assert b["weights_sha256"] == c["weights_sha256"] and b["metrics"] == c["metrics"]  # training unchanged
    assert b["identity_hash"] == c["identity_hash"]  # the switch is not part of what a run is
    assert len(list((cache / "zeroshot").glob("*.json"))) == 1


def test_the_key_changes_with_the_base_model_the_eval_data_and_the_evaluation_not_with_training(tmp_path,
                                                                                                 monkeypatch):
    monkeypatch.setenv("SAFT_CACHE_DIR", str(tmp_path / "cache"))

    def key(*overrides):
        return reference_key(*_parts(tmp_path / f"cfg{len(list(tmp_path.iterdir()))}", overrides))
    base = key()
    assert key("seed=2", "lr_scale=3", "shots=2", "method=saft") == base  # the training side
    others = [key("model.init_seed=1"), key("model.force_quick_gelu=true"), key("model.batch_first_attention=false"),
              key("dataset.datamodule.test_per_class=5"),
              key("dataset.datamodule.image_size=24"), key("eval_batch_size=16"), key("protocol=base2new")]
    assert len({base, *others}) == 1 + len(others)


def test_a_changed_test_image_file_or_another_image_root_is_another_key(tmp_path, monkeypatch):
    """Test sets read by an ImageFolder (CoOp's datasets, ImageNet's variants, eval_datasets) with relative keys."""
    from datamodules.base import EvalSet, ImageFolder
    trainer, module, datamodule = _parts(tmp_path)
    sets = datamodule.eval_sets()
    for root in ("a", "b"):
        (tmp_path / root / "cls").mkdir(parents=True)
        (tmp_path / root / "cls" / "1.jpg").write_bytes(b"one")
    folder = {"root": tmp_path / "a"}

    def key():
        extra = EvalSet("folder", [("cls/1.jpg", 0)], sets[0].classnames, sets[0].templates, ImageFolder(folder["root"]))
        monkeypatch.setattr(datamodule, "eval_sets", lambda: [*sets, extra])
        return reference_key(trainer, module, datamodule)
    before = key()
    assert key() == before
    (tmp_path / "a" / "cls" / "1.jpg").write_bytes(b"other bytes")
    changed = key()
    folder["root"] = tmp_path / "b"
    assert len({before, changed, key()}) == 3


def test_an_unreadable_entry_is_measured_again_and_replaced(tmp_path, monkeypatch):
    monkeypatch.setenv("SAFT_CACHE_DIR", str(tmp_path / "cache"))
    trainer, module, datamodule = _parts(tmp_path)
    path = cache_dir() / f"{reference_key(trainer, module, datamodule)}.json"
    path.parent.mkdir(parents=True)
    path.write_text('{"metrics": {"photo": {"top1": 1')  # a truncated file
    metrics, source = zeroshot_metrics(trainer, module, datamodule)
    assert source == MEASURED and set(metrics) == {s.name for s in datamodule.eval_sets()}
    assert json.loads(path.read_text())["metrics"] == metrics
    assert zeroshot_metrics(trainer, module, datamodule) == (metrics, CACHED)
    partial = {name: {**m, "n": m["n"] - 1} for name, m in metrics.items()}  # e.g. a limited test loop's
    for bad in (partial, dict(list(metrics.items())[1:]), []):
        path.write_text(json.dumps({"metrics": bad}))
        assert zeroshot_metrics(trainer, module, datamodule) == (metrics, MEASURED)


def test_a_limited_test_loop_is_measured_and_never_stored(tmp_path):
    trainer, module, datamodule = _parts(tmp_path)
    limited = pl.Trainer(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False, limit_test_batches=1,
                         enable_model_summary=False, default_root_dir=str(tmp_path / "lightning"))
    assert zeroshot_metrics(limited, module, datamodule)[1] == MEASURED
    assert not cache_dir().exists()


def test_a_cache_folder_that_cannot_be_written_costs_a_measurement_not_the_run(tmp_path, monkeypatch, caplog):
    monkeypatch.setenv("SAFT_CACHE_DIR", "/proc/no-such-cache")
    trainer, module, datamodule = _parts(tmp_path)
    metrics, source = zeroshot_metrics(trainer, module, datamodule)
    assert source == MEASURED and len(metrics) == len(datamodule.eval_sets())
    assert "cannot be used" in caplog.text


def test_a_job_waits_for_the_one_measuring_the_same_reference_and_reads_its_result(tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    monkeypatch.setenv("SAFT_CACHE_DIR", str(cache))
    trainer, module, datamodule = _parts(tmp_path)
    path = cache_dir() / f"{reference_key(trainer, module, datamodule)}.json"
    path.parent.mkdir(parents=True)
    marked = {s.name: {"top1": 12.5, "n": len(s.items), "head": "text"} for s in datamodule.eval_sets()}
    with open(path.with_suffix(".lock"), "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # this test is the job measuring it
        job = subprocess.Popen([sys.executable, str(ROOT / "train.py"), *TRAIN, f"hydra.run.dir={tmp_path / 'job'}"],
                               env={**os.environ, "OMP_NUM_THREADS": "1"}, cwd=ROOT, stdout=subprocess.DEVNULL,
                               stderr=subprocess.PIPE, text=True)
        log = tmp_path / "job" / "train.log"
        deadline = time.time() + 240
        while not (log.is_file() and "waiting for another job" in log.read_text()):  # it found the lock held
            assert job.poll() is None and time.time() < deadline, job.stderr.read()[-3000:]
            time.sleep(0.5)
        path.write_text(json.dumps({"metrics": marked}))
        fcntl.flock(lock, fcntl.LOCK_UN)
    assert job.wait(timeout=300) == 0, job.stderr.read()[-3000:]
    result = read_results(tmp_path / "job")
    assert result["zeroshot_from"] == CACHED and result["zeroshot_metrics"] == marked
