"""Pooled gates: x times an attention computed from x's global pooling, fast to train on the CPU.

Every gate module is ``x * attention(pool(x))``: pool over the pixels (a channel gate: SE, SPE,
CBAM's first half) or over the channels (a spatial gate: CBAM's second half); IEBN is
``x * scale + shift`` with both from each image's mean and variance (where it trains through its
own C path, modules/iebn.py, it calls the same kernels itself). Written as torch ops, a
gate's training step makes five or six full passes over x beyond the plain block's (the pooling,
the product, the product's two gradients, the pooling's gradient and their sum), and on the CPU
those passes are its whole cost. gate() makes four when training on the CPU: one read pools (max,
min, their positions and the sum together, via fused.py), one write gives the output, and the
backward reads dy and x once for the attention's gradient and writes dx once, with the pooling's
gradient folded in (a constant per row for a mean, one element per row for a max or min). A gate
that ends a block is also handed the block's shortcut (attnbench.residual) and writes
relu(x * scale + shortcut) in that one write, reading the shortcut as it goes, so the block's add
never reads the product back; its backward masks dy by the ReLU in the read that sums the
attention's gradient (the channel-then-spatial pair starts with torch's threshold_backward, the
pass that the block's ReLU would have made anyway).

The block's last batch norm goes into the same passes. Its output y = x * a + b (a, b per channel
from the batch's statistics) has pools that follow from x's: the batch's mean and variance come
from each image's, y's mean and variance from x's through the affine map, y's max from x's max
(or min, where a < 0). The gate then writes x * (a * scale) + b * scale, and the norm's output
(a write, then a read for the pooling and one for the product, each way) is never made: on
ResNet-164 this brought SE from 1.18x to 1.12x of `none` in one process, SPE from 1.15x to 1.11x.
channel_spatial_gate (CBAM) folds the norm into its channel gate the same way.

The attention itself runs as ordinary autograd on the small pooled tensors: its graph is built in
the forward and differentiated inside the backward, as torch.utils.checkpoint does, so a module
gives its attention as a plain function (double backward is not supported). Off the CPU, under
torch.compile or tracing, without a C compiler, or without autograd (evaluation, measure.py's
counter) gate() is those torch ops, so both paths compute the same values for finite inputs;
with ties, the fused max or min gives its gradient to the first tied element, where amax shares
it out.
"""

from __future__ import annotations

import functools
import types
import weakref
from typing import Callable, Iterable, Sequence

import torch
from torch import Tensor, nn
from torch.autograd.function import once_differentiable

from attnbench import fused
from attnbench.norm import BatchNorm2d, running_update
from attnbench.residual import add as add_residual

POOLS = fused.POOLS  # "mean", "var", "max", "min"
DIMS = {"pixels": (2, 3), "channels": (1,)}
Scale = Tensor | tuple[Tensor, Tensor]


def gate(x: Tensor, pools: Sequence[str], attention: Callable[..., Scale], params: Iterable[Tensor] | None = None, *,
         over: str = "pixels", residual: Tensor | None = None, relu: bool = False,
         before: nn.Module | None = None) -> Tensor:
    """x * attention(*pooled), where pooled[i] is pools[i] of x over the pixels, shape (N, C, 1, 1),
    or over the channels, shape (N, 1, H, W): "mean", "var" (the population variance), "max" or
    "min". The attention returns a scale of that same shape, or a (scale, shift) pair for
    x * scale + shift. It is normally a method of the module (or a functools.partial of one),
    whose parameters are then the ones it trains; any other callable gives them as `params`.
    A block's tail comes with it: plus `residual` (x's shape, if given), then a ReLU if `relu`,
    written in the same pass as the product (see attnbench.residual). `before` is a layer to
    apply to x first (the block's last norm, or a pre-activation block's conv): where it is the
    default batch norm in training and the gate over the pixels runs fused, it is folded in (see
    _AfterNorm), and x is read and written as if the gate had no norm before it."""
    if over not in DIMS or not set(pools) <= set(POOLS) or len(set(pools)) != len(pools):
        raise ValueError(f"gate over {over!r} with pools {pools!r}: use over pixels or channels, each pool once from {POOLS}")
    params = _trained(attention, params)  # on every path, so that a bad call fails alike everywhere
    folded = _fold(before, x, attention, pools) if over == "pixels" and _fusable(x, residual) else None
    if folded is not None:
        attention, pools, params = folded, folded.x_pools, _once(*params, *folded.norm_params)
    elif before is not None:
        x = before(x)
    _check_residual(x, residual)
    if folded is not None or _fusable(x, residual):
        return _FusedGate.apply(x, tuple(pools), over, attention, residual, relu, *params)
    scale = attention(*(_pool(x, p, DIMS[over]) for p in pools))
    _check_shape(scale, _pooled_shape(x, over))
    scale = _as_tuple(scale)
    return add_residual((x * scale[0] if len(scale) == 1 else torch.addcmul(scale[1], x, scale[0])).to(x.dtype),
                        residual, relu)


def channel_spatial_gate(x: Tensor, channel_pools: Sequence[str], channel_attention: Callable[..., Scale],
                         spatial_pools: Sequence[str], spatial_attention: Callable[..., Tensor], *,
                         residual: Tensor | None = None, relu: bool = False, before: nn.Module | None = None) -> Tensor:
    """A channel gate, then a spatial gate on its output, as CBAM has them:
    gate(gate(x, channel_pools, channel_attention), spatial_pools, spatial_attention, over="channels",
    residual=residual, relu=relu), `before` as in gate().
    Both attentions are methods of a module; the channel one returns a scale or (scale, shift), the
    spatial one a scale. Training on the CPU with a channels_last x and spatial pools from "mean"
    and "max", the pair runs as one Function that never writes the channel gate's output: three
    passes over x forward and three back, where two gates make four and four (CBAM's gate step at
    ResNet-164's first stage: 32 ms as two gates). A batch norm given as `before` is folded into
    the channel gate there, as gate() folds it."""
    pairs_fuse = (all(pools and len(set(pools)) == len(pools) for pools in (channel_pools, spatial_pools))
                  and set(channel_pools) <= set(POOLS) and set(spatial_pools) <= {"mean", "max"})

    def fuses(x: Tensor) -> bool:
        return pairs_fuse and _fusable(x, residual) and x.is_contiguous(memory_format=torch.channels_last)

    params = _once(*_trained(channel_attention, None), *_trained(spatial_attention, None))
    folded = _fold(before, x, channel_attention, channel_pools) if fuses(x) else None
    if folded is not None:
        channel_attention, channel_pools = folded, folded.x_pools
        params = _once(*params, *folded.norm_params)
    elif before is not None:
        x = before(x)
    _check_residual(x, residual)
    if folded is not None or fuses(x):
        return _FusedChannelSpatialGate.apply(x, tuple(channel_pools), channel_attention, tuple(spatial_pools),
                                              spatial_attention, residual, relu, *params)
    return gate(gate(x, channel_pools, channel_attention), spatial_pools, spatial_attention, over="channels",
                residual=residual, relu=relu)


class _AfterNorm:
    """A batch norm y = x * a + b (per channel) folded into the gate after it, which gate() hands
    on in place of the attention: the batch's statistics come from each image's mean and
    variance, y's pools from x's (a mean or a variance through the affine map, a max from x's max
    or min by the sign of a), and y * scale = x * (a * scale) + b * scale. So x is read for its
    pools (x_pools) and written once as the gate's output, and the norm's output is never
    written. _FoldedGraph runs the norm's part of that math in C, the attention as the module
    wrote it."""

    def __init__(self, norm: BatchNorm2d, attention: Callable[..., Scale], pools: Sequence[str], pixels: int):
        self.norm, self.attention, self.pools, self.pixels = norm, attention, tuple(pools), pixels
        self.x_pools = POOLS if {"max", "min"} & set(pools) else POOLS[:2]  # the C math needs mean and var
        self.norm_params = (norm.weight, norm.bias)


class _Graph:
    """An attention run on pooled values as leaves of a graph of its own, built in the forward
    and differentiated inside the backward (as torch.utils.checkpoint does). `outputs` is the
    scale, or (scale, shift), that the C passes apply."""

    def __init__(self, attention: Callable[..., Scale], pools: Sequence[str], found: dict[str, Tensor],
                 shape: tuple[int, ...], params: tuple[Tensor, ...]):
        with torch.enable_grad():
            self.leaves = [found[p].view(shape).requires_grad_() for p in pools]
            scale = attention(*self.leaves)
        _check_shape(scale, shape)
        self.outputs = _as_tuple(scale)
        _check_params(attention, self.outputs, self.leaves, params)
        self.pools, self.params = tuple(pools), params

    def differentiate(self, grads: Sequence[Tensor | None]) -> tuple[dict[str, Tensor | None], list[Tensor | None]]:
        """From the outputs' gradients (float64 sums allowed): the gradient of each pool by name,
        and of each of params (None where it needs none)."""
        pairs = [(t, d.float().view(t.shape)) for t, d in zip(self.outputs, grads) if t.requires_grad and d is not None]
        wanted = [p for p in self.params if p.requires_grad]
        inputs = [*self.leaves, *wanted]
        found = torch.autograd.grad([t for t, _ in pairs], inputs, [d for _, d in pairs], allow_unused=True,
                                    retain_graph=True) if pairs else [None] * len(inputs)
        param_grads = iter(found[len(self.leaves):])
        return dict(zip(self.pools, found[:len(self.leaves)])), [next(param_grads) if p.requires_grad else None
                                                                 for p in self.params]


class _FoldedGraph:
    """_Graph of an attention after a folded batch norm (_AfterNorm). The norm's per-channel math
    (fused.fold_forward, fold_scale_grads and fold_backward) and the products a * scale,
    b * scale run outside autograd, and only the module's attention is a graph. With the norm's math as an autograd
    Function and the products in the graph, the fold and the attention took 60-90 us more per
    gate and step (of 0.6-1.3 ms; a ResNet-164 step has 54 gates), for the same results bit for
    bit. `outputs` is (a * scale, b * scale (+ the attention's shift))."""

    def __init__(self, fold: _AfterNorm, found: dict[str, Tensor], shape: tuple[int, ...], params: tuple[Tensor, ...]):
        norm, self.shape = fold.norm, shape
        self.norm_params = fold.norm_params
        self.weight = norm.weight.detach().clone()  # as the forward used it, whatever a step does to it after
        self.x_pools = {p: found[p] for p in fold.x_pools}
        self.a, self.b, batch_mean, invstd, of_y = fused.fold_forward(
            self.x_pools, fold.pixels, self.weight, norm.bias.detach(), norm.eps, *running_update(norm), fold.pools)
        self.kept = self.a, batch_mean, invstd
        self.attention = _Graph(fold.attention, fold.pools, dict(zip(fold.pools, of_y)), shape, params)
        self.scale = self.attention.outputs[0].detach()
        shift = self.b.view(1, -1, 1, 1) * self.scale
        if len(self.attention.outputs) == 2:
            shift += self.attention.outputs[1].detach()
        self.outputs = self.a.view(1, -1, 1, 1) * self.scale, shift

    def differentiate(self, grads: Sequence[Tensor | None]) -> tuple[dict[str, Tensor | None], list[Tensor | None]]:
        to_scale, d_shift, d_a, d_b = fused.fold_scale_grads(*grads, self.a, self.b, self.scale)
        by_y, param_grads = self.attention.differentiate((to_scale, d_shift))
        by_x, *d_norm = fused.fold_backward(d_a, d_b, {p: g for p, g in by_y.items() if g is not None},
                                            self.x_pools, self.weight, self.kept)
        for at, p in enumerate(self.attention.params):  # plus what the attention's own use of them gave
            for norm_param, grad in zip(self.norm_params, d_norm):
                if p is norm_param and p.requires_grad:
                    param_grads[at] = grad if param_grads[at] is None else param_grads[at] + grad
        return {p: g.view(self.shape) for p, g in by_x.items()}, param_grads


def _fold(before: nn.Module | None, x: Tensor, attention: Callable[..., Scale],
          pools: Sequence[str]) -> _AfterNorm | None:
    """The attention with `before` folded in, where it is the default batch norm that may be
    (BatchNorm2d.foldable), for a gate that runs fused; else None, and `before` runs itself."""
    if isinstance(before, BatchNorm2d) and before.foldable(x):
        return _AfterNorm(before, attention, pools, x.shape[2] * x.shape[3])
    return None


def _method_of(attention: Callable) -> tuple[nn.Module, Callable] | None:
    """(module, function) where `attention` is a module's method, directly, in a functools.partial
    or after a norm."""
    attention = attention.attention if isinstance(attention, _AfterNorm) else attention
    bound = attention.func if isinstance(attention, functools.partial) else attention
    # isinstance MethodType, not getattr(bound, "__self__", None): torch.compile reads the latter as None
    if isinstance(bound, types.MethodType) and isinstance(bound.__self__, nn.Module):
        return bound.__self__, bound.__func__
    return None


def _once(*params: Tensor) -> tuple[Tensor, ...]:
    """Each parameter once, in first-seen order: one two attentions share, or that an attention
    trains itself and a folded norm brings too, must get its gradient summed once, not twice."""
    return tuple({id(p): p for p in params}.values())


def _trained(attention: Callable, params: Iterable[Tensor] | None) -> tuple[Tensor, ...]:
    if params is not None:
        return tuple(params)
    method = _method_of(attention)
    if method is None:
        raise ValueError("gate(): an attention that is not a module's method needs `params`, the tensors it trains")
    return tuple(method[0].parameters())


def _pool(x: Tensor, pool: str, dims: tuple[int, ...]) -> Tensor:
    """Statistics in float32 at least, as batch norm keeps them under autocast."""
    if pool == "mean":
        return x.mean(dims, keepdim=True, dtype=torch.promote_types(x.dtype, torch.float32))
    if pool == "var":
        return x.to(torch.promote_types(x.dtype, torch.float32)).var(dims, correction=0, keepdim=True)
    return (x.amax if pool == "max" else x.amin)(dims, keepdim=True)


def _pooled_shape(x: Tensor, over: str) -> tuple[int, ...]:
    return (x.shape[0], x.shape[1], 1, 1) if over == "pixels" else (x.shape[0], 1, *x.shape[2:])


def _as_tuple(scale: Scale) -> tuple[Tensor, ...]:
    return scale if isinstance(scale, tuple) else (scale,)


def _check_shape(scale: Scale, shape: tuple[int, ...]) -> None:
    if any(t.shape != shape for t in _as_tuple(scale)):
        raise ValueError(f"a gate's attention returned {[tuple(t.shape) for t in _as_tuple(scale)]}; it must return {shape}")


_CHECKED: weakref.WeakKeyDictionary[nn.Module, set] = weakref.WeakKeyDictionary()  # owner -> its methods checked


def _check_params(attention: Callable, outputs: tuple[Tensor, ...], leaves: list[Tensor], params: tuple[Tensor, ...]) -> None:
    """The fused path can only hand gradients to the tensors it was given: one the attention uses
    without them would silently stay untrained, so that is an error. A module's method is checked
    on its first call only (the walk costs 50-80 us, every training step, every block)."""
    method = _method_of(attention)
    if method is not None and method[1] in _CHECKED.get(method[0], ()):
        return
    known = {id(t) for t in (*leaves, *params)}
    seen, todo = set(), [t.grad_fn for t in outputs if t.grad_fn is not None]
    while todo:
        node = todo.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        variable = getattr(node, "variable", None)  # AccumulateGrad: a leaf that needs a gradient
        if variable is not None and id(variable) not in known:
            raise ValueError(f"a gate's attention uses a tensor of shape {tuple(variable.shape)} that needs a gradient "
                             "but is not among the parameters it trains; pass it in `params`")
        todo.extend(next_node for next_node, _ in node.next_functions)
    if method is not None:
        _CHECKED.setdefault(method[0], set()).add(method[1])


def _fusable(x: Tensor, residual: Tensor | None) -> bool:
    return x.requires_grad and fused.serves(x, residual)


def _check_residual(x: Tensor, residual: Tensor | None) -> None:
    if residual is not None and residual.shape != x.shape:
        raise ValueError(f"a gate's residual must have its input's shape {tuple(x.shape)}, got {tuple(residual.shape)}")


def _past_relu(dy: Tensor, out: Tensor | None) -> Tensor:
    """The gradient at a fused gate's product, and at its residual, from its output's: through the
    block's ReLU where the gate applied one (`out` is then the gate's output)."""
    return dy if out is None else torch.ops.aten.threshold_backward(dy, out, 0)


def _layout(x: Tensor) -> torch.memory_format:
    """channels_last where x's channels are its densest dim (also for a slice of such a tensor),
    else NCHW."""
    if x.stride(1) == 1 and x.shape[1] > 1 and not x.is_contiguous():
        return torch.channels_last
    return torch.contiguous_format


def _rows(x: Tensor, layout: torch.memory_format, over: str) -> tuple[Tensor, bool]:
    """x (contiguous in `layout`) as a (N, M, K) view of its memory, and whether `over` is the
    last dim: channels_last is (N, H*W, C), NCHW (N, C, H*W)."""
    if layout == torch.channels_last:
        return fused.pixel_rows(x), over == "channels"
    return x.view(x.shape[0], x.shape[1], -1), over == "pixels"


def _attend(attention: Callable[..., Scale] | _AfterNorm, pools: Sequence[str], found: dict[str, Tensor],
            shape: tuple[int, ...], params: tuple[Tensor, ...]) -> _Graph | _FoldedGraph:
    """The attention on the pooled values, as a graph for the backward to differentiate."""
    if isinstance(attention, _AfterNorm):
        return _FoldedGraph(attention, found, shape, params)
    return _Graph(attention, pools, found, shape, params)


def _read_pools(rows: Tensor, over_last: bool, pools: Sequence[str]) -> tuple[dict[str, Tensor | None], dict]:
    """pools of x over the middle (or last) dim of its (n, m, k) rows, in one read (extremes()
    brings the sums for a mean and a variance along, else sums() reads them): the pooled values
    by name, in float32, and the max's and min's positions."""
    count = rows.shape[2] if over_last else rows.shape[1]
    found, positions, total, squares = {}, {}, None, None
    if "max" in pools or "min" in pools:
        found["max"], positions["max"], found["min"], positions["min"], total, squares = fused.extremes(
            rows, over_last, low="min" in pools, total="mean" in pools or "var" in pools, squares="var" in pools)
    elif "mean" in pools or "var" in pools:
        total, squares = fused.sums(rows, rows if "var" in pools else None, over_last)
    if total is not None:
        found["mean"], var = fused.moments(total, squares, count)
        if var is not None:
            found["var"] = var
    return found, positions


def _pool_grads(by_pool: dict[str, Tensor | None], positions: dict, mean: Tensor | None,
                count: int) -> tuple[Tensor | None, Tensor | None, list[tuple[Tensor, Tensor]]]:
    """What the pools' gradients add to x's, per row of _read_pools: a shift (d_mean - 2 mean
    d_var) / count and a factor on x, 2 d_var / count (each None where no pool needs it), and
    (positions, gradient) of the max and the min, one element per row each."""
    d_mean, d_var = by_pool.get("mean"), by_pool.get("var")
    shift, x_factor = (None if d_mean is None else d_mean / count), None
    if d_var is not None:
        x_factor = d_var * (2 / count)
        shift = (0 if shift is None else shift) - mean.view_as(d_var) * x_factor
    return shift, x_factor, [(positions[p], by_pool[p]) for p in ("max", "min") if by_pool.get(p) is not None]


class _FusedGate(torch.autograd.Function):
    """gate() when training on the CPU: one read for the pooling, one write for the output;
    backward one read of dy and x for the scale's (and shift's) gradient, one write of dx (which
    with a "var" pool reads x again, for the variance's x-proportional gradient)."""

    @staticmethod
    def forward(ctx, x: Tensor, pools: tuple[str, ...], over: str, attention: Callable[..., Scale],
                residual: Tensor | None, relu: bool, *params: Tensor) -> Tensor:
        layout = _layout(x)
        x = x.contiguous(memory_format=layout)
        rows, over_last = _rows(x, layout, over)
        found, ctx.positions = _read_pools(rows, over_last, pools)
        graph = _attend(attention, pools, found, _pooled_shape(x, over), params)
        outputs = graph.outputs
        ctx.over, ctx.layout = over, layout
        ctx.count, ctx.mean = rows.shape[2] if over_last else rows.shape[1], found.get("mean")
        ctx.graph = graph  # kept with the node, so a retained graph can run backward again
        y = torch.empty_like(x)
        residual = None if residual is None else _rows(residual.contiguous(memory_format=layout), layout, over)[0]
        fused.scale_rows(rows, over_last, outputs[0], outputs[1] if len(outputs) == 2 else None, _rows(y, layout, over)[0],
                         residual=residual, relu=relu)
        ctx.save_for_backward(x, y if relu else None)
        return y

    @staticmethod
    @once_differentiable
    def backward(ctx, dy: Tensor) -> tuple[Tensor | None, ...]:
        x, out = ctx.saved_tensors
        outputs = ctx.graph.outputs
        rows, over_last = _rows(x, ctx.layout, ctx.over)
        dy = dy.contiguous(memory_format=ctx.layout)
        # Where the gate applied the block's ReLU, the sums' read masks dy by it and writes dz.
        dz = dy if out is None else torch.empty_like(dy)
        dz_rows = _rows(dz, ctx.layout, ctx.over)[0]
        d_shift, d_scale = fused.sums(_rows(dy, ctx.layout, ctx.over)[0], rows, over_last, plain=len(outputs) == 2,
                                      relu_out=None if out is None else _rows(out, ctx.layout, ctx.over)[0],
                                      masked=None if out is None else dz_rows)
        by_pool, param_grads = ctx.graph.differentiate((d_scale, d_shift))

        shift, x_factor, peaks = _pool_grads(by_pool, ctx.positions, ctx.mean, ctx.count)
        dx = torch.empty_like(dz)
        fused.scale_rows(dz_rows, over_last, outputs[0], shift, _rows(dx, ctx.layout, ctx.over)[0], peaks,
                         b=None if x_factor is None else rows, b_scale=x_factor)
        return dx, None, None, None, dz if ctx.needs_input_grad[4] else None, None, *param_grads


def _or_zeros(grad: Tensor | None, count: int, like: Tensor) -> Tensor:
    """A pool's gradient divided by the count it averaged over (1 for a max), or zeros shaped like
    the scale it feeds where the attention did not use that pool."""
    return torch.zeros_like(like) if grad is None else grad / count


class _FusedChannelSpatialGate(torch.autograd.Function):
    """channel_spatial_gate() when training on the CPU: y = (x * a + b) * s with a (and b, if the
    channel attention gives a shift) from x's pools over the pixels and s from the pools over the
    channels of x * a + b, which is never written out. Forward: one read pools over the pixels,
    one pools x * a + b over the channels, one write gives y. Backward: one read of dy and x gives
    s's gradient, one gives a's and b's (with the spatial pools' gradients folded in), one write
    gives dx (with the channel pools' folded in)."""

    @staticmethod
    def forward(ctx, x: Tensor, channel_pools: tuple[str, ...], channel_attention: Callable[..., Scale],
                spatial_pools: tuple[str, ...], spatial_attention: Callable[..., Tensor], residual: Tensor | None,
                relu: bool, *params: Tensor) -> Tensor:
        n, c, h, w = x.shape
        rows = _rows(x, torch.channels_last, "pixels")[0]  # (N, H*W, C)
        found, positions = _read_pools(rows, False, channel_pools)
        channel = _attend(channel_attention, channel_pools, found, (n, c, 1, 1), params)
        a, shift = channel.outputs[0], channel.outputs[1] if len(channel.outputs) == 2 else None
        high_c, at_c, total_c = fused.outer_pools(rows, a, shift)
        spatial = _attend(spatial_attention, spatial_pools, {"mean": (total_c / c).float(), "max": high_c},
                          (n, 1, h, w), params)
        if len(spatial.outputs) != 1:
            raise ValueError("channel_spatial_gate's spatial attention returns a scale only; for a shift use two "
                             "gate() calls")
        ctx.graph, ctx.positions, ctx.mean = (channel, spatial), (positions, at_c), found.get("mean")
        y = torch.empty_like(x)
        if residual is not None:
            residual = _rows(residual.contiguous(memory_format=torch.channels_last), torch.channels_last, "pixels")[0]
        fused.outer_scale(rows, a, spatial.outputs[0], _rows(y, torch.channels_last, "pixels")[0], shift=shift,
                          residual=residual, relu=relu)
        ctx.save_for_backward(x, y if relu else None)
        return y

    @staticmethod
    @once_differentiable
    def backward(ctx, dy: Tensor) -> tuple[Tensor | None, ...]:
        x, out = ctx.saved_tensors
        channel_graph, spatial_graph = ctx.graph
        (s,), channel_out = spatial_graph.outputs, channel_graph.outputs
        a, shift = channel_out[0], channel_out[1] if len(channel_out) == 2 else None
        positions, at_c = ctx.positions
        n, c, h, w = x.shape
        rows = _rows(x, torch.channels_last, "pixels")[0]
        dz = _past_relu(dy, out).contiguous(memory_format=torch.channels_last)
        dz_rows = _rows(dz, torch.channels_last, "pixels")[0]
        spatial, spatial_params = spatial_graph.differentiate((fused.outer_row_dots(dz_rows, rows, a, shift),))
        # the gradient of y1 = x * a + b is dz * s + d_mean / C, plus d_max at each pixel's max channel
        t, row_peak = _or_zeros(spatial.get("mean"), c, s), _or_zeros(spatial.get("max"), 1, s)
        da, d_shift = fused.outer_col_sums(dz_rows, rows, s, t, at_c, row_peak, plain=shift is not None)
        channel, channel_params = channel_graph.differentiate((da, d_shift))
        u, x_factor, peaks = _pool_grads(channel, positions, ctx.mean, h * w)
        dx = torch.empty_like(dz)
        fused.outer_scale(dz_rows, a, s, _rows(dx, torch.channels_last, "pixels")[0], t,
                          torch.zeros_like(a) if u is None else u, (at_c, row_peak), peaks,
                          b=None if x_factor is None else rows, b_scale=x_factor)
        summed = [g1 if g2 is None else g2 if g1 is None else g1 + g2 for g1, g2 in zip(channel_params, spatial_params)]
        return dx, None, None, None, None, dz if ctx.needs_input_grad[5] else None, None, *summed
