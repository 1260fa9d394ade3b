"""The pure mask math: exact k, deterministic ties, each score and scope, random masks, statistics."""
import pytest
import torch

from saft import mask as M


def _scores(seed=0):
    g = torch.Generator().manual_seed(seed)
    return {"visual.conv1.weight": torch.rand(4, 3, 2, 2, generator=g),
            "visual.transformer.resblocks.0.attn.in_proj_weight": torch.rand(12, 4, generator=g),
            "token_embedding.weight": torch.rand(50, 4, generator=g),
            "ln_final.bias": torch.rand(4, generator=g)}


def _as_bool(mask, scores):
    out = {n: torch.zeros(s.numel(), dtype=torch.bool) for n, s in scores.items()}
    for n, idx in mask.items():
        out[n][idx] = True
    return out


@pytest.mark.parametrize("k", [1, 7, 100, 299])
def test_global_topk_is_exact_and_takes_the_largest(k):
    scores = _scores()
    mask = M.select_topk(scores, k, "global")
    assert sum(i.numel() for i in mask.values()) == k
    flat = torch.cat([s.flatten() for s in scores.values()])
    chosen = torch.cat([scores[n].flatten()[i] for n, i in mask.items()])
    # Independent reference: a full descending sort.
    assert torch.equal(chosen.sort().values, flat.sort(descending=True).values[:k].sort().values)
    for idx in mask.values():
        assert torch.equal(idx, idx.sort().values) and idx.unique().numel() == idx.numel()


def test_ties_are_broken_towards_earlier_tensors_and_lower_indices():
    scores = {"a": torch.tensor([1.0, 5.0, 5.0]), "b": torch.tensor([5.0, 5.0, 0.0])}
    mask = M.select_topk(scores, 3, "global")
    assert mask["a"].tolist() == [1, 2] and mask["b"].tolist() == [0]
    constant = {"a": torch.ones(10), "b": torch.ones(10)}
    assert {n: i.tolist() for n, i in M.select_topk(constant, 12, "global").items()} == \
        {"a": list(range(10)), "b": [0, 1]}


def test_per_tensor_scope_splits_k_by_size_and_sums_to_k():
    scores = _scores()
    for k in (1, 10, 33, 150):
        mask = M.select_topk(scores, k, "per_tensor")
        assert sum(i.numel() for i in mask.values()) == k
        sizes = {n: s.numel() for n, s in scores.items()}
        for n, s in scores.items():
            got = mask.get(n, torch.empty(0, dtype=torch.long)).numel()
            assert abs(got - k * sizes[n] / sum(sizes.values())) < 1
            if got:  # the largest `got` entries of that tensor
                assert torch.equal(s.flatten()[mask[n]].sort().values,
                                   s.flatten().sort(descending=True).values[:got].sort().values)


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


def test_random_mask_is_deterministic_per_seed_and_uniform():
    shapes = {n: s.shape for n, s in _scores().items()}
    a = M.select_topk(M.random_scores(shapes, seed=1), 30)
    b = M.select_topk(M.random_scores(shapes, seed=1), 30)
    c = M.select_topk(M.random_scores(shapes, seed=2), 30)
    assert a.keys() == b.keys() and all(torch.equal(a[n], b[n]) for n in a)
    assert any(n not in c or not torch.equal(a[n], c[n]) for n in a)
    # Uniform: over many seeds each of the N entries is picked ~ 300 * 30 / N times.
    sizes = {n: s.numel() for n, s in _scores().items()}
    counts = torch.zeros(sum(sizes.values()))
    for seed in range(300):
        counts[M.flatten_mask(M.select_topk(M.random_scores(shapes, seed), 30), sizes)] += 1
    assert counts.mean().item() == pytest.approx(300 * 30 / counts.numel())
    assert counts.min() > 10 and counts.max() < 55


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
