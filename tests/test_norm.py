"""attnbench.norm.BatchNorm2d: the C path gives batch norm's values, gradients and running
statistics (then the residual add and ReLU), against float64 torch; off it, it is nn.BatchNorm2d."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from attnbench import fused, norm
from attnbench.models import build_model
from conftest import assert_trained_alike, needs_kernels

pytestmark = pytest.mark.usefixtures("kernels_built_unless_turned_off")

# Channels below, at and above a span of 256 floats (c >= 256 puts one row per span), row counts
# that leave a short last span, and (the last) 128 spans per thread, so that the float lanes are
# moved into double sums several times.
SHAPES = [(4, 16, 5, 7), (3, 24, 3, 3), (2, 3, 5, 5), (2, 300, 2, 3), (5, 64, 4, 4), (16, 16, 16, 16)]


def _batch(shape: tuple[int, ...], seed: int, offset: float = 0.0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=g) * 2 + offset).to(memory_format=torch.channels_last)


def _norm(channels: int, seed: int = 5) -> norm.BatchNorm2d:
    bn = norm.BatchNorm2d(channels)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        bn.weight.uniform_(0.5, 1.5, generator=g)
        bn.bias.normal_(0, 0.5, generator=g)
        bn.running_mean.normal_(generator=g)
        bn.running_var.uniform_(0.5, 2, generator=g)
    return bn


@needs_kernels
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("relu, with_residual", [(False, False), (True, False), (False, True), (True, True)])
def test_fused_batch_norm_matches_float64_torch(shape, relu, with_residual) -> None:
    """Output, gradients of x, weight, bias and the residual, and the running statistics. The
    reference's ReLU mask is taken from the fused output, so that values within rounding of 0
    (where either side may cut) do not decide the comparison."""
    bn = _norm(shape[1])
    reference = nn.BatchNorm2d(shape[1]).double()
    reference.load_state_dict(bn.state_dict())
    x = _batch(shape, 0, offset=3.0).requires_grad_()
    residual = _batch(shape, 1).requires_grad_() if with_residual else None
    dy = _batch(shape, 2)

    out = bn(x, residual, relu)
    assert type(out.grad_fn).__name__ == "_FusedBatchNormBackward"
    out.backward(dy)

    x64 = x.detach().double().requires_grad_()
    r64 = residual.detach().double().requires_grad_() if with_residual else None
    y64 = reference(x64) + (r64 if with_residual else 0)
    keep = out.detach() > 0 if relu else torch.ones(shape, dtype=torch.bool)
    (y64 * keep).backward(dy.double())
    assert torch.allclose(out.double(), y64.relu() if relu else y64, rtol=1e-5, atol=1e-5)
    pairs = [(x.grad, x64.grad), (bn.weight.grad, reference.weight.grad), (bn.bias.grad, reference.bias.grad)]
    if with_residual:
        pairs.append((residual.grad, r64.grad))
    for got, want in pairs:
        assert torch.allclose(got.double(), want, rtol=1e-4, atol=1e-5 * want.abs().max().item())
    assert torch.allclose(bn.running_mean.double(), reference.running_mean, rtol=1e-5, atol=1e-6)
    assert torch.allclose(bn.running_var.double(), reference.running_var, rtol=1e-5, atol=1e-6)
    assert bn.num_batches_tracked.item() == reference.num_batches_tracked.item() == 1
    assert out.is_contiguous(memory_format=torch.channels_last)


@needs_kernels
def test_statistics_survive_a_large_mean() -> None:
    """Summed about the mean of the batch's first pixels, the variance of values near 1000 with
    spread 2 keeps float32 accuracy (sums of x and x^2 would cancel to nothing)."""
    x = _batch((8, 16, 6, 6), 0, offset=1000.0)
    bn = norm.BatchNorm2d(16, momentum=1.0)
    bn(x.requires_grad_())
    x64 = x.detach().double()
    assert torch.allclose(bn.running_mean.double(), x64.mean((0, 2, 3)), rtol=1e-6)
    assert torch.allclose(bn.running_var.double(), x64.var((0, 2, 3)), rtol=1e-4)


@needs_kernels
def test_statistics_survive_an_outlying_first_pixel() -> None:
    """The sums are taken about the mean of the first 64 pixels, not about the first pixel
    alone, so one pixel 1000 standard deviations out does not cost the variance its accuracy."""
    x = _batch((16, 16, 8, 8), 0)
    x[0, :, 0, 0] = 2000.0
    bn = norm.BatchNorm2d(16, momentum=1.0)
    bn(x.requires_grad_())
    x64 = x.detach().double()
    assert torch.allclose(bn.running_var.double(), x64.var((0, 2, 3)), rtol=1e-5)


@needs_kernels
def test_second_derivatives_are_refused_not_wrong() -> None:
    x = _batch((4, 8, 3, 3), 0).requires_grad_()
    out = norm.BatchNorm2d(8)(x, relu=True)
    (grad,) = torch.autograd.grad(out.square().sum(), x, create_graph=True)
    with pytest.raises(RuntimeError):
        grad.sum().backward()


def test_vmap_takes_the_torch_path() -> None:
    """torch.func.vmap over a batch of batches, as nn.BatchNorm2d allows without running stats."""
    xs = torch.randn(3, 4, 8, 5, 5, generator=torch.Generator().manual_seed(0))
    bn, reference = norm.BatchNorm2d(8, track_running_stats=False), nn.BatchNorm2d(8, track_running_stats=False)
    got = torch.func.vmap(lambda x: bn(x, relu=True))(xs)
    assert torch.equal(got, torch.func.vmap(lambda x: reference(x).relu())(xs))


@needs_kernels
def test_cumulative_average_and_no_running_stats() -> None:
    """momentum None averages the batches seen; track_running_stats=False keeps none and still
    normalises by the batch."""
    xs = [_batch((4, 8, 3, 3), seed).requires_grad_() for seed in range(3)]
    bn, reference = norm.BatchNorm2d(8, momentum=None), nn.BatchNorm2d(8, momentum=None)
    for x in xs:
        assert type(bn(x).grad_fn).__name__ == "_FusedBatchNormBackward"
        reference(x)
    assert torch.allclose(bn.running_mean, reference.running_mean, atol=1e-6)
    assert torch.allclose(bn.running_var, reference.running_var, rtol=1e-5)
    assert bn.num_batches_tracked.item() == 3
    free = norm.BatchNorm2d(8, momentum=None, track_running_stats=False)
    out = free(xs[0], relu=True)
    assert type(out.grad_fn).__name__ == "_FusedBatchNormBackward"
    assert torch.allclose(out, F.batch_norm(xs[0], None, None, free.weight, free.bias, True).relu(), atol=1e-5)


@needs_kernels
def test_repeated_steps_are_bit_identical() -> None:
    """The threads' sums are added in thread order, so a rerun gives the same bits."""
    x, dy = _batch((16, 32, 8, 8), 0).requires_grad_(), _batch((16, 32, 8, 8), 1)
    results = []
    for _ in range(2):
        bn = _norm(32)
        out = bn(x, relu=True)
        out.backward(dy)
        results.append((out, x.grad.clone(), bn.weight.grad, bn.running_var))
        x.grad = None
    for first, second in zip(*results):
        assert torch.equal(first, second)


@pytest.mark.parametrize("case", ["eval", "eval-residual", "nchw", "no-grad", "residual-nchw"])
def test_off_the_c_path_it_is_torchs_batch_norm(case) -> None:
    """Wherever the kernels do not serve, the same bits as nn.BatchNorm2d, + residual, ReLU."""
    shape = (4, 8, 5, 5)
    x = _batch(shape, 0)
    residual = _batch(shape, 1) if case != "eval" else None
    if case == "nchw":
        x = x.contiguous()
    if case == "residual-nchw":
        residual = residual.contiguous()
    bn, reference = _norm(8), nn.BatchNorm2d(8)
    reference.load_state_dict(bn.state_dict())
    if case.startswith("eval"):
        bn.eval()
        reference.eval()
    with torch.set_grad_enabled(case != "no-grad"):
        x.requires_grad_(case != "no-grad")
        out = bn(x, residual, relu=True)
        want = torch.relu(reference(x) + (residual if residual is not None else 0))
    assert out.grad_fn is None or "Fused" not in type(out.grad_fn).__name__
    assert torch.equal(out, want)
    assert torch.equal(bn.running_mean, reference.running_mean)
    assert torch.equal(bn.running_var, reference.running_var)


@needs_kernels
def test_a_subclass_keeps_the_c_path_but_is_not_folded() -> None:
    """A plugin's subclass whose forward calls this one's still runs in C; a gate does not fold it
    (its forward may do more than a batch norm)."""

    class Logged(norm.BatchNorm2d):
        def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None, relu: bool = False) -> torch.Tensor:
            return super().forward(x, residual, relu)

    x = _batch((4, 8, 5, 5), 0).requires_grad_()
    layer = Logged(8)
    assert type(layer(x, relu=True).grad_fn).__name__ == "_FusedBatchNormBackward"
    assert not layer.foldable(x) and norm.BatchNorm2d(8).foldable(x)


def test_a_missing_running_var_is_torchs_error() -> None:
    """The C path, which would write the running variance, is not taken without it."""
    bn = norm.BatchNorm2d(8)
    bn.running_var = None
    with pytest.raises(ValueError, match="running_var"):
        bn(_batch((4, 8, 5, 5), 0).requires_grad_(), relu=True)


def test_state_dict_is_batchnorm2ds() -> None:
    """Checkpoints from before (nn.BatchNorm2d) load, and the other way round."""
    bn, plain = _norm(6), nn.BatchNorm2d(6)
    plain.load_state_dict(bn.state_dict())
    again = norm.BatchNorm2d(6)
    again.load_state_dict(plain.state_dict())
    for key, value in bn.state_dict().items():
        assert torch.equal(again.state_dict()[key], value), key


@needs_kernels
@pytest.mark.parametrize("bad", ["nchw", "shape", "one-row", "per-channel", "float64", "one-running-stat"])
def test_norm_kernels_refuse_what_they_would_misread(bad) -> None:
    """Both kernels, with each operand they would read at a wrong address or as a wrong type."""
    x, other = _batch((2, 8, 3, 3), 0), _batch((2, 8, 3, 3), 1)
    per_channel = [torch.ones(8), torch.zeros(8), torch.zeros(8), torch.ones(8)]  # weight, bias, mean, invstd
    running = (torch.zeros(8), torch.ones(8))
    if bad == "nchw":
        other = other.contiguous()
    elif bad == "shape":
        other = _batch((2, 8, 3, 4), 1)
    elif bad == "one-row":
        x, other = _batch((1, 8, 1, 1), 0), _batch((1, 8, 1, 1), 1)
    elif bad == "per-channel":
        per_channel = [t[:7] for t in per_channel]
    elif bad == "float64":
        per_channel = [t.double() for t in per_channel]
    else:
        running = (torch.zeros(8), None)
    weight, bias, mean, invstd = per_channel
    with pytest.raises(ValueError):
        fused.norm_forward(x, weight, bias, 1e-5, running, 0.1, other, True)
    if bad != "one-running-stat":
        with pytest.raises(ValueError):
            fused.norm_backward(x, other, mean, invstd, weight, bias, True, out=other)


@needs_kernels
@pytest.mark.parametrize("arch, block, depth", [("resnet", "basic", 8), ("resnet", "bottleneck", 11),
                                                ("preresnet", "bottleneck", 11)])
@pytest.mark.parametrize("module", ["none", "se"])  # none: the last norm takes the shortcut; se: the gate does
def test_models_train_as_with_torchs_batch_norm(module, arch, block, depth, monkeypatch) -> None:
    """One training step of a whole model, C norms against torch's, same initialisation: the
    wiring (which norm gets which ReLU and shortcut). The gradients are compared in relative L2
    norm to 1e-2: where a ReLU's input lies within rounding of 0, one side may cut it and the
    other not, and in the bottleneck model one such input (1.5e-6 on torch's side, 0 on the C
    side) moved every gradient upstream of it by 0.3-0.6%. The layer tests above do not depend on
    such inputs (they take the mask from the C output); a wrong formula or wiring is off by far more."""
    results = []
    for c_path in (True, False):
        torch.manual_seed(0)
        model = build_model(module, depth, 10, arch=arch, block=block).to(memory_format=torch.channels_last)
        x = _batch((6, 3, 32, 32), 0)
        with monkeypatch.context() as patch:
            if not c_path:
                patch.setattr(norm.BatchNorm2d, "_fusable", lambda self, x, residual: False)
            nodes = []
            for layer in model.modules():
                if isinstance(layer, norm.BatchNorm2d):
                    layer.register_forward_hook(lambda _, __, out: nodes.append(type(out.grad_fn).__name__))
            out = model(x)
            F.cross_entropy(out, torch.arange(6) % 10).backward()
        assert ("_FusedBatchNormBackward" in nodes) == c_path
        stats = {k: v for k, v in model.state_dict().items() if "running" in k}
        results.append((out.detach(), {n: p.grad for n, p in model.named_parameters()}, stats))
    assert_trained_alike(*results, grads_rel=1e-2, buffers_rtol=1e-4)
