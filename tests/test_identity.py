"""A run's identity (saft.app.identity): one definition, derived from the config, used by results.json, resume, the
report and wandb. The report tests use the identities of really composed configs."""
import json
import shutil

import pytest
from omegaconf import OmegaConf

from conftest import FAST, compose_cfg, read_results, run_script
from saft.app import run
from saft.app.identity import LOCATION, run_identity
from saft.errors import ConfigError
from saft.report.runs import Runs, collect
from saft.report.tables import matched_id_table, summary_table

STEPS = ["trainer.max_steps=3", "checkpoint.every_n_train_steps=1", "checkpoint.save_top_k=-1"]


def _identity(tmp_path, overrides=()):
    return run_identity(compose_cfg(tmp_path / "cfg", FAST + list(overrides)))


def _fake(tmp_path, overrides, seed=1, id_top1=30.0, ood_top1=70.0, zeroshot=(20.0, 80.0)):
    """A finished run's results.json as train.py writes it, for the config those overrides compose (no training)."""
    cfg = compose_cfg(tmp_path / "cfg", FAST + [f"seed={seed}", *overrides])
    metrics = lambda x, y: {"photo": {"top1": x}, "sketch": {"top1": y - 1}, "negative": {"top1": y + 1}}  # noqa
    return {"method": cfg.method.name, "dataset": "synthetic", "model": "saft-tiny", "seed": seed, "shots": 4,
            "id": "photo", "ood": ["sketch", "negative"], "metrics": metrics(id_top1, ood_top1),
            "zeroshot_metrics": metrics(*zeroshot), "ood_mean_top1": ood_top1, "num_trainable": 1,
            **run_identity(cfg).as_results()}


def _rows(table):
    return {label: cells for label, cells in table.rows}


# --- what the identity holds ------------------------------------------------------------------------
def test_identity_is_the_resolved_config_minus_declared_keys(tmp_path):
    base = _identity(tmp_path)
    assert base.settings["method.optimizer.lr"] == 1e-3 and base.settings["trainer.max_steps"] == 6
    assert "hydra.run.dir" not in base.settings and not any(k.startswith(("checkpoint", "logger")) for k in base.settings)
    # What cannot change results leaves the identity as it is; what can changes it.
    for same in (["eval_batch_size=7"], ["num_workers=3"], ["data_dir=/elsewhere"], ["trainer.log_every_n_steps=2"],
                 ["experiment_name=other"], ["eval_zeroshot=false"], ["logger=wandb"]):
        assert _identity(tmp_path, same).hash == base.hash, same
    for other in (["trainer.max_steps=7"], ["method.mask.selection=random"], ["trainer.precision=bf16-mixed"],
                  ["batch_size=4"], ["trainer.gradient_clip_val=0.5"], ["seed=2"]):
        assert _identity(tmp_path, other).hash != base.hash, other
    assert _identity(tmp_path, ["seed=2"]).config_hash == base.config_hash  # the seeds of one configuration
    assert set(base.seed_keys) == {"seed", "dataset.datamodule.seed", "method.mask.seed"}


def test_a_shared_value_counts_only_where_the_run_uses_it(tmp_path):
    """``sparsity`` reaches a run through ``method.mask.sparsity``: full fine-tuning has no mask, so its runs do
    not differ by it; the zero-shot method has no optimizer, so ``lr_scale`` is no part of it."""
    saft = [_identity(tmp_path, [f"sparsity={s}"]) for s in (0.001, 0.01)]
    assert saft[0].hash != saft[1].hash and saft[1].settings["method.mask.sparsity"] == 0.01
    ft = [_identity(tmp_path, ["method=full_ft", f"sparsity={s}"]) for s in (0.001, 0.01)]
    assert ft[0].hash == ft[1].hash and "sparsity" not in ft[0].settings
    zeroshot = [_identity(tmp_path, ["method=zeroshot", f"lr_scale={s}"]) for s in (1, 3)]
    assert zeroshot[0].hash == zeroshot[1].hash
    assert "sparsity" in saft[0].method_keys and "lr_scale" in saft[0].method_keys and "shots" not in saft[0].method_keys


def test_the_seed_counts_even_where_no_config_interpolates_it(tmp_path):
    """CoOp draws its context from the global RNG that ``seed`` seeds: with the datamodule's seed pinned, nothing
    interpolates ``${seed}`` any more, and the runs still differ."""
    a, b = (_identity(tmp_path, ["method=coop", "dataset.datamodule.seed=1", f"seed={s}"]) for s in (2, 3))
    assert a.hash != b.hash and a.seed_keys == ["seed"]


def test_a_number_is_one_value_whatever_its_spelling(tmp_path):
    """A sweep's lr_scale=1 and the config's 1.0 are one configuration (and one resume)."""
    assert _identity(tmp_path, ["lr_scale=1"]).hash == _identity(tmp_path, []).hash
    assert _identity(tmp_path, ["lr_scale=1"]).settings["lr_scale"] == 1


def test_only_the_checkpoint_writer_of_the_trainer_plugins_is_ignored(tmp_path):
    half = ["trainer.plugins=[{_target_:saft.app.checkpoint_io.AtomicCheckpointIO},"
            "{_target_:pytorch_lightning.plugins.precision.HalfPrecision}]"]
    assert _identity(tmp_path, ["trainer.plugins=[]"]).hash == _identity(tmp_path, []).hash
    assert _identity(tmp_path, half).hash != _identity(tmp_path, []).hash


def test_what_an_ignored_key_interpolates_does_not_count(tmp_path):
    """A logger named after the sparsity does not make full fine-tuning depend on it."""
    ft = [_identity(tmp_path, ["method=full_ft", "logger.name=x_${sparsity}", f"sparsity={s}"]) for s in (0.1, 0.2)]
    assert ft[0].hash == ft[1].hash and "sparsity" not in ft[0].settings


def test_a_split_file_counts_by_its_content_and_a_data_path_by_nothing(tmp_path):
    a, b = tmp_path / "a.json", tmp_path / "b.json"
    a.write_text('{"train": [], "val": []}')
    shutil.copy(a, b)
    assert _identity(tmp_path, [f"split_file={a}"]).hash == _identity(tmp_path, [f"split_file={b}"]).hash
    b.write_text('{"train": [["x", 0]], "val": []}')
    assert _identity(tmp_path, [f"split_file={a}"]).hash != _identity(tmp_path, [f"split_file={b}"]).hash
    imagenet = run_identity(compose_cfg(tmp_path / "cfg", ["dataset=imagenet"])).settings
    assert imagenet["dataset.datamodule.root"] == LOCATION and imagenet["dataset.datamodule.variant_dirs.imagenet_a"] == LOCATION


def test_results_json_records_the_identity_the_saved_config_gives(tmp_path):
    run_script("train.py", FAST + [f"hydra.run.dir={tmp_path / 'run'}"])
    results = read_results(tmp_path / "run")
    saved = run_identity(OmegaConf.load(tmp_path / "run" / ".hydra" / "config.yaml"))  # outside Hydra, as the report
    assert results["identity"] == saved.settings and results["identity_hash"] == saved.hash
    assert results["config_hash"] == saved.config_hash
    assert results["identity"] == run_identity(compose_cfg(tmp_path / "again", FAST)).settings  # where it runs aside


# --- a new option: part of the identity without any list being edited -------------------------------
def test_a_new_config_key_separates_report_rows_and_refuses_a_resume(tmp_path):
    first = tmp_path / "runs" / "first"
    run_script("train.py", FAST + STEPS + [f"hydra.run.dir={first}"])
    new = ["+method.new_option=2"]
    run_script("train.py", FAST + STEPS + new + [f"hydra.run.dir={tmp_path / 'runs' / 'second'}"])
    rows = _rows(summary_table(collect([tmp_path / "runs"])))
    assert set(rows) == {"saft", "saft, new_option=2"} and all(cells[-1] == 1 for cells in rows.values())
    resumed = tmp_path / "resumed"
    with pytest.raises(ConfigError, match="new_option"):
        run.train(compose_cfg(resumed, FAST + STEPS + new + [f"ckpt_path={first}/checkpoints/step_000002.ckpt"]))
    assert not (resumed / "checkpoints").exists() and not (resumed / "results.json").exists()


# --- the report groups by identity --------------------------------------------------------------------
@pytest.mark.parametrize("base, changed, shown", [
    (["method=saft"], ["method=saft", "method.mask.selection=random"], "mask.selection=random"),
    (["method=lp_ft"], ["method=lp_ft", "method.head_lr=0.001"], "head_lr=0.001"),
    (["method=lp_ft"], ["method=lp_ft", "method.lp_fraction=0.25"], "lp_fraction=0.25"),
    (["method=full_ft"], ["method=full_ft", "method.trainable=[ln_]"], 'trainable=["ln_"]'),
    (["method=coop"], ["method=coop", "method.n_ctx=4"], "n_ctx=4"),
    (["method=coop"], ["method=coop", "method.ctx_init='a photo of a'"], "ctx_init=a photo of a"),
    (["method=saft", "method.towers=[image]"], ["method=saft", "method.towers=[image]", "+method.head=linear"],
     "head=linear"),
    (["method=saft"], ["method=saft", "trainer.max_steps=50"], "max_steps=50"),
])
def test_runs_differing_in_one_key_are_rows_of_their_own(tmp_path, base, changed, shown):
    runs = [_fake(tmp_path, base, seed) for seed in (1, 2)] + [_fake(tmp_path, changed, seed, 40.0) for seed in (1, 2)]
    rows = _rows(summary_table(Runs(finished=runs)))
    assert len(rows) == 2 and rows[next(k for k in rows if k.endswith(shown))][0].values == [40.0, 40.0]
    assert all(cells[-1] == 2 for cells in rows.values())


def test_repeated_runs_of_one_seed_count_once_and_are_listed(tmp_path):
    for i in range(4):
        (tmp_path / f"seed1_{i}" / ".hydra").mkdir(parents=True)
        (tmp_path / f"seed1_{i}" / ".hydra" / "config.yaml").write_text("{}\n")
        (tmp_path / f"seed1_{i}" / "results.json").write_text(json.dumps(_fake(tmp_path, [], 1, 30.0 + i)))
    (tmp_path / "seed2" / ".hydra").mkdir(parents=True)
    (tmp_path / "seed2" / ".hydra" / "config.yaml").write_text("{}\n")
    (tmp_path / "seed2" / "results.json").write_text(json.dumps(_fake(tmp_path, [], 2, 50.0)))
    runs = collect([tmp_path])
    (cells,) = _rows(summary_table(runs)).values()
    assert cells[-1] == 2 and sorted(cells[0].values) == [30.0, 50.0]  # one value per seed, not n=5
    assert len(runs.duplicates) == 3 and all("seed1_0" in kept for _, kept in runs.duplicates)


def test_one_configuration_in_two_experiments_keeps_a_row_in_each(tmp_path):
    """Each ablation's default point is the same configuration: every ablation table keeps its row."""
    from saft.report.runs import without_duplicates
    from saft.report.tables import ablation_tables
    runs = [{**_fake(tmp_path, []), "experiment": name} for name in ("ablation_score", "ablation_scope")]
    kept, duplicates = without_duplicates(runs)
    assert len(kept) == 2 and not duplicates
    tables = {t.name: t for t in ablation_tables(Runs(finished=kept))}
    assert set(tables) == {"ablation_score", "ablation_scope"} and all(len(t.rows) == 1 for t in tables.values())
    (cells,) = _rows(summary_table(Runs(finished=kept))).values()
    assert cells[-1] == 1  # one seed, not two


def test_base_to_new_rows_of_other_shots_keep_their_label_and_their_average(tmp_path):
    from saft.report.tables import base_to_new_table
    def b2n(shots, seed, base):
        run = _fake(tmp_path, ["protocol=base2new", f"shots={shots}"], seed)
        return {**run, "protocol": "base2new", "id": "base", "ood": ["new"], "hm": base,
                "metrics": {"base": {"top1": base}, "new": {"top1": base}}}
    rows = _rows(base_to_new_table(Runs(finished=[b2n(4, s, 40.0 + s) for s in (1, 2)]
                                                 + [b2n(2, s, 20.0 + s) for s in (1, 2)])))
    assert rows["synthetic: saft, shots=4"][0].values == [41.0, 42.0]
    assert rows["synthetic: saft, shots=2"][0].values == [21.0, 22.0]
    assert {k for k in rows if k.startswith("average")} == {"average: saft, shots=2", "average: saft, shots=4"}


def test_full_ft_of_some_parameters_is_no_matched_id_reference(tmp_path):
    saft = _fake(tmp_path, [], 1, 25.0, 79.0)
    layer_norms = _fake(tmp_path, ["method=full_ft", "method.trainable=[ln_]"], 1, 30.0, 70.0)
    assert matched_id_table(Runs(finished=[saft, layer_norms])) is None
    full = _fake(tmp_path, ["method=full_ft"], 1, 30.0, 70.0)
    rows = _rows(matched_id_table(Runs(finished=[saft, layer_norms, full])))
    assert rows["saft"][2].values == pytest.approx([79.0 - 75.0])


def test_lp_ft_meets_full_ft_whose_towers_differ(tmp_path):
    """LP-FT trains the image tower and the head; the experiment's full FT both towers: the only FT there is."""
    lp_ft = _fake(tmp_path, ["method=lp_ft"], 1, 25.0, 77.0)
    full = _fake(tmp_path, ["method=full_ft"], 1, 30.0, 70.0)
    rows = _rows(matched_id_table(Runs(finished=[lp_ft, full])))
    assert rows["lp_ft"][2].values == pytest.approx([77.0 - 75.0])


# --- resume compares the identity on every path -------------------------------------------------------
@pytest.fixture(scope="module")
def interrupted(tmp_path_factory):
    """A run dir as a run killed after step 1 leaves it (last.ckpt of step 1, no results), and the results of the
    whole run."""
    out = tmp_path_factory.mktemp("interrupted") / "run"
    whole = run.train(compose_cfg(out, FAST + STEPS))
    (out / "results.json").unlink()
    shutil.copy(out / "checkpoints" / "step_000001.ckpt", out / "checkpoints" / "last.ckpt")
    return out, whole


def _copy(interrupted, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(interrupted[0], out)
    return out


@pytest.mark.parametrize("change, named", [(["method.optimizer.lr=0.05"], "method.optimizer.lr"),
                                           (["method=full_ft"], "method.name")])
def test_ckpt_path_last_with_other_settings_is_refused(interrupted, tmp_path, change, named):
    out = _copy(interrupted, tmp_path)
    before = (out / "checkpoints" / "last.ckpt").read_bytes()
    with pytest.raises(ConfigError, match=named):
        run.train(compose_cfg(out, FAST + STEPS + change + ["ckpt_path=last"]))
    assert (out / "checkpoints" / "last.ckpt").read_bytes() == before and not (out / "results.json").exists()


def test_ckpt_path_last_resumes_with_the_runs_own_settings(interrupted, tmp_path):
    out = _copy(interrupted, tmp_path)
    results = run.train(compose_cfg(out, FAST + STEPS + ["ckpt_path=last"]))
    assert results["weights_sha256"] == interrupted[1]["weights_sha256"]  # steps 2-3 trained from step 1's state
    assert results["metrics"] == interrupted[1]["metrics"]


def test_ckpt_path_last_without_a_checkpoint_is_named(tmp_path):
    with pytest.raises(ConfigError, match="ckpt_path=last.*nothing to resume"):
        run.train(compose_cfg(tmp_path / "fresh", FAST + STEPS + ["ckpt_path=last"]))


def test_wandb_names_and_groups_come_from_the_identity(tmp_path):
    """One name per configuration and seed, one group per configuration; a new option changes both."""
    def init(overrides):
        cfg = compose_cfg(tmp_path / "cfg", FAST + ["logger=wandb", *overrides])
        return run.make_logger(cfg, run_identity(cfg), "train")._wandb_init
    base, seed2, new = init([]), init(["seed=2"]), init(["+method.new_option=2"])
    assert base["job_type"] == "train" and base["name"].startswith("saft_synthetic_seed1_")
    assert base["group"] == seed2["group"] and base["name"] != seed2["name"]
    assert new["group"] != base["group"] and new["name"] != base["name"]
    assert base["name"].endswith(_identity(tmp_path, ["logger=wandb"]).hash[:8])


def test_a_setting_that_takes_its_value_from_the_method_is_the_methods(tmp_path):
    """trainer.gradient_clip_val is ${method.gradient_clip_val}: FLYP (no clipping) and full FT (1.0) differ in it,
    and are still runs of one context (the report compares them at matched ID)."""
    from saft.app.identity import without
    ft, flyp = _identity(tmp_path, ["+arm=full_ft"]), _identity(tmp_path, ["+arm=flyp"])
    assert "trainer.gradient_clip_val" in ft.method_keys and ft.settings["trainer.gradient_clip_val"] == 1
    assert "trainer.gradient_clip_val" not in flyp.settings  # null: dropped
    assert without(ft.settings, ft.method_keys) == without(flyp.settings, flyp.method_keys)
