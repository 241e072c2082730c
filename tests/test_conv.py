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
@pytest.mark.parametrize("case", ["resnet-conv", "resnet-3x3", "few-channels"])
def test_layer_trains_as_nn_conv2d_does(case: str, bias: bool) -> None:
    if case == "resnet-conv":  # channels_last, 16k input channels, stride 2: oneDNN forward, weight gradient in C
        ours, theirs = _pair(bias, stride=2)
        x, dy = torch.randn(4, 32, 10, 10).to(memory_format=CL), torch.randn(4, 12, 5, 5).to(memory_format=CL)
        kernel_ran = "_ConvWithWeightGradInCBackward"
    elif case == "resnet-3x3":  # stride 1, 16k channels both sides: all of it by Winograd
        ours, theirs = _pair(bias, cout=16)
        x, dy = torch.randn(4, 32, 10, 10).to(memory_format=CL), torch.randn(4, 16, 10, 10).to(memory_format=CL)
        kernel_ran = "_WinogradConvBackward"
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
@pytest.mark.parametrize("n, cin, cout, h, w", [
    (3, 16, 16, 8, 8),     # a CIFAR ResNet layer's shape: 12 whole tiles
    (5, 16, 32, 16, 16),   # 80 tiles: 3 whole groups of 24 tiles, one of 8 (not a multiple of the 6-row tile)
    (2, 8, 48, 9, 6),      # partial tiles at the bottom and right edges; 8 channels in, 48 out
    (2, 16, 32, 7, 10),    # partial tiles again, with the input gradient's conv (32 channels to 16)
    (2, 32, 16, 1, 1),     # one pixel: all but the centre tap read the zero border
])
def test_winograd_conv_equals_the_direct_conv(n: int, cin: int, cout: int, h: int, w: int) -> None:
    """Forward, input and weight gradients against float64 convs, to 1e-5 of each result's scale:
    Winograd's transforms round ~10x more than a direct conv (float32's own rounding is ~1e-7 of it)."""
    g = torch.Generator().manual_seed(n * cin + h)
    x = torch.randn(n, cin, h, w, generator=g).to(memory_format=CL)
    weight = torch.randn(cout, cin, 3, 3, generator=g).to(memory_format=CL)  # as a channels_last model holds it
    want = F.conv2d(x.double(), weight.double(), padding=1)
    got = fused.conv3x3(x, weight)
    assert got.dtype == torch.float32 and got.is_contiguous(memory_format=CL)
    torch.testing.assert_close(got.double(), want, rtol=0, atol=1e-5 * want.abs().max().item())
    dy = torch.randn(n, cout, h, w, generator=g).to(memory_format=CL)
    if cin % 16 == 0:  # the input gradient's conv maps cout channels to cin
        want_dx = F.conv_transpose2d(dy.double(), weight.double(), padding=1)  # a conv's input gradient
        got_dx = fused.conv3x3(dy, weight, input_grad=True)
        torch.testing.assert_close(got_dx.double(), want_dx, rtol=0, atol=1e-5 * want_dx.abs().max().item())
    weight64 = weight.double().requires_grad_()
    (want_dw,) = torch.autograd.grad(F.conv2d(x.double(), weight64, padding=1), [weight64], dy.double())
    got_dw = fused.conv3x3_weight_grad(x, dy)
    assert got_dw.is_contiguous(memory_format=CL) and got_dw.shape == weight.shape
    assert torch.equal(got_dw, fused.conv3x3_weight_grad(x, dy))  # the threads' sums added in one order
    torch.testing.assert_close(got_dw.double(), want_dw, rtol=0, atol=1e-5 * want_dw.abs().max().item())


@needs_kernels
@pytest.mark.parametrize("x, weight, input_grad, message", [
    (torch.randn(2, 16, 4, 4), torch.randn(16, 16, 3, 3), False, "channels_last"),
    (torch.randn(2, 16, 4, 4).to(memory_format=CL), torch.randn(16, 16, 5, 5), False, "not a 3x3 kernel"),
    (torch.randn(2, 16, 4, 4).to(memory_format=CL), torch.randn(12, 16, 3, 3), False, "16 input and 12 output"),
    (torch.randn(2, 12, 4, 4).to(memory_format=CL), torch.randn(16, 12, 3, 3), False, "12 input and 16 output"),
    (torch.randn(2, 16, 4, 4).to(memory_format=CL), torch.randn(16, 8, 3, 3), False, "takes 8 channels"),
    (torch.randn(2, 16, 4, 4).to(memory_format=CL), torch.randn(16, 8, 3, 3), True,
     r"input gradient\): 16 input and 8 output"),  # channels swapped: 16 in is fine, 8 out is not
    (torch.randn(2, 16, 4, 4).to(memory_format=CL), torch.randn(8, 16, 3, 3), True, r"input gradient\) takes 8"),
    (torch.randn(0, 16, 4, 4).to(memory_format=CL), torch.randn(16, 16, 3, 3), False, "is empty"),
    (torch.randn(2, 16, 4, 4).to(memory_format=CL), torch.randn(16, 16, 3, 3, dtype=torch.float64), False, "float32"),
    (torch.randn(2, 16, 4, 4).to(memory_format=CL), torch.empty(16, 16, 3, 3, device="meta"), False, "float32 CPU"),
    (torch.randn(2, 16, 4, 4).to(memory_format=CL), torch.randn(16), False, "4-d"),
])
def test_winograd_conv_refuses_what_it_cannot_take(x, weight, input_grad: bool, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        fused.conv3x3(x, weight, input_grad=input_grad)


@needs_kernels
@pytest.mark.parametrize("x, dy, message", [
    (torch.randn(2, 16, 4, 4), torch.randn(2, 16, 4, 4), "channels_last"),
    (torch.randn(2, 12, 4, 4), torch.randn(2, 16, 4, 4), "12 input and 16 output"),
    (torch.randn(2, 16, 4, 4), torch.randn(2, 8, 4, 4), "16 input and 8 output"),
    (torch.randn(2, 16, 4, 4), torch.randn(2, 16, 2, 2), "maps"),  # a stride-2 conv's output
    (torch.randn(2, 16, 4, 4), torch.randn(3, 16, 4, 4), "maps"),
    (torch.randn(0, 16, 4, 4), torch.randn(0, 16, 4, 4), "is empty"),
])
def test_winograd_weight_grad_refuses_what_it_cannot_take(x, dy, message: str) -> None:
    channels_last = message != "channels_last"
    x, dy = (t.to(memory_format=CL) if channels_last else t for t in (x, dy))
    with pytest.raises(ValueError, match=message):
        fused.conv3x3_weight_grad(x, dy)


@needs_kernels
@pytest.mark.parametrize("cin, cout, kernel, h, w", [(2, 1, 7, 9, 9), (3, 2, 3, 5, 6), (1, 3, 5, 1, 1), (4, 4, 3, 3, 8),
                                                     (2, 1, 7, 6, 21), (1, 2, 9, 10, 12)])  # 21: 8 + 8 + 5 columns; 9: taps 8 + 1
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
@pytest.mark.parametrize("options, path", [
    (dict(out_channels=16), "_WinogradConvBackward"),
    (dict(out_channels=12), "_ConvWithWeightGradInCBackward"),  # output channels not a multiple of 16
    (dict(out_channels=16, padding=0), "_ConvWithWeightGradInCBackward"),
    (dict(out_channels=16, stride=2), "_ConvWithWeightGradInCBackward"),
    (dict(out_channels=16, kernel_size=5, padding=2), "_ConvWithWeightGradInCBackward"),
])
def test_only_same_size_3x3_convs_take_winograd(options: dict, path: str) -> None:
    layer = Conv2d(**(RESNET_CONV | options), bias=False).to(memory_format=CL)
    assert type(layer(torch.randn(2, 32, 8, 8).to(memory_format=CL)).grad_fn).__name__ == path


@needs_kernels
@pytest.mark.parametrize("cout", [12, 16], ids=["weight-grad-in-c", "winograd"])
def test_second_derivative_is_refused_not_wrong(cout: int) -> None:
    ours, _ = _pair(False, cout=cout)
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
