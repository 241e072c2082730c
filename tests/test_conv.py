"""attnbench.models.conv: the weight gradient from kernels.c equals oneDNN's, and the layer is an
nn.Conv2d wherever the kernel does not apply."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from attnbench import fused
from attnbench.models import build_model
from attnbench.models.conv import Conv2d
from conftest import needs_kernels

pytestmark = pytest.mark.usefixtures("kernels_built_unless_turned_off")
CL = torch.channels_last


def _onednn_weight_grad(x: torch.Tensor, dy: torch.Tensor, weight_shape: tuple, stride: int, padding: int) -> torch.Tensor:
    weight = torch.zeros(weight_shape).to(memory_format=CL)
    return torch.ops.aten.convolution_backward(dy, x, weight, None, [stride] * 2, [padding] * 2, [1, 1], False,
                                               [0, 0], 1, [False, True, False])[1]


@needs_kernels
@pytest.mark.parametrize("cin, cout, kernel, stride, padding, h, w", [
    (16, 16, 3, 1, 1, 8, 8),     # a CIFAR ResNet 3x3
    (32, 20, 3, 2, 1, 9, 7),     # stride 2, odd sizes, output channels not a multiple of the 6-row tile
    (48, 7, 5, 1, 2, 6, 6),      # a bigger kernel
    (16, 5, 3, 1, 0, 5, 5),      # no padding
    (16, 1, 3, 2, 1, 1, 1),      # one pixel: every tap but the centre reads the border
])
def test_weight_grad_equals_onednn(cin, cout, kernel, stride, padding, h, w) -> None:
    g = torch.Generator().manual_seed(cin + cout + kernel)
    x = torch.randn(3, cin, h, w, generator=g).to(memory_format=CL)
    ho, wo = ((size + 2 * padding - kernel) // stride + 1 for size in (h, w))
    dy = torch.randn(3, cout, ho, wo, generator=g).to(memory_format=CL)
    got = fused.conv_weight_grad(x, dy, kernel, stride, padding)
    want = _onednn_weight_grad(x, dy, (cout, cin, kernel, kernel), stride, padding)
    assert got.shape == want.shape and got.is_contiguous(memory_format=CL)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    assert torch.equal(got, fused.conv_weight_grad(x, dy, kernel, stride, padding))  # same sum order every time


@needs_kernels
@pytest.mark.parametrize("bad, message", [
    (dict(x=torch.randn(2, 8, 4, 4).to(memory_format=CL)), "multiple of 16"),             # too few channels
    (dict(x=torch.randn(2, 16, 4, 4)), "channels_last"),                                  # NCHW
    (dict(dy=torch.randn(2, 4, 3, 4).to(memory_format=CL)), "maps"),                      # wrong output size
    (dict(dy=torch.randn(3, 4, 4, 4).to(memory_format=CL)), "maps"),                      # wrong batch
    (dict(x=torch.randn(2, 16, 4, 4, dtype=torch.float64).to(memory_format=CL)), "float32"),
])
def test_weight_grad_refuses_what_the_kernel_cannot_take(bad: dict, message: str) -> None:
    args = dict(x=torch.randn(2, 16, 4, 4).to(memory_format=CL), dy=torch.randn(2, 4, 4, 4).to(memory_format=CL))
    args.update(bad)
    with pytest.raises(ValueError, match=message):
        fused.conv_weight_grad(args["x"], args["dy"], 3, 1, 1)


def _pair(bias: bool, **options) -> tuple[Conv2d, nn.Conv2d]:
    ours = Conv2d(32, 12, 3, padding=1, bias=bias, **options)
    theirs = nn.Conv2d(32, 12, 3, padding=1, bias=bias, **options)
    theirs.load_state_dict(ours.state_dict())
    return ours.to(memory_format=CL), theirs.to(memory_format=CL)


def _grads(layer: nn.Module, x: torch.Tensor, dy: torch.Tensor) -> tuple[torch.Tensor, tuple[torch.Tensor, ...]]:
    x = x.detach().requires_grad_()
    y = layer(x)
    return y, torch.autograd.grad(y, [x, *layer.parameters()], dy)


@needs_kernels
@pytest.mark.parametrize("bias", [False, True])
def test_layer_trains_as_nn_conv2d_does(bias: bool) -> None:
    ours, theirs = _pair(bias, stride=2)
    x = torch.randn(4, 32, 10, 10).to(memory_format=CL)
    dy = torch.randn(4, 12, 5, 5).to(memory_format=CL)
    y, grads = _grads(ours, x, dy)
    y_ref, grads_ref = _grads(theirs, x, dy)
    assert type(y.grad_fn).__name__ == "_ConvWithWeightGradInCBackward"  # the kernel did run
    assert torch.equal(y, y_ref)  # the forward is oneDNN's either way
    for got, want in zip(grads, grads_ref):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("case", ["nchw", "few-channels", "grouped", "dilated", "1x1", "no-grad", "frozen"])
def test_layer_is_nn_conv2d_where_the_kernel_does_not_apply(case: str) -> None:
    options = {"grouped": dict(groups=2), "dilated": dict(dilation=2, padding=2), "1x1": dict(kernel_size=1, padding=0)}
    cin = 8 if case == "few-channels" else 32
    args = dict(in_channels=cin, out_channels=12, kernel_size=3, padding=1, bias=False) | options.get(case, {})
    ours, theirs = Conv2d(**args), nn.Conv2d(**args)
    theirs.load_state_dict(ours.state_dict())
    ours.weight.requires_grad_(case != "frozen")
    x = torch.randn(2, cin, 6, 6)
    if case != "nchw":
        x = x.to(memory_format=CL)
        ours, theirs = ours.to(memory_format=CL), theirs.to(memory_format=CL)
    x.requires_grad_()
    with torch.set_grad_enabled(case != "no-grad"):
        y = ours(x)
        assert torch.equal(y, theirs(x))
    assert y.grad_fn is None if case == "no-grad" else type(y.grad_fn).__name__ == "ConvolutionBackward0"


@needs_kernels
def test_second_derivative_is_refused_not_wrong() -> None:
    ours, _ = _pair(False)
    x = torch.randn(2, 32, 6, 6).to(memory_format=CL).requires_grad_()
    (dw,) = torch.autograd.grad(ours(x).square().sum(), [ours.weight], create_graph=True)
    with pytest.raises(RuntimeError, match="once_differentiable"):
        dw.sum().backward()


def test_models_build_with_it_and_keep_nn_conv2d_state() -> None:
    model = build_model("none", 20, 10, "resnet", "basic")
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    assert convs and all(isinstance(m, Conv2d) for m in convs)
    plain = {k: v.shape for k, v in model.state_dict().items()}
    assert all(f"{name}.weight" in plain for name, m in model.named_modules() if isinstance(m, nn.Conv2d))
