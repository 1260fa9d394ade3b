"""The Hydra + Lightning CLIP app built on the SAFT library: configs in, runs, checkpoints and results out."""
import math
from pathlib import Path

from omegaconf import OmegaConf

CONF_DIR = Path(__file__).resolve().parents[2] / "conf"  # the Hydra configs, beside train.py

# ${mul:a,b}: configs scale a method's base learning rate by the sweepable ``lr_scale``.
OmegaConf.register_new_resolver("mul", lambda *values: math.prod(values), replace=True)

from saft.app import folders  # noqa: E402  (the resolvers of the output folders' names)

folders.register()
