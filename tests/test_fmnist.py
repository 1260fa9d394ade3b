"""The CPU benchmark on a scaled-down scale: styles, captions, data sources, pretraining and its cache."""
import hashlib
import json
import math
import shutil
from collections import Counter

import numpy as np
import pytest
import pytorch_lightning as pl
import torch
from numpy.lib.stride_tricks import sliding_window_view
from omegaconf import OmegaConf
from PIL import Image, ImageFilter, ImageOps

from conftest import compose_cfg, read_results, run_script
from datamodules import fmnist_styles as fm
from datamodules.base import key_rng
from saft.app import pretrain as P
from saft.app.clip import MAX_LOGIT_SCALE, load_clip
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


def _pretraining_module(name, lr=1e-3, steps=10):
    model, _, _, tokenizer = load_clip(name, None, init_seed=0)
    tokens = tokenizer([fm.caption(s, c) for s in fm.STYLES for c in fm.CLASSNAMES])
    return P.ContrastivePretraining(model, tokens, lr=lr, steps=steps, warmup=1)


def test_pretraining_decays_exactly_what_open_clip_decays():
    """open_clip's trainer (src/open_clip_train/main.py): no weight decay where p.ndim < 2 or the name holds
    bn, ln, bias or logit_scale; weight decay on every other trained parameter. The benchmark's own model."""
    module = _pretraining_module("saft-fmnist")
    optimizer = module.configure_optimizers()["optimizer"]
    decay_of = {}
    for group in optimizer.param_groups:
        for p in group["params"]:
            assert id(p) not in decay_of, "a parameter in two groups"
            decay_of[id(p)] = group["weight_decay"]
    names = dict(module.model.named_parameters())
    expected = {}
    for n, p in names.items():
        if n == "token_embedding.weight":
            continue  # frozen at its random init (saft/app/pretrain.py says why)
        excluded = p.ndim < 2 or any(s in n for s in ("bn", "ln", "bias", "logit_scale"))
        expected[n] = 0.0 if excluded else 0.1
    assert {n: decay_of.get(id(p)) for n, p in names.items() if id(p) in decay_of} == expected
    assert not names["token_embedding.weight"].requires_grad and id(names["token_embedding.weight"]) not in decay_of
    # The rule as it reads on this model's names, so that a rule that agrees with itself but not with open_clip fails.
    assert expected["logit_scale"] == 0.0 and expected["ln_final.weight"] == 0.0
    assert expected["visual.transformer.resblocks.0.attn.in_proj_bias"] == 0.0
    assert expected["visual.class_embedding"] == 0.0  # a vector: ndim 1
    assert expected["visual.conv1.weight"] == expected["positional_embedding"] == expected["text_projection"] == 0.1
    assert 0 < sum(v == 0.0 for v in expected.values()) < len(expected)


def test_the_temperature_learns_during_a_short_pretraining(pretrained):
    """The fixture's 300 steps move exp(logit_scale) away from CLIP's init of 1/0.07, within the clamp."""
    path, _, _ = pretrained
    learned = torch.load(path, weights_only=True)["state_dict"]["logit_scale"].item()
    initial = load_clip("saft-tiny", None)[0].logit_scale.item()
    assert initial == pytest.approx(math.log(1 / 0.07))
    assert abs(learned - initial) > 1e-3 and 0 <= learned <= MAX_LOGIT_SCALE, (math.exp(initial), math.exp(learned))


class _RecordScale(pl.Callback):
    """The stored logit_scale after each step (a callback's on_train_batch_end runs after the optimizer step)."""

    def __init__(self):
        self.after_step = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.after_step.append(pl_module.model.logit_scale.detach().clone())


def _fit(module, steps):
    """``steps`` optimizer steps of ``module`` on random images and captions, as pretrain() trains it."""
    g = torch.Generator().manual_seed(0)
    data = torch.utils.data.TensorDataset(torch.randn(8 * steps, 3, 32, 32, generator=g),
                                          torch.randint(0, len(module.tokens), (8 * steps,), generator=g))
    record = _RecordScale()
    trainer = pl.Trainer(max_steps=steps, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                         enable_model_summary=False, enable_progress_bar=False, gradient_clip_val=1.0,
                         callbacks=[record])
    trainer.fit(module, torch.utils.data.DataLoader(data, batch_size=8))
    assert len(record.after_step) == steps
    return record.after_step


def test_the_temperature_moves_by_its_gradient_alone():
    """No weight decay on logit_scale: with its gradient held at 0, AdamW at lr 0.5 leaves the stored value bit
    for bit (a decay of 0.1 would shrink it 5% a step), while the decayed weights do move."""
    module = _pretraining_module("saft-tiny", lr=0.5)
    scale, proj = module.model.logit_scale, module.model.visual.proj
    before, proj_before = scale.detach().clone(), proj.detach().clone()
    scale.register_hook(torch.zeros_like)
    assert all(torch.equal(v, before) for v in _fit(module, 3))
    assert not torch.equal(proj.detach(), proj_before)


@pytest.mark.parametrize("start, push, bound", [(MAX_LOGIT_SCALE - 0.01, -1.0, MAX_LOGIT_SCALE), (0.01, 1.0, 0.0)],
                         ids=["at ln 100", "at 0"])
def test_the_stored_temperature_is_clamped_after_every_step(start, push, bound):
    """open_clip clamps logit_scale in place to [0, ln 100] right after optimizer.step
    (src/open_clip_train/train.py). A gradient forced to push it past the bound with lr 1 (AdamW's first steps
    move it by about lr): the stored parameter, read after each step, sits on the bound."""
    module = _pretraining_module("saft-tiny", lr=1.0)
    scale = module.model.logit_scale
    with torch.no_grad():
        scale.fill_(start)
    scale.register_hook(lambda g: torch.full_like(g, push))  # whatever the loss says: towards the bound
    on_bound = torch.tensor(bound, dtype=scale.dtype).expand_as(scale)
    after_step = _fit(module, 3)
    assert all(torch.equal(v, on_bound) for v in after_step), after_step
    assert torch.equal(scale.detach(), on_bound)


def test_a_cache_built_by_the_old_recipe_is_never_read(tmp_path, monkeypatch):
    """The cache file's name hashes the recipe's version too, with or without a ``version`` key in the spec,
    so no file named by the old hash (of the spec alone) matches any spec; an old version is refused."""
    monkeypatch.setenv("SAFT_CACHE_DIR", str(tmp_path))
    cfg = compose_cfg(tmp_path / "run", ["model=fmnist_clip"])
    spec = {k: v for k, v in OmegaConf.to_container(cfg.model.pretrain, resolve=True).items() if k != "data_dir"}
    assert spec["version"] == P.RECIPE_VERSION == 2
    old_spec = {k: v for k, v in spec.items() if k != "version"}  # the block as it was before version 2
    for name, s in (("saft-fmnist", old_spec), ("saft-tiny", {"steps": 300, "lr": 3e-3, "seed": 0})):
        old_digest = hashlib.sha256(json.dumps({"arch": name, **s}, sort_keys=True).encode()).hexdigest()[:12]
        assert P.cache_path(name, s) != tmp_path / f"{name}-{old_digest}.pt"
    assert P.cache_path("saft-fmnist", spec) == P.cache_path("saft-fmnist", old_spec)  # version 2 is the default
    assert P.cache_path("saft-fmnist", {**spec, "version": 1}) != P.cache_path("saft-fmnist", spec)
    with pytest.raises(ConfigError, match="model.pretrain.version=1"):
        P.resolve_pretrained({"name": "saft-fmnist", "pretrained": "auto", "pretrain": {**spec, "version": 1,
                                                                                       "data_dir": str(tmp_path)}})


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


def _load_after(barrier, data_dir):
    barrier.wait()
    return fm.load_fashion_mnist(data_dir)[0].sum()


def test_concurrent_first_jobs_unpack_the_data_side_by_side(arrays, tmp_path):
    """The first jobs of a parallel sweep unpack Debian's files into one empty data_dir at the same time: each
    writes its own temporary files, so none finds its file renamed away by another."""
    import multiprocessing as mp
    ctx = mp.get_context("spawn")  # a forked child of a process that ran torch can hang in torch's thread pool
    barrier = ctx.Manager().Barrier(3)
    with ctx.Pool(3) as pool:
        sums = pool.starmap(_load_after, [(barrier, str(tmp_path))] * 3)
    assert sums == [arrays[0].sum()] * 3
    assert not list((tmp_path / "FashionMNIST" / "raw").glob("*.tmp"))
