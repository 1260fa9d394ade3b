"""SAFT: sparse adaptation for fine-tuning, for any PyTorch model.

    mask = saft.select_mask(model, batches, loss_fn, sparsity=0.001)
    optimizer = saft.MaskedAdamW.from_mask(model, mask, lr=1e-3, weight_decay=0.1)

Importing ``saft`` needs torch and safetensors only; ``saft.SparseMaskCallback`` (Lightning) is imported on
first use. The Hydra + Lightning CLIP app lives in ``saft.app``, reporting in ``saft.report``.
"""
from saft.delta import (apply_delta, compute_delta, interpolate_delta, load_delta, num_changed, save_delta,
                        state_checksum)
from saft.errors import ConfigError
from saft.mask import mask_stats, select_topk
from saft.optim import MaskedAdamW
from saft.select import eligible_parameters, gradient_sums, select_mask

__all__ = ["select_mask", "MaskedAdamW", "SparseMaskCallback", "compute_delta", "save_delta", "load_delta",
           "apply_delta", "interpolate_delta", "num_changed", "state_checksum", "eligible_parameters", "gradient_sums", "select_topk",
           "mask_stats", "ConfigError"]


def __getattr__(name):
    if name == "SparseMaskCallback":  # the only part that needs Lightning
        from saft.callback import SparseMaskCallback
        return SparseMaskCallback
    raise AttributeError(f"module 'saft' has no attribute {name!r}")
