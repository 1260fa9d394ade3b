"""The pure mask math: exact k, deterministic ties, each score and scope, random masks, statistics."""
import math
from fractions import Fraction

import pytest
import torch

from saft import mask as M


def _scores(seed=0):
    g = torch.Generator().manual_seed(seed)
    return {"visual.conv1.weight": torch.rand(4, 3, 2, 2, generator=g),
            "visual.transformer.resblocks.0.attn.in_proj_weight": torch.rand(12, 4, generator=g),
            "token_embedding.weight": torch.rand(50, 4, generator=g),
            "ln_final.bias": torch.rand(4, generator=g)}


def _reference_global(scores, k):
    """Brute force: every (value, tensor, index), by value descending, then tensor order, then index."""
    entries = [(-v, t, i) for t, s in enumerate(scores.values()) for i, v in enumerate(s.flatten().tolist())]
    names = list(scores)
    out = {}
    for _, t, i in sorted(entries)[:k]:
        out.setdefault(names[t], []).append(i)
    return {n: sorted(idx) for n, idx in out.items()}


def _reference_split(sizes, k):
    """k split by size with the largest remainder method in exact arithmetic; equal remainders go to the
    earlier tensor."""
    total = sum(sizes.values())
    quotas = [Fraction(k * size, total) for size in sizes.values()]
    ks = [int(q) for q in quotas]
    for i in sorted(range(len(ks)), key=lambda i: (-(quotas[i] - ks[i]), i))[: k - sum(ks)]:
        ks[i] += 1
    return dict(zip(sizes, ks))


def _reference_per_tensor(scores, k):
    ks = _reference_split({n: s.numel() for n, s in scores.items()}, k)
    out = {n: _reference_global({n: s}, ks[n]).get(n, []) for n, s in scores.items()}
    return {n: idx for n, idx in out.items() if idx}


def _score_dicts():
    """Tensors of different sizes; values that tie a lot, a few ties among continuous values, and all equal."""
    g = torch.Generator().manual_seed(3)
    shapes = {"visual.conv1.weight": (3,), "visual.proj": (2, 5), "positional_embedding": (7,), "logit_scale": (1,),
              "token_embedding.weight": (4, 3, 2)}
    few_values = {n: torch.randint(1, 5, s, generator=g).float() for n, s in shapes.items()}
    continuous = {n: torch.rand(s, generator=g) for n, s in shapes.items()}
    for n in ("visual.proj", "positional_embedding", "token_embedding.weight"):
        continuous[n].view(-1)[1] = 0.5  # a tie in the middle of the ranking, across tensors
    constant = {n: torch.full(s, 2.0) for n, s in shapes.items()}
    return {"few_values": few_values, "continuous": continuous, "constant": constant, "test_scores": _scores()}


def _as_lists(mask):
    return {n: idx.tolist() for n, idx in mask.items()}


@pytest.mark.parametrize("scope", M.SCOPES)
@pytest.mark.parametrize("case", list(_score_dicts()))
def test_selection_is_exactly_the_top_k_of_its_scores(case, scope):
    scores = _score_dicts()[case]
    n = sum(s.numel() for s in scores.values())
    reference = _reference_global if scope == "global" else _reference_per_tensor
    for k in sorted({1, 2, n // 3, n // 2, n - 1, n}):
        mask = M.select_topk(scores, k, scope)
        assert sum(idx.numel() for idx in mask.values()) == k
        assert all(idx.dtype == torch.long for idx in mask.values())
        assert _as_lists(mask) == reference(scores, k), (case, scope, k)


def _per_tensor_counts(sizes, k):
    mask = M.select_topk({n: torch.ones(size) for n, size in sizes.items()}, k, "per_tensor")
    return {n: int(mask[n].numel()) if n in mask else 0 for n in sizes}


def test_per_tensor_split_is_the_largest_remainder_split():
    sizes = {"a": 3, "b": 10, "c": 7, "d": 1, "e": 24}
    for k in range(1, sum(sizes.values()) + 1):
        assert _per_tensor_counts(sizes, k) == _reference_split(sizes, k), k


def test_per_tensor_split_gives_equal_remainders_to_the_earlier_tensor():
    """k / N = 0.1 exactly: remainders 0.8, 0, 0.6, 0.6. The two 0.6 are equal and the earlier tensor gets the
    extra entry (in floating point, 6553.6 - 6553 > 409.6 - 409)."""
    sizes = {"a": 48, "b": 1000, "c": 4096, "d": 65536}
    assert _reference_split(sizes, 7068) == {"a": 5, "b": 100, "c": 410, "d": 6553}
    assert _per_tensor_counts(sizes, 7068) == {"a": 5, "b": 100, "c": 410, "d": 6553}


def test_ties_are_broken_towards_earlier_tensors_and_lower_indices():
    scores = {"a": torch.tensor([1.0, 5.0, 5.0]), "b": torch.tensor([5.0, 5.0, 0.0])}
    mask = M.select_topk(scores, 3, "global")
    assert mask["a"].tolist() == [1, 2] and mask["b"].tolist() == [0]
    constant = {"a": torch.ones(10), "b": torch.ones(10)}
    assert {n: i.tolist() for n, i in M.select_topk(constant, 12, "global").items()} == \
        {"a": list(range(10)), "b": [0, 1]}


def test_num_selected_rounds_and_rejects_impossible_sparsity():
    assert M.num_selected(0.001, 3_385_088) == 3385
    assert M.num_selected(1.0, 17) == 17
    for bad in (0.0, -0.1, 1.5):
        with pytest.raises(ValueError):
            M.num_selected(bad, 100)


def test_scores_match_their_definitions():
    g1 = {"w": torch.tensor([1.0, -2.0, 3.0])}
    g2 = {"w": torch.tensor([-1.0, -2.0, 0.5])}
    expected = {"abs_sum": [0.0, 4.0, 3.5], "sum_abs": [2.0, 4.0, 3.5], "fisher": [2.0, 8.0, 9.25]}
    for score, want in expected.items():
        acc = {}
        M.accumulate_scores(acc, g1, score)
        M.accumulate_scores(acc, g2, score)
        assert M.finalize_scores(acc, score)["w"].tolist() == want
    with pytest.raises(ValueError):
        M.accumulate_scores({}, g1, "nope")


def test_score_choice_changes_the_mask():
    g1 = {"w": torch.tensor([1.0, -2.0, 3.0, 0.1])}
    g2 = {"w": torch.tensor([-1.0, 2.0, -2.9, 0.1])}
    masks = {}
    for score in M.SCORES:
        acc = {}
        for g in (g1, g2):
            M.accumulate_scores(acc, g, score)
        masks[score] = M.select_topk(M.finalize_scores(acc, score), 1)["w"].tolist()
    # |sum g| favours the consistent small gradient; sum |g| and fisher the large noisy ones.
    assert masks == {"abs_sum": [3], "sum_abs": [2], "fisher": [2]}


RANDOM_SEEDS = range(1000)  # fixed: the statistics below are deterministic, not flaky


def _uniformity_failures(draw, shapes, k, seeds=RANDOM_SEEDS):
    """Which checks of "``draw(seed)`` is a uniformly random k-subset" fail over ``seeds``:

    - ``chi2``: X = sum_i (c_i - E)^2 / (S p (1 - p)) * (N - 1) / N over the N per-entry counts c_i (E = S p,
      p = k / N) is ~ chi2 with N - 1 degrees of freedom under uniform k-subsets; both tails at 1e-4
      (Wilson-Hilferty): too large = some entries favoured, too small = too regular to be random;
    - ``entry``: some count more than 5 binomial sds from E (union bound over N entries: ~2e-4);
    - ``tensor``: some tensor's share of the S k picks more than 5 sds (hypergeometric per draw) from
      S k n_t / N."""
    sizes = {n: math.prod(s) for n, s in shapes.items()}
    total, draws = sum(sizes.values()), len(seeds)
    counts = torch.zeros(total, dtype=torch.float64)
    for seed in seeds:
        mask = draw(seed)
        assert sum(idx.numel() for idx in mask.values()) == k
        counts[M.flatten_mask(mask, sizes)] += 1
    p = k / total
    expected, var = draws * p, draws * p * (1 - p)
    x = float(((counts - expected) ** 2).sum()) / var * (total - 1) / total
    df = total - 1
    low, high = (df * (1 - 2 / (9 * df) + z * math.sqrt(2 / (9 * df))) ** 3 for z in (-3.72, 3.72))
    failures = []
    if not low < x < high:
        failures.append("chi2")
    if float((counts - expected).abs().max()) > 5 * math.sqrt(var):
        failures.append("entry")
    offset = 0
    for size in sizes.values():
        share = float(counts[offset:offset + size].sum())
        offset += size
        sd = math.sqrt(draws * k * size / total * (1 - size / total) * (total - k) / (total - 1))
        if abs(share - draws * k * size / total) > 5 * sd:
            failures.append("tensor")
            break
    return failures


def test_random_mask_is_deterministic_per_seed():
    shapes = {n: s.shape for n, s in _scores().items()}
    a = M.select_topk(M.random_scores(shapes, seed=1), 30)
    b = M.select_topk(M.random_scores(shapes, seed=1), 30)
    c = M.select_topk(M.random_scores(shapes, seed=2), 30)
    assert a.keys() == b.keys() and all(torch.equal(a[n], b[n]) for n in a)
    assert _as_lists(a) != _as_lists(c)


def test_random_mask_is_uniform_over_entries_and_tensors():
    shapes = {n: s.shape for n, s in _scores().items()}
    assert _uniformity_failures(lambda seed: M.select_topk(M.random_scores(shapes, seed), 30), shapes, 30) == []


def test_the_uniformity_checks_catch_biased_selectors():
    """The same statistics, with the same seeds, reject selectors that are not uniform."""
    shapes = {n: s.shape for n, s in _scores().items()}
    sizes = {n: math.prod(s) for n, s in shapes.items()}
    total = sum(sizes.values())

    def skewed(seed):  # u ** (1 + 0.3 x): an entry at the end is picked ~20% less often than one at the start
        scores, offset = {}, 0
        for n, s in M.random_scores(shapes, seed).items():
            position = (torch.arange(s.numel()) + offset) / total
            scores[n], offset = s.flatten() ** (1 + 0.3 * position), offset + s.numel()
        return M.select_topk(scores, 30)

    def first_tensor_first(seed):  # the first tensor's entries always outrank the others
        scores = M.random_scores(shapes, seed)
        first = next(iter(scores))
        return M.select_topk({**scores, first: scores[first] + 1}, 30)

    def round_robin(seed):  # every entry equally often, but in a fixed cycle: not random
        flat = torch.sort((seed * 30 + torch.arange(30)) % total).values
        return M.unflatten_mask(flat, sizes)

    assert "chi2" in _uniformity_failures(skewed, shapes, 30)
    assert {"chi2", "entry", "tensor"} <= set(_uniformity_failures(first_tensor_first, shapes, 30))
    assert _uniformity_failures(round_robin, shapes, 30) == ["chi2"]


def test_flatten_unflatten_round_trip():
    scores = _scores()
    sizes = {n: s.numel() for n, s in scores.items()}
    mask = M.select_topk(scores, 40)
    flat = M.flatten_mask(mask, sizes)
    assert flat.numel() == 40
    back = M.unflatten_mask(flat, sizes)
    assert back.keys() == mask.keys() and all(torch.equal(back[n], mask[n]) for n in mask)


def test_eligibility_by_patterns_and_towers():
    assert M.tower_of("visual.conv1.weight") == "image"
    assert M.tower_of("transformer.resblocks.0.ln_1.weight") == "text"
    assert M.tower_of("logit_scale") == "logit_scale"
    assert M.is_eligible("visual.conv1.weight")
    assert not M.is_eligible("visual.conv1.weight", exclude=[r"conv1|embedding"])
    assert M.is_eligible("visual.transformer.resblocks.0.mlp.c_fc.weight", include=[r"resblocks"])
    assert not M.is_eligible("token_embedding.weight", include=[r"resblocks"])


def test_stats_count_per_tower_and_block():
    scores = _scores()
    sizes = {n: s.numel() for n, s in scores.items()}
    mask = {"visual.conv1.weight": torch.tensor([0, 3]), "token_embedding.weight": torch.tensor([5]),
            "visual.transformer.resblocks.0.attn.in_proj_weight": torch.tensor([1, 2, 3])}
    stats = M.mask_stats(mask, sizes)
    assert stats["mask/k"] == 6 and stats["mask/N"] == sum(sizes.values())
    assert stats["mask/tower/image"] == 5 and stats["mask/tower/text"] == 1
    assert stats["mask/block/visual.transformer.resblocks.0"] == 3
    assert stats["mask/block/visual.conv1"] == 2 and stats["mask/block/token_embedding"] == 1


def test_large_selection_is_exact_even_when_the_threshold_sample_misleads():
    """Above 2**20 entries the threshold search samples with a stride; a pattern the stride only ever
    sees one half of must still give the exact top-k."""
    n = 2**21 + 6
    values = torch.full((n,), -5.0)
    values[::2] = 5.0  # every sampled (even) entry is large; the odd ones are small
    values[1::2][:100] = 7.0  # a few large odd entries the sample never sees
    for k in (50, 100, n // 2 + 50, n - 3):
        (idx,) = M.select_topk({"w": values}, k).values()
        assert idx.numel() == k
        assert torch.equal(values[idx].sort(descending=True).values, values.sort(descending=True).values[:k])
