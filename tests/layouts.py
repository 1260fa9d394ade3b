"""Miniature copies of the on-disk layouts researchers have (CoOp's DATASETS.md), built in a temp dir."""
import json
from pathlib import Path

from PIL import Image

from datamodules.coop import DATASETS

# classes by canonical index: tench 0 (in neither A nor R), goldfish 1 (R), stingray 6 (A and R),
# American robin 15 (A); n01580077 (17, in A) exists in the variants but not in classnames.txt.
IMAGENET = {"n01440764": "tench", "n01443537": "goldfish", "n01498041": "stingray", "n01558993": "American robin"}
NOT_IN_RUN = "n01580077"
COOP_FOLDERS = {"caltech101": "caltech-101", "oxford_pets": "oxford_pets", "stanford_cars": "stanford_cars",
                "oxford_flowers": "oxford_flowers", "food101": "food-101", "fgvc_aircraft": "fgvc_aircraft",
                "sun397": "sun397", "dtd": "dtd", "eurosat": "eurosat", "ucf101": "ucf101"}
COOP_CLASSES = ["Apply_Eye_Makeup", "Forest", "boxer", "pizza", "zebra"]  # 5: base = 3, new = 2


def jpeg(path: Path, seed: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (12, 12), ((seed * 37) % 256, (seed * 91) % 256, (seed * 53) % 256)).save(path)


def _folder(root: Path, n: int, start: int = 0):
    for i in range(n):
        jpeg(root / f"img_{i:03d}.jpg", start + i)


def make_imagenet(data: Path, train=6, val=3) -> None:
    root = data / "imagenet"
    root.mkdir(parents=True)
    (root / "classnames.txt").write_text("".join(f"{w} {n}\n" for w, n in IMAGENET.items()))
    for k, wnid in enumerate(IMAGENET):
        _folder(root / "images" / "train" / wnid, train, 100 * k)
        _folder(root / "images" / "val" / wnid, val, 100 * k + 50)
    v2 = data / "imagenetv2" / "imagenetv2-matched-frequency-format-val"
    for index in (0, 1, 6, 15, 17):
        _folder(v2 / str(index), 2, index)
    for wnid in [*IMAGENET, NOT_IN_RUN]:
        _folder(data / "imagenet-sketch" / "images" / wnid, 2)
    for wnid in ("n01498041", "n01558993", NOT_IN_RUN):
        _folder(data / "imagenet-adversarial" / "imagenet-a" / wnid, 3)
    for wnid in ("n01443537", "n01498041"):
        _folder(data / "imagenet-rendition" / "imagenet-r" / wnid, 4)


def make_coop(data: Path, name: str, per_split=(6, 3, 4)) -> None:
    root = data / COOP_FOLDERS[name]
    spec = DATASETS[name]
    images = root / spec.image_dir
    splits = {}
    for split, n in zip(("train", "val", "test"), per_split):
        splits[split] = []
        for label, cls in enumerate(COOP_CLASSES):
            for i in range(n):
                rel = f"{cls}/{split}_{i}.jpg" if spec.split_file else f"{split}{label}{i:02d}.jpg"
                jpeg(images / rel, label * 10 + i)
                splits[split].append([rel, label, cls])
    if spec.split_file:
        (root / spec.split_file).write_text(json.dumps(splits))
    else:  # FGVCAircraft: images/<id>.jpg, images_variant_<split>.txt lines "<id> <variant>"
        (root / "variants.txt").write_text("".join(f"{c.replace('_', ' ')}\n" for c in COOP_CLASSES))
        for split, rows in splits.items():
            (root / f"images_variant_{split}.txt").write_text(
                "".join(f"{rel[:-4]} {cls.replace('_', ' ')}\n" for rel, _, cls in rows))


def make_all(data: Path) -> Path:
    make_imagenet(data)
    for name in COOP_FOLDERS:
        make_coop(data, name)
    return data
