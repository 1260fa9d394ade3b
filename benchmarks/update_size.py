"""How far each configuration moved its model: ||delta||_2, max |delta|, and the embeddings' share of it.

    python benchmarks/update_size.py multirun/fmnist_tradeoff/<date> --base ~/.cache/saft/saft-fmnist-<hash>.pt

Reads every finished run's ``delta.safetensors`` (final values of the changed entries), subtracts the base
checkpoint's values, and prints per configuration (mean over seeds): ID gain and OOD change from zero-shot,
the number of changed entries, ||delta||_2, max |delta|, and the share of ||delta||^2 in the patch, positional
and class embeddings. Used to ask why sparse updates forget more at the same ID gain (README, CPU benchmark).
"""
import argparse
import statistics
import sys
from collections import defaultdict
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from saft.delta import load_delta  # noqa: E402
from saft.report.runs import collect, config_key, label, varying  # noqa: E402
from saft.report.tables import _id_ood, changes_from_zeroshot  # noqa: E402
from saft.app.run import DELTA  # noqa: E402

EMBEDDINGS = ("visual.conv1.", "visual.positional_embedding", "visual.class_embedding")


def update_size(run_dir: Path, base: dict) -> dict:
    delta, _ = load_delta(run_dir / DELTA)
    squares, biggest, embedded = 0.0, 0.0, 0.0
    for name, (idx, val) in delta.items():
        change = (val.double() - base[name].reshape(-1)[idx].double())
        square = float(change.pow(2).sum())
        squares += square
        embedded += square if name.startswith(EMBEDDINGS) else 0.0
        biggest = max(biggest, float(change.abs().max()) if change.numel() else 0.0)
    return {"l2": squares ** 0.5, "max": biggest, "embedding_share": embedded / squares if squares else 0.0}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("dirs", nargs="+", type=Path, help="sweep or run folders (searched recursively)")
    parser.add_argument("--base", type=Path, required=True, help="the base checkpoint the runs started from")
    args = parser.parse_args(argv)
    base = torch.load(args.base, map_location="cpu", weights_only=True)
    base = base.get("state_dict", base)
    runs = [r for r in collect(args.dirs).finished if _id_ood(r) and _id_ood(r, "zeroshot_metrics")]
    groups = defaultdict(list)
    for r in runs:
        groups[config_key(r)].append({**r, **update_size(Path(r["dir"]), base)})
    keys = varying(runs)
    print("| configuration | ID gain | OOD change | changed entries | ‖Δ‖₂ | max \\|Δ\\| | share of ‖Δ‖² in embeddings |")
    print("|---|---|---|---|---|---|---|")
    for members in sorted(groups.values(), key=lambda members: label(members[0], keys)):
        def mean(value):
            return statistics.mean(value(r) for r in members)
        print(f"| {label(members[0], keys)} | {mean(lambda r: changes_from_zeroshot(r)[0]):+.1f} "
              f"| {mean(lambda r: changes_from_zeroshot(r)[1]):+.1f} "
              f"| {mean(lambda r: r['num_changed']):.0f} | {mean(lambda r: r['l2']):.3f} | {mean(lambda r: r['max']):.4f} "
              f"| {mean(lambda r: r['embedding_share']):.2f} |")


if __name__ == "__main__":
    main()
