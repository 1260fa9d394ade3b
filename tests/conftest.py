"""Shared fixtures: compose the real Hydra configs, run train/eval in-process or as subprocesses."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import open_dict

import saft.app  # noqa: F401  (registers the ${mul:} resolver the configs use)

ROOT = Path(__file__).resolve().parent.parent
CONF = str(ROOT / "conf")

# Small and fast: 6 classes x 4 shots, 24 test images per style, a few steps.
FAST = ["model=tiny", "dataset=synthetic", "shots=4", "batch_size=8", "eval_batch_size=32",
        "dataset.datamodule.train_per_class=8", "dataset.datamodule.val_per_class=4",
        "dataset.datamodule.test_per_class=4", "trainer=cpu", "trainer.max_steps=6",
        "trainer.enable_progress_bar=false", "trainer.enable_model_summary=false",
        "trainer.check_val_every_n_epoch=100"]


@pytest.fixture(autouse=True)
def _quiet_env(monkeypatch, tmp_path):
    monkeypatch.setenv("WANDB_MODE", "disabled")
    # Each test its own cache: a zero-shot reference stored by one test (perhaps under a stub) never reaches another.
    monkeypatch.setenv("SAFT_CACHE_DIR", str(tmp_path / "saft-cache"))
    torch.set_num_threads(2)


def compose_cfg(out_dir, overrides=(), config_name="train"):
    """The real config, as Hydra would compose it for a run writing into ``out_dir``."""
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=CONF, version_base="1.3"):
        cfg = compose(config_name=config_name, return_hydra_config=True,
                      overrides=list(overrides) + [f"hydra.run.dir={out_dir}"])
    with open_dict(cfg):
        cfg.hydra.runtime.output_dir = str(out_dir)
    HydraConfig.instance().set_config(cfg)
    Path(out_dir).mkdir(parents=True, exist_ok=True)
    return cfg


def run_script(script, args, cwd=ROOT, check=True, env=None, timeout=600):
    """Run train.py / eval.py as a user would; return the completed process."""
    full_env = {**os.environ, "WANDB_MODE": "disabled", "OMP_NUM_THREADS": "1", **(env or {})}
    proc = subprocess.run([sys.executable, str(ROOT / script), *args], cwd=cwd, env=full_env,
                          capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"{script} {' '.join(args)} failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
    return proc


def read_results(run_dir):
    return json.loads((Path(run_dir) / "results.json").read_text())


def checkpoint(run_dir, name="last.ckpt"):
    return torch.load(Path(run_dir) / "checkpoints" / name, map_location="cpu", weights_only=True)


def ckpt_masks(ckpt):
    return ckpt["callbacks"]["SparseMaskCallback"]["masks"]


def ckpt_params(ckpt):
    return {k[len("model."):]: v for k, v in ckpt["state_dict"].items() if k.startswith("model.")}


def changed_entries(base, final):
    """{name: flat indices whose bits differ}, computed here independently of saft.delta."""
    out = {}
    for name, b in base.items():
        f = final[name]
        diff = torch.nonzero(b.reshape(-1).view(torch.int32) != f.reshape(-1).view(torch.int32)).flatten()
        if diff.numel():
            out[name] = diff
    return out
