"""Instance enhancement batch norm (Liang et al., AAAI 2020): BN whose scale is gated per instance."""

from functools import partial

import torch
from torch import Tensor, nn
from torch.autograd.function import once_differentiable

from attnbench import fused
from attnbench.norm import batch_statistics, channels_last_alike, running, running_buffers_in_step, running_update
from attnbench.pooling import gate
from attnbench.registry import register


class IEBatchNorm2d(nn.BatchNorm2d):
    """y = BN(x) * (gamma * s) + beta with s = sigmoid(GAP(x) * w + b), GAP on the raw input.

    The gate is computed before normalisation, so it sees each image's own channel means, which
    batch statistics average away. w = 0, b = -1 at init: every gate starts at sigmoid(-1) = 0.269.

    The whole layer is x * scale + shift with a scale and shift per image and channel, so it runs
    as a pooled gate: the batch mean and variance come from each image's mean and variance, and
    BatchNorm2d only keeps the running statistics. scale_and_shift() is that math as torch ops.
    Training on the CPU with a channels_last input it runs as _FusedIEBN instead: one read and one
    write each way, like the C batch norm, with the same per-channel math in C
    (fused.ie_norm_forward), since as torch ops and autograd it cost ~0.7 ms per layer.
    """

    def __init__(self, channels: int, *, eps: float = 1e-5, momentum: float = 0.1):
        super().__init__(channels, eps=eps, momentum=momentum, affine=False)
        shape = (1, channels, 1, 1)
        self.gamma = nn.Parameter(torch.full(shape, 1.0))
        self.beta = nn.Parameter(torch.full(shape, 0.0))
        self.gate_weight = nn.Parameter(torch.full(shape, 0.0))
        self.gate_bias = nn.Parameter(torch.full(shape, -1.0))

    def forward(self, x: Tensor, residual: Tensor | None = None, relu: bool = False) -> Tensor:
        self._check_input_dim(x)
        batch_stats = self.training or not self.track_running_stats
        per_channel = x.numel() // x.shape[1]
        if batch_stats and per_channel == 1:
            raise ValueError(f"IEBN needs more than 1 value per channel to normalise a batch, got input {tuple(x.shape)}")
        params = (self.gamma, self.beta, self.gate_weight, self.gate_bias)
        # the C path: training, on what the kernels serve, channels_last (serves() first: under
        # vmap, asking for the layout raises)
        if (self.training and running_buffers_in_step(self)
                and fused.serves(x, residual, params=(*params, *running(self))) and channels_last_alike(x, residual)):
            return _FusedIEBN.apply(x, residual, relu, self.eps, *running_update(self), *params)
        pools = ["mean", "var"] if batch_stats else ["mean"]
        return gate(x, pools, partial(self.scale_and_shift, per_channel=per_channel), residual=residual, relu=relu)

    def scale_and_shift(self, mean: Tensor, var: Tensor | None = None, *, per_channel: int) -> tuple[Tensor, Tensor]:
        """From per-image means and variances (N, C, 1, 1): with var, normalise by the batch's
        statistics (and update the running ones); without, by the running ones."""
        if var is None:
            batch_mean, batch_var = self.running_mean.view_as(self.gamma), self.running_var.view_as(self.gamma)
        else:
            batch_mean, batch_var = batch_statistics(self, mean, var, per_channel)
        s = torch.sigmoid(mean * self.gate_weight + self.gate_bias)
        scale = self.gamma * s * torch.rsqrt(batch_var + self.eps)
        return scale, self.beta - batch_mean * scale


class _FusedIEBN(torch.autograd.Function):
    """relu(x * scale + shift + residual) in training, scale and shift per image and channel from
    x's per-image sums (one read), written in one pass; backward one read of dy and x for the
    per-image sums, one write of dx. Residual and ReLU optional, as the C batch norm's; without a
    residual the ReLU's mask is recomputed from x, so the output is not kept."""

    @staticmethod
    def forward(ctx, x: Tensor, residual: Tensor | None, relu: bool, eps: float,
                running: tuple[Tensor, Tensor] | None, factor: float, *params: Tensor) -> Tensor:
        rows = fused.pixel_rows(x)
        sum_x, sum_xx = fused.sums(rows, rows, False)
        scale, shift, *kept = fused.ie_norm_forward(sum_x, sum_xx, rows.shape[1], params, eps, running, factor)
        y = torch.empty_like(x)
        fused.scale_rows(rows, False, scale, shift, fused.pixel_rows(y), residual=fused.pixel_rows(residual), relu=relu)
        ctx.save_for_backward(x, y if relu and residual is not None else None, scale, shift, *kept, *params)
        ctx.relu = relu
        return y

    @staticmethod
    @once_differentiable
    def backward(ctx, dy: Tensor) -> tuple[Tensor | None, ...]:
        x, out, scale, shift, *saved = ctx.saved_tensors
        kept, params = saved[:4], saved[4:]
        rows, dy = fused.pixel_rows(x), dy.contiguous(memory_format=torch.channels_last)
        # Past the ReLU: with a residual, masked by the output as the sums read dy, and written
        # out as dz (the residual's gradient too); without, masked by x * scale + shift > 0 where
        # dy is read, each time.
        dz = dy if out is None else torch.empty_like(dy)
        relu_of_x = (scale, shift) if ctx.relu and out is None else None
        d_shift, d_scale = fused.sums(fused.pixel_rows(dy), rows, False, relu_out=fused.pixel_rows(out),
                                      masked=fused.pixel_rows(dz) if out is not None else None, relu_of_b=relu_of_x)
        dx_x, dx_shift, grads = fused.ie_norm_backward(d_scale, d_shift, rows.shape[1], kept, params)
        dx = torch.empty_like(x)
        fused.scale_rows(fused.pixel_rows(dz), False, scale, dx_shift, fused.pixel_rows(dx), b=rows, b_scale=dx_x,
                         relu_of_b=relu_of_x)
        return dx, dz if ctx.needs_input_grad[1] else None, None, None, None, None, *grads


register("iebn", "instance-enhanced batch norm: replaces each BN, per-image sigmoid gate on its scale", norm=IEBatchNorm2d)
