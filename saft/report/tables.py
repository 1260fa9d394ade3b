"""Tables and pictures from finished runs: ``python -m saft.report <sweep or run dirs...> --out DIR``.

Reads every ``results.json`` below the given folders (and notes runs that failed, ``error.txt``, or never
finished), averages over seeds (mean +- sample std), and writes ``report.md``, ``report.tex``, one CSV
per table, ``id_vs_ood.png`` (one curve per configuration through its learning rates) and ``mask_blocks.png``.
Runs with a zero-shot reference are also compared with full fine-tuning at matched ID accuracy. Cells without
a finished run show as "-".

WiSE-FT evaluations (``eval.py run_dir=RUN wise_alpha=A``) carry the settings of their training run plus
``wise_alpha``, which tells configurations apart like any setting: each α of a run configuration is a row of
its own (training runs have ``wise_alpha`` None). In the matched-ID table they never join full FT's reference;
when full FT has WiSE evaluations, a column compares every row with the best of full FT's WiSE-FT curves at the
same ID. In ``id_vs_ood.png`` each configuration with WiSE evaluations gets a thin dashed curve per learning
rate in the colour of its learning-rate curve: zero-shot (α=0), its evaluations in α order, the run (α=1).
"""
import argparse
import csv
import json
import statistics
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

from omegaconf import OmegaConf

from saft.report.published import BASE_TO_NEW_AVERAGE, DOMAIN_GENERALISATION
from saft.app.results import ERROR, RESULTS, run_settings

IMAGENET_SETS = ("imagenet", "imagenet_v2", "imagenet_sketch", "imagenet_a", "imagenet_r")
BASE_TO_NEW_DATASETS = ("imagenet", "caltech101", "oxford_pets", "stanford_cars", "oxford_flowers", "food101",
                        "fgvc_aircraft", "sun397", "dtd", "eurosat", "ucf101")
# Settings that make two runs different configurations (the seed does not; wise_alpha is None but for WiSE-FT evals).
SETTINGS = ("experiment", "dataset", "protocol", "model", "method", "shots", "sparsity", "mask_score",
            "mask_scope", "mask_include", "mask_exclude", "towers", "lr", "wise_alpha")
MASK_SETTINGS = ("sparsity", "mask_score", "mask_scope", "mask_include", "mask_exclude")  # moot without a mask


@dataclass
class Runs:
    finished: List[dict] = field(default_factory=list)
    failed: List[Tuple[Path, str]] = field(default_factory=list)
    unfinished: List[Path] = field(default_factory=list)
    planned: List[dict] = field(default_factory=list)  # settings of failed and unfinished runs


def collect(dirs: Sequence[Path]) -> Runs:
    runs = Runs()
    for root in dirs:
        for config in sorted(Path(root).glob("**/.hydra/config.yaml")):
            run_dir = config.parent.parent
            if (run_dir / RESULTS).is_file():
                runs.finished.append({**json.loads((run_dir / RESULTS).read_text()), "dir": str(run_dir)})
                continue
            if (run_dir / ERROR).is_file():
                runs.failed.append((run_dir, (run_dir / ERROR).read_text().strip()))
            else:
                runs.unfinished.append(run_dir)
            runs.planned.append(run_settings(OmegaConf.load(config)))
    runs.finished = _without_reevaluations(runs.finished)
    return runs


def _without_reevaluations(finished: List[dict]) -> List[dict]:
    """``eval.py run_dir=RUN`` without ``wise_alpha`` on RUN's own data measures RUN again: with RUN in the report
    it would count as a second seed. It stays when RUN is not there, or when it evaluated other data."""
    trained = {(settings_key(r), r["seed"], json.dumps(sorted(r["metrics"]))) for r in finished if not r.get("run_dir")}
    return [r for r in finished if not (r.get("run_dir") and r.get("wise_alpha") is None and
                                        (settings_key(r), r["seed"], json.dumps(sorted(r["metrics"]))) in trained)]


def _moot(run: dict, key: str) -> bool:
    return key in MASK_SETTINGS and not run.get("mask_selection")  # a mask setting of a method without a mask


def _setting(run: dict, key: str):
    return None if _moot(run, key) else run.get(key)


def _sortable(value) -> tuple:
    """Numbers before everything else and in numeric order (lr 3e-6 before 1e-5), the rest as JSON."""
    numeric = isinstance(value, (int, float)) and not isinstance(value, bool)
    return (0, float(value), "") if numeric else (1, 0.0, json.dumps(value))


def settings_key(run: dict, skip: Sequence[str] = ()) -> tuple:
    return tuple(_sortable(_setting(run, k)) for k in SETTINGS if k not in skip)


@dataclass
class Cell:
    values: List[float]

    @property
    def mean(self) -> Optional[float]:
        return statistics.mean(self.values) if self.values else None

    @property
    def std(self) -> Optional[float]:
        return statistics.stdev(self.values) if len(self.values) > 1 else None

    def text(self) -> str:
        if not self.values:
            return "-"
        return f"{self.mean:.2f}" + (f" ± {self.std:.2f}" if self.std is not None else "")


@dataclass
class Table:
    name: str
    title: str
    columns: List[str]
    rows: List[Tuple[str, List[object]]]  # label, cells (Cell or a published float)


def _cell(runs: Sequence[dict], value) -> Cell:
    values = [v for v in (value(r) for r in runs) if v is not None]
    return Cell(values)


def _top1(name: str):
    return lambda r: r["metrics"].get(name, {}).get("top1")


def _label(run: dict, varying: Sequence[str]) -> str:
    def show(value):
        return f"{value:.3g}" if isinstance(value, float) else value
    shown = [k for k in varying if k != "method" and not _moot(run, k)
             and not (k == "wise_alpha" and run.get(k) is None)]  # a training run: no alpha to show
    return ", ".join([run["method"]] + [f"{k}={show(run.get(k))}" for k in shown])


def _groups(runs: Sequence[dict], planned: Sequence[dict] = ()) -> Dict[tuple, List[dict]]:
    groups: Dict[tuple, List[dict]] = defaultdict(list)
    for r in planned:
        groups.setdefault(settings_key(r), [])
    for r in runs:
        groups[settings_key(r)].append(r)
    return groups


def _varying(settings: Sequence[dict]) -> List[str]:
    """Settings that tell configurations of the same method apart (what a row label must show)."""
    by_method = defaultdict(list)
    for s in settings:
        by_method[s.get("method")].append(s)
    varying = {k for group in by_method.values() for k in SETTINGS
               if k != "method" and len({json.dumps(_setting(s, k)) for s in group}) > 1}
    return ["method"] + [k for k in SETTINGS if k in varying]


def summary_table(runs: Runs) -> Table:
    """Every configuration: each eval set and the OOD mean (works for any dataset and experiment)."""
    groups = _groups(runs.finished, runs.planned)
    examples = {key: (members[0] if members else next(p for p in runs.planned if settings_key(p) == key))
                for key, members in groups.items()}
    sets: List[str] = []
    for r in runs.finished:
        sets += [s for s in [r["id"], *r["ood"]] if s not in sets]
    varying = _varying(list(examples.values()))
    rows = []
    for key, members in sorted(groups.items(), key=lambda kv: kv[0]):
        cells = [_cell(members, _top1(s)) for s in sets] + [_cell(members, lambda r: r.get("ood_mean_top1")),
                                                            len(members)]
        rows.append((_label(examples[key], varying), cells))
    return Table("summary", "All configurations (top-1 %, mean ± std over seeds; n = seeds)",
                 [*sets, "OOD mean", "n"], rows)


def domain_generalisation_table(runs: Runs) -> Optional[Table]:
    dg = [r for r in runs.finished if r["dataset"] == "imagenet" and r.get("protocol", "all") == "all"]
    if not dg:
        return None
    varying = _varying(dg)

    def ood(r):
        values = [r["metrics"].get(s, {}).get("top1") for s in IMAGENET_SETS[1:]]
        return statistics.mean(values) if None not in values else None
    rows = [(_label(members[0], varying), [_cell(members, _top1(s)) for s in IMAGENET_SETS] + [_cell(members, ood)])
            for _, members in sorted(_groups(dg).items())]
    rows += [(f"{name} (published)", [*values, statistics.mean(values[1:])])
             for name, values in DOMAIN_GENERALISATION.items()]
    return Table("domain_generalisation", "Domain generalisation: 16-shot ImageNet → variants (top-1 %)",
                 ["ImageNet", "-V2", "-Sketch", "-A", "-R", "OOD avg"], rows)


def base_to_new_table(runs: Runs) -> Optional[Table]:
    """One row per dataset and configuration (every setting but the seed, as in the other tables; labelled by
    what varies), B / N / HM as mean ± std over its seeds; then each configuration's average over the 11
    datasets (the mean of its per-dataset means, only when all 11 are there) and the published averages."""
    b2n = [r for r in runs.finished if r.get("protocol") == "base2new"]
    if not b2n:
        return None
    varying = [k for k in _varying(b2n) if k != "dataset"]  # the dataset has a place of its own in each label
    order = {d: i for i, d in enumerate(BASE_TO_NEW_DATASETS)}
    by_dataset = defaultdict(list)
    for r in b2n:
        by_dataset[r["dataset"]].append(r)
    rows = []
    per_configuration: Dict[tuple, Dict[str, List[Cell]]] = defaultdict(dict)
    examples: Dict[tuple, dict] = {}
    for dataset in sorted(by_dataset, key=lambda d: (order.get(d, len(order)), d)):
        for _, members in sorted(_groups(by_dataset[dataset]).items()):
            trio = [_cell(members, _top1("base")), _cell(members, _top1("new")), _cell(members, lambda r: r.get("hm"))]
            configuration = settings_key(members[0], skip=("dataset",))
            per_configuration[configuration][dataset] = trio
            examples.setdefault(configuration, members[0])
            rows.append((f"{dataset}: {_label(members[0], varying)}", trio + [len(members)]))
    for configuration, trios in sorted(per_configuration.items()):
        average = [Cell([statistics.mean(trios[d][i].mean for d in BASE_TO_NEW_DATASETS)])
                   if all(d in trios and trios[d][i].values for d in BASE_TO_NEW_DATASETS) else Cell([])
                   for i in range(3)]
        rows.append((f"average: {_label(examples[configuration], varying)}", average + [""]))
    for name, values in BASE_TO_NEW_AVERAGE.items():
        rows.append((f"{name} average (published)", [*values, ""]))
    return Table("base_to_new", "Base-to-new generalisation (top-1 %, mean ± std over seeds; HM = 2BN/(B+N); "
                 "n = seeds; average = over the 11 datasets)", ["B", "N", "HM", "n"], rows)


def cross_dataset_table(runs: Runs) -> Optional[Table]:
    cross = [r for r in runs.finished if any(t in r["metrics"] for t in BASE_TO_NEW_DATASETS[1:])
             and r["dataset"] == "imagenet"]
    if not cross:
        return None
    targets = [t for t in BASE_TO_NEW_DATASETS[1:] if any(t in r["metrics"] for r in cross)]

    def average(r):
        values = [r["metrics"].get(t, {}).get("top1") for t in targets]
        return statistics.mean(values) if None not in values else None
    rows = [(_label(members[0], _varying(cross)),
             [_cell(members, _top1("imagenet"))] + [_cell(members, _top1(t)) for t in targets] + [_cell(members, average)])
            for _, members in sorted(_groups(cross).items())]
    return Table("cross_dataset", "Cross-dataset transfer from 16-shot ImageNet (top-1 %)",
                 ["ImageNet", *targets, "average"], rows)


def ablation_tables(runs: Runs) -> List[Table]:
    tables = []
    for experiment in sorted({r.get("experiment") for r in runs.finished if str(r.get("experiment")).startswith("ablation")}):
        members = [r for r in runs.finished if r.get("experiment") == experiment]
        varying = _varying(members)
        rows = [(_label(group[0], varying), [_cell(group, _top1(group[0]["id"])),
                                             _cell(group, lambda r: r.get("ood_mean_top1")),
                                             _cell(group, lambda r: float(r["num_trainable"]))])
                for _, group in sorted(_groups(members).items())]
        tables.append(Table(experiment, f"Ablation {experiment[len('ablation_'):]} (top-1 %)",
                            ["ID", "OOD mean", "trainable entries"], rows))
    return tables


def _id_ood(run: dict, metrics_key: str = "metrics") -> Optional[Tuple[float, float]]:
    metrics = run.get(metrics_key)
    if not metrics or not run.get("ood") or any(s not in metrics for s in [run["id"], *run["ood"]]):
        return None
    return metrics[run["id"]]["top1"], statistics.mean(metrics[s]["top1"] for s in run["ood"])


def changes_from_zeroshot(run: dict) -> Tuple[float, float]:
    """(ID gain, OOD-mean change) of a run against the zero-shot model it started from."""
    (x, y), (x0, y0) = _id_ood(run), _id_ood(run, "zeroshot_metrics")
    return x - x0, y - y0


def interpolate(points: Sequence[Tuple[float, float]], x: float) -> Optional[float]:
    """y at x on the polyline through ``points`` taken in order of x (points that share an x count as their
    mean y); None outside their x range, because extrapolating a trade-off curve invents evidence."""
    by_x = defaultdict(list)
    for px, py in points:
        by_x[px].append(py)
    line = [(px, statistics.mean(ys)) for px, ys in sorted(by_x.items())]
    if len(line) == 1:
        return line[0][1] if line[0][0] == x else None
    for (x0, y0), (x1, y1) in zip(line, line[1:]):
        if x0 <= x <= x1:
            return y0 + (y1 - y0) * (x - x0) / (x1 - x0)
    return None


def _curve_label(runs: Sequence[dict]):
    """Label of a run's learning-rate curve: what varies among the training runs, but not what the curve runs over."""
    varying = [k for k in _varying([r for r in runs if r.get("wise_alpha") is None]) if k not in ("lr", "wise_alpha")]
    return lambda r: _label(r, varying)


def tradeoff_curves(runs: Sequence[dict]) -> Dict[str, List[List[Tuple[float, float]]]]:
    """Label -> points of one configuration over learning rates, each point the (ID, OOD) of every seed (training
    runs only: WiSE-FT evaluations are the curves of ``wise_curves``)."""
    finished = [r for r in runs if _id_ood(r) is not None and r.get("wise_alpha") is None]
    label = _curve_label(finished)
    curves: Dict[tuple, Dict[tuple, List[dict]]] = defaultdict(lambda: defaultdict(list))
    for r in finished:
        curves[settings_key(r, skip=("lr",))][settings_key(r)].append(r)
    return {label(next(iter(points.values()))[0]): [[_id_ood(r) for r in seeds] for seeds in points.values()]
            for _, points in sorted(curves.items())}


def wise_curves(runs: Sequence[dict]) -> Dict[str, List[List[List[Tuple[float, float]]]]]:
    """Label of a learning-rate curve (as in ``tradeoff_curves``) -> one WiSE-FT curve per run configuration of
    it that has WiSE evaluations: zero-shot (α=0), the evaluations in α order, the training run (α=1), each
    point the (ID, OOD) of every seed. The order is α's, not ID's: a WiSE-FT curve need not rise in ID."""
    finished = [r for r in runs if _id_ood(r) is not None]
    label = _curve_label(finished)
    configurations = defaultdict(list)
    for r in finished:
        configurations[settings_key(r, skip=("wise_alpha",))].append(r)
    curves = defaultdict(list)
    for _, members in sorted(configurations.items()):
        evals = defaultdict(list)
        for r in members:
            if r.get("wise_alpha") is not None:
                evals[float(r["wise_alpha"])].append(_id_ood(r))
        if not evals:
            continue  # without WiSE evaluations the curve would be a straight line, not a measurement
        start = {r["seed"]: _id_ood(r, "zeroshot_metrics") for r in members if _id_ood(r, "zeroshot_metrics")}
        trained = [_id_ood(r) for r in members if r.get("wise_alpha") is None]
        points = [list(start.values()), *(evals[alpha] for alpha in sorted(evals)), trained]
        curves[label(members[0])].append([seeds for seeds in points if seeds])
    return dict(curves)


def matched_id_table(runs: Runs) -> Optional[Table]:
    """Each configuration against full fine-tuning at the same ID accuracy: per seed, full FT's OOD mean is
    read off the polyline through that seed's FT training runs (all learning rates; never WiSE-FT evaluations)
    and the zero-shot start (FT with lr -> 0) of the same experiment; a seed whose ID lies outside that range
    (below zero-shot or above FT's largest measured ID) is left out, and "n" counts the seeds that remain.

    When full FT has WiSE-FT evaluations, "OOD vs WiSE-FT" is the OOD mean minus the best OOD mean that any of
    full FT's WiSE-FT curves of the same seed and experiment reaches at the run's ID. A curve belongs to one FT
    configuration (learning rate) with at least one WiSE evaluation: the polyline through zero-shot, its
    evaluations and its training run. Curves that do not cover the ID do not count; a seed no curve covers is
    left out, and "n WiSE" counts the seeds that remain. Full FT's own WiSE rows are that reference."""
    measured = [r for r in runs.finished if _id_ood(r) and _id_ood(r, "zeroshot_metrics")]
    if not any(r["method"] == "full_ft" for r in measured) or all(r["method"] == "full_ft" for r in measured):
        return None

    def context(r):
        return json.dumps([r.get("experiment"), r["dataset"], r["model"], r["shots"], r.get("protocol"),
                           r.get("towers"), r["seed"]])

    def reference(r, table):
        """The key of ``table`` r is compared with. A method that trains no tower (linear probe, CoOp) meets the
        full FT of its experiment and seed whatever towers that trains, when there is exactly one."""
        if r.get("towers"):
            return context(r)
        def without_towers(key):
            c = json.loads(key)
            return c[:5] + c[6:]
        keys = [k for k in table if without_towers(k) == without_towers(context(r))]
        return keys[0] if len(keys) == 1 else context(r)

    def wise_curve(r):  # an FT training run and its WiSE evaluations share it
        return context(r), settings_key(r, skip=("wise_alpha",))
    full_ft = [r for r in measured if r["method"] == "full_ft"]
    # An FT run without WiSE evaluations has no WiSE-FT curve: the straight line to zero-shot was never measured.
    evaluated = {wise_curve(r) for r in full_ft if r.get("wise_alpha") is not None}
    ft = defaultdict(set)  # context -> points of FT's learning-rate curve
    wise = defaultdict(lambda: defaultdict(set))  # context -> FT configuration -> points of its WiSE-FT curve
    for r in full_ft:
        points = {_id_ood(r), _id_ood(r, "zeroshot_metrics")}
        if r.get("wise_alpha") is None:
            ft[context(r)] |= points
        if wise_curve(r) in evaluated:
            wise[context(r)][wise_curve(r)] |= points

    def versus_ft(r):
        (x, y), curve = _id_ood(r), ft.get(reference(r, ft))
        at = interpolate(list(curve), x) if curve else None
        return None if at is None else y - at

    def versus_wise(r):
        (x, y) = _id_ood(r)
        curves = wise.get(reference(r, wise), {}).values()
        reached = [at for at in (interpolate(list(c), x) for c in curves) if at is not None]
        return y - max(reached) if reached else None

    def versus(group, reference, value):
        if reference:
            return ["reference", len(group)]
        cell = _cell(group, value)
        return [cell, len(cell.values)]

    def cells(group):
        is_ft, alpha = group[0]["method"] == "full_ft", group[0].get("wise_alpha")
        row = [_cell(group, lambda r: changes_from_zeroshot(r)[0]), _cell(group, lambda r: changes_from_zeroshot(r)[1]),
               *versus(group, is_ft and alpha is None, versus_ft)]
        return row + versus(group, is_ft and alpha is not None, versus_wise) if evaluated else row
    varying = _varying(measured)
    rows = [(_label(group[0], varying), cells(group)) for _, group in sorted(_groups(measured).items())]
    title = ("Against full fine-tuning at matched ID accuracy (points; change from zero-shot, and OOD mean minus "
             "full FT's at the same ID; n = seeds inside FT's measured range")
    columns = ["ID gain", "OOD change", "OOD vs full FT", "n"]
    if evaluated:
        title += ("; OOD vs WiSE-FT = OOD mean minus the best of full FT's WiSE-FT curves (zero-shot, WiSE evals, "
                  "run; one per learning rate, same seed) at the same ID, n WiSE = seeds some curve covers")
        columns += ["OOD vs WiSE-FT", "n WiSE"]
    return Table("matched_id", title + ")", columns, rows)


def _text(value) -> str:
    if isinstance(value, Cell):
        return value.text()
    return f"{value:.2f}" if isinstance(value, float) else str(value)


def to_markdown(table: Table) -> str:
    lines = [f"### {table.title}", "", "| | " + " | ".join(table.columns) + " |",
             "|---" * (len(table.columns) + 1) + "|"]
    lines += ["| " + label + " | " + " | ".join(_text(c) for c in cells) + " |" for label, cells in table.rows]
    return "\n".join(lines) + "\n"


def to_latex(table: Table) -> str:
    def esc(s: str) -> str:
        return s.replace("_", r"\_").replace("%", r"\%").replace("±", r"$\pm$")
    lines = [r"\begin{table}[t]", r"\centering", r"\begin{tabular}{l" + "c" * len(table.columns) + "}",
             r"\toprule", " & ".join([""] + [esc(c) for c in table.columns]) + r" \\", r"\midrule"]
    lines += [" & ".join([esc(label)] + [esc(_text(c)) for c in cells]) + r" \\" for label, cells in table.rows]
    lines += [r"\bottomrule", r"\end{tabular}", rf"\caption{{{esc(table.title)}}}", r"\end{table}"]
    return "\n".join(lines) + "\n"


def to_csv(table: Table, path: Path) -> None:
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        header = ["row"]
        for c in table.columns:
            header += [f"{c} mean", f"{c} std", f"{c} n"]
        writer.writerow(header)
        for label, cells in table.rows:
            row = [label]
            for c in cells:
                if isinstance(c, Cell):
                    row += [c.mean if c.mean is not None else "", c.std if c.std is not None else "", len(c.values)]
                else:
                    row += [c, "", ""]
            writer.writerow(row)


def build_tables(runs: Runs) -> List[Table]:
    tables = [domain_generalisation_table(runs), base_to_new_table(runs), cross_dataset_table(runs),
              *ablation_tables(runs), matched_id_table(runs), summary_table(runs)]
    return [t for t in tables if t is not None]


def write_report(dirs: Sequence[Path], out: Path) -> List[Table]:
    from saft.report.plots import plot_id_vs_ood, plot_mask_blocks
    out.mkdir(parents=True, exist_ok=True)
    runs = collect(dirs)
    tables = build_tables(runs)
    status = [f"{len(runs.finished)} finished runs, {len(runs.failed)} failed, {len(runs.unfinished)} unfinished."]
    status += [f"- failed: {d} ({msg.splitlines()[0]})" for d, msg in runs.failed]
    status += [f"- unfinished: {d}" for d in runs.unfinished]
    (out / "report.md").write_text("\n".join(status) + "\n\n" + "\n".join(to_markdown(t) for t in tables))
    (out / "report.tex").write_text("\n".join(to_latex(t) for t in tables))
    for t in tables:
        to_csv(t, out / f"{t.name}.csv")
    start = next((_id_ood(r, "zeroshot_metrics") for r in runs.finished if _id_ood(r, "zeroshot_metrics")), None)
    plot_id_vs_ood(tradeoff_curves(runs.finished), start, out / "id_vs_ood.png", wise_curves(runs.finished))
    plot_mask_blocks(runs.finished, out / "mask_blocks.png")
    return tables


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("dirs", nargs="+", type=Path, help="sweep or run folders (searched recursively)")
    parser.add_argument("--out", type=Path, default=Path("report"), help="where to write the report")
    parser.add_argument("--wandb-project", help="also log the tables and pictures to this wandb project")
    args = parser.parse_args(argv)
    missing = [d for d in args.dirs if not d.is_dir()]
    if missing:
        raise SystemExit(f"error: not a folder: {', '.join(map(str, missing))}")
    tables = write_report(args.dirs, args.out)
    if args.wandb_project:
        log_to_wandb(args.wandb_project, args.out, tables)
    print((args.out / "report.md").read_text())


def log_to_wandb(project: str, out: Path, tables: Sequence[Table]) -> None:
    """The tables and pictures as one wandb run (offline unless WANDB_MODE says otherwise)."""
    import os

    import wandb
    run = wandb.init(project=project, job_type="report", mode=os.environ.get("WANDB_MODE", "offline"),
                     dir=str(out))
    for t in tables:
        run.log({t.name: wandb.Table(columns=["row", *t.columns],
                                     data=[[label, *map(_text, cells)] for label, cells in t.rows])})
    run.log({name: wandb.Image(str(out / f"{name}.png")) for name in ("id_vs_ood", "mask_blocks")})
    run.finish()

