"""Compose datamodule, model, method and trainer from a Hydra config; train or evaluate; write artifacts.

A run's output dir holds ``results.json``, ``delta.safetensors`` (training only), ``head.safetensors`` (methods
with a head of their own: linear probe, LP-FT, CoOp), ``split.json`` (the few-shot files drawn), Lightning
checkpoints and logs, and Hydra's ``.hydra/`` with the full config.
"""
import functools
import json
import logging
import sys
import warnings
from pathlib import Path
from typing import List, Optional, Sequence

import hydra
import open_clip
import pytorch_lightning as pl
import torch
from pytorch_lightning.utilities.warnings import PossibleUserWarning
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf, open_dict

from saft.app import CONF_DIR
from saft.atomic import atomic_path
from saft.app.clip import augmented_transform, load_clip
from saft.delta import (apply_delta, compute_delta, interpolate_delta, load_delta, num_changed, save_delta,
                        state_checksum)
from saft.app.heads import PromptHead, build_head
from saft.app.module import CLIPClassifier
from saft.app.pretrain import resolve_pretrained
from saft.app.progress import progress_bars
from saft.app.checkpoint_io import checkpoint_entry
from saft.app.identity import Identity, differences, run_identity, without
from saft.app.results import ERROR, RESULTS, build_results, summary, write_json
from saft.app.signals import StopOnSignal, cluster_plugins, owned
from saft.app.tracking import make_logger, monitors, report_results
from saft.app.validate import output_dir, validate
from saft.app.zeroshot import zeroshot_metrics
from saft.errors import ConfigError

log = logging.getLogger(__name__)
DELTA = "delta.safetensors"
HEAD = "head.safetensors"


def reports_user_errors(main):
    """A ``ConfigError`` becomes one line on stderr and exit status 2, without a traceback. In a
    multirun the job's failure is written to ``error.txt`` in its output dir and the other jobs go on
    (Hydra reports the failed jobs when the sweep ends)."""
    @functools.wraps(main)
    def wrapper(cfg: DictConfig):
        try:
            return main(cfg)
        except Exception as e:
            if HydraConfig.get().mode == RunMode.MULTIRUN or not isinstance(e, ConfigError):
                (output_dir() / ERROR).write_text(f"{type(e).__name__}: {e}\n")
                raise
            print(f"error: {e}", file=sys.stderr)
            sys.exit(2)
    return wrapper


def build_datamodule(cfg: DictConfig):
    """The run's datamodule plus the test sets of ``eval_datasets``; every layout is checked here,
    before any model is loaded."""
    datamodule = hydra.utils.instantiate(cfg.dataset.datamodule)
    datamodule.check()
    for name in cfg.get("eval_datasets") or []:
        path = CONF_DIR / "dataset" / f"{name}.yaml"
        if not path.is_file():
            known = sorted(p.stem for p in path.parent.glob("*.yaml"))
            raise ConfigError(f"eval_datasets: there is no dataset config {name!r}; choose from {known}")
        other_cfg = cfg.copy()
        with open_dict(other_cfg):  # the group config under this run's keys, so ${shots} etc. are the run's
            other_cfg.dataset = _dataset_config(name)
            other_cfg.protocol = "all"
        other = hydra.utils.instantiate(other_cfg.dataset.datamodule)
        other.check()
        datamodule.add_eval_sets(other.eval_sets())
    return datamodule


def _dataset_config(name: str) -> DictConfig:
    """conf/dataset/<name>.yaml as Hydra composes it, defaults list included (inside a Hydra app or not)."""
    if GlobalHydra.instance().is_initialized():
        return hydra.compose(config_name="train", overrides=[f"dataset={name}"]).dataset
    with hydra.initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return hydra.compose(config_name="train", overrides=[f"dataset={name}"]).dataset


def build(cfg: DictConfig, identity: Optional[Identity] = None, head_classnames: Optional[Sequence[str]] = None):
    """The datamodule (checked first: it is cheap), then the model around it (its checkpoints carry ``identity``,
    by default the config's).
    ``head_classnames``: the classes of a trained linear head being evaluated (its own, whatever data is evaluated)."""
    datamodule = build_datamodule(cfg)
    model, train_tf, eval_tf, tokenizer = load_clip(**resolve_pretrained(cfg.model))
    method = cfg.method
    unaugmented = method.get("augment") is False  # the training images as evaluation sees them
    if unaugmented:
        train_tf = eval_tf
    elif method.get("augment"):
        train_tf = augmented_transform(model, **method.augment)
    datamodule.set_transforms(train_tf, eval_tf)
    optimizer = hydra.utils.instantiate(method.optimizer) if method.train else None
    head = build_head(method, model, tokenizer, head_classnames or datamodule.classnames(),
                      open_clip.get_model_config(cfg.model.name)["embed_dim"])
    if isinstance(head, PromptHead):  # every prompt must fit the text context: known now, not at the final test
        for names in [datamodule.classnames()] + [s.classnames for s in datamodule.eval_sets()]:
            head.tokens(names)
    # A method whose training differs in more than its settings names its LightningModule (FLYP's contrastive loss).
    module_class = hydra.utils.get_class(method.module) if method.get("module") else CLIPClassifier
    module = module_class(model, tokenizer, optimizer, towers=list(method.towers),
                            warmup_fraction=method.warmup_fraction, schedule=method.schedule,
                            identity=(identity or run_identity(cfg)).settings, head=head,
                            trainable=list(method.get("trainable") or []), lp_fraction=method.get("lp_fraction", 0.0),
                            head_lr=method.get("head_lr"), head_weight_decay=method.get("head_weight_decay"),
                            probe=hydra.utils.instantiate(method.probe) if method.get("probe") else None,
                            warmup_lr=method.get("warmup_lr") if method.get("warmup") == "constant" else None,
                            decay_exclusions=method.get("decay_exclusions", "open_clip"),
                            frozen_features=unaugmented, trim_prompts=cfg.model.get("trim_prompts", False))
    return datamodule, module


def weights_checksum(module: CLIPClassifier) -> str:
    """sha256 of everything the metrics depend on: the CLIP state and the method's head."""
    head = {f"head.{k}": v for k, v in module.head.state_dict().items()} if module.head is not None else {}
    return state_checksum({**module.model.state_dict(), **head})


def make_trainer(cfg: DictConfig, callbacks, identity: Identity, job_type: str,
                 checkpoint: Optional[Path] = None) -> pl.Trainer:
    """The configured Trainer. It owns the stop signals (saft.app.signals; ``checkpoint`` is where an interrupted fit
    saves), has Lightning's SLURM auto-requeue off, and its ``default_root_dir`` is a folder of its own: under SLURM
    Lightning loads any ``hpc_ckpt_*.ckpt`` it finds there into the model, for training and for testing."""
    callbacks = [StopOnSignal(checkpoint), *callbacks, *monitors(cfg)]
    if cfg.trainer.get("enable_progress_bar", True):
        callbacks = [*callbacks, *progress_bars()]
    plugins = [hydra.utils.instantiate(p) for p in cfg.trainer.get("plugins") or []] + cluster_plugins()
    return hydra.utils.instantiate(cfg.trainer, callbacks=callbacks, logger=make_logger(cfg, identity, job_type),
                                   plugins=plugins, default_root_dir=str(output_dir() / "lightning"))


def base_state(cfg: DictConfig):
    """The pre-trained parameters and buffers, rebuilt from the config (tag, file or seeded init)."""
    return load_clip(**resolve_pretrained(cfg.model))[0].state_dict()


def finish(trainer: pl.Trainer) -> None:
    """One wandb run per job: close it, or the next multirun job would log into it."""
    if isinstance(trainer.logger, pl.loggers.WandbLogger):
        import wandb
        wandb.finish()


def check_resume(ckpt_path, identity: Identity) -> None:
    """A resumed run must continue the same training: refuse a checkpoint written with another identity (its
    results would be labelled with settings it was not trained with), before anything is written."""
    saved = checkpoint_entry(ckpt_path, "saft_run")
    if not isinstance(saved, dict):
        raise ConfigError(f"{ckpt_path} holds no run identity, so it cannot be shown to continue this training "
                          f"(written by another program or an older version of this one); start a new run in "
                          f"another hydra.run.dir")
    differ = sorted(differences(saved, identity.settings), key=lambda k: (k.count("."), k))  # outer keys first
    if differ:
        shown = differ[:6] + ([f"{len(differ) - 6} more"] if len(differ) > 6 else [])
        was = ", ".join(f"{k}={saved.get(k)}" if k in differ else k for k in shown)
        now = ", ".join(f"{k}={identity.settings.get(k)}" if k in differ else k for k in shown)
        raise ConfigError(f"{ckpt_path} was trained with {was}; this run asks for {now}. A resume continues the "
                          f"same training: resume with the run's own config and trainer settings, or start a "
                          f"new run in another hydra.run.dir")


def last_checkpoint(cfg: DictConfig) -> Path:
    return Path(cfg.checkpoint.dirpath) / "last.ckpt"


def train(cfg: DictConfig) -> dict:
    """Train, test and write the run's artifacts; the stop signals are this job's throughout (saft.app.signals)."""
    with owned():
        return _train(cfg)


def _train(cfg: DictConfig) -> dict:
    validate(cfg)
    identity = run_identity(cfg)
    done = finished_results(identity)
    if done is not None:
        return done
    ckpt_path = resume_path(cfg) if cfg.method.train else None
    if ckpt_path:
        check_resume(ckpt_path, identity)
    pl.seed_everything(cfg.seed, workers=True)
    datamodule, module = build(cfg, identity)
    module.restore_from = ckpt_path
    mask_callback = hydra.utils.instantiate(cfg.method.mask) if cfg.method.get("mask") else None
    callbacks = [c for c in (mask_callback, hydra.utils.instantiate(cfg.checkpoint)) if c is not None]
    last = last_checkpoint(cfg)
    trainer = make_trainer(cfg, callbacks, identity, "train", checkpoint=last if cfg.method.train else None)
    if trainer.is_global_zero:
        datamodule.save_split(output_dir() / "split.json")
    if trainer.logger is not None:
        trainer.logger.log_hyperparams(hyperparameters(cfg, identity))
    before = None
    if cfg.get("eval_zeroshot") and cfg.method.train:
        before = zeroshot_metrics(trainer, module, datamodule, cfg.get("zeroshot_cache", True))
    if cfg.method.train:
        # The datamodule skips the samples trained before a mid-epoch checkpoint (FewShotDataModule.state_dict),
        # so Lightning's warning that a non-resumable loader makes such a resume unreliable does not apply.
        warnings.filterwarnings("ignore", message="You're resuming from a checkpoint that ended before the epoch",
                                category=PossibleUserWarning)
        trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt_path)
        # ModelCheckpoint saves on its own schedule; the final state is always kept as last.ckpt.
        trainer.save_checkpoint(last, weights_only=False)
        log.info("rank %d: trained weights sha256 %s", trainer.global_rank, weights_checksum(module))
    trainer.test(module, datamodule=datamodule, verbose=False)
    val_metrics = None
    if cfg.get("optimized_metric"):  # a search optimises the few-shot validation split, never a test set
        trainer.validate(module, datamodule=datamodule, verbose=False)
        val_metrics = {cfg.optimized_metric: float(trainer.callback_metrics[cfg.optimized_metric])}
    results = None
    if trainer.is_global_zero:
        results = write_artifacts(cfg, identity, module, datamodule, mask_callback, before, val_metrics)
        report_results(trainer, results, [output_dir() / f for f in (RESULTS, DELTA, HEAD)], "train")
        print(comparison_table(results))
    if results and mask_callback is not None and isinstance(trainer.logger, pl.loggers.WandbLogger):
        from saft.report.plots import plot_mask_blocks
        plot_mask_blocks([results], output_dir() / "mask_blocks.png")
        trainer.logger.log_image(key="mask_blocks", images=[str(output_dir() / "mask_blocks.png")])
    finish(trainer)
    return results


def objective(cfg: DictConfig, results: Optional[dict]) -> Optional[float]:
    """What train.py returns to a hyper-parameter search (Hydra's Optuna sweeper): the run's ``optimized_metric``
    on the validation split, None without one (and on ranks other than 0)."""
    name = cfg.get("optimized_metric")
    if not name or results is None:
        return None
    if name not in (results.get("val_metrics") or {}):
        raise ConfigError(f"{output_dir()} holds results without {name} (the run finished before it was searched "
                          f"on); give the search another hydra.sweep.dir")
    return results["val_metrics"][name]


def finished_results(identity: Identity) -> Optional[dict]:
    """With ``finished=skip`` (validate refuses a finished dir otherwise): the results this job dir already holds
    when they are this run's; a dir that finished another run is refused, so nothing is overwritten."""
    path = output_dir() / RESULTS
    if not path.is_file():
        return None
    done = json.loads(path.read_text())
    if done.get("identity_hash") != identity.hash:
        changed = differences(done.get("identity", {}), identity.settings)
        raise ConfigError(f"{path.parent} holds the results of another run ({', '.join(changed[:5]) or 'identity'} "
                          f"differ); finished=skip only skips the same run: choose another hydra.run.dir / hydra.sweep.dir")
    log.info("%s already holds this run's results: skipped (finished=skip)", path.parent)
    return done


def hyperparameters(cfg: DictConfig, identity: Identity) -> dict:
    """What a logger records of a run: its full resolved config and its identity's hashes."""
    settings = OmegaConf.masked_copy(cfg, [k for k in cfg if k != "hydra"])
    return {**OmegaConf.to_container(settings, resolve=True), "identity_hash": identity.hash,
            "config_hash": identity.config_hash}


def resume_path(cfg: DictConfig) -> Optional[str]:
    """The checkpoint file a training run continues from: ``ckpt_path`` (a file, or ``last``: this run dir's
    ``last.ckpt``); without it, this run dir's own ``last.ckpt`` when an earlier attempt of the same run was
    interrupted (a re-run of the same command, a requeue); else None, a fresh start. Lightning's SLURM
    ``hpc_ckpt`` files are never resumed from: nothing here writes them."""
    last = last_checkpoint(cfg)
    for stray in sorted(output_dir().glob("hpc_ckpt_*.ckpt")):
        log.warning("ignoring %s: Lightning's SLURM requeue checkpoints are not used (this run resumes from %s)",
                    stray, last)
    if cfg.ckpt_path == "last":
        if not last.is_file():
            raise ConfigError(f"ckpt_path=last: {last} does not exist, so there is nothing to resume in this "
                              f"hydra.run.dir; drop ckpt_path to start the run, or give a checkpoint file")
        return str(last)
    if cfg.ckpt_path:
        return cfg.ckpt_path
    if last.is_file():
        log.info("resuming the interrupted run from %s", last)
        return str(last)
    return None


def comparison_table(results: dict) -> str:
    """Top-1 per eval set before training (zero-shot, when measured) and after, as Markdown."""
    sets = [results["id"], *results["ood"]]
    header = "| | " + " | ".join(f"{s} (ID)" if s == results["id"] else s for s in sets) + " | OOD mean |"
    rows = [header, "|---" * (len(sets) + 2) + "|"]
    name = results["method"] if results.get("wise_alpha") is None else f"{results['method']}, WiSE-FT α={results['wise_alpha']}"
    for label, metrics in (("zero-shot", results.get("zeroshot_metrics")), (name, results["metrics"])):
        if metrics:
            ood = [metrics[s]["top1"] for s in results["ood"]]
            mean = f"{sum(ood) / len(ood):.2f}" if ood else "-"
            rows.append(f"| {label} | " + " | ".join(f"{metrics[s]['top1']:.2f}" for s in sets) + f" | {mean} |")
    before = results.get("zeroshot_metrics")
    if before and results["ood"]:
        id_gain = results["metrics"][results["id"]]["top1"] - before[results["id"]]["top1"]
        ood = [results["metrics"][s]["top1"] - before[s]["top1"] for s in results["ood"]]
        rows.append(f"\n{name} changed {results['num_changed']:,} of {results['num_params']:,} entries: "
                    f"ID {id_gain:+.2f}, OOD mean {sum(ood) / len(ood):+.2f} points against zero-shot. "
                    f"How to read this: docs/cpu-benchmark.md")
    return "\n".join(rows)


def write_artifacts(cfg, identity: Identity, module, datamodule, mask_callback, before=None, val_metrics=None) -> dict:
    """delta.safetensors against the rebuilt base model, then results.json."""
    out = output_dir()
    base = base_state(cfg)
    delta = compute_delta(base, module.model.state_dict())
    save_delta(out / DELTA, delta, {"model.name": cfg.model.name, "model.pretrained": str(cfg.model.pretrained)},
               base=base)
    if module.head is not None:
        with atomic_path(out / HEAD) as tmp:
            save_file({k: v.detach().cpu().contiguous() for k, v in module.head.state_dict().items()}, str(tmp),
                      metadata={"classnames": json.dumps(list(module.classnames))})
    if mask_callback is not None:
        num_trainable, extra = mask_callback.stats["mask/k"], {"mask": mask_callback.stats}
    else:
        num_trainable, extra = sum(p.numel() for p in module.model.parameters() if p.requires_grad), {}
    if module.head is not None:
        extra["num_head"] = sum(p.numel() for p in module.head.parameters())
        num_trainable += extra["num_head"]
    if before:
        extra["zeroshot_metrics"], extra["zeroshot_from"] = before
    if val_metrics:
        extra["val_metrics"] = val_metrics
    extra["base_sha256"] = state_checksum(base)
    results = _results(cfg, identity, module, datamodule, num_trainable, num_changed(delta), extra)
    write_json(out / RESULTS, results)
    log.info("results: %s", out / RESULTS)
    return results


def _results(cfg, identity: Identity, module, datamodule, num_trainable, changed, extra=None) -> dict:
    # The fingerprint of the weights the metrics were measured with: eval.py of a run must match training.
    extra = {"weights_sha256": weights_checksum(module), **(extra or {})}
    if datamodule.protocol == "base2new":
        base, new = module.results["base"]["top1"], module.results["new"]["top1"]
        extra["hm"] = 2 * base * new / (base + new) if base + new else 0.0
    return build_results({**summary(cfg), **identity.as_results()}, num_params=sum(p.numel() for p in module.model.parameters()),
                         num_trainable=num_trainable, num_changed=changed, metrics=module.results,
                         id_name=datamodule.id_name, ood=datamodule.ood_names, extra=extra)


def read_head_file(path: Path) -> dict:
    """The tensors and class names of a run's ``head.safetensors``."""
    if not path.is_file():
        raise ConfigError(f"{path} is missing: the run's method trains a head, and its metrics need it; "
                          f"evaluate a complete run dir")
    try:
        tensors = load_file(path)
        with safe_open(path, "pt") as f:
            classnames = json.loads((f.metadata() or {})["classnames"])
    except Exception as e:
        raise ConfigError(f"{path} cannot be read as a head ({str(e).splitlines()[0][:200]}); the file is corrupt "
                          f"or was not written by this project") from None
    return {"tensors": tensors, "classnames": classnames}


def head_classnames(cfg: DictConfig, run_dir: Path) -> Optional[List[str]]:
    """The classes a run's linear head was trained on: the head is rebuilt with them, whatever data is evaluated."""
    return read_head_file(run_dir / HEAD)["classnames"] if cfg.method.get("head", "text") == "linear" else None


def load_head(head: torch.nn.Module, path: Path, alpha=None) -> None:
    """A run's trained head; WiSE-FT blends a linear head with its start (the scaled zero-shot head, no bias) by
    ``alpha``, as it blends the rest of the model."""
    tensors = read_head_file(path)["tensors"]
    if "weight" in tensors and "start" not in tensors:
        raise ConfigError(f"{path} is a linear head of an older version of this project (its weight was the change "
                          f"from the text head, with no start); train the run again with this version")
    try:
        if alpha is not None:
            tensors = {**tensors, "weight": torch.lerp(tensors["start"], tensors["weight"], alpha),
                       "bias": torch.lerp(torch.zeros_like(tensors["bias"]), tensors["bias"], alpha)}
        head.load_state_dict(tensors)
    except Exception as e:
        raise ConfigError(f"{path} does not hold this method's head ({str(e).splitlines()[0][:200]}); the file is "
                          f"corrupt or belongs to another run") from None


def compose_for_run(run_dir: Path, overrides: Sequence[str], composed: DictConfig) -> DictConfig:
    """The training run's own saved config with this call's overrides on top: a group choice
    (``dataset=dtd``) takes the group as ``composed`` has it, a key takes its value. The model and the
    method stay the run's: the delta belongs to them."""
    hydra_dir = run_dir / ".hydra"
    if not (run_dir / RESULTS).is_file() or not (run_dir / DELTA).is_file() or not hydra_dir.is_dir():
        raise ConfigError(f"run_dir={run_dir} is not a finished training run (it needs {RESULTS}, {DELTA} "
                          f"and .hydra/); point run_dir at the output dir of a completed train.py run")
    cfg = OmegaConf.load(hydra_dir / "config.yaml")
    choices = OmegaConf.load(hydra_dir / "hydra.yaml").hydra.runtime.choices
    for override in OverridesParser.create().parse_overrides(list(overrides)):
        key = override.key_or_group
        if key == "run_dir" or key.startswith("hydra") or choices.get(key) == override.value():
            continue  # naming the run's own group choice keeps the run's settings for it
        if key.split(".")[0] in ("model", "method"):
            raise ConfigError(f"{key} cannot be overridden together with run_dir: the delta belongs to the "
                              f"run's base model and method")
        with open_dict(cfg):
            if override.is_delete():
                parent, _, leaf = key.rpartition(".")
                (OmegaConf.select(cfg, parent) if parent else cfg).pop(leaf, None)
            else:
                OmegaConf.update(cfg, key, OmegaConf.select(composed, key), merge=False)
    with open_dict(cfg):
        cfg.run_dir, cfg.ckpt_path = str(run_dir), None
    return cfg


def evaluate(cfg: DictConfig) -> dict:
    """Evaluate a finished run (or zero-shot CLIP) and write results.json; signals as in :func:`train`."""
    with owned():
        return _evaluate(cfg)


def _evaluate(cfg: DictConfig) -> dict:
    run_dir = Path(cfg.run_dir) if cfg.get("run_dir") else None
    if run_dir is not None:
        cfg = compose_for_run(run_dir, HydraConfig.get().overrides.task, cfg)
    validate(cfg)
    identity = run_identity(cfg)
    done = finished_results(identity)
    if done is not None:
        return done
    OmegaConf.save(cfg, output_dir() / ".hydra" / "config.yaml")  # the config this evaluation really used
    pl.seed_everything(cfg.seed, workers=True)
    datamodule, module = build(cfg, identity, head_classnames(cfg, run_dir) if run_dir is not None else None)
    trainer = make_trainer(cfg, [], identity, "eval")
    if trainer.logger is not None:
        trainer.logger.log_hyperparams(hyperparameters(cfg, identity))
    num_trainable = changed = 0
    extra = {"base_sha256": state_checksum(module.model.state_dict())}
    if run_dir is not None:
        trained = json.loads((run_dir / RESULTS).read_text())
        delta, metadata = load_delta(run_dir / DELTA)
        if metadata.get("base_sha256") != extra["base_sha256"]:
            raise ConfigError(f"{run_dir / DELTA} was made for another base model (checksum differs from "
                              f"{cfg.model.name} / {cfg.model.pretrained}); evaluate it with its own base")
        reference = zeroshot_reference(cfg, identity, trained, trainer, module, datamodule)
        alpha = cfg.get("wise_alpha")
        if alpha is not None:
            delta = interpolate_delta(delta, module.model.state_dict(), alpha)
        apply_delta(module.model, delta)
        if module.head is not None:
            load_head(module.head, run_dir / HEAD, alpha)
        num_trainable, changed = trained["num_trainable"], num_changed(delta)
        extra.update(run_dir=str(run_dir), wise_alpha=alpha)
        if reference:
            extra["zeroshot_metrics"], extra["zeroshot_from"] = reference
    trainer.test(module, datamodule=datamodule, verbose=False)
    results = None
    if trainer.is_global_zero:
        results = _results(cfg, identity, module, datamodule, num_trainable, changed, extra)
        write_json(output_dir() / RESULTS, results)
        report_results(trainer, results, [output_dir() / RESULTS], "eval")
        log.info("results: %s", output_dir() / RESULTS)
        print(comparison_table(results))
    finish(trainer)
    return results


def zeroshot_reference(cfg, identity: Identity, trained: dict, trainer, module, datamodule):
    """The zero-shot metrics of exactly the data this evaluation tests (the reference its gains are measured from)
    and where they come from: the training run's own when this evaluation has the training run's identity
    (WiSE-FT's alpha aside), else the base model's (saft.app.zeroshot: cached or measured now); None without
    ``eval_zeroshot``."""
    if not cfg.get("eval_zeroshot"):
        return None
    same_sets = [s.name for s in datamodule.eval_sets()] == list(trained.get("zeroshot_metrics") or {})
    if same_sets and trained.get("identity") == without(identity.settings, ["wise_alpha"]):
        log.info("zero-shot reference: the training run's (same identity, same eval sets)")
        return trained["zeroshot_metrics"], "run"
    return zeroshot_metrics(trainer, module, datamodule, cfg.get("zeroshot_cache", True))
