"""Reporting: tables and pictures from finished runs' ``results.json`` (``python -m saft.report``), and every run as
one pandas DataFrame (:func:`load_runs`)."""
from pathlib import Path
from typing import Union


def load_runs(*dirs: Union[str, Path]):
    """Every finished run below ``dirs`` as a pandas DataFrame, one row per run (the columns of ``runs.csv``:
    :func:`saft.report.runs.tidy`), with the report's grouping: duplicates and re-evaluations left out.

        from saft.report import load_runs
        df = load_runs("multirun/fmnist_tradeoff")
        df.groupby("label")[["id_top1", "ood_mean_top1"]].agg(["mean", "std"])
    """
    import pandas

    from saft.report.runs import collect, tidy
    return pandas.DataFrame(tidy(collect([Path(d) for d in dirs]).finished))
