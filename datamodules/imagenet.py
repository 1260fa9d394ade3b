"""ImageNet (few-shot train, val as the ID test set) and its four OOD variants, in CoOp's layout.

Class index = position in the 1,000 sorted ImageNet wnids (``imagenet_wnids.json``). ImageNet-V2 folders
are class indices; Sketch, A and R folders are wnids. A and R cover 200 classes each: their heads are
built from the wnids found in their folders, never from positions.
"""
import json
import logging
from pathlib import Path
from typing import Dict, List, Mapping, Optional

from datamodules.base import EvalSet, FewShotDataModule, ImageFolder, list_images
from datamodules.templates import IMAGENET_EVAL, IMAGENET_TRAIN
from saft.errors import ConfigError

log = logging.getLogger(__name__)
WNIDS = json.loads((Path(__file__).with_name("imagenet_wnids.json")).read_text())["imagenet_1k"]
SOURCE = "ILSVRC-2012 from image-net.org, arranged as in CoOp's DATASETS.md (github.com/KaiyangZhou/CoOp)"

# name -> (sub-folder holding the class folders, class folder naming, where to get it)
VARIANTS = {
    "imagenet_v2": ("imagenetv2-matched-frequency-format-val", "index",
                    "ImageNetV2 matched-frequency, github.com/modestyachts/ImageNetV2"),
    "imagenet_sketch": ("images", "wnid", "ImageNet-Sketch, github.com/HaohanWang/ImageNet-Sketch"),
    "imagenet_a": ("imagenet-a", "wnid", "ImageNet-A, github.com/hendrycks/natural-adv-examples"),
    "imagenet_r": ("imagenet-r", "wnid", "ImageNet-R, github.com/hendrycks/imagenet-r"),
}


def read_classnames(path: Path) -> Dict[str, str]:
    """``<wnid> <class name>`` per line."""
    names = {}
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        wnid, _, name = line.strip().partition(" ")
        if wnid not in WNIDS or not name.strip():
            raise ConfigError(f"ImageNet: {path} line {n} is not '<wnid> <class name>' with an ImageNet wnid: "
                              f"{line!r}. Use CoOp's classnames.txt ({SOURCE})")
        names[wnid] = name.strip()
    return names


class ImageNetDataModule(FewShotDataModule):
    def __init__(self, root: str, variant_dirs: Optional[Mapping[str, str]] = None, templates: str = "openai",
                 **kwargs):
        super().__init__(**kwargs)
        if templates not in IMAGENET_EVAL:
            raise ConfigError(f"ImageNet templates {templates!r} is not one of {list(IMAGENET_EVAL)}")
        self.root, self.template_set = Path(root), templates
        self._images = ImageFolder(self.root)
        self.variant_dirs = {k: Path(v) for k, v in (variant_dirs or {}).items()}
        unknown = set(self.variant_dirs) - set(VARIANTS)
        if unknown:
            raise ConfigError(f"unknown ImageNet variants {sorted(unknown)}; choose from {list(VARIANTS)}")
        self._names: Optional[Dict[str, str]] = None

    def check(self) -> None:
        layout = "imagenet/classnames.txt, imagenet/images/train/<wnid>/*.JPEG, imagenet/images/val/<wnid>/*.JPEG"
        for path in (self.root / "classnames.txt", self.root / "images" / "train", self.root / "images" / "val"):
            if not path.exists():
                raise ConfigError(f"ImageNet: {path} does not exist. Expected under data_dir: {layout}. "
                                  f"Get it from {SOURCE}, then set data_dir (or $SAFT_DATA_DIR)")
        for name, folder in self.active_variants().items():
            sub, naming, source = VARIANTS[name]
            if not (folder / sub).is_dir():
                raise ConfigError(f"{name}: {folder / sub} does not exist. Expected class folders named by "
                                  f"{naming} in {folder / sub}. Get it from {source}, or drop it with "
                                  f"'dataset.datamodule.variant_dirs={{...}}'")
        self.names()

    def names(self) -> Dict[str, str]:
        """wnid -> class name for the classes present, in class-index order."""
        if self._names is None:
            names = read_classnames(self.root / "classnames.txt")
            if len(names) != len(WNIDS):
                log.warning("ImageNet: %s lists %d classes, not %d; using those", self.root / "classnames.txt",
                            len(names), len(WNIDS))
            self._names = {w: names[w] for w in WNIDS if w in names}
        return self._names

    def all_classnames(self) -> List[str]:
        return list(self.names().values())

    def templates(self):
        return IMAGENET_EVAL[self.template_set]

    def train_templates(self):
        return IMAGENET_TRAIN

    def load_image(self, key: str):
        return self._images(key)

    def _class_folders(self, split: str):
        items = []
        for label, wnid in enumerate(self.names()):
            folder = self.root / "images" / split / wnid
            if not folder.is_dir():
                raise ConfigError(f"ImageNet: class folder {folder} is missing. Every class in classnames.txt "
                                  f"needs images/{split}/<wnid>/ ({SOURCE})")
            items += [(f"images/{split}/{wnid}/{f}", label) for f in list_images(folder)]
        return items

    def pools(self):
        return {"train": self._class_folders("train")}

    def build_eval_sets(self) -> List[EvalSet]:
        sets = [EvalSet("imagenet", self._class_folders("val"), self.all_classnames(), self.templates(),
                        self.load_image)]
        return sets + [self._variant(name, folder) for name, folder in self.active_variants().items()]

    def active_variants(self) -> Dict[str, Path]:
        """The OOD variants this run evaluates (none under base-to-new, which tests ImageNet val only)."""
        return {} if self.protocol == "base2new" else self.variant_dirs

    def _variant(self, name: str, folder: Path) -> EvalSet:
        sub, naming, _ = VARIANTS[name]
        base = folder / sub
        present = {d.name for d in base.iterdir() if d.is_dir()}
        if naming == "index":  # ImageNet-V2: folder name = class index in the 1,000-class list
            by_wnid = {WNIDS[int(d)]: d for d in present if d.isdigit() and int(d) < len(WNIDS)}
        else:
            by_wnid = {d: d for d in present if d in WNIDS}
        wnids = [w for w in self.names() if w in by_wnid]  # class-index order
        if not wnids:
            raise ConfigError(f"{name}: no class folder in {base} matches an ImageNet class of this run")
        items = [(f"{sub}/{by_wnid[w]}/{f}", label) for label, w in enumerate(wnids)
                 for f in list_images(base / by_wnid[w])]
        index = {w: i for i, w in enumerate(self.names())}
        return EvalSet(name, items, [self.names()[w] for w in wnids], self.templates(), ImageFolder(folder),
                       [index[w] for w in wnids])
