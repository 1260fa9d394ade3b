"""Sparse weight gradients: autograd forms only the k selected entries' gradients of each masked tensor.

Each masked parameter gets a *leaf*, a tensor of its k selected entries whose ``.grad`` receives exactly their
gradients (the optimizer reads it; clipping, gradient scaling and ``zero_grad`` see it). While
:class:`SparseGradients` is entered (a torch function mode, around each training batch), every op that reads a
masked parameter with grad enabled reads it detached, so autograd never forms its dense gradient:

- ``linear``, ``conv2d`` as a patch embedding (stride = kernel, no padding, one group) and ``embedding`` then add
  the k entries' gradients from their input and output gradient (:func:`matrix_entries_grad`: the selected entries alone, or a GEMM over the
  selected rows or columns, whichever costs less);
- any other op (``layer_norm``, a matmul with a projection, an addition, the stock attention) reads a view whose
  backward gathers the k entries from that op's dense gradient, a transient freed at once.

The input gradients are the stock ops' own. Entries outside the mask get no gradient at all. The weight
gradients differ from the dense ones by float rounding only (another summation order). Not covered: gradient
checkpointing (its recomputation runs outside the mode) and custom autograd Functions applied to a masked
tensor; both leave a dense ``.grad`` on it, which :meth:`SparseGradients.check` reports.
"""
from typing import Dict, Optional

import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode

# A product gathered entry by entry costs about this many multiply-adds of a GEMM (measured on a 2-core CPU,
# 2 threads, 1,576 x 768 inputs: 600 entries 1.25 ms, the dense 768 x 768 weight gradient 5.6 ms).
ENTRY_COST = 200
_ROW_BLOCK = 128
_CHUNK_ELEMENTS = 1 << 20  # a gathered product's transient: at most 1 M elements (4 MB) per block


class Leaf:
    """The k selected entries ``idx`` (sorted flat indices) of ``param``, viewed as a (rows, cols) matrix the way
    linear, conv2d and embedding read their weight; ``values.grad`` receives those entries' gradients."""

    def __init__(self, param: nn.Parameter, idx: torch.Tensor):
        self.param, self.idx = param, idx.to(param.device)
        self.values = torch.zeros(idx.numel(), dtype=param.dtype, device=param.device, requires_grad=True)
        width = param[0].numel() if param.dim() > 1 else 1
        self.shape = (param.shape[0] if param.dim() else 1, width)
        self.rows, self.cols = self.idx // width, self.idx % width
        self.row_set, self.row_pos = torch.unique(self.rows, return_inverse=True)
        self.col_set, self.col_pos = torch.unique(self.cols, return_inverse=True)
        self._table: Optional[torch.Tensor] = None

    def embedding_rows(self) -> torch.Tensor:
        """Position of each embedding row among the selected rows (-1: no selected entry)."""
        if self._table is None:
            self._table = torch.full((self.shape[0],), -1, dtype=torch.long, device=self.idx.device)
            self._table[self.row_set] = torch.arange(len(self.row_set), device=self.idx.device)
        return self._table


WAYS = ("entries", "rows", "cols")


def matrix_entries_grad(leaf: Leaf, grad_out: torch.Tensor, inputs: torch.Tensor,
                        way: Optional[str] = None) -> torch.Tensor:
    """The selected entries of ``grad_out.T @ inputs`` ((M, rows) and (M, cols) -> the k values), computed
    one of three ways (``way=None``: the cheapest): entry by entry, or a GEMM over only the selected rows or
    only the selected columns."""
    k = leaf.idx.numel()
    rows, cols = leaf.shape
    if way is None:
        costs = {"entries": ENTRY_COST * k, "rows": len(leaf.row_set) * cols, "cols": rows * len(leaf.col_set)}
        way = min(costs, key=costs.get)
    if way == "rows":
        g = grad_out if len(leaf.row_set) == rows else grad_out.index_select(1, leaf.row_set)
        return (g.t() @ inputs)[leaf.row_pos, leaf.cols]
    if way == "cols":
        x = inputs if len(leaf.col_set) == cols else inputs.index_select(1, leaf.col_set)
        return (grad_out.t() @ x)[leaf.rows, leaf.col_pos]
    # Blocks of rows keep the gathered products in cache on a CPU (3-4x faster than one pass over 1,576 rows);
    # gather with an expanded index is several times faster than index_select.
    m = grad_out.shape[0]
    block = m if grad_out.is_cuda else _ROW_BLOCK
    step = max(1, _CHUNK_ELEMENTS // block)
    out = torch.zeros(k, dtype=torch.float32, device=grad_out.device)
    for s in range(0, k, step):
        rows, cols = leaf.rows[s:s + step], leaf.cols[s:s + step]
        for b in range(0, m, block):
            g, x = grad_out[b:b + block], inputs[b:b + block]
            out[s:s + step] += (torch.gather(g, 1, rows.expand(len(g), -1)).float()
                                * torch.gather(x, 1, cols.expand(len(x), -1)).float()).sum(0)
    return out


def _linear_grad(leaf: Leaf, grad: torch.Tensor, x: torch.Tensor, _settings) -> torch.Tensor:
    return matrix_entries_grad(leaf, grad.reshape(-1, grad.shape[-1]), x.reshape(-1, x.shape[-1]).to(grad.dtype))


def _conv2d_grad(leaf: Leaf, grad: torch.Tensor, x: torch.Tensor, settings) -> torch.Tensor:
    stride, padding, dilation = settings
    kernel = leaf.param.shape[2:]
    patches = F.unfold(x.to(grad.dtype), kernel, dilation=dilation, padding=padding, stride=stride)  # (N, C*kh*kw, L)
    return matrix_entries_grad(leaf, grad.flatten(2).transpose(1, 2).reshape(-1, grad.shape[1]),
                               patches.transpose(1, 2).reshape(-1, patches.shape[1]))


def _embedding_grad(leaf: Leaf, grad: torch.Tensor, ids: torch.Tensor, padding_idx) -> torch.Tensor:
    """Only the rows both read and selected are summed (a CLIP's prompts read a few dozen of 49,408)."""
    ids, grad = ids.reshape(-1), grad.reshape(-1, grad.shape[-1])
    where = leaf.embedding_rows()[ids]  # position among the selected rows, -1: no selected entry
    keep = where >= 0 if padding_idx is None else (where >= 0) & (ids != padding_idx)
    read, position = torch.unique(where[keep], return_inverse=True)
    if not len(read):  # the batch reads none of the selected rows
        return torch.zeros(leaf.idx.numel(), dtype=grad.dtype, device=grad.device)
    sums = torch.zeros(len(read), grad.shape[1], dtype=grad.dtype, device=grad.device)
    sums.index_add_(0, position, grad[keep])
    of_entry = torch.full((len(leaf.row_set),), -1, dtype=torch.long, device=grad.device)
    of_entry[read] = torch.arange(len(read), device=grad.device)
    of_entry = of_entry[leaf.row_pos]
    values = sums[of_entry.clamp(min=0), leaf.cols]
    return torch.where(of_entry >= 0, values, torch.zeros((), dtype=values.dtype, device=values.device))


_GRADS = {"linear": _linear_grad, "conv2d": _conv2d_grad, "embedding": _embedding_grad}


class _EntriesGrad(torch.autograd.Function):
    """Identity on an op's output; its backward adds the op's selected weight entries' gradients to the leaf. The
    output is a copy, not a view, so later in-place ops on it (``ReLU(inplace=True)``, ``+=``) are allowed."""

    @staticmethod
    def forward(ctx, out, values, saved, leaf, kind, settings):
        ctx.save_for_backward(saved)
        ctx.leaf, ctx.kind, ctx.settings = leaf, kind, settings
        return out.clone()

    @staticmethod
    def backward(ctx, grad):
        saved, = ctx.saved_tensors
        entries = _GRADS[ctx.kind](ctx.leaf, grad, saved, ctx.settings).to(ctx.leaf.values.dtype)
        return grad, entries, None, None, None, None


class _Gathered(torch.autograd.Function):
    """The parameter as it is; its backward keeps the k selected entries of the dense gradient it receives."""

    @staticmethod
    def forward(ctx, param, values, leaf):
        ctx.leaf = leaf
        return param.view_as(param)

    @staticmethod
    def backward(ctx, grad):
        return None, grad.reshape(-1)[ctx.leaf.idx].to(ctx.leaf.values.dtype), None


def _pair(value):
    return value if isinstance(value, str) else tuple(value) if isinstance(value, (tuple, list)) else (value, value)


def _arg(args, kwargs, position: int, name: str, default=None):
    return args[position] if len(args) > position else kwargs.get(name, default)


class SparseGradients(TorchFunctionMode):
    """``with SparseGradients(leaves):`` ops that read a masked parameter send its k entries' gradients to
    ``leaves[param].values.grad`` and form no dense gradient for it. ``leaves``: ``{param: Leaf}``."""

    def __init__(self, leaves: Dict[nn.Parameter, Leaf]):
        super().__init__()
        self.leaves = {id(p): leaf for p, leaf in leaves.items()}
        self.params = list(leaves)

    def check(self) -> None:
        """After a backward: no masked tensor may hold a dense gradient (it reached it outside the routing, and
        its k entries would not receive it)."""
        escaped = sum(p.grad is not None for p in self.params)
        if escaped:
            raise RuntimeError(f"sparse gradients: {escaped} masked tensors got a dense gradient outside "
                               f"saft.sparse_grad's routing (gradient checkpointing? a custom autograd Function?), "
                               f"which their k entries would not receive; use dense gradients "
                               f"(method.mask.sparse_grads=false, SparseMaskCallback(sparse_grads=False))")

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if not torch.is_grad_enabled():
            return func(*args, **kwargs)
        if getattr(func, "__name__", "") == "__get__":  # an attribute: .shape, .grad as they are; .T, .mT read it
            out = func(*args, **kwargs)
            if isinstance(out, torch.Tensor) and out.requires_grad and args and id(args[0]) in self.leaves:
                return func(self._gathered(args[0]))
            return out
        routed = self._entries_op(func, args, kwargs)
        if routed is not None:
            return routed
        return func(*[self._gathered(a) for a in args], **{k: self._gathered(v) for k, v in kwargs.items()})

    def _entries_op(self, func, args, kwargs):
        if func is F.linear:
            kind, weight, settings = "linear", _arg(args, kwargs, 1, "weight"), None
        elif func is F.conv2d:  # a patch embedding (stride = kernel, no padding): its unfold is the input itself
            kind, weight = "conv2d", _arg(args, kwargs, 1, "weight")
            settings = tuple(_pair(_arg(args, kwargs, i, n, d)) for i, n, d in
                             ((3, "stride", 1), (4, "padding", 0), (5, "dilation", 1)))
            if (_arg(args, kwargs, 0, "input").dim() != 4 or _arg(args, kwargs, 6, "groups", 1) != 1
                    or settings != (tuple(weight.shape[2:]), (0, 0), (1, 1))):
                return None  # another conv: its unfold would be kernel-size times the input; gathered instead
        elif func is F.embedding:
            kind, weight = "embedding", _arg(args, kwargs, 1, "weight")
            settings = _arg(args, kwargs, 2, "padding_idx")
            if _arg(args, kwargs, 3, "max_norm") is not None or _arg(args, kwargs, 5, "scale_grad_by_freq", False):
                return None
            if settings is not None and settings < 0:
                settings += weight.shape[0]
        else:
            return None
        leaf = self.leaves.get(id(weight))
        if leaf is None:
            return None
        args = list(args)
        if len(args) > 1:
            args[1] = weight.detach()
        else:
            kwargs = dict(kwargs, weight=weight.detach())
        args = [self._gathered(a) for a in args]  # e.g. a masked bias beside the weight
        kwargs = {k: self._gathered(v) for k, v in kwargs.items()}
        out = func(*args, **kwargs)
        inputs = args[0] if args else kwargs["input"]
        if inputs.is_floating_point() and inputs.dtype != out.dtype:  # autocast: keep the copy the op computed in
            inputs = inputs.to(out.dtype)
        return _EntriesGrad.apply(out, leaf.values, inputs, leaf, kind, settings)

    def _gathered(self, value):
        if isinstance(value, nn.Parameter):
            leaf = self.leaves.get(id(value))
            return value if leaf is None else _Gathered.apply(value.detach(), leaf.values, leaf)
        if isinstance(value, (list, tuple)) and any(isinstance(v, nn.Parameter) and id(v) in self.leaves
                                                    for v in value):
            return type(value)(self._gathered(v) for v in value)
        return value
