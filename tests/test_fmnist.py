"""The CPU benchmark on a scaled-down scale: styles, captions, data sources, pretraining and its cache."""
import shutil

import numpy as np
import pytest
import torch

from conftest import compose_cfg, read_results, run_script
from datamodules import fmnist_styles as fm
from datamodules.base import key_rng
from saft.app import pretrain as P
from saft.app.clip import load_clip
from saft.errors import ConfigError
from saft.report.tables import main as report_main

WEIGHTS = {"photo": 0.3, "sketch": 0.3, "negative": 0.3, "noisy": 0.05, "painting": 0.05}


@pytest.fixture(scope="module")
def arrays(tmp_path_factory):
    if not fm.DEBIAN_DIR.is_dir():
        pytest.skip("Debian's dataset-fashion-mnist is not installed (.ci/run installs it)")
    return fm.load_fashion_mnist(str(tmp_path_factory.mktemp("fm")))


def test_styles_render_deterministically_and_as_documented(arrays):
    images = arrays[0]
    photo = np.asarray(fm.render(images[0], "photo", key_rng("a")))
    assert photo.shape == (32, 32, 3) and np.array_equal(photo[2:30, 2:30, 0], images[0])
    assert np.array_equal(np.asarray(fm.render(images[0], "negative", key_rng("a"))), 255 - photo)
    for style in fm.STYLES:
        a = np.asarray(fm.render(images[1], style, key_rng(f"k/{style}")))
        b = np.asarray(fm.render(images[1], style, key_rng(f"k/{style}")))
        assert np.array_equal(a, b), style
    painting = [np.asarray(fm.render(images[1], "painting", key_rng(k))) for k in ("x", "y")]
    assert not np.array_equal(*painting)  # the palette is drawn per image
    sketch = np.asarray(fm.render(images[1], "sketch", key_rng("s")))
    assert np.median(sketch) > 200  # dark lines on white


def test_captions_match_labels_and_styles(arrays):
    images, labels = arrays[0][:50], arrays[1][:50]
    data = P.StyledCaptions(images, labels, WEIGHTS, seed=0, length=200, transform=lambda im: np.asarray(im))
    seen_styles = set()
    for i in range(200):
        image, caption_id = data[i]
        style, label = divmod(caption_id, len(fm.CLASSNAMES))
        assert label == labels[i % 50]
        again = fm.render(images[i % 50], fm.STYLES[style], np.random.default_rng())  # style decides the look
        assert image.shape == np.asarray(again).shape
        seen_styles.add(style)
    assert len(seen_styles) >= 3
    assert fm.caption("painting", "coat") == "a painting of a coat."


def test_data_sources_and_the_message_when_there_is_none(arrays, tmp_path, monkeypatch):
    local = tmp_path / "data" / "fashion-mnist"
    local.mkdir(parents=True)
    for f in fm.FILES:
        shutil.copy(fm.DEBIAN_DIR / f"{f}.gz", local)
    monkeypatch.setattr(fm, "DEBIAN_DIR", tmp_path / "nowhere")
    train_images = fm.load_fashion_mnist(str(tmp_path / "data"))[0]
    assert np.array_equal(train_images, arrays[0])
    with pytest.raises(ConfigError, match="apt-get install dataset-fashion-mnist"):
        fm.load_fashion_mnist(str(tmp_path / "empty"))


def test_datamodule_splits_and_eval_sets(arrays, tmp_path):
    dm = fm.FashionStylesDataModule(str(tmp_path), shots=3, test_size=20)
    dm._arrays = arrays
    assert [s.name for s in dm.eval_sets()] == ["painting", "photo", "sketch", "negative", "noisy"]
    assert dm.eval_sets()[2].templates == ("a sketch of a {}.",) and dm.train_templates() == ("a painting of a {}.",)
    assert len(dm.split["train"]) == 30 and all(k.startswith("train/painting/") for k, _ in dm.split["train"])
    assert all(int(k.split("/")[-1]) >= 50000 for k, _ in dm.split["val"])  # val pool: last 10,000


@pytest.fixture(scope="module")
def pretrained(arrays, tmp_path_factory):
    """A short pretraining of the tiny architecture (a few hundred images), through the cache."""
    cache = tmp_path_factory.mktemp("cache")
    spec = {"steps": 300, "batch_size": 64, "lr": 3e-3, "seed": 0, "style_weights": WEIGHTS,
            "train_size": 600, "data_dir": str(tmp_path_factory.mktemp("fm2"))}
    mp = pytest.MonkeyPatch()
    mp.setenv("SAFT_CACHE_DIR", str(cache))
    args = P.resolve_pretrained({"name": "saft-tiny", "pretrained": "auto", "init_seed": 0, "pretrain": spec})
    mp.undo()
    return args["pretrained"], spec, cache


def test_cached_checkpoint_round_trips_through_model_pretrained(pretrained, monkeypatch):
    path, spec, cache = pretrained
    saved = torch.load(path, weights_only=True)["state_dict"]
    model = load_clip("saft-tiny", path)[0]
    assert all(torch.equal(p, saved[n]) for n, p in model.named_parameters())
    assert not torch.equal(model.visual.proj, load_clip("saft-tiny", None)[0].visual.proj)

    def no_retraining(*args, **kwargs):
        raise AssertionError("the cached checkpoint was rebuilt")
    monkeypatch.setattr(P, "pretrain", no_retraining)
    monkeypatch.setenv("SAFT_CACHE_DIR", str(cache))
    again = P.resolve_pretrained({"name": "saft-tiny", "pretrained": "auto", "init_seed": 0, "pretrain": spec})
    assert again["pretrained"] == path


def test_zero_shot_beats_chance_after_pretraining(pretrained, tmp_path):
    path, _, _ = pretrained
    cfg = compose_cfg(tmp_path, ["model=tiny", f"model.pretrained={path}", "method=zeroshot",
                                 "dataset.datamodule.test_size=200", f"data_dir={tmp_path}"])
    from saft.app import run
    cfg.dataset.datamodule.data_dir = str(tmp_path)
    results = run.train(cfg)
    chance = 100 / len(fm.CLASSNAMES)
    pretrained_styles = [results["metrics"][s]["top1"] for s in ("photo", "sketch", "negative")]
    assert sum(pretrained_styles) / 3 > 2.5 * chance, results["metrics"]


def test_tradeoff_experiment_writes_table_and_plot(pretrained, tmp_path):
    path, _, _ = pretrained
    sweep = tmp_path / "sweep"
    run_script("train.py", ["-m", "experiment=fmnist_tradeoff", "model=tiny", f"model.pretrained={path}",
                            "arm=full_ft,saft,saft_no_embed_1pct", "lr_scale=1", "seed=1,2", "shots=2",
                            "trainer.max_steps=3", "dataset.datamodule.test_size=30",
                            "trainer.enable_progress_bar=false", f"data_dir={tmp_path / 'fm'}",
                            f"hydra.sweep.dir={sweep}"])
    runs = [read_results(p.parent) for p in sweep.glob("*/results.json")]
    assert len(runs) == 6 and all(r["zeroshot_metrics"] for r in runs)
    dense = [r for r in runs if r["sparsity"] == 0.01]
    assert len(dense) == 2 and all(r["mask_exclude"] == ["conv1", "embedding"] for r in dense)
    blocks = [k for r in dense for k, count in r["mask"].items() if k.startswith("mask/block/") and count]
    assert blocks and not any("conv1" in k or "embedding" in k for k in blocks)
    report_main([str(sweep), "--out", str(tmp_path / "report")])
    summary = (tmp_path / "report" / "report.md").read_text()
    assert "| full_ft |" in summary and "painting" in summary and "matched ID" in summary
    assert "| saft, sparsity=0.001, mask_exclude=[] |" in summary
    assert "| saft, sparsity=0.01, mask_exclude=['conv1', 'embedding'] |" in summary
    assert (tmp_path / "report" / "id_vs_ood.png").stat().st_size > 5000
