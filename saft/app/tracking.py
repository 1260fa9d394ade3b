"""What a run tells its logger (wandb, CSV): names and groups a dashboard filters by, the summary, the artifact.

Everything is derived from the run's identity and its results.json, so a dashboard and the report agree.
"""
import re
from pathlib import Path
from typing import Dict, List

import hydra
import pytorch_lightning as pl
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig
from pytorch_lightning.callbacks import LearningRateMonitor, ThroughputMonitor
from pytorch_lightning.utilities.data import extract_batch_size
from pytorch_lightning.utilities.rank_zero import rank_zero_only

from saft.app.identity import Identity, digest
from saft.app.validate import output_dir

THROUGHPUT_WINDOW = 10  # steps Lightning's throughput is averaged over


def is_wandb(cfg: DictConfig) -> bool:
    return bool(cfg.get("logger")) and str(cfg.logger.get("_target_", "")).endswith("WandbLogger")


def wandb_names(cfg: DictConfig, identity: Identity, job_type: str) -> Dict[str, str]:
    """A wandb run's name, group, id and job type. The name tells the run apart (its job folder in a sweep, else
    method, dataset and seed; WiSE-FT's α; the identity hash); the group is the sweep (experiment and launch: its
    folder) or, for a single run, its configuration (what its seeds share). The id is the job's, so a requeued or
    resumed job logs into the same wandb run."""
    hydra_cfg = HydraConfig.get()
    alpha = f"_wise{cfg.wise_alpha:g}" if cfg.get("wise_alpha") is not None else ""
    if hydra_cfg.mode == RunMode.MULTIRUN:
        name = f"{Path(hydra_cfg.runtime.output_dir).name}{alpha}_{identity.hash[:8]}"
        group = f"{cfg.experiment_name}_{Path(hydra_cfg.sweep.dir).name}"
    else:
        name = f"{cfg.method.name}_{cfg.dataset.name}_seed{cfg.seed}{alpha}_{identity.hash[:8]}"
        group = f"{cfg.method.name}_{cfg.dataset.name}_{identity.config_hash[:8]}"
    run_id = digest({"identity": identity.hash, "dir": str(output_dir().resolve()), "job_type": job_type})[:16]
    return {"name": cfg.logger.get("name") or name, "group": cfg.logger.get("group") or group, "id": run_id,
            "job_type": job_type}


def make_logger(cfg: DictConfig, identity: Identity, job_type: str):
    """The configured logger; a wandb run named and grouped as :func:`wandb_names` says, resumed when its job is."""
    if not cfg.get("logger"):
        return False
    if not is_wandb(cfg):
        logger = hydra.utils.instantiate(cfg.logger)
        if isinstance(logger, pl.loggers.CSVLogger) and rank_zero_only.rank == 0:
            keep_earlier_attempt(Path(logger.log_dir) / "metrics.csv")
        return logger
    return hydra.utils.instantiate(cfg.logger, **wandb_names(cfg, identity, job_type), resume="allow")


def keep_earlier_attempt(metrics: Path) -> None:
    """Lightning's CSV logger deletes the metrics file it finds: a resumed or requeued job keeps the earlier
    attempt's rows as ``metrics.attempt<N>.csv`` beside the new ``metrics.csv``."""
    if metrics.is_file():
        taken = [int(m.group(1)) for p in metrics.parent.glob("metrics.attempt*.csv")
                 if (m := re.fullmatch(r"metrics\.attempt(\d+)\.csv", p.name))]
        metrics.rename(metrics.with_name(f"metrics.attempt{max(taken, default=0) + 1}.csv"))


def monitors(cfg: DictConfig) -> List[pl.Callback]:
    """Lightning's learning-rate (``train/lr/pg<N>``) and throughput (``train/device/samples_per_sec``) logging."""
    if not cfg.get("logger"):
        return []
    return [LearningRateMonitor(logging_interval="step"),
            TrainingThroughput(batch_size_fn=extract_batch_size, window_size=THROUGHPUT_WINDOW)]


class TrainingThroughput(ThroughputMonitor):
    """Lightning's throughput of training (its validation hooks stay: they take validation time out of training's);
    a test's ``test/time`` and ``test/samples`` would sit among the run's ``test/<set>/top1`` metrics."""

    def on_test_start(self, *args, **kwargs) -> None:
        pass

    def on_test_batch_end(self, *args, **kwargs) -> None:
        pass


def summary_metrics(results: dict) -> Dict[str, float]:
    """The numbers a dashboard compares runs by, the same keys on every dataset: ``test/id/top1``,
    ``test/ood_mean/top1``, each set's ``test/<set>/top1``, the zero-shot reference under ``zeroshot/``, the gains
    against it under ``gain/``, and the run's counts."""
    out = {f"test/{s}/top1": m["top1"] for s, m in results["metrics"].items()}
    out["test/id/top1"] = results["metrics"][results["id"]]["top1"]
    if results.get("ood_mean_top1") is not None:
        out["test/ood_mean/top1"] = results["ood_mean_top1"]
    before = results.get("zeroshot_metrics") or {}
    if before:
        out.update({f"zeroshot/{s}/top1": m["top1"] for s, m in before.items()})
        out["zeroshot/id/top1"] = before[results["id"]]["top1"]
        out["gain/id/top1"] = out["test/id/top1"] - out["zeroshot/id/top1"]
        if results["ood"] and all(s in before for s in results["ood"]):
            out["zeroshot/ood_mean/top1"] = sum(before[s]["top1"] for s in results["ood"]) / len(results["ood"])
            out["gain/ood_mean/top1"] = out["test/ood_mean/top1"] - out["zeroshot/ood_mean/top1"]
    out.update({f"val/{k.split('/', 1)[-1]}": v for k, v in (results.get("val_metrics") or {}).items()})
    out.update({k: results[k] for k in ("num_params", "num_trainable", "num_changed") if k in results})
    return out


def report_results(trainer: pl.Trainer, results: dict, files: List[Path], job_type: str) -> None:
    """The run's summary (numbers to every logger; checksums and identity hashes to wandb's summary) and, on wandb,
    ``files`` (results.json, the delta, the head) as one artifact, ``<job type>-<identity hash>``: an evaluation of
    a run on its own data has the run's identity, so the job type keeps their artifacts apart."""
    logger = trainer.logger
    if not logger:
        return
    summary = summary_metrics(results)
    logger.log_metrics(summary, step=trainer.global_step)
    logger.save()  # Lightning has finalised its loggers by now: the CSV file gets these rows only when saved
    if isinstance(logger, pl.loggers.WandbLogger):
        import wandb
        run = logger.experiment
        run.summary.update(summary)
        run.summary.update({k: results[k] for k in ("weights_sha256", "base_sha256", "identity_hash", "config_hash",
                                                    "wise_alpha", "zeroshot_from") if results.get(k) is not None})
        artifact = wandb.Artifact(f"{job_type}-{results['identity_hash'][:16]}", type=job_type,
                                  metadata={k: results.get(k) for k in ("method", "dataset", "seed", "wise_alpha")})
        for path in files:
            if path.is_file():
                artifact.add_file(str(path))
        run.log_artifact(artifact)
