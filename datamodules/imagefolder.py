"""Your own images with no Python: ``root/{train,val,test}/<class>/<image>``, class names from the folder names.

The folders of ``train`` are the classes (sorted; ``_`` read as a space, ``red_fox`` -> "red fox"); ``test`` is the ID
eval set and holds the same class folders; ``val`` is optional (without it, validation examples are drawn from the
training images the few-shot draw left).
"""
from pathlib import Path
from typing import Dict, List, Optional, Sequence

from datamodules.base import IMAGE_SUFFIXES, EvalSet, FewShotDataModule, ImageFolder, Item
from saft.errors import ConfigError

LAYOUT = "root/train/<class>/*.jpg and root/test/<class>/*.jpg (root/val/<class>/ optional), one folder per class"


class ImageFolderDataModule(FewShotDataModule):
    def __init__(self, name: str, root: str, prompt_templates: Sequence[str] = ("a photo of a {}.",), **kwargs):
        super().__init__(**kwargs)
        self.name, self.root, self.prompt_templates = name, Path(root), tuple(prompt_templates)
        self._images = ImageFolder(self.root)
        self._splits: Optional[Dict[str, List[Item]]] = None

    def _fail(self, problem: str):
        raise ConfigError(f"dataset {self.name}: {problem}. Expected {LAYOUT}; set dataset.datamodule.root to the "
                          f"folder that holds train/ and test/")

    def check(self) -> None:
        self.splits()

    def splits(self) -> Dict[str, List[Item]]:
        """``{split: [(path relative to root, label)]}``, listed once, in sorted order on every machine."""
        if self._splits is None:
            for split in ("train", "test"):
                if not (self.root / split).is_dir():
                    self._fail(f"{self.root / split} does not exist")
            classes = self._class_folders("train")
            self._splits = {}
            for split in ("train", "val", "test"):
                if split == "val" and not (self.root / split).is_dir():
                    continue
                if self._class_folders(split) != classes:
                    self._fail(f"{self.root / split} has other class folders than {self.root / 'train'} "
                               f"({sorted(set(self._class_folders(split)) ^ set(classes))[:5]})")
                self._splits[split] = [(f"{split}/{c}/{p.name}", label) for label, c in enumerate(classes)
                                       for p in sorted((self.root / split / c).iterdir())
                                       if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file()
                                       and not p.name.startswith(".")]
                empty = [c for label, c in enumerate(classes) if all(item[1] != label for item in self._splits[split])]
                if empty:
                    self._fail(f"{self.root / split} has class folders with no images ({empty[:5]}; images end in "
                               f"{'/'.join(sorted(IMAGE_SUFFIXES))})")
            self._classes = classes
        return self._splits

    def _class_folders(self, split: str) -> List[str]:
        return sorted(p.name for p in (self.root / split).iterdir() if p.is_dir() and not p.name.startswith("."))

    def all_classnames(self) -> List[str]:
        self.splits()
        return [c.replace("_", " ") for c in self._classes]

    def templates(self) -> Sequence[str]:
        return self.prompt_templates

    def load_image(self, key: str):
        return self._images(key)

    def pools(self) -> Dict[str, List[Item]]:
        return {k: v for k, v in self.splits().items() if k != "test"}

    def build_eval_sets(self) -> List[EvalSet]:
        return [EvalSet(self.name, self.splits()["test"], self.all_classnames(), self.templates(), self._images)]
