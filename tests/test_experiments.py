"""Experiment configs, sweeps (local and through submitit), and the report built from finished runs."""
import csv
import json
import re
import shutil
import statistics

import pytest
from omegaconf import OmegaConf

from conftest import compose_cfg, read_results, run_script
from layouts import make_all
from saft.app import run
from saft.app.identity import Identity
from saft.report.tables import main as report_main

EXPERIMENTS = ["imagenet_dg", "imagenet_shots", "base2new", "cross_dataset", "ablation_sparsity", "ablation_mask",
               "ablation_score", "ablation_scope", "ablation_towers"]
TINY = ["model=tiny", "model.pretrained=null", "trainer=cpu", "trainer.max_steps=2", "batch_size=8",
        "eval_batch_size=16", "num_workers=0", "shots=2", "trainer.enable_progress_bar=false"]
SWEEP = ["model=tiny", "dataset=synthetic", "shots=4", "trainer.max_steps=3", "dataset.datamodule.test_per_class=4", "trainer.enable_progress_bar=false"]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_all(tmp_path_factory.mktemp("data"))


@pytest.mark.parametrize("name", EXPERIMENTS)
def test_experiment_composes_and_runs_a_few_steps_on_fixture_data(data, tmp_path, name):
    cfg = compose_cfg(tmp_path, [f"experiment={name}", *TINY, f"data_dir={data}"])
    assert cfg.experiment_name == name and cfg.hydra.sweeper.params.seed == "1,2,3"
    results = run.train(cfg)
    assert results["experiment"] == name and results["metrics"]
    if name == "base2new":
        assert results["id"] == "base" and results["ood"] == ["new"] and "hm" in results
        assert cfg.hydra.sweeper.params.dataset.count(",") == 10  # the 11 datasets
    if name == "cross_dataset":
        assert {"dtd", "eurosat", "ucf101"} <= set(results["ood"])


@pytest.mark.parametrize("method", ["linear_probe", "coop"])
def test_base_to_new_with_a_head_of_its_own_keeps_new_classes_on_the_text_head(data, tmp_path, method):
    """The probe knows only the base classes (new ones keep the zero-shot head: its new accuracy is zero-shot's);
    CoOp's learned prompt takes any class name (its new-class head: test_baselines.py runs the same code)."""
    cfg = compose_cfg(tmp_path, ["experiment=base2new", *TINY, f"data_dir={data}", f"method={method}",
                                 "++method.n_ctx=4", "eval_zeroshot=true", "method.optimizer.lr=0.5"])
    assert "linear_probe,lp_ft,bitfit,coop_reference,flyp" in cfg.hydra.sweeper.params.arm  # the table's baselines
    results = run.train(cfg)
    assert results["id"] == "base" and results["ood"] == ["new"] and (tmp_path / "head.safetensors").is_file()
    if method == "linear_probe":
        assert results["metrics"]["new"] == results["zeroshot_metrics"]["new"]


def test_slurm_launcher_starts_one_task_per_gpu(tmp_path):
    cfg = compose_cfg(tmp_path, ["hydra/launcher=slurm", "trainer=ddp", "trainer.devices=4"])  # composes only
    launcher = cfg.hydra.launcher
    assert "SlurmLauncher" in launcher._target_
    assert launcher.tasks_per_node == launcher.gpus_per_node == 4 and launcher.max_num_timeout > 0


def test_submitit_local_launcher_runs_a_job_end_to_end(tmp_path):
    run_script("train.py", ["-m", "hydra/launcher=submitit_local", "hydra.launcher.timeout_min=10", "seed=3",
                            *SWEEP, f"hydra.sweep.dir={tmp_path}"])
    (results,) = [read_results(p.parent) for p in tmp_path.glob("**/results.json")]
    assert results["seed"] == 3 and results["method"] == "saft"


@pytest.fixture(scope="module")
def sweep(tmp_path_factory):
    """A 2x2 multirun: two methods, two seeds."""
    out = tmp_path_factory.mktemp("sweep")
    run_script("train.py", ["-m", "method=saft,full_ft", "seed=1,2", "method.optimizer.lr=1e-3", *SWEEP,
                            f"hydra.sweep.dir={out}"])
    return out


def _rows(path):
    return {row["row"]: row for row in csv.DictReader(open(path))}


def test_report_means_and_stds_match_the_runs(sweep, tmp_path, monkeypatch):
    runs = [read_results(p.parent) for p in sweep.glob("*/results.json")]
    assert len(runs) == 4 and {r["experiment"] for r in runs} == {"adhoc"}
    monkeypatch.setenv("WANDB_MODE", "offline")
    report_main([str(sweep), "--out", str(tmp_path), "--wandb-project", "saft-test"])
    assert len(list((tmp_path / "wandb").glob("offline-run-*"))) == 1
    rows = _rows(tmp_path / "summary.csv")
    for method in ("saft", "full_ft"):
        mine = [r for r in runs if r["method"] == method]
        row = next(v for k, v in rows.items() if k.startswith(method))
        for name in ("photo", "sketch", "negative"):
            values = [r["metrics"][name]["top1"] for r in mine]
            assert float(row[f"{name} mean"]) == pytest.approx(statistics.mean(values))
            assert float(row[f"{name} std"]) == pytest.approx(statistics.stdev(values))
        ood = [r["ood_mean_top1"] for r in mine]
        assert float(row["OOD mean mean"]) == pytest.approx(statistics.mean(ood))
        assert row["n"] == "2"
    markdown = (tmp_path / "report.md").read_text()
    assert "4 finished runs, 0 failed" in markdown and " ± " in markdown
    assert (tmp_path / "report.tex").read_text().count(r"\begin{tabular}") == 2  # matched ID + summary
    for png in ("id_vs_ood.png", "mask_blocks.png"):
        assert (tmp_path / png).stat().st_size > 5000


def test_partial_sweep_shows_missing_cells_and_failed_runs(sweep, tmp_path):
    partial = tmp_path / "partial"
    shutil.copytree(sweep, partial)
    for results in partial.glob("*/results.json"):
        if json.loads(results.read_text())["method"] == "full_ft":
            results.unlink()  # as if both full-FT jobs had not finished
    report_main([str(partial), "--out", str(tmp_path / "report")])
    rows = _rows(tmp_path / "report" / "summary.csv")
    full_ft = next(v for k, v in rows.items() if k.startswith("full_ft"))
    assert full_ft["photo mean"] == "" and full_ft["photo n"] == "0"
    saft = next(v for k, v in rows.items() if k.startswith("saft"))
    assert saft["photo n"] == "2"
    markdown = (tmp_path / "report" / "report.md").read_text()
    assert "2 finished runs, 0 failed, 2 unfinished" in markdown
    assert "| full_ft" in markdown and " - |" in markdown


def _identified(run):
    """A hand-made results dict with the identity train.py would record for its settings (top-level keys such as
    ``sparsity`` and the ``method.*`` keys they set both appear, as in a real run)."""
    identity = {"method.name": run["method"], "method.optimizer.lr": run["lr"], "lr_scale": run["lr"],
                "method.towers": run.get("towers", ["image"]), "seed": run["seed"], "dataset.name": run["dataset"],
                "model.name": run["model"], "shots": run["shots"], "protocol": run.get("protocol", "all"),
                "wise_alpha": run.get("wise_alpha")}
    if run.get("mask_selection"):
        identity.update({"sparsity": run.get("sparsity", 0.001), "method.mask.sparsity": run.get("sparsity", 0.001),
                         "method.mask.selection": run["mask_selection"]})
    identity.update(run.get("extra_settings", {}))
    identity = {k: v for k, v in identity.items() if v is not None}
    method_keys = [k for k in identity if k.startswith("method.") or k in ("lr_scale", "sparsity")]
    return {**run, **Identity(identity, ["seed"], method_keys).as_results()}


def _ids(runs):
    return [_identified(r) for r in runs]


def _run(method, seed, id_top1, ood_top1, lr, zeroshot=(20.0, 80.0)):
    """A results.json as the report reads it: ID "a", OOD "b" and "c" (OOD mean = ood_top1)."""
    metrics = lambda x, y: {"a": {"top1": x}, "b": {"top1": y - 1}, "c": {"top1": y + 1}}  # noqa: E731
    return {"method": method, "seed": seed, "lr": lr, "dataset": "d", "model": "m", "shots": 4, "towers": ["image"],
            "mask_selection": None if method == "full_ft" else "gradient", "id": "a", "ood": ["b", "c"],
            "metrics": metrics(id_top1, ood_top1), "zeroshot_metrics": metrics(*zeroshot)}


def test_interpolate_reads_the_polyline_and_never_extrapolates():
    from saft.report.tables import interpolate
    assert interpolate([(2.0, 10.0), (0.0, 0.0), (4.0, 0.0)], 1.0) == 5.0
    assert interpolate([(0.0, 0.0), (2.0, 10.0)], 2.5) is None and interpolate([(0.0, 0.0), (2.0, 10.0)], -1) is None
    assert interpolate([(20.0, 80.0), (20.0, 78.0), (30.0, 70.0)], 20.0) == 79.0  # equal x: their mean y
    assert interpolate([(1.0, 5.0)], 1.0) == 5.0 and interpolate([(1.0, 5.0)], 2.0) is None


def test_matched_id_reads_full_ft_off_its_own_seed_and_never_extrapolates():
    from saft.report.tables import Runs, matched_id_table
    runs = [_run("full_ft", 1, 30.0, 70.0, 1e-5), _run("full_ft", 1, 40.0, 50.0, 3e-5),
            _run("full_ft", 2, 24.0, 78.0, 1e-5), _run("full_ft", 2, 28.0, 72.0, 3e-5),
            _run("saft", 1, 25.0, 79.0, 1e-3), _run("saft", 2, 26.0, 75.0, 1e-3),   # inside FT's range
            _run("saft", 1, 45.0, 60.0, 1e-2), _run("saft", 2, 27.0, 74.0, 1e-2)]   # seed 1: beyond FT's
    rows = {label: cells for label, cells in matched_id_table(Runs(finished=_ids(runs))).rows}
    assert rows["full_ft, lr=1e-05"][2:] == ["reference", 2]
    assert rows["full_ft, lr=1e-05"][0].values == [10.0, 4.0] and rows["full_ft, lr=1e-05"][1].values == [-10.0, -2.0]
    # seed 1: FT's OOD at ID 25 lies halfway from zero-shot (20, 80) to (30, 70): 75. Seed 2: at ID 26 it lies
    # halfway from (24, 78) to (28, 72): 75.
    assert rows["saft, lr=0.001"][2].values == pytest.approx([79.0 - 75.0, 75.0 - 75.0])
    assert rows["saft, lr=0.01"][2].values == pytest.approx([74.0 - 73.5]) and rows["saft, lr=0.01"][3] == 1


def test_tradeoff_curves_follow_each_configuration_through_its_learning_rates():
    from saft.report.tables import tradeoff_curves
    dense = [{**_run("saft", seed, 30.0 + seed, 70.0, lr), "sparsity": 0.01} for seed in (1, 2) for lr in (1e-3, 1e-2)]
    runs = [{**_run("full_ft", seed, 20.0 + lr * 1e5, 75.0, lr), "sparsity": sparsity}  # sparsity moot for FT
            for seed in (1, 2) for lr in (3e-6, 1e-5) for sparsity in (0.001, 0.01)]
    curves = tradeoff_curves(_ids(runs + dense + [{**_run("saft", 1, 25.0, 79.0, 1e-3), "sparsity": 0.001}]))
    assert set(curves) == {"full_ft", "saft, sparsity=0.001", "saft, sparsity=0.01"}
    # lr order; the FT runs that differ only in the moot sparsity are one configuration: one point per seed
    assert [sorted(seeds) for seeds in curves["full_ft"]] == [[(20.3, 75.0)] * 2, [(21.0, 75.0)] * 2]
    assert sorted(map(sorted, curves["saft, sparsity=0.01"])) == [[(31.0, 70.0), (32.0, 70.0)]] * 2


def _wise(run, alpha, id_top1, ood_top1):
    """A WiSE-FT evaluation of ``run``: its settings, its own metrics, the run's zero-shot metrics."""
    own = _run(run["method"], run["seed"], id_top1, ood_top1, run["lr"])["metrics"]
    return {**run, "metrics": own, "wise_alpha": alpha, "run_dir": f"runs/{run['method']}/{run['lr']}/{run['seed']}"}


def test_wise_evals_are_rows_of_their_own_and_never_join_the_full_ft_reference():
    from saft.report.tables import Runs, matched_id_table, summary_table
    ft, saft = _run("full_ft", 1, 30.0, 70.0, 1e-5), _run("saft", 1, 25.0, 79.0, 1e-3)
    ft_wise, saft_wise = _wise(ft, 0.5, 28.0, 78.0), _wise(saft, 0.5, 23.0, 80.0)
    table = matched_id_table(Runs(finished=_ids([ft, saft, ft_wise, saft_wise])))
    assert table.columns == ["ID gain", "OOD change", "OOD vs full FT", "n", "OOD vs WiSE-FT", "n WiSE"]
    rows = {label: cells for label, cells in table.rows}
    assert set(rows) == {"full_ft", "full_ft, wise_alpha=0.5", "saft",
                         "saft, wise_alpha=0.5"}
    # Full FT's reference is (20, 80) -> (30, 70) only: 75 at ID 25 (through FT's WiSE point (28, 78) it would be
    # 78.75), 72 at ID 28, 77 at ID 23.
    assert rows["saft"][2].values == pytest.approx([79.0 - 75.0])
    assert rows["full_ft, wise_alpha=0.5"][2].values == pytest.approx([78.0 - 72.0])
    assert rows["saft, wise_alpha=0.5"][2].values == pytest.approx([80.0 - 77.0])
    assert rows["saft, wise_alpha=0.5"][0].values == [3.0] and rows["saft, wise_alpha=0.5"][1].values == [0.0]
    assert rows["full_ft"][2:4] == ["reference", 1]
    assert rows["full_ft, wise_alpha=0.5"][4:] == ["reference", 1]  # full FT's WiSE evals are that reference
    # FT's WiSE-FT curve (20, 80) -> (28, 78) -> (30, 70) at ID 25: 78.75; at ID 23: 79.25; at ID 30: 70.
    assert rows["saft"][4].values == pytest.approx([79.0 - 78.75])
    assert rows["saft, wise_alpha=0.5"][4].values == pytest.approx([80.0 - 79.25])
    assert rows["full_ft"][4].values == pytest.approx([0.0])
    summary = {label: cells for label, cells in summary_table(Runs(finished=_ids([ft, saft, ft_wise, saft_wise]))).rows}
    assert summary["full_ft, wise_alpha=0.5"][0].values == [28.0]
    assert summary["full_ft"][0].values == [30.0]
    # Without WiSE evaluations of full FT there is nothing to compare with: the table is today's.
    today = ["ID gain", "OOD change", "OOD vs full FT", "n"]
    assert matched_id_table(Runs(finished=_ids([ft, saft, saft_wise]))).columns == today


def test_ood_vs_wise_ft_is_the_best_full_ft_wise_curve_that_covers_the_id():
    from saft.report.tables import Runs, matched_id_table
    runs = []
    for seed in (1, 2):
        low, high = _run("full_ft", seed, 30.0, 70.0, 1e-5), _run("full_ft", seed, 40.0, 50.0, 3e-5)
        runs += [low, high, _wise(low, 0.5, 26.0, 78.0)]
        if seed == 1:
            runs.append(_wise(high, 0.5, 32.0, 74.0))  # seed 2's lr 3e-5 has no WiSE evals, hence no WiSE curve
    runs += [_run("saft", 1, 29.0, 77.0, 1e-3), _run("saft", 2, 35.0, 65.0, 1e-3)]
    rows = {label: cells for label, cells in matched_id_table(Runs(finished=_ids(runs))).rows}
    saft = rows["saft"]  # a label shows what varies within its own method: nothing does among SAFT's runs
    # Seed 1 at ID 29: the lr 1e-5 curve (20, 80) -> (26, 78) -> (30, 70) gives 72, the lr 3e-5 curve
    # (20, 80) -> (32, 74) -> (40, 50) gives 75.5; the best is 75.5. Seed 2 at ID 35 lies beyond its only
    # curve (up to ID 30): left out. Full FT's learning-rate curve (20, 80) -> (30, 70) -> (40, 50): 71 and 60.
    assert saft[4].values == pytest.approx([77.0 - 75.5]) and saft[5] == 1
    assert saft[2].values == pytest.approx([77.0 - 71.0, 65.0 - 60.0]) and saft[3] == 2


def test_wise_curves_run_from_zero_shot_through_alpha_to_the_run(tmp_path, monkeypatch):
    from saft.report import plots
    from saft.report.tables import tradeoff_curves, wise_curves
    ft = [_run("full_ft", seed, 30.0 + seed, 70.0, lr) for seed in (1, 2) for lr in (1e-5, 3e-5)]
    saft = [_run("saft", seed, 25.0, 79.0, 1e-3) for seed in (1, 2)]
    # Out of ID order on purpose: the curve must follow alpha, not ID.
    evals = [_wise(r, alpha, x + r["seed"], y) for r in ft if r["lr"] == 1e-5
             for alpha, x, y in ((0.7, 33.0, 74.0), (0.3, 36.0, 77.0), (1, 30.0, 70.0))]
    runs = _ids(ft + saft + evals)
    curves, wise = tradeoff_curves(runs), wise_curves(runs)
    assert set(curves) == {"full_ft", "saft"} and len(curves["full_ft"]) == 2  # evals stay off the lr curves
    assert [sorted(seeds) for seeds in curves["full_ft"]] == [[(31.0, 70.0), (32.0, 70.0)]] * 2
    assert tradeoff_curves(_ids(evals)) == {}
    assert set(wise) == {"full_ft"} and len(wise["full_ft"]) == 1  # only lr 1e-5 has WiSE evals
    assert [sorted(seeds) for seeds in wise["full_ft"][0]] == [
        [(20.0, 80.0)] * 2,                # alpha = 0: zero-shot
        [(37.0, 77.0), (38.0, 77.0)],      # alpha = 0.3
        [(34.0, 74.0), (35.0, 74.0)],      # alpha = 0.7
        [(31.0, 70.0), (32.0, 70.0)],      # alpha = 1 evaluated
        [(31.0, 70.0), (32.0, 70.0)]]      # alpha = 1: the training run itself
    figures = []
    monkeypatch.setattr(plots.plt, "close", figures.append)  # keep the figure to look at
    plots.plot_id_vs_ood(curves, (20.0, 80.0), tmp_path / "id_vs_ood.png", wise)
    assert (tmp_path / "id_vs_ood.png").stat().st_size > 5000
    ax = figures[0].axes[0]
    legend = [t.get_text() for t in ax.get_legend().get_texts()]
    assert legend.count("WiSE-FT (dashed): α from 0 at zero-shot to 1 at the run") == 1 and len(legend) == 4
    solid = {line.get_color() for line in ax.lines if line.get_linestyle() == "-" and len(line.get_xdata()) == 2}
    dashed = [line for line in ax.lines if line.get_linestyle() == "--" and len(line.get_xdata()) == 5]
    assert len(dashed) == 1 and dashed[0].get_color() in solid  # in the colour of full FT's lr curve
    assert list(dashed[0].get_xdata()) == [20.0, 37.5, 34.5, 31.5, 31.5]


def test_report_command_compares_with_wise_ft_from_results_files(tmp_path, monkeypatch):
    from saft.report import plots
    drawn = []
    monkeypatch.setattr(plots, "plot_id_vs_ood", lambda *args, **kwargs: drawn.append((args, kwargs)))
    ft = _run("full_ft", 1, 30.0, 70.0, 1e-5)
    results = {"ft": ft, "ft_wise": _wise(ft, 0.5, 28.0, 78.0), "saft": _run("saft", 1, 25.0, 79.0, 1e-3)}
    for name, result in results.items():
        (tmp_path / "runs" / name / ".hydra").mkdir(parents=True)
        (tmp_path / "runs" / name / ".hydra" / "config.yaml").write_text("{}\n")
        (tmp_path / "runs" / name / "results.json").write_text(json.dumps(_identified(result)))
    report_main([str(tmp_path / "runs"), "--out", str(tmp_path / "report"), "--methods", "full_ft", "saft",
                 "--ylim", "60", "80"])
    options = {"methods": ["full_ft", "saft"], "xlim": None, "ylim": [60.0, 80.0]}  # the pictures' options
    assert [kwargs for _, kwargs in drawn] == [{**options, "ylabel": f"{y} top-1 (%)"} for y in ("OOD mean", "b", "c")]
    # one picture per OOD set as well as the mean: set b's points are its own top-1 (OOD mean - 1 in _run)
    assert drawn[1][0][0]["saft"] == [[(25.0, 78.0)]] and drawn[0][0][0]["saft"] == [[(25.0, 79.0)]]
    matched = _rows(tmp_path / "report" / "matched_id.csv")
    assert float(matched["saft"]["OOD vs WiSE-FT mean"]) == pytest.approx(79.0 - 78.75)
    assert float(matched["saft"]["OOD vs full FT mean"]) == pytest.approx(79.0 - 75.0)
    assert "full_ft, wise_alpha=0.5" in _rows(tmp_path / "report" / "summary.csv")
    (_, _, _, wise), _ = drawn[0]
    assert [len(points) for points in wise["full_ft"]] == [3]  # zero-shot, alpha 0.5, the run


def _b2n_run(dataset, method, seed, base, new, lr=1e-3, sparsity=0.001):
    """A base-to-new results.json as the report reads it (its identity: _identified)."""
    masked = method != "full_ft"
    return {"method": method, "model": "m", "dataset": dataset, "shots": 16, "seed": seed, "sparsity": sparsity,
            "experiment": "base2new", "protocol": "base2new", "towers": ["image", "text"], "lr": lr,
            "mask_selection": "gradient" if masked else None, "mask_score": "abs_sum" if masked else None,
            "mask_scope": "global" if masked else None, "mask_include": [], "mask_exclude": [],
            "id": "base", "ood": ["new"], "metrics": {"base": {"top1": base}, "new": {"top1": new}},
            "ood_mean_top1": new, "hm": 2 * base * new / (base + new)}


def _b2n_table(runs):
    from saft.report.tables import Runs, base_to_new_table
    return base_to_new_table(Runs(finished=_ids(runs)))


def _b2n_rows(runs):
    table = _b2n_table(runs)
    assert table.columns == ["B", "N", "HM", "n"]
    return {label: cells for label, cells in table.rows}


def _expect_row(cells, runs):
    """B, N and HM cells hold the runs' values (mean over seeds), n the number of seeds."""
    for cell, value in zip(cells[:3], (lambda r: r["metrics"]["base"]["top1"], lambda r: r["metrics"]["new"]["top1"],
                                       lambda r: r["hm"])):
        assert sorted(cell.values) == pytest.approx(sorted(value(r) for r in runs))
        assert cell.mean == pytest.approx(statistics.mean(value(r) for r in runs))
    assert cells[3] == len(runs)


@pytest.mark.parametrize("key, values", [("lr", (1e-3, 1e-2)), ("sparsity", (0.001, 0.01))])
def test_base_to_new_keeps_configurations_apart_and_averages_their_seeds(key, values):
    low = [_b2n_run("dtd", "saft", seed, 70.0 + seed, 60.0 - seed, **{key: values[0]}) for seed in (1, 2)]
    high = [_b2n_run("dtd", "saft", seed, 80.0 + 3 * seed, 40.0 + seed, **{key: values[1]}) for seed in (1, 2)]
    ft = [_b2n_run("dtd", "full_ft", seed, 75.0, 50.0 + seed, lr=1e-5) for seed in (1, 2)]
    others = [_b2n_run("eurosat", "saft", 1, 90.0, 30.0, **{key: values[0]})]
    # Whatever the layout: some cell holds exactly the base accuracies of one configuration's seeds, and
    # no cell pools the two configurations.
    from saft.report.tables import Cell
    cells = [c.values for _, row in _b2n_table(low + high + ft + others).rows for c in row if isinstance(c, Cell)]
    low_base, high_base = ({r["metrics"]["base"]["top1"] for r in runs} for runs in (low, high))
    assert sorted(low_base) in [sorted(v) for v in cells] and sorted(high_base) in [sorted(v) for v in cells]
    assert not any(set(v) & low_base and set(v) & high_base for v in cells)
    rows = _b2n_rows(low + high + ft + others)
    low_label, high_label = (f"saft, {key}={v:.3g}" for v in values)
    # A label shows what varies among its own method's configurations: full FT has one.
    ft_label = "full_ft"
    assert {label for label in rows if not label.endswith("(published)")} == {
        f"dtd: {low_label}", f"dtd: {high_label}", f"dtd: {ft_label}", f"eurosat: {low_label}",
        f"average: {low_label}", f"average: {high_label}", f"average: {ft_label}"}
    _expect_row(rows[f"dtd: {ft_label}"], ft)
    _expect_row(rows[f"dtd: {low_label}"], low)
    _expect_row(rows[f"dtd: {high_label}"], high)
    _expect_row(rows[f"eurosat: {low_label}"], others)
    assert rows[f"dtd: {low_label}"][0].mean == pytest.approx(71.5)  # (71 + 72) / 2, not pooled with the other
    # Not all 11 datasets: no average.
    assert all(cell.values == [] for cell in rows[f"average: {low_label}"][:3])


def test_base_to_new_gives_one_row_per_configuration_with_the_mean_over_its_seeds():
    seeds = [_b2n_run("oxford_pets", "saft", seed, base, new)
             for seed, base, new in ((1, 91.0, 95.0), (2, 92.5, 96.0), (3, 93.0, 94.0))]
    rows = _b2n_rows(seeds)
    assert [label for label in rows if label.startswith("oxford_pets")] == ["oxford_pets: saft"]
    _expect_row(rows["oxford_pets: saft"], seeds)
    assert rows["oxford_pets: saft"][0].mean == pytest.approx((91.0 + 92.5 + 93.0) / 3)
    assert rows["oxford_pets: saft"][0].std == pytest.approx(statistics.stdev([91.0, 92.5, 93.0]))


def test_base_to_new_average_is_over_the_11_datasets_of_one_configuration():
    from saft.report.tables import BASE_TO_NEW_DATASETS
    runs = [_b2n_run(d, "saft", seed, 60.0 + i + seed, 50.0 + 2 * i - seed, lr=lr)
            for i, d in enumerate(BASE_TO_NEW_DATASETS) for seed in (1, 2) for lr in (1e-3, 1e-2)]
    runs = [r for r in runs if not (r["lr"] == 1e-2 and r["dataset"] == "dtd")]  # lr 1e-2 misses one dataset
    rows = _b2n_rows(runs)
    complete = [r for r in runs if r["lr"] == 1e-3]
    per_dataset = [[statistics.mean(v(r) for r in complete if r["dataset"] == d) for d in BASE_TO_NEW_DATASETS]
                   for v in (lambda r: r["metrics"]["base"]["top1"], lambda r: r["metrics"]["new"]["top1"],
                             lambda r: r["hm"])]
    average = rows["average: saft, lr=0.001"]
    assert [c.mean for c in average[:3]] == pytest.approx([statistics.mean(v) for v in per_dataset])
    assert all(cell.values == [] for cell in rows["average: saft, lr=0.01"][:3])
    assert [label for label in rows if label.startswith("dtd")] == ["dtd: saft, lr=0.001"]


def test_methods_that_train_no_tower_meet_the_full_ft_of_their_experiment():
    """The probe and CoOp record towers [] while the experiment's full FT trains the image tower: they must still
    be compared with it (and a run whose experiment has two FT tower settings is not guessed at)."""
    from saft.report.tables import Runs, matched_id_table
    ft = [_run("full_ft", 1, 30.0, 70.0, 1e-5), _run("full_ft", 2, 30.0, 70.0, 1e-5)]
    probe = {**_run("linear_probe", 1, 25.0, 79.0, 1e-4), "towers": []}
    rows = {label: cells for label, cells in matched_id_table(Runs(finished=_ids(ft + [probe]))).rows}
    assert rows["linear_probe"][2].values == pytest.approx([79.0 - 75.0])
    text_ft = {**_run("full_ft", 1, 30.0, 60.0, 1e-5), "towers": ["text"]}
    rows = {label: cells for label, cells in matched_id_table(Runs(finished=_ids(ft + [text_ft, probe]))).rows}
    assert rows[next(k for k in rows if k.startswith("linear_probe"))][2].values == []


def test_a_plain_re_evaluation_of_a_run_is_not_a_second_seed(tmp_path):
    from saft.report.runs import without_reevaluations
    run = _identified(_run("saft", 1, 25.0, 79.0, 1e-3))
    again = _identified({**run, "run_dir": "runs/saft", "wise_alpha": None})
    other_data = _identified({**again, "metrics": {**run["metrics"], "d2": {"top1": 50.0}},
                              "extra_settings": {"eval_datasets": ["d2"]}})
    half = _identified({**again, "wise_alpha": 0.5})
    assert without_reevaluations([run, again, other_data, half]) == [run, other_data, half]
    assert without_reevaluations([again]) == [again]  # without its run, the evaluation is the measurement


def test_the_picture_draws_the_chosen_methods_within_the_chosen_axes(tmp_path):
    """--methods and --xlim/--ylim of the report: the outliers of other methods no longer set the axes."""
    from saft.report.plots import plot_id_vs_ood
    curves = {"full_ft": [[(30.0, 70.0)], [(40.0, 60.0)]], "saft, sparsity=0.01": [[(25.0, 75.0)]],
              "coop": [[(10.0, 20.0)]]}
    wise = {"full_ft": [[[(20.0, 78.0)], [(30.0, 70.0)]]], "coop": [[[(5.0, 5.0)]]]}
    labels, xlim, ylim = plot_id_vs_ood(curves, (20.0, 78.0), tmp_path / "a.png", wise, methods=["full_ft", "saft"],
                                        xlim=(18.0, 45.0), ylim=(55.0, 80.0))
    assert labels == ["full_ft", "saft, sparsity=0.01"] and xlim == (18.0, 45.0) and ylim == (55.0, 80.0)
    labels, xlim, ylim = plot_id_vs_ood(curves, (20.0, 78.0), tmp_path / "b.png", wise)
    assert "coop" in labels and xlim[0] < 10.0 and ylim[0] < 20.0  # every method, axes that hold them all
    assert (tmp_path / "a.png").stat().st_size > 0


def test_runs_from_different_pre_trained_weights_are_never_seeds_of_one_configuration(tmp_path):
    """Two machines can rebuild the benchmark CLIP with other bits: a run from each, one seed, is not a duplicate,
    and seeds from two bases are not averaged; with one base nothing changes."""
    def write(name, result, base):
        (tmp_path / "runs" / name / ".hydra").mkdir(parents=True)
        (tmp_path / "runs" / name / ".hydra" / "config.yaml").write_text("{}\n")
        (tmp_path / "runs" / name / "results.json").write_text(json.dumps({**_identified(result), "base_sha256": base}))

    write("a1", _run("saft", 1, 25.0, 79.0, 1e-3), "aaa")
    write("a2", _run("saft", 2, 27.0, 77.0, 1e-3), "aaa")
    report_main([str(tmp_path / "runs"), "--out", str(tmp_path / "one")])
    assert {k: v["a n"] for k, v in _rows(tmp_path / "one" / "summary.csv").items()} == {"saft": "2"}
    assert "pre-trained weights" not in (tmp_path / "one" / "report.md").read_text()

    write("b1", _run("saft", 1, 40.0, 60.0, 1e-3), "bbb")
    report_main([str(tmp_path / "runs"), "--out", str(tmp_path / "two")])
    rows = _rows(tmp_path / "two" / "summary.csv")
    assert {k: v["a n"] for k, v in rows.items()} == {"saft, base_sha256=aaa": "2", "saft, base_sha256=bbb": "1"}
    assert float(rows["saft, base_sha256=aaa"]["a mean"]) == pytest.approx(26.0)
    markdown = (tmp_path / "two" / "report.md").read_text()
    assert "3 finished runs" in markdown and "duplicate" not in markdown
    assert "m: runs started from 2 different pre-trained weights (aaa, bbb)" in markdown


def test_a_sweep_run_again_with_finished_skip_runs_only_what_is_missing(sweep, tmp_path):
    again = tmp_path / "sweep"
    shutil.copytree(sweep, again)
    jobs = sorted(p.parent for p in again.glob("*/results.json"))
    missing, kept = jobs[0], jobs[1:]
    before = {d: ((d / "results.json").read_bytes(), (d / "results.json").stat().st_mtime_ns) for d in kept}
    expected = read_results(missing)
    shutil.rmtree(missing)  # a job the killed sweep never ran
    command = ["-m", "method=saft,full_ft", "seed=1,2", "method.optimizer.lr=1e-3", *SWEEP, f"hydra.sweep.dir={again}"]
    refused = run_script("train.py", command, check=False)
    assert refused.returncode != 0 and "with finished=skip" in refused.stderr  # the default still refuses
    saved = {d: (d / ".hydra" / "config.yaml").read_bytes() for d in kept}
    run_script("train.py", [*command, "finished=skip"])
    assert all(((d / "results.json").read_bytes(), (d / "results.json").stat().st_mtime_ns) == before[d] for d in kept)
    rerun = read_results(missing)
    assert rerun["identity_hash"] == expected["identity_hash"] and rerun["weights_sha256"] == expected["weights_sha256"]
    # A finished folder asked to hold another run (its learning rate differs): refused, nothing overwritten.
    first = read_results(kept[0])
    other = run_script("train.py", [f"method={first['method']}", f"seed={first['seed']}", "method.optimizer.lr=2e-3",
                                    *SWEEP, f"hydra.run.dir='{kept[0]}'", "finished=skip"], check=False)
    assert other.returncode != 0 and "holds the results of another run (method.optimizer.lr" in other.stderr
    assert all((d / "results.json").read_bytes() == before[d][0] for d in kept)
    # The command's arguments in another order find the same folders: nothing runs again.
    run_script("train.py", [*command[:1], "seed=1,2", "method=saft,full_ft", *command[3:], "finished=skip"])
    assert all(((d / "results.json").read_bytes(), (d / "results.json").stat().st_mtime_ns) == before[d] for d in kept)
    # A sweep of other keys (seed fixed) names its jobs anew (method-saft, method-full_ft); the finished runs it has
    # no job for keep their saved configs, which eval.py run_dir= reads back
    run_script("train.py", [*command[:2], "seed=1", *command[3:], "finished=skip"])
    assert {p.name for p in again.iterdir() if p.is_dir()} >= {"method-saft", "method-full_ft"}
    assert all((d / ".hydra" / "config.yaml").read_bytes() == saved[d] for d in kept)
    assert not list(again.glob("*/.hydra.finished"))


def test_job_folders_are_the_swept_values_short_safe_and_distinct(tmp_path):
    from saft.app.folders import MAX_NAME, job_folder
    (tmp_path / "multirun.yaml").write_text(  # Hydra's record of the sweep: what it varies
        "hydra:\n  overrides:\n    task: ['method=saft,full_ft', 'b=x,y', shots=4, finished=skip, 'split_file=a,b']\n"
        "  sweeper:\n    params: {seed: '1,2,3'}\n")
    name = lambda *overrides: job_folder(0, list(overrides), tmp_path, None)  # noqa: E731
    # only what the sweep varies, in key order whatever the command's order; a swept key override_dirname
    # leaves out (split_file) still names its jobs
    assert name("seed=3", "method=full_ft", "shots=4", "finished=skip", "b=x", "split_file=a") == \
        "b-x_method-full_ft_seed-3_split_file-a"
    # values that differ only in characters a shell or Hydra would need quoted never share a folder
    values = ["a/b", "a-b", "[a,b]", "a,b", "-0.5", "0.5", "x y", "x_y"]
    names = [name(f"b={v}") for v in values]
    assert len(set(names)) == len(values) and all(re.fullmatch(r"[A-Za-z0-9._+-]+", n) for n in names), names
    long = [name("method=saft", *(f"b={'v' * 80}{i}",)) for i in range(2)]
    assert len(set(long)) == 2 and all(len(n) <= MAX_NAME for n in long)  # cut, with a hash of the whole
    # no multirun.yaml (Optuna): the searched keys, after the job number (a search may try a point twice)
    assert job_folder(7, ["lr_scale=0.5", "shots=4"], tmp_path / "none", {"lr_scale": "interval(0.1,30)"}) == \
        "7_lr_scale-0.5"


def test_a_sweeps_folders_name_its_values_and_go_back_to_eval_unquoted(sweep, tmp_path):
    jobs = sorted(p.name for p in sweep.iterdir() if p.is_dir())
    assert jobs == ["method-full_ft_seed-1", "method-full_ft_seed-2", "method-saft_seed-1", "method-saft_seed-2"]
    proc = run_script("eval.py", [f"run_dir={sweep / jobs[2]}", "wise_alpha=0.5", "trainer.enable_progress_bar=false"],
                      cwd=tmp_path)
    out = next((tmp_path / "outputs" / "eval" / "synthetic" / jobs[2]).iterdir())  # named by what it evaluated
    results = read_results(out)
    assert results["wise_alpha"] == 0.5 and results["dataset"] == "synthetic"
    printed = proc.stdout + proc.stderr
    assert f"results: {out / 'results.json'}" in printed
    assert f"| saft, WiSE-FT α=0.5 | {results['metrics']['photo']['top1']:.2f} |" in proc.stdout
    # an eval sweep over runs names each job by the run it evaluated; run again with finished=skip it skips them
    evals = tmp_path / "evals"
    command = ["-m", f"run_dir={sweep / jobs[0]},{sweep / jobs[2]}", "trainer.enable_progress_bar=false",
               f"hydra.sweep.dir={evals}"]
    run_script("eval.py", command, cwd=tmp_path)
    names = sorted(p.name for p in evals.iterdir() if p.is_dir())
    assert names == [f"0_run-{jobs[0]}", f"1_run-{jobs[2]}"]
    stamps = {n: (evals / n / "results.json").stat().st_mtime_ns for n in names}
    again = run_script("eval.py", [*command, "finished=skip"], cwd=tmp_path)
    assert {n: (evals / n / "results.json").stat().st_mtime_ns for n in names} == stamps
    assert "skipped (finished=skip)" in again.stdout + again.stderr


def test_every_run_as_one_tidy_table_and_a_report_a_paper_can_take(sweep, tmp_path, monkeypatch):
    from scipy.stats import t

    from saft.report import load_runs
    monkeypatch.setenv("WANDB_MODE", "offline")
    report_main([str(sweep), "--out", str(tmp_path), "--ci", "--formats", "png", "pdf", "svg",
                 "--wandb-project", "saft-test"])
    runs = {r["identity_hash"]: r for r in (read_results(p.parent) for p in sweep.glob("*/results.json"))}
    frame = load_runs(sweep)
    assert len(frame) == 4 and set(frame["identity_hash"]) == set(runs) and set(frame["label"]) == {"saft", "full_ft"}
    assert len(list(csv.DictReader(open(tmp_path / "runs.csv")))) == 4
    for _, row in frame.iterrows():  # per seed, every metric and identity key a column
        r = runs[row["identity_hash"]]
        assert (row["seed"], row["cfg/method.name"], row["top1/sketch"]) == (r["seed"], r["method"],
                                                                              r["metrics"]["sketch"]["top1"])
        assert row["id_gain"] == pytest.approx(r["metrics"]["photo"]["top1"] - r["zeroshot_metrics"]["photo"]["top1"])
        assert row["zeroshot/top1/negative"] == r["zeroshot_metrics"]["negative"]["top1"]
    summary = _rows(tmp_path / "summary.csv")
    for method in ("saft", "full_ft"):
        values = [r["metrics"]["photo"]["top1"] for r in runs.values() if r["method"] == method]
        half = t.ppf(0.975, 1) * statistics.stdev(values) / 2 ** 0.5
        assert float(summary[method]["photo ci95_low"]) == pytest.approx(statistics.mean(values) - half)
        assert float(summary[method]["photo ci95_high"]) == pytest.approx(statistics.mean(values) + half)
        assert summary[method]["n"] == "2"
    assert "[95% CI of the mean]" in (tmp_path / "report.md").read_text()
    for name in ("id_vs_ood", "id_vs_sketch", "id_vs_negative", "mask_blocks"):
        assert all((tmp_path / f"{name}.{f}").stat().st_size > 3000 for f in ("png", "pdf", "svg")), name
    tables = {p.name.split("_")[0]: json.loads(p.read_text())
              for p in (tmp_path / "wandb").glob("offline-run-*/files/media/table/*.table.json")}
    logged = dict(zip(tables["summary"]["columns"], zip(*tables["summary"]["data"])))
    assert all(isinstance(v, float) for v in logged["photo mean"]) and set(logged["n"]) == {2}
    assert len(tables["runs"]["data"]) == 4


def test_an_optuna_search_returns_each_trials_validation_top1(tmp_path):
    """train.py returns the validation split's top-1 to Hydra's Optuna sweeper (it crashed on None before), and
    records it in results.json; optimized_metric accepts no test metric (tests/test_validation.py)."""
    pytest.importorskip("hydra_plugins.hydra_optuna_sweeper", reason="the [sweeps] extra (scripts/setup.sh installs it)")
    run_script("train.py", ["-m", "hparams_search=saft", *SWEEP, "num_workers=0", "hydra.sweeper.n_trials=3",
                            "hydra.sweeper.sampler.n_startup_trials=3", f"hydra.sweep.dir={tmp_path}"])
    trials = [read_results(p.parent) for p in tmp_path.glob("*/results.json")]
    assert len(trials) == 3 and len({t["identity"]["lr_scale"] for t in trials}) == 3
    best = OmegaConf.load(tmp_path / "optimization_results.yaml")
    values = [t["val_metrics"]["val/top1"] for t in trials]
    assert best.best_value == pytest.approx(max(values))
    assert any(t["identity"]["lr_scale"] == pytest.approx(best.best_params.lr_scale) and
               t["val_metrics"]["val/top1"] == pytest.approx(best.best_value) for t in trials)


def test_a_local_parallel_sweep_with_the_joblib_launcher(tmp_path):
    pytest.importorskip("hydra_plugins.hydra_joblib_launcher", reason="the [sweeps] extra (scripts/setup.sh installs it)")
    run_script("train.py", ["-m", "hydra/launcher=joblib", "hydra.launcher.n_jobs=2", "method=saft,full_ft", *SWEEP,
                            "num_workers=0", f"hydra.sweep.dir={tmp_path}"])
    runs = {read_results(p.parent)["method"]: p.parent.name for p in tmp_path.glob("*/results.json")}
    assert runs == {"saft": "method-saft", "full_ft": "method-full_ft"}


def test_row_labels_show_what_varies_within_each_method_once_and_in_numeric_order():
    """lr_scale and the lr it sets split a method's runs alike: one of them is shown (by value they differ); a key
    that varies only among SAFT's configurations never labels full FT's rows."""
    from saft.report.tables import _rows
    runs = []
    for lr in (3e-5, 1e-5, 1e-4):
        runs.append(_identified({**_run("full_ft", 1, 30.0, 70.0, lr), "extra_settings": {"lr_scale": lr / 1e-5}}))
        for sparsity in (0.01, 0.001):
            runs.append(_identified({**_run("saft", 1, 25.0, 79.0, lr * 100), "sparsity": sparsity,
                                     "extra_settings": {"lr_scale": lr / 1e-5}}))
    assert [name for name, _ in _rows(runs)] == [
        "full_ft, lr=1e-05", "full_ft, lr=3e-05", "full_ft, lr=0.0001",
        *(f"saft, lr={lr}, sparsity={s}" for lr in ("0.001", "0.003", "0.01") for s in ("0.001", "0.01"))]


def test_labels_keep_two_settings_that_only_vary_together():
    """The mask's exclusions and its sparsity change together in fmnist_tradeoff's SAFT arms; both tell the rows
    apart, unlike lr_scale and the lr it sets."""
    from saft.report.tables import _rows
    runs = [_identified({**_run("saft", 1, 25.0, 79.0, 1e-3), "sparsity": s, "extra_settings": {
        "method.mask.exclude": exclude, "lr_scale": 1}}) for s, exclude in ((0.001, []), (0.01, ["conv1"]))]
    assert [name for name, _ in _rows(runs)] == ['saft, mask.exclude=["conv1"], sparsity=0.01',
                                                "saft, mask.exclude=[], sparsity=0.001"]
