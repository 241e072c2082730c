"""gate(): the fused CPU path gives the torch ops' values and gradients, in the input's layout."""

from __future__ import annotations

import copy
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
from torch import nn

from attnbench import fused, pooling
from attnbench.models import build_model
from attnbench.norm import BatchNorm2d
from attnbench.pooling import gate
from conftest import assert_trained_alike, needs_kernels

LAYOUTS = {"nchw": torch.contiguous_format, "channels_last": torch.channels_last}
pytestmark = pytest.mark.usefixtures("kernels_built_unless_turned_off")


def _distinct(shape: tuple[int, ...], seed: int = 0) -> torch.Tensor:
    """A permutation of distinct float32 values: no ties, so every max and min has one winner."""
    g = torch.Generator().manual_seed(seed)
    return torch.randperm(torch.Size(shape).numel(), generator=g).float().reshape(shape) / 50 - 3


def _input(case: str) -> torch.Tensor:
    """The layouts the models make, and the corner cases of _layout and _rows."""
    if case == "channel-slice":  # channels_last memory, but contiguous in neither layout
        x = _distinct((2, 9, 6, 7)).to(memory_format=torch.channels_last)[:, 2:7]
    else:
        corners = {"batch-1": (1, 5, 6, 7), "one-pixel": (2, 5, 1, 1), "one-channel": (2, 1, 6, 7)}
        x = _distinct(corners.get(case, (2, 5, 6, 7))).to(memory_format=LAYOUTS.get(case, torch.channels_last))
    return x.requires_grad_()


class Attention(nn.Module):
    """Every pooled input enters through its own random per-entry weights, so a wrong gradient
    for any pool or any parameter shows; with `shift`, it returns (scale, shift)."""

    def __init__(self, pools: list[str], shape: tuple[int, ...], shift: bool) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(1)
        self.weights = nn.Parameter(torch.randn(len(pools), *shape[1:], generator=g) / 3)
        self.bias = nn.Parameter(torch.randn(shape[1:], generator=g))
        self.shift = shift

    def forward(self, *pooled: torch.Tensor) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        z = sum(w * p for w, p in zip(self.weights, pooled)) + self.bias
        return (z.sigmoid(), z.tanh()) if self.shift else z.sigmoid()


def _residual(x: torch.Tensor) -> torch.Tensor:
    """A block's shortcut for x, in the other layout than x's (channels_last for NCHW, else NCHW),
    spread over [-4, 4], so that a ReLU after x * scale + it cuts some values and keeps others."""
    r = _distinct(tuple(x.shape), seed=3)
    r = (r - r.min()) / max(r.max() - r.min(), 1e-6) * 8 - 4
    other = torch.channels_last if x.is_contiguous() else torch.contiguous_format
    return r.contiguous(memory_format=other).requires_grad_()


def _with_tail(y: torch.Tensor, residual: torch.Tensor | None, relu: bool) -> torch.Tensor:
    """The block's tail as torch ops, the reference for a gate that writes it itself."""
    y = y if residual is None else y + residual
    return torch.relu(y) if relu else y


def _run(x: torch.Tensor, pools: list[str], over: str, shift: bool, fused_path: bool, monkeypatch,
         tail: str = "none") -> tuple:
    shape = (x.shape[0], x.shape[1], 1, 1) if over == "pixels" else (x.shape[0], 1, *x.shape[2:])
    attention = Attention(pools, shape, shift)
    residual, relu = (None if tail == "none" else _residual(x)), tail == "add+relu"
    with monkeypatch.context() as patch:
        x = x.detach().requires_grad_()
        if fused_path:
            y = gate(x, pools, attention, attention.parameters(), over=over, residual=residual, relu=relu)
        else:
            patch.setattr(pooling, "_fusable", lambda *tensors: False)
            y = _with_tail(gate(x, pools, attention, attention.parameters(), over=over), residual, relu)
        # channels_last also for NCHW inputs: gate() must bring dy to x's layout itself
        dy = _distinct(tuple(y.shape), seed=2).contiguous(memory_format=torch.channels_last)
        y.backward(dy)
    return y.detach(), x.grad, [p.grad for p in attention.parameters()] + ([] if residual is None else [residual.grad])


CASES = [(["mean"], "pixels", False), (["max", "min"], "pixels", False), (["mean", "max"], "pixels", False),
         (["mean", "var"], "pixels", True), (["var", "max"], "pixels", True), (["max", "mean"], "channels", False), (["min"], "channels", True)]


@needs_kernels
@pytest.mark.parametrize("pools, over, shift", CASES, ids=lambda v: "+".join(v) if isinstance(v, list) else str(v))
@pytest.mark.parametrize("case", [*LAYOUTS, "batch-1", "one-pixel", "one-channel", "channel-slice"])
def test_fused_gate_matches_torch_ops(pools, over, shift, case, monkeypatch) -> None:
    x = _input(case)
    applied = []
    monkeypatch.setattr(pooling._FusedGate, "apply", lambda *a, apply=pooling._FusedGate.apply: applied.append(1) or apply(*a))
    y, dx, dparams = _run(x, pools, over, shift, True, monkeypatch)
    assert applied, "the fused path did not run"
    y_ref, dx_ref, dparams_ref = _run(x, pools, over, shift, False, monkeypatch)
    assert torch.allclose(y, y_ref, atol=1e-5)
    assert torch.allclose(dx, dx_ref, atol=1e-4)
    for got, want in zip(dparams, dparams_ref):
        assert torch.allclose(got, want, rtol=1e-4, atol=1e-4)
    if case in LAYOUTS:  # the gradient flows on in the layout the backbone runs
        assert dx.is_contiguous(memory_format=LAYOUTS[case])
    for fmt in LAYOUTS.values():  # both paths hand on the same layout (a channel slice: channels_last)
        assert y.is_contiguous(memory_format=fmt) == y_ref.is_contiguous(memory_format=fmt)


@needs_kernels
@pytest.mark.parametrize("pools, over, shift", CASES, ids=lambda v: "+".join(v) if isinstance(v, list) else str(v))
@pytest.mark.parametrize("case", [*LAYOUTS, "batch-1", "one-pixel", "one-channel", "channel-slice"])
@pytest.mark.parametrize("tail", ["add", "add+relu"])
def test_fused_gate_adds_a_residual_and_relu_as_torch_ops_do(pools, over, shift, case, tail, monkeypatch) -> None:
    """A block's residual add and ReLU, written with the product: the output, and the gradients of
    x, the residual and the parameters through the ReLU, as torch ops on gate()'s output."""
    x = _input(case)
    applied = []
    monkeypatch.setattr(pooling._FusedGate, "apply", lambda *a, apply=pooling._FusedGate.apply: applied.append(a) or apply(*a))
    y, dx, dparams = _run(x, pools, over, shift, True, monkeypatch, tail)
    assert applied and applied[0][4] is not None, "the fused path did not run with the residual"
    y_ref, dx_ref, dparams_ref = _run(x, pools, over, shift, False, monkeypatch, tail)
    if tail == "add+relu":
        assert (y == 0).any() and (y > 0).any(), "the ReLU must cut some values and keep others"
    assert torch.allclose(y, y_ref, atol=1e-5)
    assert torch.allclose(dx, dx_ref, atol=1e-4)
    for got, want in zip(dparams, dparams_ref, strict=True):
        assert torch.allclose(got, want, rtol=1e-4, atol=1e-4)


def _batch_norm(channels: int, **kwargs) -> BatchNorm2d:
    """A batch norm in training with weights of both signs (a negative one turns a max into a
    min) and running statistics away from their initial values."""
    g = torch.Generator().manual_seed(4)
    bn = BatchNorm2d(channels, **kwargs)
    with torch.no_grad():
        bn.weight.copy_(torch.randn(channels, generator=g) * 2)
        bn.bias.copy_(torch.randn(channels, generator=g))
        bn.running_mean.copy_(torch.randn(channels, generator=g))
        bn.running_var.uniform_(0.5, 2, generator=g)
    return bn


def _run_after_norm(x: torch.Tensor, pools: list[str], shift: bool, fold: bool, bn: BatchNorm2d) -> tuple:
    """The gate after bn, given as `before` (folded) or applied first; tail add+relu."""
    attention = Attention(pools, (x.shape[0], x.shape[1], 1, 1), shift)
    residual, bn = _residual(x), copy.deepcopy(bn)
    x = x.detach().requires_grad_()
    if fold:
        y = gate(x, pools, attention, attention.parameters(), residual=residual, relu=True, before=bn)
    else:
        y = gate(bn(x), pools, attention, attention.parameters(), residual=residual, relu=True)
    y.backward(_distinct(tuple(y.shape), seed=2).contiguous(memory_format=torch.channels_last))
    grads = [p.grad for p in (*attention.parameters(), *bn.parameters(), residual)]
    return y.detach(), x.grad, grads, {k: v for k, v in bn.state_dict().items()}


@needs_kernels
@pytest.mark.parametrize("pools, shift", [(["mean"], False), (["max", "min"], False), (["min"], False),
                                          (["mean", "max"], True), (["var", "max"], True)], ids=str)
@pytest.mark.parametrize("case", [*LAYOUTS, "batch-1", "one-pixel"])
@pytest.mark.parametrize("momentum", [0.1, None])
def test_a_batch_norm_before_a_gate_folds_into_it(pools, shift, case, momentum, monkeypatch) -> None:
    """gate(x, before=bn) against gate(bn(x)) where bn is not folded: the output, the gradients of
    x, of the attention's and the norm's parameters and of the residual, and the norm's running
    statistics and batch count. The norm's own forward never runs."""
    x = _input(case)
    bn = _batch_norm(x.shape[1], momentum=momentum)
    calls = []
    bn.register_forward_hook(lambda *_: calls.append("bn"))
    apply = pooling._FusedGate.apply
    monkeypatch.setattr(pooling._FusedGate, "apply", lambda *a: calls.append(a[3]) or apply(*a))
    y, dx, grads, state = _run_after_norm(x, pools, shift, True, bn)
    assert len(calls) == 1 and isinstance(calls[0], pooling._AfterNorm), "the norm was not folded"
    y_ref, dx_ref, grads_ref, state_ref = _run_after_norm(x, pools, shift, False, bn)
    assert calls[1] == "bn" and len(calls) == 3 and not isinstance(calls[2], pooling._AfterNorm)
    assert (y == 0).any() and (y > 0).any()
    assert torch.allclose(y, y_ref, atol=1e-5)
    # One pixel per image: the norm sees two values per channel, and its gradients reach 50.
    # The folded backward adds the variance's gradient as x * k - mean * k, which cancels where
    # an image's values lie close to their mean: 2e-4 of the largest gradient here (torch's
    # batch norm, against float64: 5e-6), and ~1e-6 where images have many pixels.
    def close(got: torch.Tensor, want: torch.Tensor) -> bool:
        if case == "one-pixel":
            return torch.allclose(got, want, rtol=5e-4, atol=5e-4 * want.abs().max())
        return torch.allclose(got, want, rtol=1e-4, atol=1e-4)

    assert close(dx, dx_ref)
    for got, want in zip(grads, grads_ref, strict=True):
        assert close(got, want)
    assert state.keys() == state_ref.keys()
    for name, value in state.items():
        assert torch.allclose(value, state_ref[name], rtol=1e-5, atol=1e-6), name
    assert state["num_batches_tracked"] == 1


@needs_kernels
@pytest.mark.parametrize("listed", [False, True], ids=["norm-params-implied", "norm-weight-listed-too"])
def test_a_folded_norm_whose_weight_the_attention_also_uses(listed: bool) -> None:
    """An attention that weighs channels by the norm's own |weight| (as NAM does) trains that
    weight twice, through the fold and through itself: the folded gate's gradients add both, once,
    also where the caller lists the weight among the attention's params; a frozen bias gets none."""
    x = _input("channels_last")
    bn = _batch_norm(x.shape[1])
    bn.bias.requires_grad_(False)

    def run(fold: bool) -> tuple:
        norm, inp = copy.deepcopy(bn), x.detach().requires_grad_()

        def attention(mean: torch.Tensor) -> torch.Tensor:
            w = norm.weight.abs().view(1, -1, 1, 1)
            return (mean * w / w.sum()).sigmoid()

        params = [norm.weight] if listed else []
        y = gate(inp, ["mean"], attention, params, before=norm) if fold else gate(norm(inp), ["mean"], attention,
                                                                                    [norm.weight])
        y.backward(_distinct(tuple(y.shape), seed=2).contiguous(memory_format=torch.channels_last))
        return y.detach(), inp.grad, norm.weight.grad, norm.bias.grad

    (y, dx, d_weight, d_bias), (y_ref, dx_ref, d_weight_ref, _) = run(True), run(False)
    assert torch.allclose(y, y_ref, atol=1e-5) and torch.allclose(dx, dx_ref, rtol=1e-4, atol=1e-5)
    assert torch.allclose(d_weight, d_weight_ref, rtol=1e-4, atol=1e-5) and d_bias is None


def _folded_norm_formula(x_pools: dict[str, torch.Tensor], weight: torch.Tensor, bias: torch.Tensor, eps: float,
                         wanted: list[str]) -> tuple[torch.Tensor, ...]:
    """The norm folded into a gate, as the torch ops it replaced: a, b and y's `wanted` pools from
    x's pools per image, with the batch's mean and variance (for the running averages)."""
    mean, var, high, low = (x_pools.get(p) for p in fused.POOLS)
    batch_mean, batch_var = mean.mean(0), var.mean(0) + mean.var(0, correction=0)
    a = weight * (batch_var + eps).rsqrt()
    b = bias - batch_mean * a
    of_y = {"mean": lambda: a * mean + b, "var": lambda: a * a * var,
            "max": lambda: torch.where(a >= 0, a * high, a * low) + b,
            "min": lambda: torch.where(a >= 0, a * low, a * high) + b}
    return a, b, batch_mean, batch_var, *(of_y[p]() for p in wanted)


@needs_kernels
@pytest.mark.parametrize("wanted", [["mean"], ["max", "min"], ["var", "max"], ["min", "mean"]], ids=str)
def test_the_folded_norm_in_c_is_its_formula(wanted) -> None:
    """fused.fold_forward and fold_backward against the formula in float64 with autograd: a, b,
    y's pools, the running averages, and the gradients of x's pools and of weight and bias. The
    weights take both signs and 0 (a max becomes a min where a < 0; at a = 0 it stays a max)."""
    n, c, pixels, eps, factor = 5, 7, 9, 1e-5, 0.1
    g = torch.Generator().manual_seed(8)
    mean = torch.randn(n, c, generator=g) * 3
    spread = torch.rand(n, c, generator=g) + 0.1
    x_pools = {"mean": mean, "var": spread.square(), "max": mean + 2 * spread, "min": mean - spread}
    if not {"max", "min"} & set(wanted):
        x_pools = {p: x_pools[p] for p in ("mean", "var")}
    weight = torch.tensor([1.5, -0.7, 0.0, 2.0, -1.2, 0.3, 1.0])
    bias = torch.randn(c, generator=g)
    running = torch.randn(c, generator=g), torch.rand(c, generator=g) + 0.5
    moved = tuple(t.clone() for t in running)
    a, b, batch_mean, invstd, of_y = fused.fold_forward(x_pools, pixels, weight, bias, eps, moved, factor, wanted)

    leaves = {p: t.double().requires_grad_() for p, t in x_pools.items()}
    params = [t.double().requires_grad_() for t in (weight, bias)]
    a_ref, b_ref, mean_ref, var_ref, *of_y_ref = _folded_norm_formula(leaves, *params, eps, wanted)
    for got, want in zip((a, b, batch_mean, invstd, *of_y), (a_ref, b_ref, mean_ref, (var_ref + eps).rsqrt(), *of_y_ref),
                         strict=True):
        assert got.dtype == torch.float32 and torch.allclose(got.double(), want, rtol=1e-6, atol=1e-6)
    count = n * pixels
    assert torch.allclose(moved[0].double(), running[0] + factor * (mean_ref - running[0]), atol=1e-6)
    assert torch.allclose(moved[1].double(), running[1] + factor * (var_ref * count / (count - 1) - running[1]),
                          atol=1e-6)

    d_a, d_b = torch.randn(c, generator=g), torch.randn(c, generator=g)
    d_of_y = {p: torch.randn(n, c, generator=g) for p in wanted}
    grads, d_weight, d_bias = fused.fold_backward(d_a, d_b, d_of_y, x_pools, weight, (a, batch_mean, invstd))
    want = torch.autograd.grad([a_ref, b_ref, *of_y_ref], [*leaves.values(), *params],
                               [t.double() for t in (d_a, d_b, *d_of_y.values())], allow_unused=True)
    for got, ref in zip((*(grads[p] for p in leaves), d_weight, d_bias), want, strict=True):
        ref = torch.zeros(got.shape, dtype=torch.float64) if ref is None else ref
        assert torch.allclose(got.double(), ref, rtol=1e-5, atol=1e-6)
    # Operands the wrapper must convert (float64, strided) give the same: its copies outlive the call.
    strided = torch.stack((d_a, d_a), 1)[:, 0]
    again = fused.fold_backward(strided, d_b.double(), d_of_y, x_pools, weight.double(), (a, batch_mean, invstd))
    assert not strided.is_contiguous() and torch.equal(again[1], d_weight) and torch.equal(again[2], d_bias)
    assert all(torch.equal(again[0][p], grads[p]) for p in grads)


@needs_kernels
def test_the_folded_gates_scale_gradients_are_their_formula() -> None:
    """fused.fold_scale_grads against autograd in float64: the gate wrote x * (a * scale) + b * scale,
    its backward read gives the sums of dz * x and of dz per image and channel, and from those
    come the gradients of the attention's scale and shift and of a and b."""
    n, c = 6, 5
    g = torch.Generator().manual_seed(3)
    d_scale, d_shift = (torch.randn(n, c, dtype=torch.float64, generator=g) * 40 for _ in range(2))
    a, b = torch.randn(c, generator=g), torch.randn(c, generator=g)
    scale = torch.rand(n, c, generator=g)
    to_scale, to_shift, d_a, d_b = fused.fold_scale_grads(d_scale, d_shift, a, b, scale)

    leaves = [t.double().requires_grad_() for t in (scale, a, b)]
    s, a_ref, b_ref = leaves
    shift = torch.zeros(n, c, dtype=torch.float64, requires_grad=True)  # the attention's own shift, added after
    want = torch.autograd.grad([a_ref * s, b_ref * s + shift], [s, shift, a_ref, b_ref], [d_scale, d_shift])
    for got, ref in zip((to_scale, to_shift, d_a, d_b), want, strict=True):
        assert got.dtype == torch.float32 and got.shape == ref.shape
        assert torch.allclose(got.double(), ref, rtol=1e-6, atol=1e-5)
    with pytest.raises(ValueError, match="float64 sums of 6 x 5"):
        fused.fold_scale_grads(d_scale.float(), d_shift, a, b, scale)


@needs_kernels
@pytest.mark.parametrize("x_pools, of_y", [(("mean",), ["mean"]), (("mean", "var", "max"), ["mean"]),
                                           (("mean", "var"), ["max"]), (("mean", "var"), ["median"])], ids=str)
def test_the_folded_norm_kernels_refuse_pools_they_would_misread(x_pools, of_y) -> None:
    """x's mean and var always, x's max and min both or neither, y's max or min only from them:
    anything else would reach C as a NULL or an unwritten result."""
    n, c = 3, 4
    pools = {p: torch.rand(n, c) for p in x_pools}
    weight, bias = torch.ones(c), torch.zeros(c)
    with pytest.raises(ValueError, match="need x's mean and var"):
        fused.fold_forward(pools, 5, weight, bias, 1e-5, None, 0.0, of_y)
    with pytest.raises(ValueError, match="need x's mean and var"):
        fused.fold_backward(torch.zeros(c), torch.zeros(c), {p: torch.zeros(n, c) for p in of_y}, pools, weight,
                            (torch.ones(c), torch.zeros(c), torch.ones(c)))


@needs_kernels
def test_the_folded_norm_kernels_refuse_a_single_value_per_channel() -> None:
    one = {"mean": torch.zeros(1, 4), "var": torch.zeros(1, 4)}
    with pytest.raises(ValueError, match="more than 1 value per channel, got 1 images of 1 pixels"):
        fused.fold_forward(one, 1, torch.ones(4), torch.zeros(4), 1e-5, None, 0.0, ["mean"])


@needs_kernels
def test_a_norm_that_cannot_fold_runs_before_the_gate() -> None:
    """In eval, without an affine map, as a subclass with its own forward, as another layer (a
    pre-activation block's conv), or before a gate over the channels, `before` is applied to x and
    the gate takes its output."""

    class Shifted(BatchNorm2d):
        def forward(self, x: torch.Tensor, residual=None, relu=False) -> torch.Tensor:
            return super().forward(x) + 1

    x = _input("channels_last")
    cases = {"eval": (_batch_norm(5).eval(), "pixels"), "no affine": (BatchNorm2d(5, affine=False), "pixels"),
             "subclass": (Shifted(5), "pixels"), "conv": (nn.Conv2d(5, 5, 1), "pixels"),
             "over channels": (_batch_norm(5), "channels")}
    for name, (layer, over) in cases.items():
        attentions = []
        with pytest.MonkeyPatch.context() as patch:
            apply = pooling._FusedGate.apply
            patch.setattr(pooling._FusedGate, "apply", lambda *a, apply=apply: attentions.append(a[3]) or apply(*a))
            y = gate(x, ["mean", "max"], lambda m, h: (m + h).sigmoid(), [], over=over, before=layer)
        assert len(attentions) == 1 and not isinstance(attentions[0], pooling._AfterNorm), name
        z, dims = layer(x), pooling.DIMS[over]
        assert torch.allclose(y, z * (z.mean(dims, keepdim=True) + z.amax(dims, keepdim=True)).sigmoid()), name


@needs_kernels
@pytest.mark.parametrize("module", ["se", "spe", "cbam"])
def test_models_train_alike_with_the_norm_folded_or_not(module: str, monkeypatch) -> None:
    """Two training steps of a whole post-activation model, each block's last norm folded into its
    gate or run as itself (the C batch norm): outputs, parameter gradients and running statistics.
    Folded, the 3 blocks' last norms never run their own forward."""
    results, norms_run = [], []
    for fold in (True, False):
        torch.manual_seed(0)
        model = build_model(module, 8, 10, arch="resnet", block="basic").to(memory_format=torch.channels_last)
        runs = []
        for layer in model.modules():
            if isinstance(layer, BatchNorm2d):
                layer.register_forward_hook(lambda *_: runs.append(1))
        with monkeypatch.context() as patch:
            if not fold:
                patch.setattr(BatchNorm2d, "foldable", lambda self, x: False)
            for step in range(2):
                model.zero_grad()
                x = _distinct((4, 3, 32, 32), seed=step).to(memory_format=torch.channels_last)
                out = model(x)
                torch.nn.functional.cross_entropy(out, torch.arange(4)).backward()
        norms_run.append(len(runs))
        buffers = {name: b.clone() for name, b in model.named_buffers()}
        results.append((out.detach(), {name: p.grad for name, p in model.named_parameters()}, buffers))
    assert norms_run[0] == norms_run[1] - 2 * 3
    assert_trained_alike(*results, grads_rel=1e-4, buffers_rtol=1e-5)


@pytest.mark.parametrize("fused_path", [True, False])
def test_a_relu_without_a_residual_applies_on_both_paths(fused_path: bool, monkeypatch) -> None:
    x = _input("channels_last")
    if not fused_path:
        monkeypatch.setattr(pooling, "_fusable", lambda *tensors: False)
    y = gate(x, ["mean"], lambda m: m.sigmoid(), [], relu=True)
    assert torch.equal(y, torch.relu(gate(x, ["mean"], lambda m: m.sigmoid(), [])))
    assert (y == 0).any()


def test_a_residual_of_another_shape_is_an_error_on_both_paths(monkeypatch) -> None:
    x = _input("channels_last")
    for fused_path in (True, False):
        with monkeypatch.context() as patch:
            if not fused_path:
                patch.setattr(pooling, "_fusable", lambda *tensors: False)
            with pytest.raises(ValueError, match="residual must have its input's shape"):
                gate(x, ["mean"], lambda m: m.sigmoid(), [], residual=torch.zeros(2, 5, 6, 1))


@needs_kernels
def test_training_on_the_cpu_takes_the_fused_path(monkeypatch) -> None:
    calls = []
    monkeypatch.setattr(pooling._FusedGate, "apply", lambda *a: calls.append(a) or a[0] * 1)
    x = _input("channels_last")
    gate(x, ["mean"], lambda m: m.sigmoid(), [])
    with torch.no_grad():
        gate(x, ["mean"], lambda m: m.sigmoid(), [])
    gate(x.detach(), ["mean"], lambda m: m.sigmoid(), [])
    assert len(calls) == 1


@needs_kernels
@pytest.mark.parametrize("layout", LAYOUTS)
def test_a_tie_sends_the_whole_gradient_to_its_first_element(layout: str) -> None:
    x = torch.zeros(1, 3, 4, 4).to(memory_format=LAYOUTS[layout])
    x[:, :, 1, 2] = x[:, :, 3, 0] = 5.0  # two maxima per channel, (1, 2) first in row-major order
    x.requires_grad_()
    gate(x, ["max"], lambda high: high, []).sum().backward()
    # d/dx of x * max(x) summed: max(x) everywhere, plus sum(x) = 10 at the one winning pixel
    expected = torch.full((1, 3, 4, 4), 5.0)
    expected[:, :, 1, 2] += 10.0
    assert torch.equal(x.grad, expected)


_OUT_OF_MEMORY_IN_A_KERNEL = """
import resource, sys, torch
from attnbench import fused
torch.set_num_threads(1)
fused.extremes(torch.rand(1, 2, 64), False, low=True, total=True)  # the library and its thread are up
a, ones, zeros = torch.rand(1, 2, 2**24), torch.ones(1, 2**24), torch.zeros(1, 2**24)
out = torch.empty_like(a)
mapped = int(open("/proc/self/statm").read().split()[0]) * resource.getpagesize()
resource.setrlimit(resource.RLIMIT_AS, (mapped + int(sys.argv[1]) * 2**20, resource.RLIM_INFINITY))
try:
    {call}
except MemoryError as exc:
    print("MemoryError:", exc)
"""
# per kernel: the call, and the address space it gets on top of what is mapped (MB): room for what
# the wrapper allocates, not for the kernel's buffers (k = 2**24 floats or doubles each)
_OUT_OF_MEMORY_CASES = {
    "extremes": ("fused.extremes(a, False, low=True, total=True)", 512 + 128 + 64),  # 5 outputs, `best`
    "sums": ("fused.sums(a, a, False, relu_of_b=(ones, zeros))", 256 + 64),  # 2 float64 outputs
    "scale_rows": ("fused.scale_rows(a, False, ones, zeros, out, b=a, b_scale=ones, relu_of_b=(ones, zeros))", 64),
    "outer_pools": ("fused.outer_pools(a, ones)", 32),  # a as 2 pixels of 2**24 channels
}


@needs_kernels
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="caps the address space through /proc and RLIMIT_AS")
@pytest.mark.parametrize("kernel", list(_OUT_OF_MEMORY_CASES))
def test_a_kernel_out_of_memory_raises_memory_error_instead_of_aborting(kernel: str) -> None:
    """The kernels' own buffers (per thread or per image) that cannot be allocated make the call
    raise MemoryError; they used to abort() the process, training run and all."""
    call, headroom_mb = _OUT_OF_MEMORY_CASES[kernel]
    out = subprocess.run([sys.executable, "-c", _OUT_OF_MEMORY_IN_A_KERNEL.replace("{call}", call), str(headroom_mb)],
                         capture_output=True, text=True, timeout=120, cwd=Path(__file__).resolve().parents[1])
    assert out.returncode == 0, out.stderr
    assert "MemoryError: the CPU kernels could not allocate their working buffers" in out.stdout, out.stdout


@needs_kernels
def test_extremes_keep_the_first_of_tied_values_across_chunks_of_rows() -> None:
    """Over the middle dim extremes() goes 16 rows at a time with sixteen or eight columns' running
    values in registers (and one column at a time for the rest: 27 = 16 + 8 + 3 columns here): a
    tie in a later chunk must not win."""
    a = torch.zeros(2, 40, 27)
    a[:, 3], a[:, 20], a[:, 35] = 7.0, 7.0, 7.0  # maxima tied across three chunks, in every column
    a[:, 5], a[:, 37] = -7.0, -7.0  # minima tied across chunks
    high, at_high, low, at_low, total, _ = fused.extremes(a, False, low=True, total=True)
    assert torch.equal(high, torch.full((2, 27), 7.0)) and torch.equal(at_high, torch.full((2, 27), 3))
    assert torch.equal(low, torch.full((2, 27), -7.0)) and torch.equal(at_low, torch.full((2, 27), 5))
    assert torch.equal(total, a.double().sum(1))


@pytest.mark.parametrize("fused_path", [True, False])
def test_bad_gates_are_errors_on_both_paths(fused_path: bool, monkeypatch) -> None:
    if not fused_path:
        monkeypatch.setattr(pooling, "_fusable", lambda *tensors: False)
    x = _input("channels_last")
    with pytest.raises(ValueError, match=r"must return \(2, 5, 1, 1\)"):
        gate(x, ["mean"], lambda m: m.flatten(1), [])
    with pytest.raises(ValueError, match="each pool once from"):
        gate(x, ["median"], lambda m: m, [])
    with pytest.raises(ValueError, match="each pool once from"):  # its gradients would collide
        gate(x, ["mean", "mean"], lambda a, b: a + b, [])


@needs_kernels
def test_a_parameter_missing_from_params_is_an_error() -> None:
    weight = torch.ones(1, 5, 1, 1, requires_grad=True)
    with pytest.raises(ValueError, match=r"shape \(1, 5, 1, 1\) that needs a gradient but is not among"):
        gate(_input("channels_last"), ["mean"], lambda m: (m * weight).sigmoid(), [])
    gate(_input("channels_last"), ["mean"], lambda m: (m * weight).sigmoid(), [weight]).sum().backward()
    assert weight.grad is not None


class Scaled(nn.Module):
    """A gate module whose attention also uses a tensor it does not own."""

    def __init__(self, outside: torch.Tensor) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(1, 5, 1, 1))
        self.outside = [outside]  # a plain list: not registered, so not among its parameters

    def attention(self, mean: torch.Tensor) -> torch.Tensor:
        return (mean * self.weight * self.outside[0]).sigmoid()


@pytest.mark.parametrize("fused_path", [True, False])
def test_a_module_method_trains_its_module_and_a_plain_callable_needs_params(fused_path: bool, monkeypatch) -> None:
    if not fused_path:
        monkeypatch.setattr(pooling, "_fusable", lambda *tensors: False)
    module = Scaled(torch.ones(1, 5, 1, 1))
    gate(_input("channels_last"), ["mean"], module.attention).sum().backward()
    assert module.weight.grad is not None and module.weight.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="needs `params`"):
        gate(_input("channels_last"), ["mean"], lambda m: m.sigmoid())


@needs_kernels
def test_an_untrained_tensor_of_a_module_method_is_an_error_on_its_first_call() -> None:
    module = Scaled(torch.ones(1, 5, 1, 1, requires_grad=True))
    with pytest.raises(ValueError, match=r"shape \(1, 5, 1, 1\) that needs a gradient but is not among"):
        gate(_input("channels_last"), ["mean"], module.attention)
    fine = Scaled(torch.ones(1, 5, 1, 1))
    gate(_input("channels_last"), ["mean"], fine.attention)
    assert pooling._CHECKED[fine] == {Scaled.attention}  # later calls skip the walk


@needs_kernels
def test_a_retained_graph_runs_backward_twice() -> None:
    x = _input("channels_last")
    y = gate(x, ["max", "mean"], lambda high, mean: (high - mean).sigmoid(), [])
    (first,) = torch.autograd.grad(y.sum(), x, retain_graph=True)
    (second,) = torch.autograd.grad(y.sum(), x)
    assert torch.equal(first, second)


@needs_kernels
def test_an_attention_without_gradient_leaves_only_the_product() -> None:
    x = _input("channels_last")
    gate(x, ["mean"], lambda m: torch.full_like(m, 0.5), []).sum().backward()
    assert torch.equal(x.grad, torch.full_like(x, 0.5))


@needs_kernels
def test_inputs_the_kernels_cannot_take_use_torch_ops() -> None:
    empty = torch.zeros(2, 3, 0, 4, requires_grad=True)
    assert not pooling._fusable(empty, None)
    assert gate(empty, ["mean"], lambda m: m, []).shape == empty.shape
    with pytest.raises(ValueError, match="contiguous float32"):
        fused.sums(torch.zeros(2, 3, 4, dtype=torch.float64), None, False)
    with pytest.raises(ValueError, match="1 <= m, k"):
        fused.extremes(torch.zeros(2, 0, 4), False, low=False)
    with pytest.raises(ValueError, match="relu_out and masked together"):
        fused.sums(torch.zeros(2, 3, 4), None, False, relu_out=torch.zeros(2, 3, 4))
    with pytest.raises(ValueError, match="peak positions"):
        a = torch.zeros(1, 3, 4)
        fused.scale_rows(a, False, torch.ones(1, 4), None, torch.empty_like(a), [(torch.full((1, 4), 3), torch.ones(1, 4))])
    x, per_pixel, per_channel = torch.zeros(1, 3, 4), torch.ones(1, 3), torch.ones(1, 4)
    with pytest.raises(ValueError, match="peak positions"):  # a channel index past the 4 channels
        fused.outer_col_sums(x, x, per_pixel, per_pixel, torch.full((1, 3), 4), per_pixel)
    with pytest.raises(ValueError, match="together"):  # a backward call with part of its operands
        fused.outer_scale(x, per_channel, per_pixel, torch.empty_like(x), t=per_pixel)
    with pytest.raises(ValueError, match="peak positions"):  # a pixel before the first, over the last dim
        fused.scale_rows(x, True, per_pixel, None, torch.empty_like(x), [(torch.full((1, 3), -1), per_pixel)])
    with pytest.raises(ValueError, match="peak positions"):  # a column peak at pixel 3 of 3
        fused.outer_scale(x, per_channel, per_pixel, torch.empty_like(x), per_pixel, per_channel,
                          (torch.zeros(1, 3, dtype=torch.long), per_pixel), [(torch.full((1, 4), 3), per_channel)])


@pytest.mark.parametrize("over_last", [False, True])
def test_kernels_agree_with_torch(over_last: bool) -> None:
    if fused.library() is None:
        pytest.skip("no C compiler")
    a, b = _distinct((3, 40, 17)), _distinct((3, 40, 17), seed=1)
    dim = 2 if over_last else 1
    total, products = fused.sums(a, b, over_last)
    assert torch.allclose(total, a.double().sum(dim)) and torch.allclose(products, (a.double() * b).sum(dim))
    assert fused.sums(a, None, over_last, plain=True)[1] is None
    relu_out, masked = torch.relu(_distinct((3, 40, 17), seed=2)), torch.empty_like(a)
    total, products = fused.sums(a, b, over_last, relu_out=relu_out, masked=masked)
    expected = torch.ops.aten.threshold_backward(a, relu_out, 0)
    assert torch.equal(masked, expected) and (masked == 0).any() and (masked != 0).any()
    assert torch.allclose(total, expected.double().sum(dim))
    assert torch.allclose(products, (expected.double() * b).sum(dim))
    high, at_high, low, at_low, total_too, squares = fused.extremes(a, over_last, low=True, total=True, squares=True)
    assert torch.allclose(total_too, a.double().sum(dim)) and torch.allclose(squares, a.double().square().sum(dim))
    assert torch.equal(high, a.amax(dim)) and torch.equal(at_high, a.argmax(dim))
    assert torch.equal(low, a.amin(dim)) and torch.equal(at_low, a.argmin(dim))
    scale, shift, bump, b_scale = (_distinct(tuple(high.shape), seed=s) for s in (3, 4, 5, 6))
    out = torch.empty_like(a)
    fused.scale_rows(a, over_last, scale, shift, out, [(at_high, bump), (at_low, 2 * bump)], b=b, b_scale=b_scale)
    expected = a * scale.unsqueeze(dim) + b * b_scale.unsqueeze(dim) + shift.unsqueeze(dim)
    expected.scatter_add_(dim, at_high.unsqueeze(dim), bump.unsqueeze(dim))
    expected.scatter_add_(dim, at_low.unsqueeze(dim), 2 * bump.unsqueeze(dim))
    assert torch.allclose(out, expected, atol=1e-5)


@needs_kernels
@pytest.mark.parametrize("k", [3, 17, 40, 64, 100])  # spans of several rows, and of one (k >= 33)
def test_a_relu_recomputed_from_b_masks_as_the_forward_wrote_it(k: int) -> None:
    """relu_of_b (IEBN's backward without a residual) gives, bit for bit, the sums and the write
    that reading the forward's output gives, also where b * scale + shift is within an ulp of 0."""
    b, a = _distinct((2, 37, k)), _distinct((2, 37, k), seed=1)
    s, t, scale2, shift2, u = (_distinct((2, k), seed=seed) for seed in range(2, 7))
    s /= 50
    t[:, ::2] = -(b[:, 0, ::2] * s[:, ::2])  # row 0 at the ReLU's edge: 0 or an ulp off, by rounding
    out = torch.empty_like(b)
    fused.scale_rows(b, False, s, t, out, relu=True)
    masked = torch.empty_like(a)
    assert all(torch.equal(got, want) for got, want in zip(fused.sums(a, b, False, relu_of_b=(s, t)),
                                                           fused.sums(a, b, False, relu_out=out, masked=masked)))
    assert (out == 0).any() and (out > 0).any() and torch.equal(masked, torch.ops.aten.threshold_backward(a, out, 0))
    recomputed, read = torch.empty_like(a), torch.empty_like(a)
    fused.scale_rows(a, False, scale2, shift2, recomputed, b=b, b_scale=u, relu_of_b=(s, t))
    fused.scale_rows(masked, False, scale2, shift2, read, b=b, b_scale=u)
    assert torch.equal(recomputed, read)
    with pytest.raises(ValueError, match="needs b, the middle dim"):
        fused.sums(a, b, True, relu_of_b=(s, t))


@needs_kernels
@pytest.mark.parametrize("over_last", [False, True])
def test_a_sum_of_squares_keeps_the_variance_of_values_with_a_large_mean(over_last: bool) -> None:
    """A gate's "var" pool is E[x^2] - E[x]^2 from sums(x, x), or from extremes() with a max or min
    pool: with a mean 1000 standard deviations from 0, float sums of x * x would lose the variance
    (float lanes, unshifted: 3% off); the kernels sum about each image's first row, and the
    result is float64's."""
    g = torch.Generator().manual_seed(0)
    a = 1000 + torch.randn(3, 300, 17, generator=g)
    a[:, 0] += 300  # a first row far out, as a zero-padded conv's corner pixel can be
    dim = 2 if over_last else 1
    count = a.shape[dim]
    for total, squares in (fused.sums(a, a, over_last), fused.extremes(a, over_last, low=False, total=True,
                                                                       squares=True)[4:]):
        variance = squares / count - (total / count) ** 2
        assert torch.allclose(variance, a.double().var(dim, correction=0), rtol=1e-4)
        assert torch.allclose(total, a.double().sum(dim), rtol=1e-9)


@needs_kernels
def test_moments_are_the_float64_formula_rounded_to_float32() -> None:
    """moments() turns the sums into E[x] and E[x^2] - E[x]^2 as float64 arithmetic does, then
    rounds to float32: a variance that rounding takes below 0 is 0, a NaN stays a NaN, and the
    mean alone comes without squares."""
    g = torch.Generator().manual_seed(0)
    total = torch.randn(4, 9, dtype=torch.float64, generator=g) * 50
    squares = torch.rand(4, 9, dtype=torch.float64, generator=g) * 900
    total[0, 0], squares[0, 0] = 3 * 0.1, 3 * 0.1 ** 2 * (1 - 1e-15)  # three values of 0.1: E[x^2] - E[x]^2 < 0
    total[1, 1] = float("nan")
    mean, var = fused.moments(total, squares, 3)
    assert mean.dtype == var.dtype == torch.float32 and mean.shape == (4, 9)
    expected = squares / 3 - (total / 3) ** 2
    assert float(expected[0, 0]) < 0 and var[0, 0] == 0
    torch.testing.assert_close(mean, (total / 3).float(), rtol=0, atol=0, equal_nan=True)
    keep = ~torch.isnan(expected) & (expected >= 0)
    assert torch.allclose(var[keep].double(), expected[keep], rtol=1e-6)
    assert torch.isnan(mean[1, 1]) and torch.isnan(var[1, 1])
    assert fused.moments(total, None, 3)[1] is None
    with pytest.raises(ValueError, match="float64"):
        fused.moments(total.float(), None, 3)
    with pytest.raises(ValueError, match="count of at least 1"):
        fused.moments(total, squares, 0)


@pytest.fixture
def fresh_cache(monkeypatch, tmp_path):
    """An empty library cache, and library() asked anew (before and after the test)."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    fused.library.cache_clear()
    yield tmp_path / "attnbench"
    fused.library.cache_clear()


def test_without_a_compiler_gates_fall_back_with_one_warning(monkeypatch, tmp_path, fresh_cache) -> None:
    monkeypatch.delenv("ATTNBENCH_KERNELS", raising=False)
    monkeypatch.setenv("CC", str(tmp_path / "no-such-cc"))
    with pytest.warns(RuntimeWarning, match="no-such-cc.*gates and convs use torch ops"):
        assert fused.library() is None
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert fused.library() is None  # cached: warned once
        x = _input("channels_last")
        y = gate(x, ["max", "min"], lambda high, low: (high - low).sigmoid(), [])
    assert torch.allclose(y, x * (x.amax((2, 3), keepdim=True) - x.amin((2, 3), keepdim=True)).sigmoid())
    assert not list(fresh_cache.glob("*"))  # nothing half-written


@needs_kernels
def test_library_is_built_once_into_a_private_cache(fresh_cache) -> None:
    assert fused.library() is not None
    (built,) = fresh_cache.iterdir()
    assert built.name.startswith("kernels-") and built.suffix == ".so"
    assert fresh_cache.stat().st_mode & 0o777 == 0o700


@needs_kernels
def test_a_library_others_can_write_is_not_loaded(fresh_cache) -> None:
    fused.library()
    (built,) = fresh_cache.iterdir()
    built.chmod(0o777)  # anyone could have replaced it
    fused.library.cache_clear()
    with pytest.warns(RuntimeWarning, match="not this user's alone"):
        assert fused.library() is None


class TwoGates(nn.Module):
    """A channel gate then a spatial gate, each a small function of its pools with parameters of
    this module, as CBAM's are (the spatial one with a 3x3 conv over the pooled maps)."""

    def __init__(self, channels: int, channel_pools: list[str], spatial_pools: list[str], shift: bool = False):
        super().__init__()
        g = torch.Generator().manual_seed(3)
        self.channel_weights = nn.Parameter(torch.randn(len(channel_pools), channels, 1, 1, generator=g))
        self.spatial_conv = nn.Parameter(torch.randn(1, len(spatial_pools), 3, 3, generator=g) / 3)
        self.channel_pools, self.spatial_pools, self.shift = channel_pools, spatial_pools, shift

    def channel_attention(self, *pooled: torch.Tensor) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        z = sum(w * p for w, p in zip(self.channel_weights, pooled))
        return (z.sigmoid(), z.tanh()) if self.shift else z.sigmoid()

    def spatial_attention(self, *pooled: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.conv2d(torch.cat(pooled, 1), self.spatial_conv, padding=1).sigmoid()

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None, relu: bool = False,
                before: nn.Module | None = None) -> torch.Tensor:
        return pooling.channel_spatial_gate(x, self.channel_pools, self.channel_attention, self.spatial_pools,
                                            self.spatial_attention, residual=residual, relu=relu, before=before)


def _run_two_gates(x: torch.Tensor, channel_pools: list[str], spatial_pools: list[str], fused_path: bool, monkeypatch,
                   tail: str = "none", shift: bool = False) -> tuple:
    module = TwoGates(x.shape[1], channel_pools, spatial_pools, shift)
    residual = None if tail == "none" else _residual(x)
    with monkeypatch.context() as patch:
        if not fused_path:
            patch.setattr(pooling, "_fusable", lambda *tensors: False)
        x = x.detach().requires_grad_()
        y = module(x, residual, tail == "add+relu") if fused_path else _with_tail(module(x), residual, tail == "add+relu")
        y.backward(_distinct(tuple(y.shape), seed=2))
    return y, x.grad, [p.grad for p in module.parameters()] + ([] if residual is None else [residual.grad])


@needs_kernels
@pytest.mark.parametrize("channel_pools, spatial_pools, shift", [
    (["mean", "max"], ["max", "mean"], False), (["max"], ["mean"], False), (["mean"], ["max"], False),
    (["var", "min", "mean"], ["max", "mean"], True), (["min", "max"], ["max"], True)], ids=str)
@pytest.mark.parametrize("case", ["channels_last", "batch-1", "one-pixel", "20-channels"])
@pytest.mark.parametrize("tail", ["none", "add", "add+relu"])
def test_fused_channel_then_spatial_gate_matches_two_gates(channel_pools, spatial_pools, shift, case, tail,
                                                           monkeypatch) -> None:
    """One Function that never writes the channel gate's output, against the two gates as torch ops
    (20 channels: the kernels' eight-lane loops and their tails), with a block's residual add and
    ReLU or without, and channel gates of every pool, with a shift or without."""
    x = _distinct((2, 20, 5, 6)).to(memory_format=torch.channels_last) if case == "20-channels" else _input(case)
    y, dx, dparams = _run_two_gates(x, channel_pools, spatial_pools, True, monkeypatch, tail, shift)
    assert type(y.grad_fn).__name__ == "_FusedChannelSpatialGateBackward"
    y_ref, dx_ref, dparams_ref = _run_two_gates(x, channel_pools, spatial_pools, False, monkeypatch, tail, shift)
    if tail == "add+relu":
        assert (y == 0).any() and (y > 0).any(), "the ReLU must cut some values and keep others"
    assert torch.allclose(y, y_ref, atol=1e-5)
    assert torch.allclose(dx, dx_ref, atol=1e-4) and dx.is_contiguous(memory_format=torch.channels_last)
    for got, want in zip(dparams, dparams_ref, strict=True):
        assert torch.allclose(got, want, rtol=1e-4, atol=1e-4)


@needs_kernels
@pytest.mark.parametrize("case, spatial_pools", [("nchw", ["max"]), ("channels_last", ["min"])])
def test_channel_then_spatial_gate_is_two_gates_where_the_pair_does_not_fuse(case: str, spatial_pools: list[str],
                                                                             monkeypatch) -> None:
    y, dx, _ = _run_two_gates(_input(case), ["mean", "max"], spatial_pools, True, monkeypatch)
    assert type(y.grad_fn).__name__ == "_FusedGateBackward"  # the spatial gate's own fused Function
    y_ref, dx_ref, _ = _run_two_gates(_input(case), ["mean", "max"], spatial_pools, False, monkeypatch)
    assert torch.allclose(y, y_ref, atol=1e-5) and torch.allclose(dx, dx_ref, atol=1e-4)


class ShiftingTwoGates(TwoGates):
    def spatial_attention(self, *pooled: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        scale = super().spatial_attention(*pooled)
        return scale, scale


@needs_kernels
def test_fused_channel_then_spatial_gate_refuses_a_shift() -> None:
    with pytest.raises(ValueError, match="scale only"):
        ShiftingTwoGates(5, ["mean"], ["max"])(_input("channels_last"))


@needs_kernels
@pytest.mark.parametrize("case", ["channels_last", "batch-1", "20-channels"])
def test_a_batch_norm_before_the_channel_then_spatial_gate_folds_into_it(case: str) -> None:
    """channel_spatial_gate(x, before=bn) against the pair after bn(x): output, gradients of x, the
    gates' and the norm's parameters and the residual, and the running statistics."""
    x = _distinct((2, 20, 5, 6)).to(memory_format=torch.channels_last) if case == "20-channels" else _input(case)
    bn = _batch_norm(x.shape[1])
    results = []
    for fold in (True, False):
        module, norm, residual = TwoGates(x.shape[1], ["mean", "max"], ["max", "mean"]), copy.deepcopy(bn), _residual(x)
        norm_ran = []
        norm.register_forward_hook(lambda *_: norm_ran.append(True))
        x_in = x.detach().requires_grad_()
        y = module(x_in, residual, True, before=norm) if fold else module(norm(x_in), residual, True)
        assert type(y.grad_fn).__name__ == "_FusedChannelSpatialGateBackward" and bool(norm_ran) != fold
        y.backward(_distinct(tuple(y.shape), seed=2))
        grads = [p.grad for p in (*module.parameters(), *norm.parameters(), residual)]
        results.append((y.detach(), x_in.grad, grads, norm.state_dict()))
    (y, dx, grads, state), (y_ref, dx_ref, grads_ref, state_ref) = results
    assert (y == 0).any() and (y > 0).any()
    assert torch.allclose(y, y_ref, atol=1e-5)
    assert torch.allclose(dx, dx_ref, rtol=1e-4, atol=1e-4)
    for got, want in zip(grads, grads_ref, strict=True):
        assert torch.allclose(got, want, rtol=1e-4, atol=1e-4)
    for name, value in state.items():
        assert torch.allclose(value, state_ref[name], rtol=1e-5, atol=1e-6), name
