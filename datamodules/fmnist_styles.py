"""Real Fashion-MNIST images rendered in five visual styles: the CPU benchmark of forgetting.

Styles (every image a function of its split, index and style alone, 32x32 RGB):
- ``photo``: the grey image;   ``negative``: its inverse;
- ``sketch``: inverted edges (PIL's FIND_EDGES), dark lines on white;
- ``painting``: blurred and mapped onto a random two-colour palette;
- ``noisy``: Gaussian noise (sigma 0.25) and 15% of the pixels dropped.
The fine-tuning (ID) style is ``painting``, the one the project's CLIP sees least in pretraining.
"""
import gzip
import shutil
from pathlib import Path
from typing import List, Optional

import numpy as np
from PIL import Image, ImageFilter, ImageOps

from datamodules.base import EvalSet, FewShotDataModule, key_rng
from saft.atomic import atomic_path
from saft.errors import ConfigError

STYLES = ("photo", "sketch", "negative", "painting", "noisy")
CLASSNAMES = ("t-shirt", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag", "ankle boot")
DEBIAN_DIR = Path("/usr/share/datasets/fashion-mnist")
FILES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")
HOW_TO_GET = ("install Debian's package (apt-get install dataset-fashion-mnist), or put the four *-ubyte.gz "
              "files in <data_dir>/fashion-mnist/, or set dataset.datamodule.download=true on a machine with "
              "internet access")


def caption(style: str, classname: str) -> str:
    return f"a {style} of a {classname}."


def load_fashion_mnist(data_dir: str, download: bool = False):
    """``(train images, train labels, test images, test labels)`` as uint8 / int64 arrays, read with
    torchvision from ``<data_dir>/FashionMNIST/raw`` after copying the gzipped files there from Debian's
    package or ``<data_dir>/fashion-mnist``, or downloading them."""
    from torchvision.datasets import FashionMNIST
    raw = Path(data_dir) / "FashionMNIST" / "raw"
    if not all((raw / f).is_file() for f in FILES):
        source = next((d for d in (DEBIAN_DIR, Path(data_dir) / "fashion-mnist")
                       if all((d / f"{f}.gz").is_file() for f in FILES)), None)
        if source is not None:
            raw.mkdir(parents=True, exist_ok=True)
            for f in FILES:  # concurrent first jobs of a sweep each write their own temporary file
                with atomic_path(raw / f) as tmp, gzip.open(source / f"{f}.gz") as src, open(tmp, "wb") as dst:
                    shutil.copyfileobj(src, dst)
        elif not download:
            raise ConfigError(f"Fashion-MNIST not found in {DEBIAN_DIR} or {Path(data_dir) / 'fashion-mnist'}: "
                              f"{HOW_TO_GET}")
    try:
        train = FashionMNIST(str(data_dir), train=True, download=download)
        test = FashionMNIST(str(data_dir), train=False, download=download)
    except RuntimeError as e:
        raise ConfigError(f"Fashion-MNIST in {raw} is unreadable ({e}): {HOW_TO_GET}") from None
    return train.data.numpy(), train.targets.numpy(), test.data.numpy(), test.targets.numpy()


def render(image: np.ndarray, style: str, rng: np.random.Generator) -> Image.Image:
    """One 28x28 uint8 image in ``style``, padded to 32x32 RGB."""
    grey = ImageOps.expand(Image.fromarray(image, mode="L"), border=2, fill=0)
    if style == "photo":
        out = grey
    elif style == "negative":
        out = ImageOps.invert(grey)
    elif style == "sketch":
        out = ImageOps.invert(ImageOps.autocontrast(grey.filter(ImageFilter.FIND_EDGES)))
    elif style == "painting":
        blurred = np.asarray(grey.filter(ImageFilter.GaussianBlur(1.2)), dtype=np.float32)[..., None] / 255
        background, foreground = rng.integers(0, 256, size=(2, 3))
        return Image.fromarray(((1 - blurred) * background + blurred * foreground).astype(np.uint8), mode="RGB")
    elif style == "noisy":
        pixels = np.asarray(grey, dtype=np.float32) / 255 + rng.normal(0, 0.25, size=(32, 32))
        pixels[rng.random((32, 32)) < 0.15] = 0
        out = Image.fromarray((np.clip(pixels, 0, 1) * 255).astype(np.uint8), mode="L")
    else:
        raise ValueError(f"unknown style {style!r}; choose from {STYLES}")
    return out.convert("RGB")


class FashionStylesDataModule(FewShotDataModule):
    """Few-shot training in ``id_style``; test sets: ``id_style`` first, then every other style.

    Train pool: the first 50,000 training images; val pool: the last 10,000; test: the first
    ``test_size`` test images, rendered in each style. Prompts name the style: "a painting of a coat.".
    """

    def __init__(self, data_dir: str, id_style: str = "painting", test_size: int = 1000, train_size: int = 50000,
                 download: bool = False, **kwargs):
        super().__init__(**kwargs)
        if id_style not in STYLES:
            raise ConfigError(f"id_style={id_style!r} is not one of {STYLES}")
        self.data_dir, self.id_style, self.download = data_dir, id_style, download
        self.test_size, self.train_size = test_size, train_size
        self._arrays: Optional[tuple] = None

    def check(self) -> None:
        self.arrays()

    def arrays(self):
        if self._arrays is None:
            self._arrays = load_fashion_mnist(self.data_dir, self.download)
        return self._arrays

    def all_classnames(self) -> List[str]:
        return list(CLASSNAMES)

    def templates(self):
        return (caption(self.id_style, "{}"),)

    def _items(self, split: str, style: str, indices):
        labels = self.arrays()[1 if split != "test" else 3]
        return [(f"{split}/{style}/{i}", int(labels[i])) for i in indices]

    def pools(self):
        n_train = len(self.arrays()[0])
        return {"train": self._items("train", self.id_style, range(min(self.train_size, n_train - 10000))),
                "val": self._items("train", self.id_style, range(n_train - 10000, n_train))}

    def build_eval_sets(self) -> List[EvalSet]:
        order = [self.id_style] + [s for s in STYLES if s != self.id_style]
        return [EvalSet(s, self._items("test", s, range(self.test_size)), self.all_classnames(),
                        (caption(s, "{}"),), self.load_image) for s in order]

    def load_image(self, key: str) -> Image.Image:
        split, style, index = key.split("/")
        images = self.arrays()[0 if split == "train" else 2]
        return render(images[int(index)], style, key_rng(key))
