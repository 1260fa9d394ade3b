"""Tables and pictures from finished runs: ``python -m saft.report <sweep or run dirs...> --out DIR``.

Reads every ``results.json`` below the given folders (and notes runs that failed, ``error.txt``, never
finished, or repeat another run's configuration and seed), groups them into configurations by their identity
(``saft.report.runs``: every setting but the seed), averages over seeds (mean +- sample std), and writes ``report.md``, ``report.tex``, one CSV
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
import statistics
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

from saft.app.identity import digest
from saft.report.published import BASE_TO_NEW_AVERAGE, DOMAIN_GENERALISATION
from saft.report.runs import LR_KEYS, Runs, collect, config_key, context_key, groups, label, tidy, varying

IMAGENET_SETS = ("imagenet", "imagenet_v2", "imagenet_sketch", "imagenet_a", "imagenet_r")
BASE_TO_NEW_DATASETS = ("imagenet", "caltech101", "oxford_pets", "stanford_cars", "oxford_flowers", "food101",
                        "fgvc_aircraft", "sun397", "dtd", "eurosat", "ucf101")
# Identity keys of the data a base-to-new configuration is averaged over (one value per dataset).
DATASET_KEYS = ("dataset.",)


@dataclass
class Cell:
    values: List[float]

    @property
    def mean(self) -> Optional[float]:
        return statistics.mean(self.values) if self.values else None

    @property
    def std(self) -> Optional[float]:
        return statistics.stdev(self.values) if len(self.values) > 1 else None

    @property
    def ci95(self) -> Optional[Tuple[float, float]]:
        """The 95% confidence interval of the mean over seeds (Student's t: seeds are few)."""
        if self.std is None:
            return None
        from scipy.stats import t
        half = t.ppf(0.975, len(self.values) - 1) * self.std / len(self.values) ** 0.5
        return self.mean - half, self.mean + half

    def text(self, ci: bool = False) -> str:
        if not self.values:
            return "-"
        shown = f"{self.mean:.2f}" + (f" ± {self.std:.2f}" if self.std is not None else "")
        return shown + (" [{:.2f}, {:.2f}]".format(*self.ci95) if ci and self.ci95 else "")


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


def _rows(runs: Sequence[dict], planned: Sequence[dict] = (), skip: Sequence[str] = ()):
    """(label, members) per configuration, sorted by label; labels show what varies among them."""
    grouped = groups(runs, planned, skip)
    examples = {key: members[0] if members else next(p for p in planned if config_key(p, skip) == key)
                for key, members in grouped.items()}
    keys = varying(list(examples.values()), skip)
    return sorted(((label(examples[key], keys), members) for key, members in grouped.items()),
                  key=lambda x: _in_order(x[0]))


def _in_order(text: str) -> list:
    """A label's sort key: its method, then each setting with numbers as numbers (lr=3e-06 before lr=1e-05)."""
    key = []
    for part in text.split(", "):
        name, _, value = part.partition("=")
        try:
            key.append((name, 0, float(value), ""))
        except ValueError:
            key.append((name, 1, 0.0, value))
    return key


def summary_table(runs: Runs) -> Table:
    """Every configuration: each eval set and the OOD mean (works for any dataset and experiment)."""
    sets: List[str] = []
    for r in runs.finished:
        sets += [s for s in [r["id"], *r["ood"]] if s not in sets]
    rows = [(name, [_cell(members, _top1(s)) for s in sets] + [_cell(members, lambda r: r.get("ood_mean_top1")),
                                                                len(members)])
            for name, members in _rows(runs.finished, runs.planned)]
    return Table("summary", "All configurations (top-1 %, mean ± std over seeds; n = seeds)",
                 [*sets, "OOD mean", "n"], rows)


def domain_generalisation_table(runs: Runs) -> Optional[Table]:
    dg = [r for r in runs.finished if r["dataset"] == "imagenet" and r.get("protocol", "all") == "all"]
    if not dg:
        return None

    def ood(r):
        values = [r["metrics"].get(s, {}).get("top1") for s in IMAGENET_SETS[1:]]
        return statistics.mean(values) if None not in values else None
    rows = [(name, [_cell(members, _top1(s)) for s in IMAGENET_SETS] + [_cell(members, ood)])
            for name, members in _rows(dg)]
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
    order = {d: i for i, d in enumerate(BASE_TO_NEW_DATASETS)}
    rows = []
    per_configuration: Dict[str, Dict[str, List[Cell]]] = defaultdict(dict)
    names = {}
    for name, members in _rows(b2n, skip=DATASET_KEYS):
        configuration = config_key(members[0], DATASET_KEYS)
        names[configuration] = name
        for seeds in groups(members).values():  # one per dataset
            dataset = seeds[0]["dataset"]
            trio = [_cell(seeds, _top1("base")), _cell(seeds, _top1("new")), _cell(seeds, lambda r: r.get("hm"))]
            per_configuration[configuration][dataset] = trio
            rows.append(((order.get(dataset, len(order)), dataset, name), f"{dataset}: {name}", trio + [len(seeds)]))
    rows = [(text, cells) for _, text, cells in sorted(rows, key=lambda row: row[0])]
    for configuration, trios in sorted(per_configuration.items(), key=lambda kv: names[kv[0]]):
        average = [Cell([statistics.mean(trios[d][i].mean for d in BASE_TO_NEW_DATASETS)])
                   if all(d in trios and trios[d][i].values for d in BASE_TO_NEW_DATASETS) else Cell([])
                   for i in range(3)]
        rows.append((f"average: {names[configuration]}", average + [""]))
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
    rows = [(name, [_cell(members, _top1("imagenet"))] + [_cell(members, _top1(t)) for t in targets]
             + [_cell(members, average)]) for name, members in _rows(cross)]
    return Table("cross_dataset", "Cross-dataset transfer from 16-shot ImageNet (top-1 %)",
                 ["ImageNet", *targets, "average"], rows)


def ablation_tables(runs: Runs) -> List[Table]:
    tables = []
    for experiment in sorted({r.get("experiment") for r in runs.finished if str(r.get("experiment")).startswith("ablation")}):
        members = [r for r in runs.finished if r.get("experiment") == experiment]
        rows = [(name, [_cell(group, _top1(group[0]["id"])), _cell(group, lambda r: r.get("ood_mean_top1")),
                        _cell(group, lambda r: float(r["num_trainable"]))])
                for name, group in _rows(members)]
        tables.append(Table(experiment, f"Ablation {experiment[len('ablation_'):]} (top-1 %)",
                            ["ID", "OOD mean", "trainable entries"], rows))
    return tables


def _id_ood(run: dict, metrics_key: str = "metrics") -> Optional[Tuple[float, float]]:
    metrics = run.get(metrics_key)
    if not metrics or not run.get("ood") or any(s not in metrics for s in [run["id"], *run["ood"]]):
        return None
    return metrics[run["id"]]["top1"], statistics.mean(metrics[s]["top1"] for s in run["ood"])


def _id_and(ood: str):
    """(ID, one OOD set's top-1) of a run, as :func:`_id_ood` gives (ID, OOD mean)."""
    def point(run: dict, metrics_key: str = "metrics") -> Optional[Tuple[float, float]]:
        metrics = run.get(metrics_key)
        if not metrics or run["id"] not in metrics or ood not in metrics:
            return None
        return metrics[run["id"]]["top1"], metrics[ood]["top1"]
    return point


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


def _is_training(run: dict) -> bool:
    return run.get("wise_alpha") is None


def tradeoff_curves(runs: Sequence[dict], point=_id_ood) -> Dict[str, List[List[Tuple[float, float]]]]:
    """Label -> points of one configuration over learning rates, each point the ``point`` (ID, OOD mean by default)
    of every seed (training runs only: WiSE-FT evaluations are the curves of ``wise_curves``)."""
    finished = [r for r in runs if point(r) is not None and _is_training(r)]
    return {name: [[point(r) for r in seeds] for seeds in groups(members).values()]
            for name, members in _rows(finished, skip=LR_KEYS)}


def wise_curves(runs: Sequence[dict], point=_id_ood) -> Dict[str, List[List[List[Tuple[float, float]]]]]:
    """Label of a learning-rate curve (as in ``tradeoff_curves``) -> one WiSE-FT curve per run configuration of
    it that has WiSE evaluations: zero-shot (α=0), the evaluations in α order, the training run (α=1), each
    point the ``point`` of every seed. The order is α's, not ID's: a WiSE-FT curve need not rise in ID."""
    finished = [r for r in runs if point(r) is not None]
    curves = defaultdict(list)
    for name, members in _rows(finished, skip=(*LR_KEYS, "wise_alpha")):
        for configuration in groups(members, skip=("wise_alpha",)).values():
            evals = defaultdict(list)
            for r in configuration:
                if not _is_training(r):
                    evals[float(r["wise_alpha"])].append(point(r))
            if not evals:
                continue  # without WiSE evaluations the curve would be a straight line, not a measurement
            start = {r["seed"]: point(r, "zeroshot_metrics") for r in configuration if point(r, "zeroshot_metrics")}
            trained = [point(r) for r in configuration if _is_training(r)]
            points = [list(start.values()), *(evals[alpha] for alpha in sorted(evals)), trained]
            curves[name].append([seeds for seeds in points if seeds])
    return dict(curves)


def _full_ft(run: dict) -> bool:
    """Full fine-tuning as a reference: every parameter of its towers trains (not a ``method.trainable`` subset)."""
    return run["identity"].get("method.name") == "full_ft" and not run["identity"].get("method.trainable")


def _ft_configuration(run: dict) -> str:
    """What tells full-FT configurations apart besides the learning rate its curve runs over."""
    return digest({k: v for k, v in run["identity"].items() if k in run.get("method_keys", []) and k not in LR_KEYS})


def matched_id_table(runs: Runs) -> Optional[Table]:
    """Each configuration against full fine-tuning at the same ID accuracy: per seed, full FT's OOD mean is
    read off the polyline through that seed's FT training runs (all learning rates; never WiSE-FT evaluations)
    and the zero-shot start (FT with lr -> 0) in the same context (every setting outside the method: data,
    model, shots, training length, seed); a seed whose ID lies outside that range (below zero-shot or above FT's
    largest measured ID) is left out, and "n" counts the seeds that remain. Full FT here trains every parameter of
    its towers; when a context holds full FT of several tower sets, a run meets the one with its own towers, and a
    run whose towers none has (a probe's none) meets it only if there is a single one.

    When full FT has WiSE-FT evaluations, "OOD vs WiSE-FT" is the OOD mean minus the best OOD mean that any of
    full FT's WiSE-FT curves of the same seed and context reaches at the run's ID. A curve belongs to one FT
    configuration (learning rate) with at least one WiSE evaluation: the polyline through zero-shot, its
    evaluations and its training run. Curves that do not cover the ID do not count; a seed no curve covers is
    left out, and "n WiSE" counts the seeds that remain. Full FT's own WiSE rows are that reference."""
    measured = [r for r in runs.finished if _id_ood(r) and _id_ood(r, "zeroshot_metrics")]
    full_ft = [r for r in measured if _full_ft(r)]
    if not full_ft or all(_full_ft(r) for r in measured):
        return None
    towers = {}  # (context, FT configuration) -> its towers
    for r in full_ft:
        towers[context_key(r), _ft_configuration(r)] = r["identity"].get("method.towers")

    def reference(r) -> Optional[str]:
        """The FT configuration ``r`` is compared with in its context, if one is clearly it."""
        own = sorted({c for (context, c) in towers if context == context_key(r)})
        same = [c for c in own if towers[context_key(r), c] == r["identity"].get("method.towers")]
        return same[0] if len(same) == 1 else own[0] if len(own) == 1 else None

    ft = defaultdict(set)  # (context, FT configuration) -> points of FT's learning-rate curve
    wise = defaultdict(lambda: defaultdict(set))  # (context, FT configuration) -> lr config -> its WiSE-FT curve
    def curve(r):  # an FT training run and its WiSE evaluations share it (one seed, one learning rate)
        return context_key(r), config_key(r, ("wise_alpha",))
    evaluated = {curve(r) for r in full_ft if not _is_training(r)}
    for r in full_ft:
        points = {_id_ood(r), _id_ood(r, "zeroshot_metrics")}
        where = (context_key(r), _ft_configuration(r))
        if _is_training(r):
            ft[where] |= points
        if curve(r) in evaluated:
            wise[where][curve(r)] |= points

    def versus_ft(r):
        (x, y), curve = _id_ood(r), ft.get((context_key(r), reference(r)))
        at = interpolate(list(curve), x) if curve else None
        return None if at is None else y - at

    def versus_wise(r):
        (x, y) = _id_ood(r)
        curves = wise.get((context_key(r), reference(r)), {}).values()
        reached = [at for at in (interpolate(list(c), x) for c in curves) if at is not None]
        return y - max(reached) if reached else None

    def versus(group, is_reference, value):
        if is_reference:
            return ["reference", len(group)]
        cell = _cell(group, value)
        return [cell, len(cell.values)]

    def cells(group):
        is_ft, training = _full_ft(group[0]), _is_training(group[0])
        row = [_cell(group, lambda r: changes_from_zeroshot(r)[0]), _cell(group, lambda r: changes_from_zeroshot(r)[1]),
               *versus(group, is_ft and training, versus_ft)]
        return row + versus(group, is_ft and not training, versus_wise) if evaluated else row
    rows = [(name, cells(group)) for name, group in _rows(measured)]
    title = ("Against full fine-tuning at matched ID accuracy (points; change from zero-shot, and OOD mean minus "
             "full FT's at the same ID; n = seeds inside FT's measured range")
    columns = ["ID gain", "OOD change", "OOD vs full FT", "n"]
    if evaluated:
        title += ("; OOD vs WiSE-FT = OOD mean minus the best of full FT's WiSE-FT curves (zero-shot, WiSE evals, "
                  "run; one per learning rate, same seed) at the same ID, n WiSE = seeds some curve covers")
        columns += ["OOD vs WiSE-FT", "n WiSE"]
    return Table("matched_id", title + ")", columns, rows)


def _text(value, ci: bool = False) -> str:
    if isinstance(value, Cell):
        return value.text(ci)
    return f"{value:.2f}" if isinstance(value, float) else str(value)


def to_markdown(table: Table, ci: bool = False) -> str:
    title = table.title + (" [95% CI of the mean]" if ci else "")
    lines = [f"### {title}", "", "| | " + " | ".join(table.columns) + " |",
             "|---" * (len(table.columns) + 1) + "|"]
    lines += ["| " + label + " | " + " | ".join(_text(c, ci) for c in cells) + " |" for label, cells in table.rows]
    return "\n".join(lines) + "\n"


def to_latex(table: Table, ci: bool = False) -> str:
    def esc(s: str) -> str:
        return s.replace("_", r"\_").replace("%", r"\%").replace("±", r"$\pm$")
    lines = [r"\begin{table}[t]", r"\centering", r"\begin{tabular}{l" + "c" * len(table.columns) + "}",
             r"\toprule", " & ".join([""] + [esc(c) for c in table.columns]) + r" \\", r"\midrule"]
    lines += [" & ".join([esc(label)] + [esc(_text(c, ci)) for c in cells]) + r" \\" for label, cells in table.rows]
    lines += [r"\bottomrule", r"\end{tabular}", rf"\caption{{{esc(table.title)}}}", r"\end{table}"]
    return "\n".join(lines) + "\n"


CELL_FIELDS = ("mean", "std", "n", "ci95_low", "ci95_high")


def flat(table: Table) -> Tuple[List[str], List[list]]:
    """The table as numbers: a column of mean ± std cells becomes ``<column> mean``, ``std``, ``n``, ``ci95_low``
    and ``ci95_high``; any other column (a seed count, a published number, "reference") stays one column."""
    celled = [any(isinstance(cells[i], Cell) for _, cells in table.rows) for i in range(len(table.columns))]
    header = ["row"]
    for column, is_cell in zip(table.columns, celled):
        header += [f"{column} {f}" for f in CELL_FIELDS] if is_cell else [column]
    rows = []
    for name, cells in table.rows:
        row = [name]
        for c, is_cell in zip(cells, celled):
            if isinstance(c, Cell):
                row += [c.mean, c.std, len(c.values), *(c.ci95 or (None, None))]
            else:
                row += [c, None, None, None, None] if is_cell else [c]
        rows.append(row)
    return header, rows


def to_csv(table: Table, path: Path) -> None:
    header, rows = flat(table)
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(header)
        writer.writerows([["" if v is None else v for v in row] for row in rows])


def write_runs_csv(runs: Runs, path: Path) -> None:
    rows = tidy(runs.finished)
    columns = list(dict.fromkeys(k for row in rows for k in row))
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, columns)
        writer.writeheader()
        writer.writerows(rows)


def build_tables(runs: Runs) -> List[Table]:
    tables = [domain_generalisation_table(runs), base_to_new_table(runs), cross_dataset_table(runs),
              *ablation_tables(runs), matched_id_table(runs), summary_table(runs)]
    return [t for t in tables if t is not None]


def write_report(dirs: Sequence[Path], out: Path, plot: Optional[dict] = None, ci: bool = False,
                 formats: Sequence[str] = ("png", "pdf")) -> List[Table]:
    """The tables of every run in ``dirs``, ``runs.csv`` (one row per run) and the pictures, in ``out``. ``plot``:
    ``methods``, ``xlim`` and ``ylim`` of the ID-vs-OOD pictures (the tables keep every run); ``ci``: 95% confidence
    intervals in report.md and report.tex (the CSVs always have them); ``formats``: of each picture."""
    from saft.report.plots import plot_id_vs_ood, plot_mask_blocks
    out.mkdir(parents=True, exist_ok=True)
    runs = collect(dirs)
    tables = build_tables(runs)
    status = [f"{len(runs.finished)} finished runs, {len(runs.failed)} failed, {len(runs.unfinished)} unfinished."]
    status += [f"- failed: {d} ({msg.splitlines()[0]})" for d, msg in runs.failed]
    status += [f"- unfinished: {d}" for d in runs.unfinished]
    status += [f"- {model}: runs started from {len(bases)} different pre-trained weights ({', '.join(bases)}); "
               f"their rows are kept apart by `base_sha256`" for model, bases in runs.bases.items()]
    status += [f"- duplicate: {d} has the configuration and seed of {kept} (left out: a seed counts once)"
               for d, kept in runs.duplicates]
    (out / "report.md").write_text("\n".join(status) + "\n\n" + "\n".join(to_markdown(t, ci) for t in tables))
    (out / "report.tex").write_text("\n".join(to_latex(t, ci) for t in tables))
    for t in tables:
        to_csv(t, out / f"{t.name}.csv")
    write_runs_csv(runs, out / "runs.csv")
    start = next((r for r in runs.finished if _id_ood(r, "zeroshot_metrics")), None)
    # the OOD mean, then each OOD set on its own (wise-ft draws one scatter per OOD set)
    for ood in (None, *dict.fromkeys(s for r in runs.finished for s in r["ood"])):
        point = _id_ood if ood is None else _id_and(ood)
        plot_id_vs_ood(tradeoff_curves(runs.finished, point), start and point(start, "zeroshot_metrics"),
                       [out / f"id_vs_{ood or 'ood'}.{f}" for f in formats], wise_curves(runs.finished, point),
                       ylabel=f"{ood or 'OOD mean'} top-1 (%)", **(plot or {}))
    plot_mask_blocks(runs.finished, [out / f"mask_blocks.{f}" for f in formats])
    return tables


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("dirs", nargs="+", type=Path, help="sweep or run folders (searched recursively)")
    parser.add_argument("--out", type=Path, default=Path("report"), help="where to write the report")
    parser.add_argument("--wandb-project", help="also log the tables and pictures to this wandb project")
    parser.add_argument("--methods", nargs="+", help="draw only these methods' curves in id_vs_ood.png, e.g. "
                        "--methods full_ft saft lp_ft (the tables keep every run)")
    parser.add_argument("--xlim", nargs=2, type=float, metavar=("LOW", "HIGH"), help="ID axis of id_vs_ood.png (%%)")
    parser.add_argument("--ylim", nargs=2, type=float, metavar=("LOW", "HIGH"), help="OOD axis of id_vs_ood.png (%%)")
    parser.add_argument("--ci", action="store_true", help="show 95%% confidence intervals of the means in report.md "
                        "and report.tex (the CSVs always hold them)")
    parser.add_argument("--formats", nargs="+", default=["png", "pdf"], choices=["png", "pdf", "svg"],
                        help="file formats of the pictures (default: png pdf)")
    args = parser.parse_args(argv)
    missing = [d for d in args.dirs if not d.is_dir()]
    if missing:
        raise SystemExit(f"error: not a folder: {', '.join(map(str, missing))}")
    tables = write_report(args.dirs, args.out, {"methods": args.methods, "xlim": args.xlim, "ylim": args.ylim},
                          args.ci, args.formats)
    if args.wandb_project:
        log_to_wandb(args.wandb_project, args.out, tables, "png" in args.formats)
    print((args.out / "report.md").read_text())


def log_to_wandb(project: str, out: Path, tables: Sequence[Table], images: bool = True) -> None:
    """The tables (numbers, as in the CSVs: sortable and plottable), runs.csv and the pictures as one wandb run
    (offline unless WANDB_MODE says otherwise)."""
    import os

    import wandb
    run = wandb.init(project=project, job_type="report", mode=os.environ.get("WANDB_MODE", "offline"),
                     dir=str(out))
    for t in tables:
        header, rows = flat(t)
        run.log({t.name: wandb.Table(columns=header, data=_typed(rows))})
    if (out / "runs.csv").stat().st_size > 2:  # a header: at least one finished run
        run.log({"runs": wandb.Table(dataframe=_read_csv(out / "runs.csv"))})
    if images:
        run.log({p.stem: wandb.Image(str(p)) for p in sorted(out.glob("*.png"))})
    run.finish()


def _typed(rows: List[list]) -> List[list]:
    """A wandb table column holds one type: a column with numbers keeps its numbers (a "reference" cell becomes
    empty); any other column is text."""
    numeric = [any(isinstance(v, (int, float)) and not isinstance(v, bool) for v in column) for column in zip(*rows)]
    return [[(v if isinstance(v, (int, float)) and not isinstance(v, bool) else None) if is_number
             else (None if v is None else str(v)) for v, is_number in zip(row, numeric)] for row in rows]


def _read_csv(path: Path):
    import pandas
    return pandas.read_csv(path)
