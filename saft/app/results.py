"""The ``results.json`` of a run: one schema for training and evaluation, written atomically."""
import json
from statistics import mean
from typing import Dict, List, Mapping, Optional

from saft.atomic import atomic_path

RESULTS = "results.json"
ERROR = "error.txt"  # what a failed job writes instead


def summary(cfg) -> Dict:
    """The headline settings, for people and scripts reading results.json. What tells runs apart is the run's
    identity (``saft.app.identity``), which results.json records beside them."""
    return {"method": cfg.method.name, "model": cfg.model.name, "dataset": cfg.dataset.name, "shots": cfg.shots,
            "seed": cfg.seed, "sparsity": cfg.sparsity if cfg.method.get("mask") else None,
            "experiment": cfg.get("experiment_name"), "protocol": cfg.get("protocol"),
            "towers": list(cfg.method.towers), "lr": (cfg.method.get("optimizer") or {}).get("lr")}


def build_results(settings: Mapping, *, num_params: int, num_trainable: int, num_changed: int,
                  metrics: Mapping[str, Mapping[str, float]], id_name: str, ood: List[str],
                  extra: Optional[Dict] = None) -> Dict:
    """``settings`` = :func:`summary` and the identity; ``metrics`` = ``{eval set: {"top1": percent, "n": examples, "head": kind}}``;
    ``ood_mean_top1`` is the plain mean over the OOD sets (None when there are none)."""
    return {
        **settings, "num_params": num_params, "num_trainable": num_trainable,
        "num_changed": num_changed, "metrics": {k: dict(v) for k, v in metrics.items()},
        "id": id_name, "ood": list(ood),
        "ood_mean_top1": mean(metrics[n]["top1"] for n in ood) if ood else None,
        **(extra or {}),
    }


def write_json(path, data) -> None:
    """Write to a temporary name, then rename: a kill never leaves a half-written file."""
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(data, indent=2, sort_keys=False) + "\n")
