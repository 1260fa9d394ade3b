"""Checks of a composed run config, before any data or model is loaded: each problem is one ``ConfigError``
that says what is wrong and how to fix it, as ``<key>=<value> must be <what>, e.g. <key>=<example>``.

``RULES`` holds every user-facing key with the kind of value it takes (a rule applies when its key is present;
``REQUIRED`` ones must be); ``_cross_checks`` holds the rules that involve several keys. ``hydra.*`` is
Hydra's own. Values are read resolved, so ``lr_scale=-1`` is reported as itself, before the
``method.optimizer.lr`` it scales.
"""
import importlib
import math
import operator
import re
from pathlib import Path
from typing import Any, Callable, NamedTuple, Optional

import torch
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import Container, DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException
from pytorch_lightning.accelerators import AcceleratorRegistry

from datamodules.base import PROTOCOLS
from datamodules.coop import DATASETS as COOP_DATASETS
from datamodules.fmnist_styles import STYLES
from datamodules.imagenet import VARIANTS
from datamodules.templates import IMAGENET_EVAL
from saft.app import CONF_DIR
from saft.app.guards import check_multirun_strategy
from saft.app.pretrain import RECIPE_VERSION
from saft.app.results import RESULTS
from saft.callback import SELECTIONS
from saft.errors import ConfigError
from saft.mask import SCOPES, SCORES, TOWERS
from saft.optim import MaskedAdamW

# Lightning 2.x's accepted `precision` values (lightning_fabric _PRECISION_INPUT): ints, aliases, full names.
PRECISIONS = (64, 32, 16, "64", "32", "16", "bf16", "64-true", "32-true", "16-mixed", "bf16-mixed", "16-true",
              "bf16-true", "transformer-engine", "transformer-engine-float16")
PRECISION_ALIASES = {"64": "64-true", "32": "32-true", "16": "16-mixed", "bf16": "bf16-mixed"}
ACCELERATORS = ("auto", "gpu", *sorted(AcceleratorRegistry.available_accelerators()))
MAX_SEED = 2**32 - 1  # what numpy (and so Lightning's seed_everything) accepts
_ABSENT = object()

Check = Callable[[Any], Optional[str]]  # value -> None when fine, else what the value must be


def dataset_configs():
    return sorted(p.stem for p in (CONF_DIR / "dataset").glob("*.yaml"))


# --- kinds of value ------------------------------------------------------------------------------------
def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)  # True is an int in Python


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def integer(low: int, high: Optional[int] = None, note: str = "") -> Check:
    what = (f"an integer in [{low}, {high}]" if high is not None else "a positive integer" if low == 1
            else f"an integer >= {low}") + (f" ({note})" if note else "")
    return lambda v: None if _is_int(v) and v >= low and (high is None or v <= high) else what


_BOUND = {"(": operator.lt, ")": operator.lt, "[": operator.le, "]": operator.le, ">": operator.gt, ">=": operator.ge}


def number(interval: str) -> Check:
    """``"> 0"``, ``">= 0"`` or an interval such as ``"(0, 1]"``."""
    if interval[0] in "([":
        low, high = (float(x) for x in interval[1:-1].split(","))
        what = f"a number in {interval}"
        inside = lambda x: _BOUND[interval[0]](low, x) and _BOUND[interval[-1]](x, high)
    else:
        op, bound = interval.split()
        what = f"a number {interval}"
        inside = lambda x: _BOUND[op](x, float(bound))
    return lambda v: None if _is_number(v) and inside(v) else what


def choice(*options) -> Check:
    shown = list(dict.fromkeys(map(str, options)))  # 32 and "32" read the same
    what = shown[0] if len(shown) == 1 else "one of " + "|".join(shown)
    return lambda v: None if any(type(v) is type(o) and v == o for o in options) else what


def either(*checks: Check) -> Check:
    def check(v):
        problems = [c(v) for c in checks]
        return None if None in problems else " or ".join(problems)
    return check


NULL: Check = lambda v: None if v is None else "null"
DEVICE_LIST: Check = lambda v: None if isinstance(v, list) and v and all(_is_int(d) and d >= 0 for d in v) else \
    "a list of device indices"
BOOL: Check = lambda v: None if isinstance(v, bool) else "true or false"
STRING: Check = lambda v: None if isinstance(v, str) and v else "a non-empty string"
FILE: Check = lambda v: None if isinstance(v, str) and Path(v).is_file() else "an existing file"
FALSE: Check = lambda v: None if v is False else "false"
DICT: Check = lambda v: None if isinstance(v, dict) else "a mapping"
DIR: Check = lambda v: None if isinstance(v, str) and Path(v).is_dir() else "an existing directory"
PROMPTS: Check = lambda v: None if isinstance(v, list) and v and all(isinstance(t, str) and "{}" in t for t in v) \
    else 'a non-empty list of prompt templates, each with "{}" where the class name goes'


def names(options) -> Check:
    """A list of names from ``options`` (a tuple, or a function giving one)."""
    def check(v):
        allowed = options() if callable(options) else options
        ok = isinstance(v, list) and all(isinstance(x, str) and x in allowed for x in v)
        return None if ok else f"a list of names from {'|'.join(allowed)}"
    return check


def regexes(v) -> Optional[str]:
    if not isinstance(v, list) or not all(isinstance(p, str) for p in v):
        return "a list of Python regexes (strings)"
    for pattern in v:
        try:
            re.compile(pattern)
        except re.error as e:
            return f"a list of Python regexes, and {pattern!r} is not one ({e})"
    return None


def pair_in(interval: str) -> Check:
    inner = number(interval)
    what = f"two numbers in {interval}"
    return lambda v: None if isinstance(v, list) and len(v) == 2 and not any(map(inner, v)) else what


def mapping(keys, value: Check, positive_sum: bool = False) -> Check:
    what = f"a mapping from {'|'.join(keys)} to {value(_ABSENT)}" + (" with a positive sum" if positive_sum else "")

    def check(v):
        if not isinstance(v, dict):
            return what
        bad = [k for k, x in v.items() if k not in keys or value(x) is not None]
        if bad:
            return f"{what} (wrong: {', '.join(map(str, bad))})"
        return f"{what} (the sum is {sum(v.values())})" if positive_sum and sum(v.values()) <= 0 else None
    return check


def locate(path: str):
    """The object ``module.attr`` names, as Hydra's ``_target_`` finds it."""
    parts = path.split(".")
    for n in range(len(parts) - 1, 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:n]))
        except ModuleNotFoundError:
            continue
        for part in parts[n:]:
            obj = getattr(obj, part)
        return obj
    raise ImportError(f"no module named {parts[0]!r}")


def importable(v) -> Optional[str]:
    if not isinstance(v, str):
        return "an importable name"
    try:
        locate(v)
    except (ImportError, AttributeError, ValueError) as e:
        return f"an importable name ({e})"
    return None


class Rule(NamedTuple):
    key: str
    check: Check
    example: str


SEED = integer(0, MAX_SEED)
TOP = (  # top-level keys, in the order they are checked (lr_scale before the lr it scales)
    Rule("seed", SEED, "1"),
    Rule("shots", integer(1, note="examples per class"), "16"),
    Rule("sparsity", number("(0, 1]"), "0.001"),
    Rule("protocol", choice(*PROTOCOLS), "all"),
    Rule("eval_datasets", names(dataset_configs), "[oxford_pets,dtd]"),
    Rule("lr_scale", number("> 0"), "1.0"),
    Rule("eval_zeroshot", BOOL, "true"),
    Rule("zeroshot_cache", BOOL, "false"),
    Rule("optimized_metric", either(NULL, choice("val/top1")), "val/top1"),
    Rule("finished", choice("refuse", "skip"), "skip"),
    Rule("batch_size", integer(1), "32"),
    Rule("eval_batch_size", integer(1), "64"),
    Rule("num_workers", integer(0), "4"),
    Rule("split_file", either(NULL, FILE), "<run>/split.json"),
    Rule("data_dir", STRING, "data"),
    Rule("experiment_name", STRING, "adhoc"),
    Rule("run_dir", either(NULL, DIR), "<a finished training run's output dir>"),
    Rule("wise_alpha", either(NULL, number("[0, 1]")), "0.5"),
)
RULES = TOP + (
    Rule("trainer._target_", importable, "pytorch_lightning.Trainer"),
    Rule("trainer.max_steps", either(integer(1), choice(-1)), "200"),
    Rule("trainer.max_epochs", either(NULL, integer(1), choice(-1)), "10"),
    Rule("trainer.precision", choice(*PRECISIONS), "bf16-mixed"),
    Rule("trainer.gradient_clip_val", either(NULL, number(">= 0")), "1.0"),
    Rule("trainer.gradient_clip_algorithm", choice("norm", "value"), "norm"),
    Rule("trainer.accumulate_grad_batches", integer(1), "1"),
    Rule("trainer.check_val_every_n_epoch", either(NULL, integer(1)), "5"),
    Rule("trainer.log_every_n_steps", integer(1), "5"),
    Rule("trainer.devices", either(integer(1), choice(-1, "auto"), DEVICE_LIST), "1"),
    Rule("trainer.num_nodes", integer(1), "1"),
    Rule("trainer.accelerator", choice(*ACCELERATORS), "auto"),
    Rule("trainer.strategy", STRING, "ddp"),
    Rule("trainer.deterministic", either(BOOL, choice("warn")), "false"),
    Rule("trainer.enable_progress_bar", BOOL, "true"),
    Rule("trainer.enable_model_summary", BOOL, "true"),
    Rule("method.name", STRING, "saft"),
    Rule("method.train", BOOL, "true"),
    Rule("method.towers", names(TOWERS), "[image,text]"),
    Rule("method.schedule", choice("cosine", "constant"), "cosine"),
    Rule("method.warmup_fraction", number("[0, 1)"), "0.1"),
    Rule("method.optimizer", either(NULL, DICT), "{_target_:torch.optim.AdamW,_partial_:true,lr:1e-5}"),
    Rule("method.optimizer._target_", importable, "saft.optim.MaskedAdamW"),
    Rule("method.optimizer.lr", number("> 0"), "1e-3"),
    Rule("method.optimizer.weight_decay", number(">= 0"), "0.1"),
    Rule("method.optimizer.betas", pair_in("[0, 1)"), "[0.9,0.999]"),
    Rule("method.optimizer.eps", number("> 0"), "1e-8"),
    Rule("method.optimizer.momentum", number(">= 0"), "0.9"),
    Rule("method.module", importable, "saft.app.flyp.FLYPClassifier"),
    Rule("method.gradient_clip_val", either(NULL, number(">= 0")), "1.0"),
    Rule("method.decay_exclusions", choice("open_clip", "none"), "open_clip"),
    Rule("method.warmup", choice("linear", "constant"), "linear"),
    Rule("method.warmup_lr", either(NULL, number("> 0")), "1e-5"),
    Rule("method.augment", either(NULL, FALSE, DICT), "{scale:[0.08,1.0],hflip:true}"),
    Rule("method.augment.scale", pair_in("(0, 1]"), "[0.08,1.0]"),
    Rule("method.augment.hflip", BOOL, "true"),
    Rule("method.probe", either(NULL, DICT), "null"),
    Rule("method.probe._target_", importable, "saft.app.probe.ConvexProbe"),
    Rule("method.probe.c_low", number("> -100"), "-7"),
    Rule("method.probe.c_high", number("> -100"), "2"),
    Rule("method.probe.c_count", integer(1), "50"),
    Rule("method.probe.max_iter", integer(1), "200"),
    Rule("method.head", choice("text", "linear", "prompt"), "linear"),
    Rule("method.trainable", regexes, "[bias$]"),
    Rule("method.lp_fraction", number("[0, 1)"), "0.5"),
    Rule("method.head_lr", number("> 0"), "1e-4"),
    Rule("method.head_weight_decay", either(NULL, number(">= 0")), "0.0"),
    Rule("method.n_ctx", integer(1), "16"),
    Rule("method.ctx_init", either(NULL, lambda v: None if isinstance(v, str) and v.strip() else "words"),
         "'a photo of a'"),
    Rule("method.mask", either(NULL, DICT), "null"),
    Rule("method.mask._target_", importable, "saft.callback.SparseMaskCallback"),
    Rule("method.mask.sparsity", number("(0, 1]"), "0.001"),
    Rule("method.mask.selection", choice(*SELECTIONS), "gradient"),
    Rule("method.mask.score", choice(*SCORES), "abs_sum"),
    Rule("method.mask.scope", choice(*SCOPES), "global"),
    Rule("method.mask.include", regexes, "[visual]"),
    Rule("method.mask.exclude", regexes, "[conv1,embedding]"),
    Rule("method.mask.seed", SEED, "1"),
    Rule("method.mask.batch_size", either(NULL, integer(1)), "8"),
    Rule("checkpoint._target_", importable, "pytorch_lightning.callbacks.ModelCheckpoint"),
    Rule("checkpoint.dirpath", STRING, "<run>/checkpoints"),
    Rule("checkpoint.every_n_train_steps", either(NULL, integer(1)), "100"),
    Rule("checkpoint.save_top_k", integer(-1), "1"),
    Rule("checkpoint.save_last", either(BOOL, choice("link")), "true"),
    Rule("logger._target_", importable, "pytorch_lightning.loggers.CSVLogger"),
    Rule("model.name", STRING, "saft-tiny"),
    Rule("model.pretrained", either(NULL, STRING), "openai"),
    Rule("model.init_seed", SEED, "0"),
    Rule("model.force_quick_gelu", BOOL, "false"),
    Rule("model.batch_first_attention", BOOL, "true"),
    Rule("model.trim_prompts", BOOL, "true"),
    Rule("model.pretrain", either(NULL, DICT), "null"),
    Rule("model.pretrain.steps", integer(1), "1000"),
    Rule("model.pretrain.batch_size", integer(1), "128"),
    Rule("model.pretrain.lr", number("> 0"), "2e-3"),
    Rule("model.pretrain.seed", SEED, "0"),
    Rule("model.pretrain.style_weights", mapping(STYLES, number(">= 0"), positive_sum=True), "{photo:1,sketch:1}"),
    Rule("model.pretrain.data_dir", STRING, "data"),
    Rule("model.pretrain.train_size", integer(1), "50000"),
    Rule("model.pretrain.download", BOOL, "false"),
    Rule("model.pretrain.version", choice(RECIPE_VERSION), str(RECIPE_VERSION)),
    Rule("dataset.name", STRING, "synthetic"),
    Rule("dataset.datamodule._target_", importable, "datamodules.synthetic.SyntheticDataModule"),
    *(Rule(f"dataset.datamodule.{key}", integer(1), example) for key, example in (
        ("train_per_class", "32"), ("val_per_class", "8"), ("test_per_class", "20"), ("test_size", "1000"),
        ("train_size", "50000"), ("image_size", "64"))),
    Rule("dataset.datamodule.download", BOOL, "false"),
    Rule("dataset.datamodule.id_style", choice(*STYLES), "painting"),
    Rule("dataset.datamodule.templates", choice(*IMAGENET_EVAL), "openai"),
    Rule("dataset.datamodule.variant_dirs", mapping(tuple(VARIANTS), STRING), "{imagenet_v2:data/imagenetv2}"),
    Rule("dataset.datamodule.dataset", choice(*COOP_DATASETS), "dtd"),
    Rule("dataset.datamodule.root", STRING, "data/dtd"),
    Rule("dataset.datamodule.name", STRING, "birds"),
    Rule("dataset.datamodule.prompt_templates", PROMPTS, "['a photo of a {}.']"),
    Rule("dataset.datamodule.data_dir", STRING, "data"),
    # The loader arguments are ${...} of the top-level keys above, unless a run sets them itself.
    *(Rule(f"dataset.datamodule.{r.key}", r.check, r.example) for r in TOP if r.key in (
        "shots", "seed", "batch_size", "eval_batch_size", "num_workers", "split_file", "protocol")),
)
REQUIRED = ("seed", "shots", "sparsity", "method.name", "method.train", "method.towers", "method.schedule",
            "method.warmup_fraction", "model.name", "dataset.name", "checkpoint.dirpath")


def output_dir() -> Path:
    return Path(HydraConfig.get().runtime.output_dir)


def _show(v) -> str:
    """A value as a message shows it: Hydra's spelling of null and booleans, Python's of the rest."""
    return "null" if v is None else str(v).lower() if isinstance(v, bool) else repr(v)


def _raw(cfg: DictConfig, key: str):
    """The value of ``key`` as written (interpolations unresolved)."""
    parent, _, leaf = key.rpartition(".")
    try:
        node = OmegaConf.select(cfg, parent) if parent else cfg
        return OmegaConf.to_container(node, resolve=False)[leaf]
    except Exception:  # only for the message
        return "?"


def read(cfg: DictConfig, key: str, default=_ABSENT):
    """The resolved value of ``key`` as plain Python (``default`` when absent); a value that cannot be resolved
    is a ``ConfigError`` naming the key."""
    try:
        value = OmegaConf.select(cfg, key, default=default, throw_on_resolution_failure=True,
                                 throw_on_missing=True)
        return OmegaConf.to_container(value, resolve=True) if isinstance(value, Container) else value
    except OmegaConfBaseException as e:
        where = getattr(e, "full_key", None) or key
        raise ConfigError(f"{where}={_raw(cfg, where)} cannot be resolved ({str(e).splitlines()[0]}); "
                          f"give it a value or a working interpolation") from None


def _fail(key: str, value, what: str, example: str):
    raise ConfigError(f"{key}={_show(value)} must be {what}, e.g. {key}={example}")


def check_rules(cfg: DictConfig) -> None:
    for rule in RULES:
        value = read(cfg, rule.key)
        if value is _ABSENT:
            if rule.key in REQUIRED:
                raise ConfigError(f"{rule.key} is not set; it must be {rule.check(_ABSENT)}, "
                                  f"e.g. {rule.key}={rule.example}")
            continue
        problem = rule.check(value)
        if problem:
            _fail(rule.key, value, problem, rule.example)


def _cross_checks(cfg: DictConfig) -> None:
    """Rules that involve several keys (every key has passed its own rule)."""
    max_steps, max_epochs = read(cfg, "trainer.max_steps", -1), read(cfg, "trainer.max_epochs", None)
    if max_steps == -1 and max_epochs in (None, -1):
        _fail("trainer.max_steps", max_steps, "a positive integer when trainer.max_epochs is null (nothing else "
              "ends training)", "200")
    accelerator = read(cfg, "trainer.accelerator", "auto")
    if accelerator in ("gpu", "cuda") and not torch.cuda.is_available():
        _fail("trainer.accelerator", accelerator, "available on this machine, which has no CUDA GPU", "cpu")
    if (read(cfg, "dataset.datamodule._target_", "").endswith("ImageFolderDataModule")
            and read(cfg, "dataset.name", "") == "imagefolder"):  # its folder is only where it lies, not what it is
        _fail("dataset.name", "imagefolder", "your data's own name: runs on two folders would otherwise be one "
              "configuration in results, reports and resume checks", "birds")
    eval_datasets = read(cfg, "eval_datasets", None) or []
    twice = sorted({n for n in eval_datasets if eval_datasets.count(n) > 1})
    if twice:
        _fail("eval_datasets", eval_datasets, f"a list that names each dataset once ({twice} twice)",
              "[oxford_pets,dtd]")
    method = read(cfg, "method")
    head = method.get("head", "text")
    if method["train"]:
        if not method["towers"] and head == "text":
            _fail("method.towers", method["towers"], "a non-empty list when method.train=true and nothing else "
                  "trains (the towers that train; or a method with a head of its own, method.head=linear)",
                  "[image,text]")
        if not method.get("optimizer"):
            _fail("method.optimizer", method.get("optimizer"), "an optimizer config when method.train=true",
                  "{_target_:torch.optim.AdamW,_partial_:true,lr:1e-5}")
        target = method["optimizer"].get("_target_")
        optimizer = locate(target) if target else None
        if method.get("mask") and not (isinstance(optimizer, type) and issubclass(optimizer, MaskedAdamW)):
            _fail("method.optimizer._target_", target, "saft.optim.MaskedAdamW for a masked method (it never "
                  "writes an unselected entry)", "saft.optim.MaskedAdamW")
    if head == "linear" and "text" in method["towers"]:
        _fail("method.towers", method["towers"], "a list without text when method.head=linear (a linear head "
              "replaces the text head, so the text tower would get no gradient)", "[image]")
    if head == "linear" and "logit_scale" in method["towers"]:
        _fail("method.towers", method["towers"], "a list without logit_scale when method.head=linear (the head is "
              "in logit units from its start, as wise-ft's; a trained scale would rescale the zero-shot part alone)",
              "[image]")
    probe = method.get("probe") or {}
    if probe and method.get("mask"):
        _fail("method.probe", "set", "null for a masked method (the mask is chosen at fit start, before the probe "
              "is fitted, so it would be scored against another head)", "null")
    if probe and probe.get("c_low", 0) > probe.get("c_high", 0):
        _fail("method.probe.c_low", probe["c_low"], f"at most method.probe.c_high={probe['c_high']} (C runs from "
              f"10^c_low to 10^c_high)", "-7")
    if method.get("probe") and head != "linear":
        _fail("method.probe", "set", "null unless method.head=linear (the probe fits a linear head)", "null")
    if method.get("probe") and method.get("lp_fraction"):
        _fail("method.lp_fraction", method["lp_fraction"], "0 when method.probe is set (the head is fitted before "
              "training, so every step fine-tunes; lp_fraction is the gradient-step probe's share, method.probe=null)",
              "0")
    if method.get("warmup") == "constant" and method.get("warmup_lr") is None:
        _fail("method.warmup_lr", None, "a learning rate when method.warmup=constant", "1e-5")
    if method.get("lp_fraction") and (head != "linear" or method.get("head_lr") is None):
        _fail("method.lp_fraction", method["lp_fraction"], "0 unless method.head=linear and method.head_lr is set "
              "(the probe phase trains a linear head)", "0")
    if read(cfg, "wise_alpha", None) is not None and not read(cfg, "run_dir", None):
        _fail("wise_alpha", read(cfg, "wise_alpha"), "null without run_dir: WiSE-FT blends a training run with its "
              "base model (alone, eval.py evaluates zero-shot CLIP)", "0.5 run_dir=<a finished training run>")
    if read(cfg, "wise_alpha", None) is not None and head == "prompt":
        _fail("wise_alpha", read(cfg, "wise_alpha"), "null for a CoOp run: WiSE-FT blends the zero-shot and the "
              "fine-tuned weights, and a learned prompt has no zero-shot counterpart to blend with", "null")
    precision = read(cfg, "trainer.precision", "32-true")
    weights = PRECISION_ALIASES.get(str(precision), str(precision))
    if method.get("mask") and weights.startswith(("16-true", "bf16-true", "64-true", "transformer-engine")):
        _fail("trainer.precision", precision, "a precision with fp32 weights (masked methods need fp32 weights: use "
              "bf16-mixed or 16-mixed; weights stored in another dtype change every entry)", "bf16-mixed")
    if read(cfg, "model.pretrained", None) == "auto" and not read(cfg, "model.pretrain", None):
        _fail("model.pretrained", "auto", "an open_clip tag, a file or null when there is no model.pretrain block "
              "(see conf/model/fmnist_clip.yaml)", "null")


def check_resolves(cfg: DictConfig) -> None:
    """Every other key (outside ``hydra``) resolves: a broken interpolation is named now, not mid-run."""
    for key in cfg:
        if key != "hydra":
            read(cfg, str(key))


def validate(cfg: DictConfig) -> None:
    """Cheap checks of user input, before any data or model is touched."""
    check_rules(cfg)
    check_resolves(cfg)
    _cross_checks(cfg)
    out = output_dir()
    if (out / RESULTS).exists() and read(cfg, "finished", "refuse") != "skip":
        raise ConfigError(f"{out} already holds finished results ({RESULTS}); choose another hydra.run.dir "
                          f"so they are not overwritten, or finished=skip to run again only what is not finished")
    ckpt = read(cfg, "ckpt_path", None)
    if ckpt and ckpt != "last" and not (isinstance(ckpt, str) and Path(ckpt).is_file()):
        raise ConfigError(f"ckpt_path={ckpt} is not a file; give a checkpoint of this run "
                          f"(<run>/checkpoints/last.ckpt) or ckpt_path=last to resume in the same hydra.run.dir")
    if HydraConfig.get().mode == RunMode.MULTIRUN:
        check_multirun_strategy(cfg)
