"""LP-FT's linear probe as its reference fits it (Kumar et al., 2022; AnanyaKumar/transfer_learning,
``log_reg_sk.py``): L2-regularised logistic regression on the frozen image features, fitted by scikit-learn for
each C of a log-spaced grid (warm-started from the previous C), keeping the C of best validation accuracy.

The reference standardises the features by one scalar mean and standard deviation of the training features and
folds them back into the weights; so does this fit, on the normalised features the CLIP classifier uses, so the
fitted head gives the same logits inside the model.
"""
import logging
import warnings
from typing import Sequence, Tuple

import numpy as np
import torch
from sklearn.exceptions import ConvergenceWarning
from sklearn.linear_model import LogisticRegression

from saft.errors import ConfigError

log = logging.getLogger(__name__)


def fit_logistic_regression(train_x: np.ndarray, train_y: np.ndarray, val_x: np.ndarray, val_y: np.ndarray,
                            cs: Sequence[float], max_iter: int, seed: int,
                            classes: int) -> Tuple[np.ndarray, np.ndarray, float]:
    """(weight [features, classes], bias [classes], chosen C): logits = x @ weight + bias on unstandardised x.
    The first C of the grid with the best validation accuracy wins, and a class without training examples gets
    zero weights and bias, as in the reference (``pad_head``)."""
    mean, std = train_x.mean(), train_x.std()
    clf = LogisticRegression(random_state=seed, warm_start=True, max_iter=max_iter)
    best, unconverged = None, 0
    for c in cs:
        clf.C = c
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", ConvergenceWarning)
            clf.fit((train_x - mean) / std, train_y)
        unconverged += any(issubclass(w.category, ConvergenceWarning) for w in caught)
        accuracy = float(np.mean(clf.predict((val_x - mean) / std) == val_y))
        if best is None or accuracy > best[0]:
            best = (accuracy, c, clf.coef_.copy(), clf.intercept_.copy())
    accuracy, c, coef, intercept = best
    if len(clf.classes_) == 2:  # scikit-learn's binary model is one logit z for the second class: logits (0, z)
        coef, intercept = np.vstack([np.zeros_like(coef), coef]), np.concatenate([[0.0], intercept])
    weight, bias = np.zeros((classes, train_x.shape[1])), np.zeros(classes)
    weight[clf.classes_], bias[clf.classes_] = coef / std, intercept - coef.sum(axis=1) * mean / std
    log.info("linear probe: C=%.3g of %d values (validation accuracy %.2f%%; %d fits stopped at max_iter=%d)",
             c, len(cs), 100 * accuracy, unconverged, max_iter)
    return weight.T, bias, float(c)


class ConvexProbe:
    """Fits the linear head of a CLIPClassifier before fine-tuning: ``c_count`` values of C from 10^c_low to
    10^c_high (the reference: 50 from 1e-7 to 1e2), at most ``max_iter`` L-BFGS iterations each (200)."""

    def __init__(self, c_low: float = -7, c_high: float = 2, c_count: int = 50, max_iter: int = 200, seed: int = 0):
        self.cs = np.logspace(c_low, c_high, c_count)
        self.max_iter, self.seed = max_iter, seed
        self.c = None  # the chosen C, once fitted

    @torch.no_grad()
    def fit(self, module) -> None:
        """Set ``module.head`` to the probe fitted on the frozen features of the training and validation splits
        (rank 0 fits; every rank receives its weights)."""
        trainer, head, dm = module.trainer, module.head, module.trainer.datamodule
        present = {label for _, label in dm.split["train"]}
        if not dm.split["val"] or len(present) < 2:  # known on every rank: none waits for a rank-0 failure
            raise ConfigError(f"LP-FT's probe needs a validation split and training examples of at least two classes "
                              f"(this run: {len(dm.split['val'])} validation examples, {len(present)} classes); "
                              f"use a dataset with more examples per class, or method.probe=null method.lp_fraction=0.5")
        solution = None
        if trainer.is_global_zero:
            train_x, train_y = _features(module, dm.split_dataloader("train"))
            val_x, val_y = _features(module, dm.split_dataloader("val"))
            solution = fit_logistic_regression(train_x, train_y, val_x, val_y, self.cs, self.max_iter, self.seed,
                                               classes=len(head.classnames))
        weight, bias, self.c = trainer.strategy.broadcast(solution, src=0)
        head.weight.copy_(torch.as_tensor(weight, dtype=head.weight.dtype))
        head.bias.copy_(torch.as_tensor(bias, dtype=head.bias.dtype))


def _features(module, loader) -> Tuple[np.ndarray, np.ndarray]:
    """The normalised image features (float64, as scikit-learn fits) and labels of a loader, in its order."""
    features, labels, training = [], [], module.model.training
    module.model.eval()  # BatchNorm statistics (ResNet CLIPs) must not move
    try:
        for images, y in loader:
            features.append(module.model.encode_image(images.to(module.device), normalize=True).double().cpu())
            labels.append(y)
    finally:
        module.model.train(training)
    return torch.cat(features).numpy(), torch.cat(labels).numpy()
