"""The ``results.json`` of a run: one schema for training and evaluation, written atomically."""
import json
import os
from pathlib import Path
from statistics import mean
from typing import Dict, List, Mapping, Optional

RESULTS = "results.json"
ERROR = "error.txt"  # what a failed job writes instead


def build_results(*, method: str, model: str, dataset: str, shots: int, seed: int, sparsity: float,
                  num_params: int, num_trainable: int, num_changed: int,
                  metrics: Mapping[str, Mapping[str, float]], id_name: str, ood: List[str],
                  extra: Optional[Dict] = None) -> Dict:
    """``metrics`` = ``{eval set: {"top1": percent, "n": examples}}``; ``ood_mean_top1`` is the plain
    mean over the OOD sets (None when there are none)."""
    return {
        "method": method, "model": model, "dataset": dataset, "shots": shots, "seed": seed,
        "sparsity": sparsity, "num_params": num_params, "num_trainable": num_trainable,
        "num_changed": num_changed, "metrics": {k: dict(v) for k, v in metrics.items()},
        "id": id_name, "ood": list(ood),
        "ood_mean_top1": mean(metrics[n]["top1"] for n in ood) if ood else None,
        **(extra or {}),
    }


def write_json(path, data) -> None:
    """Write to a temporary name, then rename: a kill never leaves a half-written file."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=False) + "\n")
    os.replace(tmp, path)
