"""The CPU benchmark on a scaled-down scale: styles, captions, data sources, pretraining and its cache."""
import shutil
from collections import Counter

import numpy as np
import pytest
import torch
from numpy.lib.stride_tricks import sliding_window_view
from PIL import Image, ImageFilter, ImageOps

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


def _grey(image):
    """The image as an int array, asserting it is grey (R = G = B)."""
    array = np.asarray(image).astype(int)
    assert array.shape == (32, 32, 3) and (array == array[..., :1]).all()
    return array[..., 0]


def _palette_fit(image, grey28):
    """Max residual of each channel as (1 - b) * background + b * foreground, b the blurred grey image,
    with the two colours fitted by least squares: <= 1 for a two-colour painting (uint8 truncation)."""
    padded = ImageOps.expand(Image.fromarray(grey28), border=2, fill=0)
    blurred = np.asarray(padded.filter(ImageFilter.GaussianBlur(1.2)), dtype=np.float64).ravel() / 255
    basis = np.stack([1 - blurred, blurred], 1)
    pixels = np.asarray(image, dtype=np.float64).reshape(-1, 3)
    colours = np.linalg.lstsq(basis, pixels, rcond=None)[0]
    return np.abs(basis @ colours - pixels).max(), colours


def _laplacian(grey):
    """8 x centre - its 8 neighbours (PIL's FIND_EDGES kernel) at the 30 x 30 inner pixels."""
    windows = sliding_window_view(grey, (3, 3))
    return 9 * grey[1:-1, 1:-1] - windows.sum((-1, -2))


def test_styles_render_deterministically_and_as_documented(arrays):
    images = arrays[0]
    for n in range(3):
        photo = _grey(fm.render(images[n], "photo", key_rng(f"a{n}")))
        assert np.array_equal(photo[2:30, 2:30], images[n]) and not photo[:2].any() and not photo[:, 30:].any()
        for style in ("photo", "sketch", "negative"):  # deterministic: the rng does not matter
            assert np.array_equal(np.asarray(fm.render(images[n], style, key_rng(f"a{n}"))),
                                  np.asarray(fm.render(images[n], style, key_rng(f"b{n}")))), style
        # negative: the inverse of the photo
        assert np.array_equal(_grey(fm.render(images[n], "negative", key_rng("x"))), 255 - photo)
        # sketch: dark lines on white where the photo has edges; white wherever it is flat or a valley,
        # whatever its brightness there (so it is not the negative either)
        sketch, edges = _grey(fm.render(images[n], "sketch", key_rng("x"))), _laplacian(photo)
        inner = sketch[1:-1, 1:-1]
        assert (inner[edges <= 0] == 255).all() and (inner[edges >= edges.max() / 2] < 128).all()
        assert np.corrcoef(np.clip(edges, 0, None).ravel(), inner.ravel())[0, 1] < -0.8
        assert np.median(sketch) == 255 and np.abs(sketch - (255 - photo)).mean() > 10
    # Every style: the same key renders the same image.
    for style in fm.STYLES:
        a = np.asarray(fm.render(images[1], style, key_rng(f"k/{style}")))
        b = np.asarray(fm.render(images[1], style, key_rng(f"k/{style}")))
        assert np.array_equal(a, b), style
    # painting: the blurred image on a two-colour palette, drawn per image (per key)
    fits = [_palette_fit(fm.render(images[1], "painting", key_rng(k)), images[1]) for k in ("x", "y")]
    assert all(residual <= 1.0 for residual, _ in fits)
    assert np.abs(fits[0][1] - fits[1][1]).max() > 10
    assert not np.array_equal(np.asarray(fm.render(images[1], "painting", key_rng("x"))),
                              np.asarray(fm.render(images[1], "painting", key_rng("y"))))
    # noisy: grey, Gaussian noise of sigma 0.25 and 15% of the pixels dropped to 0. On the photo's black
    # background a pixel is 0 when dropped or when its noise is negative (0.15 + 0.85 / 2 = 0.575), and the
    # positive noise averages 0.25 * sqrt(2 / pi) = 0.1995; on bright pixels only the drop reaches 0.
    dropped, positive, bright_dropped = [], [], []
    for n in range(20):
        photo = _grey(fm.render(images[n], "photo", key_rng("x")))
        noisy = _grey(fm.render(images[n], "noisy", key_rng(f"noisy/{n}")))
        background = noisy[photo == 0]
        dropped += list(background == 0)
        positive += list(background[background > 0] / 255)
        bright_dropped += list(noisy[photo > 200] == 0)
    assert np.mean(dropped) == pytest.approx(0.575, abs=0.03)
    assert np.mean(positive) == pytest.approx(0.25 * np.sqrt(2 / np.pi), abs=0.015)
    assert np.mean(bright_dropped) == pytest.approx(0.15, abs=0.04)


def _style_of(image, grey28):
    """Which documented style ``image`` is a rendering of ``grey28`` in, decided from the pixels alone."""
    for style in ("photo", "sketch", "negative"):  # deterministic: equal to any rendering of theirs
        if np.array_equal(np.asarray(image), np.asarray(fm.render(grey28, style, np.random.default_rng()))):
            return style
    array = np.asarray(image)
    if not (array == array[..., :1]).all():
        return "painting" if _palette_fit(image, grey28)[0] <= 1.0 else "a colour image that is no painting"
    return "noisy"


def test_captions_match_labels_and_styles(arrays):
    images, labels = arrays[0][:50], arrays[1][:50]
    data = P.StyledCaptions(images, labels, WEIGHTS, seed=0, length=200, transform=lambda im: np.asarray(im))
    seen = Counter()
    for i in range(200):
        image, caption_id = data[i]
        style, label = divmod(caption_id, len(fm.CLASSNAMES))
        assert label == labels[i % 50]  # the caption names the image's class
        assert _style_of(image, images[i % 50]) == fm.STYLES[style], i  # and the style the image is in
        again, again_id = data[i]
        assert np.array_equal(again, image) and again_id == caption_id  # an item is the same every epoch
        seen[fm.STYLES[style]] += 1
    # Styles drawn with WEIGHTS (60, 60, 60, 10, 10 of 200 expected): each count within 4 binomial sds.
    for style, weight in WEIGHTS.items():
        assert abs(seen[style] - 200 * weight) <= 4 * np.sqrt(200 * weight * (1 - weight)), seen
    other = P.StyledCaptions(images, labels, WEIGHTS, seed=1, length=200, transform=np.asarray)
    assert [other[i][1] for i in range(200)] != [data[i][1] for i in range(200)]  # the seed changes the draw
    only_sketch = P.StyledCaptions(images, labels, {"sketch": 1.0}, seed=0, length=20, transform=np.asarray)
    assert {only_sketch[i][1] // len(fm.CLASSNAMES) for i in range(20)} == {fm.STYLES.index("sketch")}
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
    assert len(dense) == 2 and all(r["identity"]["method.mask.exclude"] == ["conv1", "embedding"] for r in dense)
    blocks = [k for r in dense for k, count in r["mask"].items() if k.startswith("mask/block/") and count]
    assert blocks and not any("conv1" in k or "embedding" in k for k in blocks)
    report_main([str(sweep), "--out", str(tmp_path / "report")])
    summary = (tmp_path / "report" / "report.md").read_text()
    assert "| full_ft |" in summary and "painting" in summary and "matched ID" in summary
    assert "| saft, mask.exclude=[], sparsity=0.001 |" in summary
    assert '| saft, mask.exclude=["conv1","embedding"], sparsity=0.01 |' in summary
    assert (tmp_path / "report" / "id_vs_ood.png").stat().st_size > 5000
