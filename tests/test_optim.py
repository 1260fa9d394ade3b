"""MaskedAdamW: AdamW's update on selected entries, nothing anywhere else, state of size k."""
import pytest
import torch

from saft.optim import MaskedAdamW


def _grads(steps, shape, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=g) for _ in range(steps)]


@pytest.mark.parametrize("weight_decay", [0.0, 0.1])
def test_selected_entries_follow_dense_adamw_exactly(weight_decay):
    init = torch.randn(6, 5, generator=torch.Generator().manual_seed(3))
    idx = torch.tensor([0, 4, 7, 21, 29])
    dense = torch.nn.Parameter(init.clone())
    masked = torch.nn.Parameter(init.clone())
    ref = torch.optim.AdamW([dense], lr=0.01, weight_decay=weight_decay, foreach=False)
    opt = MaskedAdamW([masked], lr=0.01, weight_decay=weight_decay)
    opt.set_masks({masked: idx})
    for g in _grads(7, init.shape):
        dense.grad, masked.grad = g.clone(), g.clone()
        ref.step()
        opt.step()
    assert torch.equal(masked.view(-1)[idx], dense.view(-1)[idx])
    outside = torch.ones(init.numel(), dtype=torch.bool)
    outside[idx] = False
    assert torch.equal(masked.view(-1)[outside], init.view(-1)[outside])
    assert opt.state[masked]["exp_avg"].shape == (5,) and opt.state[masked]["exp_avg_sq"].shape == (5,)


def test_parameters_without_mask_or_grad_are_untouched_and_state_is_sparse():
    a, b = torch.nn.Parameter(torch.ones(10)), torch.nn.Parameter(torch.ones(4))
    opt = MaskedAdamW([a, b], lr=0.1, weight_decay=0.5)
    opt.set_masks({a: torch.tensor([2])})
    a.grad, b.grad = torch.ones(10), torch.ones(4)
    opt.step()
    assert torch.equal(b, torch.ones(4)) and b not in opt.state
    assert (a != 1).nonzero().flatten().tolist() == [2]


def test_state_dict_round_trip_continues_identically():
    init = torch.randn(20)
    idx = torch.tensor([1, 5, 9])
    grads = _grads(6, init.shape, seed=1)
    p1 = torch.nn.Parameter(init.clone())
    o1 = MaskedAdamW([p1], lr=0.05)
    o1.set_masks({p1: idx})
    for g in grads:
        p1.grad = g.clone()
        o1.step()
    p2 = torch.nn.Parameter(init.clone())
    o2 = MaskedAdamW([p2], lr=0.05)
    o2.set_masks({p2: idx})
    for g in grads[:3]:
        p2.grad = g.clone()
        o2.step()
    p3 = torch.nn.Parameter(p2.detach().clone())
    o3 = MaskedAdamW([p3], lr=0.05)
    o3.set_masks({p3: idx})
    o3.load_state_dict(o2.state_dict())
    for g in grads[3:]:
        p3.grad = g.clone()
        o3.step()
    assert torch.equal(p1, p3)


def test_step_before_masks_is_an_error_and_foreign_params_are_rejected():
    p = torch.nn.Parameter(torch.ones(3))
    opt = MaskedAdamW([p])
    p.grad = torch.ones(3)
    with pytest.raises(RuntimeError, match="set_masks"):
        opt.step()
    with pytest.raises(ValueError):
        opt.set_masks({torch.nn.Parameter(torch.ones(2)): torch.tensor([0])})


def test_a_dense_group_is_plain_adamw_beside_the_masked_one():
    """A classifier head beside a masked model (method.head=linear with a mask) trains in full."""
    init = torch.randn(3, 4, generator=torch.Generator().manual_seed(1))
    masked, head, reference = (torch.nn.Parameter(init.clone()) for _ in range(3))
    opt = MaskedAdamW([{"params": [masked]}, {"params": [head], "dense": True}], lr=0.01, weight_decay=0.1)
    ref = torch.optim.AdamW([reference], lr=0.01, weight_decay=0.1, foreach=False)
    opt.set_masks({masked: torch.tensor([5])})
    for g in _grads(4, init.shape):
        masked.grad, head.grad, reference.grad = g.clone(), g.clone(), g.clone()
        opt.step()
        ref.step()
    assert torch.equal(head, reference)
    assert (masked != init).nonzero().tolist() == [[1, 1]]
    with pytest.raises(ValueError, match="either masked or dense"):
        opt.set_masks({head: torch.tensor([0])})


@pytest.mark.parametrize("indices, message", [
    (torch.ones(2, 3, dtype=torch.bool), "not a 1-D tensor of flat integer indices"),
    (torch.tensor([[0, 1]]), "not a 1-D tensor"),
    (torch.tensor([0.0, 1.0]), "not a 1-D tensor"),
    (torch.tensor([0, 6]), r"outside \[0, 6\)"),
    (torch.tensor([-1, 2]), "outside"),
    (torch.tensor([3, 3]), "not sorted without repeats"),
    (torch.tensor([4, 1]), "not sorted without repeats"),
])
def test_from_mask_refuses_a_mask_that_does_not_fit(indices, message):
    model = torch.nn.Linear(3, 2)
    with pytest.raises(ValueError, match=message):
        MaskedAdamW.from_mask(model, {"weight": indices})


def test_from_mask_refuses_entries_of_a_frozen_parameter():
    model = torch.nn.Linear(3, 2)
    model.weight.requires_grad_(False)
    with pytest.raises(ValueError, match="frozen"):
        MaskedAdamW.from_mask(model, {"weight": torch.tensor([1])})
    assert MaskedAdamW.from_mask(model, {"bias": torch.tensor([1])}).masks  # a trainable one is fine
