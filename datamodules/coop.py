"""The ten datasets of CoOp's base-to-new benchmark besides ImageNet, read from CoOp's split files.

Adding one of CoOp's layout is one row in ``DATASETS`` plus one ``conf/dataset/<name>.yaml``.
"""
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Tuple

from datamodules.base import EvalSet, FewShotDataModule, ImageFolder
from datamodules.templates import COOP
from saft.errors import ConfigError

SOURCE = "CoOp's DATASETS.md (github.com/KaiyangZhou/CoOp), which links the images and the split files"

# CoOp renames EuroSAT's classes to words CLIP knows.
EUROSAT_NAMES = {
    "AnnualCrop": "Annual Crop Land", "Forest": "Forest", "HerbaceousVegetation": "Herbaceous Vegetation Land",
    "Highway": "Highway or Road", "Industrial": "Industrial Buildings", "Pasture": "Pasture Land",
    "PermanentCrop": "Permanent Crop Land", "Residential": "Residential Buildings", "River": "River",
    "SeaLake": "Sea or Lake",
}


@dataclass(frozen=True)
class Spec:
    image_dir: str          # relative to the dataset folder; split-file paths are relative to it
    split_file: Optional[str]  # None: FGVCAircraft's own text files


DATASETS: Dict[str, Spec] = {
    "caltech101": Spec("101_ObjectCategories", "split_zhou_Caltech101.json"),
    "oxford_pets": Spec("images", "split_zhou_OxfordPets.json"),
    "stanford_cars": Spec("", "split_zhou_StanfordCars.json"),
    "oxford_flowers": Spec("jpg", "split_zhou_OxfordFlowers.json"),
    "food101": Spec("images", "split_zhou_Food101.json"),
    "fgvc_aircraft": Spec("images", None),
    "sun397": Spec("SUN397", "split_zhou_SUN397.json"),
    "dtd": Spec("images", "split_zhou_DescribableTextures.json"),
    "eurosat": Spec("2750", "split_zhou_EuroSAT.json"),
    "ucf101": Spec("UCF-101-midframes", "split_zhou_UCF101.json"),
}
SPLITS = ("train", "val", "test")


def _clean(dataset: str, name: str) -> str:
    name = EUROSAT_NAMES.get(name, name) if dataset == "eurosat" else name
    return name.replace("_", " ")


class CoOpDataModule(FewShotDataModule):
    """One of ``DATASETS`` under ``root`` (CoOp's folder for it); its test split is the ID eval set."""

    def __init__(self, dataset: str, root: str, **kwargs):
        super().__init__(**kwargs)
        if dataset not in DATASETS:
            raise ConfigError(f"unknown CoOp dataset {dataset!r}; choose from {sorted(DATASETS)}")
        self.dataset, self.root, self.spec = dataset, Path(root), DATASETS[dataset]
        self._images = ImageFolder(self.root / self.spec.image_dir)
        self._data: Optional[Tuple[Dict[str, list], List[str]]] = None

    def _fail(self, path, problem: str):
        layout = (f"{self.root}/{self.spec.image_dir or '<image folders>'} and "
                  + (f"{self.root}/{self.spec.split_file}" if self.spec.split_file else
                     f"{self.root}/images_variant_{{train,val,test}}.txt and {self.root}/variants.txt"))
        raise ConfigError(f"{self.dataset}: {path} {problem}. Expected {layout}. Get it from {SOURCE}, then "
                          f"set data_dir (or $SAFT_DATA_DIR) or dataset.datamodule.root")

    def check(self) -> None:
        if not (self.root / self.spec.image_dir).is_dir():
            self._fail(self.root / self.spec.image_dir, "does not exist")
        self.data()

    def data(self):
        """``({split: [(relative path, label)]}, classnames)``, read once."""
        if self._data is None:
            self._data = self._read_split_file() if self.spec.split_file else self._read_aircraft()
        return self._data

    def _read_split_file(self):
        path = self.root / self.spec.split_file
        if not path.is_file():
            self._fail(path, "does not exist")
        try:
            raw = json.loads(path.read_text())
            names = {}
            splits = {}
            for split in SPLITS:
                splits[split] = []
                for relpath, label, classname in raw[split]:
                    names[int(label)] = _clean(self.dataset, classname)
                    splits[split].append((relpath, int(label)))
        except (ValueError, KeyError, TypeError) as e:
            self._fail(path, f"is not a CoOp split file ({{'train'|'val'|'test': [[path, label, classname], "
                             f"...]}}): {type(e).__name__}: {e}")
        if sorted(names) != list(range(len(names))):
            self._fail(path, "has labels that are not 0..n-1")
        return splits, [names[i] for i in range(len(names))]

    def _read_aircraft(self):
        variants_path = self.root / "variants.txt"
        if not variants_path.is_file():
            self._fail(variants_path, "does not exist")
        classnames = [line.strip() for line in variants_path.read_text().splitlines() if line.strip()]
        index = {name: i for i, name in enumerate(classnames)}
        splits = {}
        for split in SPLITS:
            path = self.root / f"images_variant_{split}.txt"
            if not path.is_file():
                self._fail(path, "does not exist")
            splits[split] = []
            for line in path.read_text().splitlines():
                image_id, _, variant = line.strip().partition(" ")
                if variant not in index:
                    self._fail(path, f"names variant {variant!r}, which is not in variants.txt")
                splits[split].append((f"{image_id}.jpg", index[variant]))
        return splits, classnames

    def all_classnames(self) -> List[str]:
        return self.data()[1]

    def templates(self):
        return COOP[self.dataset]

    def load_image(self, key: str):
        return self._images(key)

    def pools(self):
        splits = self.data()[0]
        return {"train": splits["train"], "val": splits["val"]}

    def build_eval_sets(self) -> List[EvalSet]:
        return [EvalSet(self.dataset, self.data()[0]["test"], self.all_classnames(), self.templates(),
                        self._images)]
