"""The synthetic data, the few-shot draw, the text heads and the logits."""
import numpy as np
import open_clip
import pytest
import torch

from datamodules.base import EpochSeededSampler, few_shot
from datamodules.synthetic import SHAPES, STYLES, SyntheticDataModule, render
from saft.app.clip import load_clip, text_head, tokenize_prompts
from saft.errors import ConfigError
from saft.app.module import CLIPClassifier, Head


def test_images_are_a_function_of_their_key():
    dm = SyntheticDataModule(shots=2)
    a, b = dm.load_image("test/photo/3"), dm.load_image("test/photo/3")
    assert np.array_equal(np.asarray(a), np.asarray(b))
    assert not np.array_equal(np.asarray(a), np.asarray(dm.load_image("test/photo/9")))


def test_styles_differ_as_documented():
    rng = lambda: np.random.default_rng(0)  # noqa: E731
    photo, sketch, negative = (np.asarray(render("square", s, rng())) for s in STYLES)
    assert np.array_equal(negative, 255 - photo)
    assert set(np.unique(sketch)) <= {0, 255}  # black outline on white
    assert len(np.unique(photo.reshape(-1, 3), axis=0)) == 2  # fill and background


def test_each_class_draws_the_shape_it_names():
    """With the same position and size, filled areas follow geometry: a star or triangle (~1.3 r^2) <
    diamond (1.9) < cross (2.3) < circle (3.1) < square (4.0)."""
    area = {}
    for shape in SHAPES:
        photo = np.asarray(render(shape, "photo", np.random.default_rng(4), size=128)).astype(int)
        area[shape] = (np.abs(photo - photo[0, 0]).sum(-1) > 0).mean()
    assert max(area["star"], area["triangle"]) < area["diamond"] < area["cross"] < area["circle"] < area["square"]
    dm = SyntheticDataModule()
    assert dm.classnames() == list(SHAPES)
    assert [label for _, label in dm.eval_sets()[0].items[:6]] == list(range(6))


def test_few_shot_draw_counts_and_determinism():
    items = [(f"img{i}", i % 5) for i in range(5 * 12)] + [("rare", 5)]
    draw = few_shot(items, 4, seed=1)
    counts = {label: sum(1 for _, l in draw if l == label) for label in range(6)}
    assert counts == {0: 4, 1: 4, 2: 4, 3: 4, 4: 4, 5: 1}  # a label with fewer keeps all it has
    assert draw == few_shot(items, 4, seed=1) != few_shot(items, 4, seed=2)


def test_saved_split_is_reused_exactly(tmp_path):
    dm = SyntheticDataModule(shots=3, seed=5)
    dm.save_split(tmp_path / "split.json")
    again = SyntheticDataModule(shots=3, seed=99, split_file=str(tmp_path / "split.json"))
    wrong = SyntheticDataModule(shots=5, split_file=str(tmp_path / "split.json"))
    with pytest.raises(ConfigError, match="holds 3 training examples per class but shots=5"):
        wrong.split
    assert again.split == dm.split


def test_epoch_sampler_depends_only_on_seed_and_epoch():
    s = EpochSeededSampler(10, seed=3)
    first = list(s)
    s.set_epoch(1)
    second = list(s)
    assert sorted(i for i, _ in first) == list(range(10)) and first != second
    s.set_epoch(0)
    assert list(s) == first == list(EpochSeededSampler(10, seed=3))


@pytest.fixture(scope="module")
def tiny():
    return load_clip("saft-tiny", None, init_seed=0)


def test_seeded_init_is_reproducible(tiny):
    again = load_clip("saft-tiny", None, init_seed=0)[0]
    other = load_clip("saft-tiny", None, init_seed=1)[0]
    for (n, p), q, r in zip(tiny[0].named_parameters(), again.parameters(), other.parameters()):
        assert torch.equal(p, q), n
    assert not all(torch.equal(p, r) for p, r in zip(tiny[0].parameters(), other.parameters()))


def test_training_head_equals_open_clips_and_has_gradients(tiny):
    model, _, _, tokenizer = tiny
    classes, templates = ["cat", "dog", "red square"], ["a photo of a {}.", "a drawing of a {}."]
    ours = text_head(model, tokenize_prompts(tokenizer, classes, templates), len(classes))
    with torch.no_grad():
        reference = open_clip.build_zero_shot_classifier(model, tokenizer, classes, templates)
    torch.testing.assert_close(ours.detach(), reference)
    ours.sum().backward()
    assert model.token_embedding.weight.grad is not None


def test_logits_use_a_clamped_scale(tiny):
    model, _, _, tokenizer = tiny
    module = CLIPClassifier(model, tokenizer)
    head = torch.nn.functional.normalize(torch.randn(64, 3), dim=0)
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        model.logit_scale.fill_(10.0)  # exp(10) would be ~22026
        logits = module(images, Head(head))  # the text head alone: no linear change, no bias
        features = model.encode_image(images, normalize=True)
    torch.testing.assert_close(logits, 100.0 * features @ head)
    assert model.logit_scale.item() == 10.0  # the parameter itself is not rewritten


def test_vit_b16_config_builds_clip_with_quickgelu():
    """model=vit_b16 must compute with QuickGELU, the activation OpenAI's weights were trained with."""
    from open_clip.transformer import QuickGELU
    model = load_clip("ViT-B-16-quickgelu", None)[0]
    acts = [m for m in model.modules() if isinstance(m, QuickGELU)]
    assert len(acts) == 24  # one per residual block of both towers
    assert sum(p.numel() for p in model.parameters()) > 149_000_000
