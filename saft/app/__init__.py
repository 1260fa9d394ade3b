"""The Hydra + Lightning CLIP app built on the SAFT library: configs in, runs, checkpoints and results out."""
import math

from omegaconf import OmegaConf

# ${mul:a,b}: configs scale a method's base learning rate by the sweepable ``lr_scale``.
OmegaConf.register_new_resolver("mul", lambda *values: math.prod(values), replace=True)
