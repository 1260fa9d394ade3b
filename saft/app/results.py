"""The ``results.json`` of a run: one schema for training and evaluation, written atomically."""
import json
from statistics import mean
from typing import Dict, List, Mapping, Optional

from saft.atomic import atomic_path

RESULTS = "results.json"
ERROR = "error.txt"  # what a failed job writes instead


def run_settings(cfg) -> Dict:
    """What a run was asked to do, from its composed config: the keys that tell configurations apart in
    ``results.json`` and in the report (which reads them from the saved config of runs that never finished)."""
    mask = cfg.method.get("mask") or {}
    return {"method": cfg.method.name, "model": cfg.model.name, "dataset": cfg.dataset.name, "shots": cfg.shots,
            "seed": cfg.seed, "sparsity": cfg.sparsity, "experiment": cfg.get("experiment_name"),
            "protocol": cfg.get("protocol"), "towers": list(cfg.method.towers),
            "lr": (cfg.method.get("optimizer") or {}).get("lr"), "mask_selection": mask.get("selection"),
            "mask_score": mask.get("score"), "mask_scope": mask.get("scope"),
            "mask_include": list(mask.get("include") or []), "mask_exclude": list(mask.get("exclude") or [])}


_METHOD_KEYS = ("head", "trainable", "lp_fraction", "head_lr", "n_ctx", "ctx_init")
# Data options that do not change what is trained: where the files are, how they are loaded.
_NOT_TRAINING = ("data_dir", "root", "variant_dirs", "num_workers", "eval_batch_size", "download", "batch_size")


def resume_settings(cfg) -> Dict:
    """What a checkpoint must have been trained with for a resume to continue the same training: the run's
    settings, the optimizer, the schedule, the training length and the data (``batch_size`` is checked by the
    datamodule, which can resume from an epoch end with another)."""
    from omegaconf import OmegaConf
    method, trainer = cfg.method, cfg.trainer
    datamodule = OmegaConf.to_container(cfg.dataset.datamodule, resolve=True)
    return {**run_settings(cfg), "split_file": cfg.get("split_file"),
            "optimizer": OmegaConf.to_container(method.optimizer, resolve=True) if method.get("optimizer") else None,
            "schedule": method.get("schedule"), "warmup_fraction": method.get("warmup_fraction"),
            "max_steps": trainer.get("max_steps"), "max_epochs": trainer.get("max_epochs"),
            "accumulate_grad_batches": trainer.get("accumulate_grad_batches"),
            "datamodule": {k: v for k, v in datamodule.items() if k not in _NOT_TRAINING},
            # the baselines' own keys, only where a method has them (older checkpoints stay resumable)
            **{f"method.{k}": OmegaConf.to_container(method[k]) if OmegaConf.is_config(method[k]) else method[k]
               for k in _METHOD_KEYS if k in method}}


def build_results(settings: Mapping, *, num_params: int, num_trainable: int, num_changed: int,
                  metrics: Mapping[str, Mapping[str, float]], id_name: str, ood: List[str],
                  extra: Optional[Dict] = None) -> Dict:
    """``settings`` = :func:`run_settings`; ``metrics`` = ``{eval set: {"top1": percent, "n": examples}}``;
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
