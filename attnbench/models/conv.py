"""nn.Conv2d whose weight gradient comes from kernels.c when it trains on the CPU.

Why: a ResNet-20 train step on a 2-core CPU spends about a third of its time in oneDNN's weight
gradients of the 3x3 convs, which run at about 40% of the AVX2 peak; fused.conv_weight_grad
takes 0.55-0.8x their time. Forward and input gradient stay oneDNN's. The layer is an nn.Conv2d
with the same parameters and state_dict, and anywhere the kernel does not apply (GPU, NCHW,
eval, fewer than 16 or an odd number of input channels, compile, tracing) it is nn.Conv2d.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.autograd.function import once_differentiable

from attnbench import fused


class Conv2d(nn.Conv2d):
    def forward(self, x: Tensor) -> Tensor:
        if self._kernel_serves(x):
            return _ConvWithWeightGradInC.apply(x, self.weight, self.bias, self.stride[0], self.padding[0])
        return super().forward(x)

    def _kernel_serves(self, x: Tensor) -> bool:
        k, s, p = self.kernel_size, self.stride, self.padding
        return (self.weight.requires_grad and self.groups == 1 and self.dilation == (1, 1)
                and self.padding_mode == "zeros" and k[0] == k[1] > 1 and s[0] == s[1]
                and isinstance(p, tuple) and p[0] == p[1] and self.in_channels % 16 == 0
                and self.weight.dtype == torch.float32 and fused.serves(x)
                and x.is_contiguous(memory_format=torch.channels_last))


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
        dx = dw = db = None
        if ctx.needs_input_grad[0]:
            dx = torch.ops.aten.convolution_backward(dy, x, weight, None, stride, padding, [1, 1], False, [0, 0], 1,
                                                     [True, False, False])[0]
        if ctx.needs_input_grad[1]:
            dw = fused.conv_weight_grad(x, dy, weight.shape[-1], ctx.stride, ctx.padding)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            db = dy.sum((0, 2, 3))
        return dx, dw, db, None, None
