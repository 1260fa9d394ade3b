"""Sparse weight gradients (``method.mask.sparse_grads``): each masked tensor's k selected entries get the
gradients the dense backward gives them (to float rounding), no dense weight gradient is formed, the input
gradients are the stock ones, and training matches the dense path with every unselected entry bit-exact."""
import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from conftest import FAST, checkpoint, ckpt_masks, ckpt_params, compose_cfg
from saft.app import run
from saft.app.attention import BatchFirstAttention
from saft.optim import MaskedAdamW
from saft.sparse_grad import WAYS, Leaf, SparseGradients, matrix_entries_grad


class Net(nn.Module):
    """Every way a CLIP reads a parameter: a patch conv and a padded conv, an embedding with a padding row,
    linears, both attention paths, a LayerNorm, a bare projection matrix and an additive embedding."""

    def __init__(self):
        super().__init__()
        self.patch = nn.Conv2d(3, 8, 4, stride=4, bias=False)
        self.conv = nn.Conv2d(8, 8, 3, padding=1)
        self.emb = nn.Embedding(30, 8, padding_idx=0)
        self.pos = nn.Parameter(torch.randn(8) / 10)
        self.attn = BatchFirstAttention(8, 2, batch_first=True)
        self.stock = nn.MultiheadAttention(8, 2, batch_first=True)
        self.fc = nn.Linear(8, 16)
        self.ln = nn.LayerNorm(16)
        self.proj = nn.Parameter(torch.randn(16, 4) / 4)

    def forward(self, images, ids):
        x = self.conv(self.patch(images)).flatten(2).transpose(1, 2)
        x = torch.cat([x, self.emb(ids) + self.pos], 1)
        x = x + self.attn(x, x, x, need_weights=False)[0]
        x = x + self.stock(x, x, x, need_weights=False)[0]
        return self.ln(F.gelu(self.fc(x))).mean(1) @ self.proj


def _inputs():
    images = torch.randn(3, 3, 8, 8, requires_grad=True)
    ids = torch.randint(0, 30, (3, 6))
    ids[0, :2] = 0  # the padding row gets no gradient
    return images, ids


def _masks(net, fraction, seed=0):
    g = torch.Generator().manual_seed(seed)
    return {n: torch.randperm(p.numel(), generator=g)[: max(1, int(fraction * p.numel()))].sort().values
            for n, p in net.named_parameters()}


@pytest.mark.parametrize("fraction", [0.05, 0.5, 1.0])
def test_every_op_gives_the_selected_entries_of_the_dense_gradient(fraction):
    torch.manual_seed(0)
    net, (images, ids) = Net(), _inputs()
    loss = net(images, ids).pow(2).sum()
    loss.backward()
    dense = {n: p.grad.clone() for n, p in net.named_parameters()}
    image_grad = images.grad.clone()
    images.grad = None
    net.zero_grad(set_to_none=True)
    masks = _masks(net, fraction)
    leaves = {p: Leaf(p, masks[n]) for n, p in net.named_parameters()}
    with SparseGradients(leaves):
        routed = net(images, ids).pow(2).sum()
    routed.backward()
    assert torch.equal(routed, loss)
    assert torch.equal(images.grad, image_grad)  # the input gradient is the stock ops' own
    for n, p in net.named_parameters():
        assert p.grad is None, n  # no dense weight gradient
        torch.testing.assert_close(leaves[p].values.grad, dense[n].reshape(-1)[masks[n]], rtol=1e-5, atol=1e-6,
                                   msg=n)


@pytest.mark.parametrize("way", WAYS)
@pytest.mark.parametrize("pattern", ["scattered", "two rows", "two columns"])
def test_the_three_ways_agree_with_the_dense_product(way, pattern):
    g, x = torch.randn(50, 12), torch.randn(50, 20)
    weight = nn.Parameter(torch.zeros(12, 20))
    flat = {"scattered": torch.randperm(240)[:30], "two rows": torch.cat([torch.arange(20), torch.arange(100, 120)]),
            "two columns": torch.arange(12) * 20 + 3}[pattern].sort().values
    leaf = Leaf(weight, flat)
    torch.testing.assert_close(matrix_entries_grad(leaf, g, x, way), (g.t() @ x).reshape(-1)[flat], rtol=1e-5,
                               atol=1e-5)


def test_bf16_autocast_matches_the_dense_gradient_to_its_rounding():
    torch.manual_seed(0)
    fc, x = nn.Linear(32, 16), torch.randn(64, 32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        fc(x).float().pow(2).sum().backward()
    idx = torch.randperm(fc.weight.numel())[:20].sort().values
    dense, fc.weight.grad = fc.weight.grad.reshape(-1)[idx], None
    leaf = Leaf(fc.weight, idx)
    with SparseGradients({fc.weight: leaf}), torch.autocast("cpu", dtype=torch.bfloat16):
        out = fc(x)
    out.float().pow(2).sum().backward()
    assert out.dtype == torch.bfloat16 and fc.weight.grad is None
    torch.testing.assert_close(leaf.values.grad, dense, rtol=2e-2, atol=1e-2)


def test_outside_the_mode_or_without_grad_nothing_is_routed():
    fc = nn.Linear(4, 4)
    leaf = Leaf(fc.weight, torch.tensor([0, 5]))
    with SparseGradients({fc.weight: leaf}), torch.no_grad():
        fc(torch.randn(2, 4))
    fc(torch.randn(2, 4)).sum().backward()
    assert leaf.values.grad is None and fc.weight.grad is not None


def test_a_leaf_steps_its_parameter_exactly_as_the_masked_dense_gradient_and_states_interchange():
    torch.manual_seed(0)
    dense_w = nn.Parameter(torch.randn(6, 5))
    sparse_w = nn.Parameter(dense_w.detach().clone())
    idx = torch.tensor([1, 7, 8, 29])
    dense = MaskedAdamW([dense_w], lr=0.1, weight_decay=0.1)
    dense.set_masks({dense_w: idx})
    sparse = MaskedAdamW([sparse_w], lr=0.1, weight_decay=0.1)
    sparse.set_masks({sparse_w: idx})
    leaf = Leaf(sparse_w, idx)
    sparse.use_sparse_gradients({sparse_w: leaf.values})
    for step in range(3):
        grad = torch.randn(6, 5)
        dense_w.grad, leaf.values.grad = grad, grad.reshape(-1)[idx].clone()
        dense.step()
        sparse.step()
        assert torch.equal(dense_w, sparse_w), step
    # The state dict has the same layout either way: a dense run's checkpoint resumes sparse, and back.
    sparse.use_dense_gradients()
    assert sparse.param_groups[0]["params"][0] is sparse_w
    restored = MaskedAdamW([sparse_w], lr=0.1, weight_decay=0.1)
    restored.set_masks({sparse_w: idx})
    restored.use_sparse_gradients({sparse_w: leaf.values})
    restored.load_state_dict(copy.deepcopy(dense.state_dict()))  # as read from a checkpoint
    grad = torch.randn(6, 5)
    dense_w.grad, leaf.values.grad = grad, grad.reshape(-1)[idx].clone()
    dense.step()
    restored.step()
    assert torch.equal(dense_w, sparse_w)


def _train(tmp_path, name, overrides):
    cfg = compose_cfg(tmp_path / name, FAST + list(overrides))
    return run.train(cfg), checkpoint(tmp_path / name)


@pytest.mark.parametrize("scope", ["global", "per_tensor"])
def test_training_matches_the_dense_path_and_keeps_every_unselected_entry(tmp_path, monkeypatch, scope):
    seen = []
    step = MaskedAdamW.step

    def recording_step(self, closure=None):
        loss = step(self, closure)
        seen.append((len(self.targets), [p for p in self.targets.values() if p.grad is not None]))
        return loss
    monkeypatch.setattr(MaskedAdamW, "step", recording_step)
    common = ["sparsity=0.01", f"method.mask.scope={scope}", "eval_zeroshot=false"]
    sparse, sparse_ckpt = _train(tmp_path, "sparse", common)
    assert seen and all(n > 0 and not dense_grads for n, dense_grads in seen)  # leaves used, no dense .grad
    seen.clear()
    dense, dense_ckpt = _train(tmp_path, "dense", common + ["method.mask.sparse_grads=false"])
    assert seen and all(n == 0 for n, _ in seen)
    masks = ckpt_masks(sparse_ckpt)
    assert {n: i.tolist() for n, i in masks.items()} == {n: i.tolist() for n, i in ckpt_masks(dense_ckpt).items()}
    from saft.app.clip import load_clip
    base = {n: p.detach() for n, p in load_clip("saft-tiny", None, 0)[0].named_parameters()}
    a, b = ckpt_params(sparse_ckpt), ckpt_params(dense_ckpt)
    towers = {n.split(".")[0] for n in masks}
    assert scope == "global" or {"visual", "transformer", "token_embedding"} <= towers
    for n, p in base.items():
        outside = torch.ones(p.numel(), dtype=torch.bool)
        if n in masks:
            outside[masks[n]] = False
        assert torch.equal(a[n].reshape(-1)[outside], p.reshape(-1)[outside]), n  # bit-exact
        assert torch.equal(b[n].reshape(-1)[outside], p.reshape(-1)[outside]), n
        if n in masks:
            moved = (a[n] - p).reshape(-1)[masks[n]].abs().max()
            assert moved > 0, n
            # The gradients differ by float rounding (another summation order); Adam steps of ~lr each.
            torch.testing.assert_close(a[n], b[n], rtol=0, atol=1e-6, msg=n)
    assert sparse["metrics"].keys() == dense["metrics"].keys()
    for name in sparse["metrics"]:
        assert abs(sparse["metrics"][name]["top1"] - dense["metrics"][name]["top1"]) <= 100 / dense["metrics"][name]["n"]


def test_the_plain_pytorch_loop_of_the_library_guide_moves_only_the_mask_without_dense_gradients():
    import saft
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3))
    x, y = torch.randn(20, 6), torch.randint(0, 3, (20,))
    loss_fn = lambda m, b: F.cross_entropy(m(b[0]), b[1], reduction="none")  # noqa: E731
    batches = [(x[:10], y[:10]), (x[10:], y[10:])]
    mask = saft.select_mask(model, batches, loss_fn, sparsity=0.1)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    params = dict(model.named_parameters())  # from here, docs/library.md "Sparse weight gradients"
    for name, p in params.items():
        p.requires_grad_(name in mask)
    leaves = {params[n]: Leaf(params[n], idx) for n, idx in mask.items()}
    optimizer = saft.MaskedAdamW.from_mask(model, mask, lr=1e-3)
    optimizer.use_sparse_gradients({p: leaf.values for p, leaf in leaves.items()})
    for batch in batches:
        with SparseGradients(leaves):
            loss = loss_fn(model, batch).mean()
        loss.backward()
        assert all(p.grad is None for p in model.parameters()) and all(leaf.values.grad is not None
                                                                      for leaf in leaves.values())
        optimizer.step()
        optimizer.zero_grad()
    moved = {n: (before[n] != p.detach()).reshape(-1).nonzero().flatten() for n, p in model.named_parameters()}
    assert {n: i.tolist() for n, i in moved.items() if i.numel()} == {n: i.tolist() for n, i in mask.items()}


def test_under_ddp_the_k_gradients_are_averaged_over_ranks_in_one_collective_after_each_backward(monkeypatch):
    """Two ranks: one all-reduce of the k values of every masked tensor, then / world size, as DDP averages dense
    gradients, in on_after_backward (before fp16's scaler looks for infs); a leaf without a gradient sends zeros,
    so every rank sends the same collective, and stays without one if no rank had one (tests/test_entrypoints.py
    runs it on two processes)."""
    import saft.callback as callback
    from saft.callback import SparseMaskCallback
    calls = []

    def all_reduce(tensor):  # the other rank holds the same gradients plus one
        calls.append(tensor.numel())
        tensor.mul_(2).add_(1)
    monkeypatch.setattr(callback, "_distributed", lambda: True)
    monkeypatch.setattr(callback.dist, "all_reduce", all_reduce)
    monkeypatch.setattr(callback.dist, "get_world_size", lambda: 2)
    fc = nn.Linear(4, 4)
    cb = SparseMaskCallback()
    cb._masked = []
    cb._leaves = {fc.weight: Leaf(fc.weight, torch.tensor([0, 3, 9])), fc.bias: Leaf(fc.bias, torch.tensor([2]))}
    grad = torch.randn(3)
    cb._leaves[fc.weight].values.grad = grad.clone()
    cb.on_after_backward(None, None)
    assert calls == [4 + 2]  # k values and a has-gradient flag per leaf, once
    torch.testing.assert_close(cb._leaves[fc.weight].values.grad, grad + 0.5)
    torch.testing.assert_close(cb._leaves[fc.bias].values.grad, torch.tensor([0.5]))  # zeros went out
    # A leaf that no rank gave a gradient keeps none, so the optimizer skips it as on one device.
    monkeypatch.setattr(callback.dist, "all_reduce", lambda tensor: tensor.mul_(2))  # the other rank: the same
    cb._leaves[fc.bias].values.grad = None
    cb.on_after_backward(None, None)
    assert cb._leaves[fc.bias].values.grad is None
    torch.testing.assert_close(cb._leaves[fc.weight].values.grad, grad + 0.5)  # averaged again: unchanged


def test_a_transpose_by_attribute_is_routed_too():
    w = nn.Parameter(torch.randn(3, 4))
    x = torch.randn(5, 3)
    (x @ w).pow(2).sum().backward()
    dense, w.grad = w.grad.reshape(-1).clone(), None
    leaf = Leaf(w, torch.tensor([1, 6, 11]))
    with SparseGradients({w: leaf}):
        out = (x @ w.T.T).pow(2).sum()
    out.backward()
    assert w.grad is None
    torch.testing.assert_close(leaf.values.grad, dense[leaf.idx])


def test_a_dense_gradient_that_escaped_the_routing_stops_training_with_the_fix():
    """Reentrant gradient checkpointing recomputes the forward outside the mode: the weight gets a dense .grad."""
    from torch.utils.checkpoint import checkpoint
    from saft.callback import SparseMaskCallback
    fc = nn.Linear(4, 4)
    leaves = {fc.weight: Leaf(fc.weight, torch.tensor([0, 3]))}
    cb = SparseMaskCallback()
    cb._leaves, cb._routing = leaves, SparseGradients(leaves)
    x = torch.randn(2, 4, requires_grad=True)
    with cb._routing:
        out = checkpoint(fc, x, use_reentrant=True)
    out.sum().backward()
    assert fc.weight.grad is not None
    with pytest.raises(RuntimeError, match="method.mask.sparse_grads=false"):
        cb.on_before_optimizer_step(None, None, None)


def test_selected_embedding_rows_the_batch_does_not_read_get_zero_gradients():
    emb = nn.Embedding(10, 3)
    leaf = Leaf(emb.weight, torch.tensor([4, 25, 29]))  # rows 1, 8 and 9
    with SparseGradients({emb.weight: leaf}):
        out = emb(torch.tensor([[2, 3, 2]]))
    out.sum().backward()
    assert torch.equal(leaf.values.grad, torch.zeros(3))
    with SparseGradients({emb.weight: leaf}):
        out = emb(torch.tensor([[8, 2, 8]]))
    out.sum().backward()
    assert torch.equal(leaf.values.grad, torch.tensor([0.0, 2.0, 0.0]))  # row 8 read twice; row 9 not read


def test_in_place_ops_on_a_routed_output_are_allowed():
    torch.manual_seed(0)
    net, x = nn.Sequential(nn.Linear(4, 5), nn.ReLU(inplace=True)), torch.randn(3, 4)
    net(x).sum().backward()
    dense, net[0].weight.grad = net[0].weight.grad.reshape(-1).clone(), None
    leaf = Leaf(net[0].weight, torch.tensor([0, 7, 19]))
    with SparseGradients({net[0].weight: leaf}):
        out = net(x)  # ReLU(inplace=True) writes the linear's output
    out.sum().backward()
    torch.testing.assert_close(leaf.values.grad, dense[leaf.idx])
