"""Pictures from finished runs: ID-vs-OOD trade-off per configuration, and where the SAFT mask lands."""
import statistics
from collections import defaultdict
from pathlib import Path
from typing import Dict, Optional, Sequence, Tuple

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.patches import Patch  # noqa: E402

TOWER_COLOURS = {"image": "tab:blue", "text": "tab:orange", "logit_scale": "tab:grey"}


def _mean_std(values):
    return statistics.mean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def _errorbar(ax, points, **style):
    """Points in the given order, each the (ID, OOD mean) of every seed, as means with std bars over seeds."""
    stats = [(_mean_std([p[0] for p in seeds]), _mean_std([p[1] for p in seeds])) for seeds in points]
    return ax.errorbar([x for (x, _), _ in stats], [y for _, (y, _) in stats], xerr=[sx for (_, sx), _ in stats],
                       yerr=[sy for _, (_, sy) in stats], **style)


def _save(fig, paths) -> None:
    """One picture in each file of ``paths`` (a path or several: PNG for a page, PDF or SVG for a paper)."""
    for path in [paths] if isinstance(paths, (str, Path)) else paths:
        fig.savefig(path, dpi=200)


def plot_id_vs_ood(curves: Dict[str, Sequence[Sequence[Tuple[float, float]]]],
                   zeroshot: Optional[Tuple[float, float]], path,
                   wise: Optional[Dict[str, Sequence[Sequence[Sequence[Tuple[float, float]]]]]] = None,
                   methods: Optional[Sequence[str]] = None, xlim: Optional[Tuple[float, float]] = None,
                   ylim: Optional[Tuple[float, float]] = None,
                   ylabel: str = "OOD mean top-1 (%)") -> Tuple[list, tuple, tuple]:
    """One curve per configuration (label -> its points, each point the (ID, OOD mean) of every seed), error
    bars over seeds, and the zero-shot model every run started from as a star. ``wise`` (label of a curve ->
    its WiSE-FT curves, points in α order) adds thin dashed curves in that curve's colour, with one legend
    entry for all of them so that the legend stays readable. ``methods`` keeps the curves of those method names
    only (a label starts with its method); ``xlim`` and ``ylim`` fix the axes, so that outliers do not squash the
    region where methods differ. Returns what was drawn: the curve labels and the axis limits."""
    if methods is not None:
        curves = {k: v for k, v in curves.items() if k.split(",")[0] in methods}
        wise = {k: v for k, v in (wise or {}).items() if k.split(",")[0] in methods}
    fig, ax = plt.subplots(figsize=(9, 4.8))
    colours = {}
    for label, points in curves.items():
        ordered = sorted(points, key=lambda seeds: statistics.mean(p[0] for p in seeds))
        colours[label] = _errorbar(ax, ordered, marker="o", capsize=3, label=label).lines[0].get_color()
    for label, lines in (wise or {}).items():
        for points in lines:  # in α order, not sorted by ID: a WiSE-FT curve may bend back
            _errorbar(ax, points, color=colours.get(label), linestyle="--", linewidth=1, marker=".", capsize=2)
    if wise:
        ax.plot([], [], "k--", linewidth=1, label="WiSE-FT (dashed): α from 0 at zero-shot to 1 at the run")
    if zeroshot is not None:
        ax.plot(*zeroshot, "k*", markersize=12, label="zeroshot (where every run starts)")
    if xlim:
        ax.set_xlim(*xlim)
    if ylim:
        ax.set_ylim(*ylim)
    ax.set_xlabel("ID top-1 (%)")
    ax.set_ylabel(ylabel)
    ax.set_title(f"ID vs {ylabel.split(' top-1')[0]} accuracy (mean ± std over seeds)")
    if curves or wise or zeroshot is not None:
        ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.02, 1))
    fig.tight_layout()
    _save(fig, path)
    drawn = (list(curves), tuple(ax.get_xlim()), tuple(ax.get_ylim()))
    plt.close(fig)
    return drawn


def plot_mask_blocks(runs: Sequence[dict], path) -> None:
    """Selected entries per block, averaged over the masked runs, coloured by tower."""
    per_block = defaultdict(list)
    masked = [r for r in runs if r.get("mask")]
    for r in masked:
        for key, count in r["mask"].items():
            if key.startswith("mask/block/"):
                per_block[key[len("mask/block/"):]].append(count)
    blocks = sorted(per_block, key=lambda b: (not b.startswith("visual"), b))
    means = [sum(per_block[b]) / len(masked) for b in blocks]
    colours = [TOWER_COLOURS["image" if b.startswith("visual") else "logit_scale" if b == "logit_scale" else "text"]
               for b in blocks]
    fig, ax = plt.subplots(figsize=(max(6, 0.28 * len(blocks)), 4.5))
    ax.bar(range(len(blocks)), means, color=colours)
    ax.set_xticks(range(len(blocks)), blocks, rotation=90, fontsize=7)
    ax.set_ylabel("selected entries (mean over runs)")
    ax.set_title(f"Selected entries per block (mean of {len(masked)} masked runs)")
    ax.legend(handles=[Patch(color=c, label=t) for t, c in TOWER_COLOURS.items() if t != "logit_scale"])
    fig.tight_layout()
    _save(fig, path)
    plt.close(fig)
