"""Pictures from finished runs: ID-vs-OOD trade-off per method, and where the SAFT mask lands."""
import statistics
from collections import defaultdict
from pathlib import Path
from typing import Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.patches import Patch  # noqa: E402

TOWER_COLOURS = {"image": "tab:blue", "text": "tab:orange", "logit_scale": "tab:grey"}


def _mean_std(values):
    return statistics.mean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def plot_id_vs_ood(runs: Sequence[dict], path: Path) -> None:
    """One curve per method through its settings (sparsity, lr, shots...), error bars over seeds."""
    points = defaultdict(lambda: defaultdict(list))  # method -> setting -> [(id, ood)]
    for r in runs:
        if r.get("ood_mean_top1") is None:
            continue
        setting = (r.get("sparsity") if r.get("mask_selection") else None, r.get("lr"), r["shots"], r["dataset"])
        points[r["method"]][setting].append((r["metrics"][r["id"]]["top1"], r["ood_mean_top1"]))
    fig, ax = plt.subplots(figsize=(6, 4.5))
    for method, settings in sorted(points.items()):
        xs, ys, xerr, yerr = [], [], [], []
        for pairs in settings.values():
            (x, sx), (y, sy) = _mean_std([p[0] for p in pairs]), _mean_std([p[1] for p in pairs])
            xs.append(x), ys.append(y), xerr.append(sx), yerr.append(sy)
        order = sorted(range(len(xs)), key=xs.__getitem__)
        ax.errorbar([xs[i] for i in order], [ys[i] for i in order], xerr=[xerr[i] for i in order],
                    yerr=[yerr[i] for i in order], marker="o", capsize=3, label=method)
    zeroshot = next((r for r in runs if r.get("zeroshot_metrics") and r.get("ood")), None)
    if zeroshot is not None:  # the base model every run started from
        z = zeroshot["zeroshot_metrics"]
        ax.plot(z[zeroshot["id"]]["top1"], sum(z[s]["top1"] for s in zeroshot["ood"]) / len(zeroshot["ood"]),
                "k*", markersize=12, label="zero-shot")
    ax.set_xlabel("ID top-1 (%)")
    ax.set_ylabel("OOD mean top-1 (%)")
    ax.set_title("ID vs OOD accuracy (mean ± std over seeds)")
    if points or zeroshot is not None:
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_mask_blocks(runs: Sequence[dict], path: Path) -> None:
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
    fig.savefig(path, dpi=120)
    plt.close(fig)
