"""attnbench.models.conv: the C kernels' convs and weight gradients equal oneDNN's, and the layer is
an nn.Conv2d wherever the kernels do not apply."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from attnbench import fused
from attnbench.models import build_model
from attnbench.models.conv import Conv2d
from conftest import needs_kernels, onednn_weight_grad

pytestmark = pytest.mark.usefixtures("kernels_built_unless_turned_off")
CL = torch.channels_last


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
    want = onednn_weight_grad(x, dy, (cout, cin, kernel, kernel), stride, padding)
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
    (dict(dy=torch.randn(2, 0, 4, 4).to(memory_format=CL)), "maps"),                      # no output channel
])
def test_weight_grad_refuses_what_the_kernel_cannot_take(bad: dict, message: str) -> None:
    args = dict(x=torch.randn(2, 16, 4, 4).to(memory_format=CL), dy=torch.randn(2, 4, 4, 4).to(memory_format=CL))
    args.update(bad)
    with pytest.raises(ValueError, match=message):
        fused.conv_weight_grad(args["x"], args["dy"], 3, 1, 1)


def _pair(bias: bool, cin: int = 32, cout: int = 12, kernel: int = 3, layout=CL, **options) -> tuple[Conv2d, nn.Conv2d]:
    ours = Conv2d(cin, cout, kernel, padding=kernel // 2, bias=bias, **options)
    theirs = nn.Conv2d(cin, cout, kernel, padding=kernel // 2, bias=bias, **options)
    theirs.load_state_dict(ours.state_dict())
    return ours.to(memory_format=layout), theirs.to(memory_format=layout)


def _grads(layer: nn.Module, x: torch.Tensor, dy: torch.Tensor) -> tuple[torch.Tensor, tuple[torch.Tensor, ...]]:
    x = x.detach().requires_grad_()
    y = layer(x)
    return y, torch.autograd.grad(y, [x, *layer.parameters()], dy)


@needs_kernels
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("case", ["resnet-conv", "few-channels"])
def test_layer_trains_as_nn_conv2d_does(case: str, bias: bool) -> None:
    if case == "resnet-conv":  # channels_last, 16k input channels: oneDNN forward, weight gradient in C
        ours, theirs = _pair(bias, stride=2)
        x, dy = torch.randn(4, 32, 10, 10).to(memory_format=CL), torch.randn(4, 12, 5, 5).to(memory_format=CL)
        kernel_ran = "_ConvWithWeightGradInCBackward"
    else:  # CBAM's spatial conv on NCHW maps: all of it in C
        ours, theirs = _pair(bias, cin=2, cout=1, kernel=7, layout=torch.contiguous_format)
        x, dy = torch.randn(4, 2, 9, 11), torch.randn(4, 1, 9, 11)
        kernel_ran = "_DirectConvBackward"
    y, grads = _grads(ours, x, dy)
    y_ref, grads_ref = _grads(theirs, x, dy)
    assert type(y.grad_fn).__name__ == kernel_ran
    assert y.shape == y_ref.shape and y.is_contiguous(memory_format=CL) == y_ref.is_contiguous(memory_format=CL)
    for got, want in zip((y, *grads), (y_ref, *grads_ref)):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


@needs_kernels
@pytest.mark.parametrize("cin, cout, kernel, h, w", [(2, 1, 7, 9, 9), (3, 2, 3, 5, 6), (1, 3, 5, 1, 1), (4, 4, 3, 3, 8)])
def test_direct_conv_equals_torch(cin, cout, kernel, h, w) -> None:
    g = torch.Generator().manual_seed(cin * 10 + cout)
    x, weight = torch.randn(3, cin, h, w, generator=g), torch.randn(cout, cin, kernel, kernel, generator=g)
    dy = torch.randn(3, cout, h, w, generator=g)
    torch.testing.assert_close(fused.conv_same(x, weight), F.conv2d(x, weight, padding=kernel // 2), rtol=1e-5, atol=1e-5)
    weight.requires_grad_()
    (want,) = torch.autograd.grad(F.conv2d(x, weight, padding=kernel // 2), [weight], dy)
    torch.testing.assert_close(fused.conv_same_weight_grad(x, dy, kernel), want, rtol=1e-4, atol=1e-4)


@needs_kernels
def test_direct_conv_refuses_what_it_cannot_take() -> None:
    x = torch.randn(2, 2, 5, 5)
    with pytest.raises(ValueError, match="odd square kernel"):
        fused.conv_same(x, torch.randn(1, 2, 4, 4))
    with pytest.raises(ValueError, match="odd square kernel"):
        fused.conv_same(x, torch.randn(1, 3, 3, 3))
    with pytest.raises(ValueError, match="NCHW"):
        fused.conv_same(x.to(memory_format=CL), torch.randn(1, 2, 3, 3))
    with pytest.raises(ValueError, match="same-size"):
        fused.conv_same_weight_grad(x, torch.randn(2, 1, 4, 5), 3)


RESNET_CONV = dict(in_channels=32, out_channels=12, kernel_size=3, padding=1)
FEW_CHANNELS = dict(in_channels=2, out_channels=1, kernel_size=7, padding=3)
NOT_SERVED = {  # case: (layer, input layout)
    "resnet-conv-nchw": (RESNET_CONV, torch.contiguous_format),
    "8-channels": (RESNET_CONV | dict(in_channels=8), CL),
    "grouped": (RESNET_CONV | dict(groups=2), CL),
    "dilated": (RESNET_CONV | dict(dilation=2, padding=2), CL),
    "1x1": (RESNET_CONV | dict(kernel_size=1, padding=0), CL),
    "few-channels-channels_last": (FEW_CHANNELS, CL),
    "few-channels-strided": (FEW_CHANNELS | dict(stride=2), torch.contiguous_format),
    "few-channels-even-kernel": (FEW_CHANNELS | dict(kernel_size=4, padding=2), torch.contiguous_format),
    "no-grad": (RESNET_CONV, CL),
    "frozen": (RESNET_CONV, CL),
    "autocast": (RESNET_CONV, CL),  # bf16 convs: torch's, whose backward takes bf16 gradients
}


@pytest.mark.parametrize("case", NOT_SERVED)
def test_layer_is_nn_conv2d_where_the_kernels_do_not_apply(case: str) -> None:
    args, layout = NOT_SERVED[case]
    ours, theirs = Conv2d(**args, bias=False), nn.Conv2d(**args, bias=False)
    theirs.load_state_dict(ours.state_dict())
    ours.weight.requires_grad_(case != "frozen")
    x = torch.randn(2, args["in_channels"], 6, 6).to(memory_format=layout).requires_grad_()
    with torch.set_grad_enabled(case != "no-grad"), torch.autocast("cpu", torch.bfloat16, enabled=case == "autocast"):
        y = ours.to(memory_format=layout)(x)
        assert torch.equal(y, theirs.to(memory_format=layout)(x))
    assert y.grad_fn is None if case == "no-grad" else type(y.grad_fn).__name__ == "ConvolutionBackward0"
    if y.grad_fn is not None:
        y.float().sum().backward()
        assert x.grad is not None and x.grad.shape == x.shape


@needs_kernels
def test_second_derivative_is_refused_not_wrong() -> None:
    ours, _ = _pair(False)
    x = torch.randn(2, 32, 6, 6).to(memory_format=CL).requires_grad_()
    (dw,) = torch.autograd.grad(ours(x).square().sum(), [ours.weight], create_graph=True)
    with pytest.raises(RuntimeError, match="once_differentiable"):
        dw.sum().backward()


def test_the_resnets_build_their_convs_with_it() -> None:
    model = build_model("none", 20, 10, "resnet", "basic")
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    assert convs and all(isinstance(m, Conv2d) for m in convs)


def test_a_weight_from_torch_func_takes_torch_ops() -> None:
    """functional_call hands the layer wrapped parameters: the C paths' Functions cannot run under
    torch.func's transforms, so the layer must notice the weight, not only the input."""
    layer = Conv2d(16, 8, 3, padding=1).to(memory_format=CL)
    x = torch.randn(2, 16, 5, 5).to(memory_format=CL)
    grads = torch.func.grad(lambda p: torch.func.functional_call(layer, p, (x,)).square().sum())(dict(layer.named_parameters()))
    weight = layer.weight.detach().requires_grad_()
    (want,) = torch.autograd.grad(F.conv2d(x, weight, layer.bias, padding=1).square().sum(), [weight])
    torch.testing.assert_close(grads["weight"], want, rtol=1e-4, atol=1e-4)
