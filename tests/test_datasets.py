"""Every benchmark dataset read from miniature copies of its real layout."""
import json
import shutil

import pytest

from conftest import compose_cfg, read_results, run_script
from datamodules.coop import CoOpDataModule
from datamodules.imagenet import ImageNetDataModule, WNIDS
from layouts import COOP_CLASSES, COOP_FOLDERS, IMAGENET, make_all, make_coop, make_imagenet
from saft.app import run
from saft.errors import ConfigError

VARIANT_DIRS = {"imagenet_v2": "imagenetv2", "imagenet_sketch": "imagenet-sketch",
                "imagenet_a": "imagenet-adversarial", "imagenet_r": "imagenet-rendition"}


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_all(tmp_path_factory.mktemp("data"))


def imagenet(data, **kwargs):
    return ImageNetDataModule(root=str(data / "imagenet"), shots=kwargs.pop("shots", 2),
                              variant_dirs={k: str(data / v) for k, v in VARIANT_DIRS.items()}, **kwargs)


def test_imagenet_classes_labels_and_variants(data):
    dm = imagenet(data)
    dm.check()
    assert dm.all_classnames() == ["tench", "goldfish", "stingray", "American robin"]  # class-index order
    sets = {s.name: s for s in dm.eval_sets()}
    assert list(sets) == ["imagenet", "imagenet_v2", "imagenet_sketch", "imagenet_a", "imagenet_r"]
    assert dm.id_name == "imagenet" and dm.ood_names == list(sets)[1:]
    names = dict(zip(WNIDS, [None] * len(WNIDS))) | IMAGENET
    for s in sets.values():  # every item's folder names the class its label points to
        for key, label in s.items:
            folder = key.split("/")[-2]
            wnid = WNIDS[int(folder)] if folder.isdigit() else folder
            assert s.classnames[label] == names[wnid]
    assert len(sets["imagenet"].items) == 4 * 3 and len(sets["imagenet_v2"].items) == 4 * 2  # folder 17 skipped
    assert sets["imagenet_a"].classnames == ["stingray", "American robin"]  # 200-way head, by wnid
    assert sets["imagenet_r"].classnames == ["goldfish", "stingray"]
    assert len(sets["imagenet_sketch"].classnames) == 4


def test_imagenet_few_shot_counts_validation_and_determinism(data):
    dm, again, other = imagenet(data, shots=2, seed=1), imagenet(data, shots=2, seed=1), imagenet(data, shots=2, seed=2)
    train, val = dm.split["train"], dm.split["val"]
    assert [sum(1 for _, l in train if l == c) for c in range(4)] == [2, 2, 2, 2]
    assert [sum(1 for _, l in val if l == c) for c in range(4)] == [2, 2, 2, 2]  # min(shots, 4), from the rest
    assert not {k for k, _ in train} & {k for k, _ in val}
    assert dm.split == again.split and dm.split != other.split
    big = imagenet(data, shots=16)
    assert len(big.split["train"]) == 4 * 6  # fewer images than shots: all are used (CoOp)


@pytest.mark.parametrize("name", sorted(COOP_FOLDERS))
def test_coop_dataset_names_labels_and_templates(data, name):
    dm = CoOpDataModule(name, str(data / COOP_FOLDERS[name]), shots=4, seed=3)
    dm.check()
    names = dm.all_classnames()
    assert len(names) == 5 and names[0] == "Apply Eye Makeup"
    if name == "eurosat":
        assert names[1] == "Forest"
    assert [sum(1 for _, l in dm.split["train"] if l == c) for c in range(5)] == [4] * 5
    assert [sum(1 for _, l in dm.split["val"] if l == c) for c in range(5)] == [3] * 5  # val pool has 3
    (test,) = dm.eval_sets()
    assert test.name == name and len(test.items) == 5 * 4
    image = test.load(test.items[0][0])
    assert image.size == (12, 12) and image.mode == "RGB"
    assert "{}" in dm.templates()[0]


def test_coop_templates_and_eurosat_renaming(tmp_path):
    make_coop(tmp_path, "eurosat")
    spec = json.loads((tmp_path / "eurosat" / "split_zhou_EuroSAT.json").read_text())
    for split in spec.values():
        for row in split:
            row[2] = {"Forest": "AnnualCrop"}.get(row[2], row[2])
    (tmp_path / "eurosat" / "split_zhou_EuroSAT.json").write_text(json.dumps(spec))
    dm = CoOpDataModule("eurosat", str(tmp_path / "eurosat"))
    assert dm.all_classnames()[1] == "Annual Crop Land"
    assert dm.templates() == ("a centered satellite photo of {}.",)
    assert CoOpDataModule("oxford_pets", "x").templates() == ("a photo of a {}, a type of pet.",)


def test_base_to_new_split_and_relabelling(data):
    dm = CoOpDataModule("dtd", str(data / "dtd"), shots=2, protocol="base2new")
    assert dm.classnames() == ["Apply Eye Makeup", "Forest", "boxer"]
    assert {l for _, l in dm.split["train"]} == {0, 1, 2} and len(dm.split["train"]) == 6
    base, new = dm.eval_sets()
    assert (base.name, new.name) == ("base", "new")
    assert base.classnames == ["Apply Eye Makeup", "Forest", "boxer"] and new.classnames == ["pizza", "zebra"]
    assert {l for _, l in new.items} == {0, 1} and len(new.items) == 2 * 4
    assert all(key.startswith(COOP_CLASSES[3 + l]) for key, l in new.items)  # relabelled from 0


def test_cross_dataset_eval_sets_join_the_run(data, tmp_path):
    cfg = compose_cfg(tmp_path, ["model=tiny", "dataset=imagenet", f"data_dir={data}", "eval_datasets=[dtd,oxford_pets]"])
    dm = run.build_datamodule(cfg)
    names = [s.name for s in dm.eval_sets()]
    assert names[:5] == ["imagenet", "imagenet_v2", "imagenet_sketch", "imagenet_a", "imagenet_r"]
    assert names[5:] == ["dtd", "oxford_pets"]
    dtd = dm.eval_sets()[5]
    assert dtd.load(dtd.items[0][0]).size == (12, 12) and dtd.templates == ("{} texture.",)


def test_saved_split_lists_files_and_can_be_reused(data, tmp_path):
    dm = CoOpDataModule("food101", str(data / "food-101"), shots=3, seed=4)
    dm.save_split(tmp_path / "split.json")
    saved = json.loads((tmp_path / "split.json").read_text())
    assert all(isinstance(k, str) and k.endswith(".jpg") for k, _ in saved["train"])
    again = CoOpDataModule("food101", str(data / "food-101"), shots=3, seed=99, split_file=str(tmp_path / "split.json"))
    assert again.split == dm.split


@pytest.mark.parametrize("breakage, message", [
    (lambda d: None, "does not exist"),
    (lambda d: (d / "dtd" / "images").mkdir(parents=True) or (d / "dtd" / "split_zhou_DescribableTextures.json")
     .write_text("{not json"), "is not a CoOp split file"),
    (lambda d: (d / "dtd" / "images").mkdir(parents=True) or (d / "dtd" / "split_zhou_DescribableTextures.json")
     .write_text(json.dumps({"train": [["a.jpg", 0]], "val": [], "test": []})), "is not a CoOp split file"),
])
def test_missing_or_malformed_coop_layout_is_named(tmp_path, breakage, message):
    breakage(tmp_path)
    with pytest.raises(ConfigError) as err:
        CoOpDataModule("dtd", str(tmp_path / "dtd")).check()
    assert message in str(err.value) and "dtd" in str(err.value) and "DATASETS.md" in str(err.value)


def test_missing_or_malformed_imagenet_is_named(tmp_path):
    with pytest.raises(ConfigError, match="classnames.txt does not exist"):
        imagenet(tmp_path).check()
    make_imagenet(tmp_path)
    (tmp_path / "imagenet" / "classnames.txt").write_text("tench n01440764\n")
    with pytest.raises(ConfigError, match="line 1 is not '<wnid> <class name>'"):
        imagenet(tmp_path).check()


def test_missing_variant_is_named(tmp_path):
    make_imagenet(tmp_path)
    import shutil
    shutil.rmtree(tmp_path / "imagenet-rendition")
    with pytest.raises(ConfigError, match="imagenet_r: .*imagenet-r does not exist.*hendrycks/imagenet-r"):
        imagenet(tmp_path).check()


def test_missing_dataset_stops_train_before_the_model_loads(tmp_path):
    proc = run_script("train.py", ["dataset=oxford_pets", f"data_dir={tmp_path / 'nowhere'}",
                                   "model.name=NoSuchArch", f"hydra.run.dir={tmp_path / 'r'}"], check=False)
    assert proc.returncode == 2 and "oxford_pets" in proc.stderr and "NoSuchArch" not in proc.stderr


def test_eval_and_train_on_every_dataset_end_to_end(data, tmp_path):
    datasets = ["imagenet", *sorted(COOP_FOLDERS)]
    run_script("eval.py", ["-m", f"dataset={','.join(datasets)}", f"data_dir={data}", "model=tiny",
                           "num_workers=0", "trainer.enable_progress_bar=false", f"hydra.sweep.dir={tmp_path / 'eval'}"])
    results = [read_results(p.parent) for p in (tmp_path / "eval").glob("*/results.json")]
    assert sorted(r["dataset"] for r in results) == sorted(datasets)
    for r in results:
        assert r["method"] == "zeroshot" and set(r["metrics"]) == {r["id"], *r["ood"]}
    imagenet_result = next(r for r in results if r["dataset"] == "imagenet")
    assert imagenet_result["ood"] == ["imagenet_v2", "imagenet_sketch", "imagenet_a", "imagenet_r"]
    assert imagenet_result["metrics"]["imagenet_a"]["n"] == 6
    run_script("train.py", ["model=tiny", "dataset=eurosat", "protocol=base2new", "eval_datasets=[dtd]", f"data_dir={data}",
                            "shots=2", "trainer.max_steps=3", "trainer.enable_progress_bar=false", "num_workers=2",
                            f"hydra.run.dir={tmp_path / 'train'}"])
    trained = read_results(tmp_path / "train")
    assert trained["id"] == "base" and trained["ood"] == ["new", "dtd"]
    b, n = trained["metrics"]["base"]["top1"], trained["metrics"]["new"]["top1"]
    assert trained["hm"] == pytest.approx(2 * b * n / (b + n) if b + n else 0.0)
    assert trained["metrics"]["new"]["n"] == 2 * 4 and trained["metrics"]["dtd"]["n"] == 5 * 4


def _image_folder(root, classes=("red_fox", "owl", "cat"), counts=(("train", 5), ("val", 2), ("test", 3))):
    from PIL import Image
    for split, n in counts:
        for label, name in enumerate(classes):
            (root / split / name).mkdir(parents=True)
            for i in range(n):
                Image.new("RGB", (24, 24), (40 * label, 10 * i, 90)).save(root / split / name / f"{i}.png")
    return root


def test_an_image_folder_must_be_named_and_skips_hidden_entries(tmp_path):
    root = _image_folder(tmp_path / "animals")
    proc = run_script("train.py", ["dataset=imagefolder", f"dataset.datamodule.root={root}", "model.name=NoSuchArch",
                                   f"hydra.run.dir={tmp_path / 'r'}"], check=False)
    assert proc.returncode == 2 and "dataset.name=birds" in proc.stderr and "Traceback" not in proc.stderr
    from datamodules.imagefolder import ImageFolderDataModule
    (root / "train" / ".ipynb_checkpoints").mkdir()  # not a class
    (root / "train" / "cat" / "._0.png").write_bytes(b"macOS metadata")  # not an image
    (root / "train" / "cat" / "folder.png").mkdir()
    dm = ImageFolderDataModule(name="animals", root=str(root))
    assert dm.all_classnames() == ["cat", "owl", "red fox"]
    assert sorted(key for key, _ in dm.splits()["train"] if "/cat/" in key) == [f"train/cat/{i}.png" for i in range(5)]


def test_a_folder_of_ones_own_images_trains_and_evaluates_with_config_only(tmp_path):
    root = _image_folder(tmp_path / "animals")
    common = ["model=tiny", "dataset=imagefolder", "dataset.name=animals", "num_workers=0",
              "trainer.enable_progress_bar=false"]
    run_script("train.py", [*common, f"dataset.datamodule.root={root}", "shots=2", "trainer.max_steps=2",
                            "method=lp_ft", f"hydra.run.dir={tmp_path / 'run'}"])
    trained = read_results(tmp_path / "run")
    assert trained["dataset"] == "animals" and trained["id"] == "animals" and trained["ood"] == []
    assert trained["metrics"]["animals"]["n"] == 9
    split = json.loads((tmp_path / "run" / "split.json").read_text())
    assert sorted(label for _, label in split["train"]) == [0, 0, 1, 1, 2, 2]
    assert {path.split("/")[1] for path, _ in split["train"]} == {"red_fox", "owl", "cat"}
    from saft.app.run import read_head_file
    assert read_head_file(tmp_path / "run" / "head.safetensors")["classnames"] == ["cat", "owl", "red fox"]
    run_script("eval.py", [f"run_dir={tmp_path / 'run'}", f"hydra.run.dir={tmp_path / 'eval'}"])
    assert read_results(tmp_path / "eval")["metrics"] == trained["metrics"]


@pytest.mark.parametrize("breakage, message", [
    (lambda root: shutil.rmtree(root / "test"), "test does not exist"),
    (lambda root: shutil.rmtree(root / "val" / "owl"), "has other class folders"),
    (lambda root: [p.unlink() for p in (root / "train" / "cat").iterdir()], "class folders with no images"),
])
def test_a_malformed_image_folder_is_named_before_the_model_loads(tmp_path, breakage, message):
    root = _image_folder(tmp_path / "animals")
    breakage(root)
    proc = run_script("train.py", ["dataset=imagefolder", "dataset.name=animals", f"dataset.datamodule.root={root}",
                                   "model.name=NoSuchArch", f"hydra.run.dir={tmp_path / 'r'}"], check=False)
    assert proc.returncode == 2 and message in proc.stderr and "root/train/<class>/*.jpg" in proc.stderr
    assert "NoSuchArch" not in proc.stderr and "Traceback" not in proc.stderr
