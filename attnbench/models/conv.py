"""nn.Conv2d that trains on the CPU with C kernels where oneDNN is slow.

Three cases, all measured at batch 128 on a 2-core AVX2 CPU:

- The CIFAR ResNets' 3x3 stride-1 convs (channels_last, 16-64 channels; all but the stem and the
  downsampling convs): forward, input gradient and weight gradient by Winograd's F(4x4, 3x3)
  (fused.conv3x3 and conv3x3_weight_grad), with a quarter of the direct conv's multiplies. That
  took 1.7-2.1x less time than oneDNN's forward and 1.7-2.3x less than the direct weight gradient
  below, and a ResNet-20 step 1.40x less.
- The other convs with 16k input channels (channels_last): a train step spent about a third of
  its time in oneDNN's weight gradients, which fused.conv_weight_grad computes in 0.7-0.85x the
  time. Forward and input gradient stay oneDNN's.
- Convs with a handful of channels, such as CBAM's 7x7 from 2 maps to 1: oneDNN's forward and
  both gradients take 26 ms at 32x32 where fused.conv_same and conv_same_weight_grad take 1.15
  ms, so the whole conv runs in C (on NCHW maps, which a direct loop reads plane by plane).

The layer has nn.Conv2d's parameters and state_dict, and anywhere no case applies (GPU,
autograd off as in evaluation, other shapes or layouts, autocast, compile, tracing, torch.func)
it is nn.Conv2d.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.autograd.function import once_differentiable

from attnbench import fused

FEW_CHANNELS = 16  # in_channels * out_channels up to which the whole conv runs in C


class Conv2d(nn.Conv2d):
    def forward(self, x: Tensor) -> Tensor:
        if self._trains_in_c(x):
            if self._few_channels(x):
                return _DirectConv.apply(x, self.weight, self.bias)
            if self._winograd(x):
                return _WinogradConv.apply(x, self.weight, self.bias)
            if self._weight_grad_in_c(x):
                return _ConvWithWeightGradInC.apply(x, self.weight, self.bias, self.stride[0], self.padding[0])
        return super().forward(x)

    def _trains_in_c(self, x: Tensor) -> bool:
        k = self.kernel_size
        return (self.weight.requires_grad and self.groups == 1
                and self.dilation == (1, 1) and self.padding_mode == "zeros" and k[0] == k[1] > 1
                and isinstance(self.padding, tuple) and self.padding[0] == self.padding[1]
                and self.stride[0] == self.stride[1] and fused.serves(x, self.weight))

    def _few_channels(self, x: Tensor) -> bool:
        k = self.kernel_size[0]
        return (self.in_channels * self.out_channels <= FEW_CHANNELS and k % 2 == 1 and self.padding[0] == k // 2
                and self.stride[0] == 1 and x.is_contiguous())

    def _weight_grad_in_c(self, x: Tensor) -> bool:
        return self.in_channels % 16 == 0 and x.is_contiguous(memory_format=torch.channels_last)

    def _winograd(self, x: Tensor) -> bool:
        return (self._weight_grad_in_c(x) and self.kernel_size == (3, 3) and self.stride == (1, 1)
                and self.padding == (1, 1) and self.out_channels % 16 == 0)


def _bias_grad(ctx, dy: Tensor) -> Tensor | None:
    return dy.sum((0, 2, 3)) if ctx.has_bias and ctx.needs_input_grad[2] else None


class _ConvWithWeightGradInC(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, bias: Tensor | None, stride: int, padding: int) -> Tensor:
        ctx.save_for_backward(x, weight)
        ctx.stride, ctx.padding, ctx.has_bias = stride, padding, bias is not None
        return F.conv2d(x, weight, bias, stride, padding)

    @staticmethod
    @once_differentiable  # the C kernel's result carries no graph: a second derivative raises, not comes out wrong
    def backward(ctx, dy: Tensor) -> tuple[Tensor | None, ...]:
        x, weight = ctx.saved_tensors
        dy = dy.contiguous(memory_format=torch.channels_last)
        stride, padding = [ctx.stride] * 2, [ctx.padding] * 2
        dx = dw = None
        if ctx.needs_input_grad[0]:
            dx = torch.ops.aten.convolution_backward(dy, x, weight, None, stride, padding, [1, 1], False, [0, 0], 1,
                                                     [True, False, False])[0]
        if ctx.needs_input_grad[1]:
            dw = fused.conv_weight_grad(x, dy, weight.shape[-1], ctx.stride, ctx.padding)
        return dx, dw, _bias_grad(ctx, dy), None, None


class _WinogradConv(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
        ctx.save_for_backward(x, weight)
        ctx.has_bias = bias is not None
        y = fused.conv3x3(x, weight)
        return y if bias is None else y.add_(bias.view(1, -1, 1, 1))

    @staticmethod
    @once_differentiable
    def backward(ctx, dy: Tensor) -> tuple[Tensor | None, ...]:
        x, weight = ctx.saved_tensors
        dy = dy.contiguous(memory_format=torch.channels_last)
        dx = fused.conv3x3(dy, weight, input_grad=True) if ctx.needs_input_grad[0] else None
        dw = fused.conv3x3_weight_grad(x, dy) if ctx.needs_input_grad[1] else None
        return dx, dw, _bias_grad(ctx, dy)


class _DirectConv(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
        ctx.save_for_backward(x, weight)
        ctx.has_bias = bias is not None
        y = fused.conv_same(x, weight.detach().contiguous())
        return y if bias is None else y.add_(bias.view(1, -1, 1, 1))

    @staticmethod
    @once_differentiable
    def backward(ctx, dy: Tensor) -> tuple[Tensor | None, ...]:
        x, weight = ctx.saved_tensors
        dy = dy.contiguous()
        dx = dw = None
        if ctx.needs_input_grad[0]:  # the same conv of dy with the kernel flipped and in/out swapped
            dx = fused.conv_same(dy, weight.flip(2, 3).transpose(0, 1).contiguous())
        if ctx.needs_input_grad[1]:
            dw = fused.conv_same_weight_grad(x, dy, weight.shape[-1])
        return dx, dw, _bias_grad(ctx, dy)
