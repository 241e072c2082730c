"""The backbone's batch norm: nn.BatchNorm2d that can apply the ReLU after it (and a block's
residual add) as it writes its output, in C when training on the CPU.

Why: a CIFAR ResNet's batch norms and the ReLUs after them are memory-bound passes over the
biggest activations, and torch makes the norm, the add and the ReLU separate passes each way.
Here (attnbench/kernels.c) the forward is one pass for the statistics and one that writes
relu(norm(x) + residual); the backward is one pass for the two sums per channel and one that
writes the input gradient, with the ReLU's mask recomputed from x rather than read from the
output. Everything per channel is done in C too, since each small torch op would cost more than
a pass over a last-stage activation.

A block asks for the ReLU through attnbench.residual.finish, so a norm that cannot take it (a
plugin's, SyncBatchNorm) gets a plain ReLU after it. Wherever the C kernels do not serve (GPU,
eval, no autograd, compile, torch.func, NCHW) this is nn.BatchNorm2d followed by the add and the
ReLU. On the C path, as with the fused gates, a second derivative (create_graph=True) and
forward-mode AD raise rather than give a wrong answer. The state dict is nn.BatchNorm2d's, so
checkpoints load either way.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.autograd.function import once_differentiable

from attnbench import fused
from attnbench.residual import add as add_residual


class BatchNorm2d(nn.BatchNorm2d):
    """nn.BatchNorm2d, then + residual (if given), then a ReLU (if `relu`)."""

    def forward(self, x: Tensor, residual: Tensor | None = None, relu: bool = False) -> Tensor:
        if not self._fusable(x, residual):
            return add_residual(super().forward(x), residual, relu)
        return _FusedBatchNorm.apply(x, self.weight, self.bias, residual, relu, self.eps, *running_update(self))

    def foldable(self, x: Tensor) -> bool:
        """Whether this norm, given x, is the plain training batch norm that a later layer may
        compute from x's statistics itself (attnbench.pooling folds it into a gate): this class's
        forward (not a subclass's own), and the conditions of _trains_in_c."""
        return type(self).forward is BatchNorm2d.forward and self._trains_in_c(x)

    def _trains_in_c(self, x: Tensor) -> bool:
        """Training, affine, with all running buffers or none, more than one value per channel,
        weights the C kernels serve. Else torch's forward, which raises where it should."""
        return (self.training and self.affine and x.dim() == 4 and x.numel() > x.shape[1]
                and running_buffers_in_step(self) and fused.serves(params=(self.weight, self.bias, *running(self))))

    def _fusable(self, x: Tensor, residual: Tensor | None) -> bool:
        """_trains_in_c, on tensors the C kernels serve (channels_last, the residual alike).
        serves() comes before the layout: under vmap, asking for the channels_last layout raises."""
        return self._trains_in_c(x) and fused.serves(x, residual) and channels_last_alike(x, residual)


def channels_last_alike(x: Tensor, residual: Tensor | None) -> bool:
    """x channels_last, and the residual (if any) too, of x's shape: what the C norms read."""
    return x.is_contiguous(memory_format=torch.channels_last) and (
        residual is None or (residual.shape == x.shape and residual.is_contiguous(memory_format=torch.channels_last)))


def batch_statistics(bn: nn.modules.batchnorm._BatchNorm, mean: Tensor, var: Tensor,
                     per_channel: int) -> tuple[Tensor, Tensor]:
    """A batch's mean and (biased) variance per channel, shape (1, C, 1, 1), from each image's,
    shape (N, C, 1, 1), over `per_channel` values in all (the images being of one size: the mean
    of the variances plus the variance of the means). In training they update bn's running
    averages as nn.BatchNorm2d does: the variance made unbiased, momentum None a cumulative
    average."""
    batch_mean = mean.mean(0, keepdim=True)
    batch_var = var.mean(0, keepdim=True) + mean.var(0, correction=0, keepdim=True)
    if bn.training and bn.track_running_stats:
        factor = _count_batch(bn)
        with torch.no_grad():
            bn.running_mean.lerp_(batch_mean.detach().flatten().to(bn.running_mean.dtype), factor)
            unbiased = batch_var.detach().flatten() * per_channel / (per_channel - 1)
            bn.running_var.lerp_(unbiased.to(bn.running_var.dtype), factor)
    return batch_mean, batch_var


def running_buffers_in_step(bn: nn.modules.batchnorm._BatchNorm) -> bool:
    """All of bn's running buffers (mean, variance, batch count) there if it tracks running
    statistics, none if not: what the C kernels, which update them in place, rely on."""
    buffers = (bn.running_mean, bn.running_var, bn.num_batches_tracked)
    return all((buffer is not None) == bn.track_running_stats for buffer in buffers)


def running(bn: nn.modules.batchnorm._BatchNorm) -> list[Tensor]:
    """bn's running mean and variance, where it has them."""
    return [buffer for buffer in (bn.running_mean, bn.running_var) if buffer is not None]


def running_update(bn: nn.modules.batchnorm._BatchNorm) -> tuple[tuple[Tensor, Tensor] | None, float]:
    """For a C kernel's training step: the running (mean, variance) to move, and the factor to
    move them by, with the batch counted; (None, 0.0) where bn keeps no running statistics."""
    if not bn.track_running_stats:
        return None, 0.0
    return (bn.running_mean, bn.running_var), _count_batch(bn)


def _count_batch(bn: nn.modules.batchnorm._BatchNorm) -> float:
    """Count a training batch in bn.num_batches_tracked; return the running averages' factor
    (momentum, or 1 / batches for a cumulative average when momentum is None)."""
    bn.num_batches_tracked.add_(1)
    return 1.0 / bn.num_batches_tracked.item() if bn.momentum is None else bn.momentum


class _FusedBatchNorm(torch.autograd.Function):
    """relu(weight * (x - mean) * invstd + bias + residual) with the batch's mean and invstd, the
    gradient through those statistics included (the batch norm's own), in the C kernels."""

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, bias: Tensor, residual: Tensor | None, relu: bool, eps: float,
                running: tuple[Tensor, Tensor] | None, factor: float) -> Tensor:
        out, mean, invstd = fused.norm_forward(x, weight.detach(), bias.detach(), eps, running, factor, residual, relu)
        # With a residual the ReLU's mask cannot be recomputed from x alone: keep the output.
        ctx.save_for_backward(x, weight, bias, mean, invstd, out if relu and residual is not None else None)
        ctx.relu, ctx.has_residual = relu, residual is not None
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: Tensor) -> tuple[Tensor | None, ...]:
        x, weight, bias, mean, invstd, out = ctx.saved_tensors
        dx, d_weight, d_bias, masked = fused.norm_backward(x, grad.contiguous(memory_format=torch.channels_last), mean,
                                                           invstd, weight.detach(), bias.detach(), ctx.relu, out)
        d_residual = (grad if masked is None else masked) if ctx.has_residual else None
        return dx, d_weight, d_bias, d_residual, None, None, None, None
