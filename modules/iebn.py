"""Instance enhancement batch norm (Liang et al., AAAI 2020): BN whose scale is gated per instance."""

from functools import partial

import torch
from torch import Tensor, nn

from attnbench.norm import batch_statistics
from attnbench.pooling import gate
from attnbench.registry import register


class IEBatchNorm2d(nn.BatchNorm2d):
    """y = BN(x) * (gamma * s) + beta with s = sigmoid(GAP(x) * w + b), GAP on the raw input.

    The gate is computed before normalisation, so it sees each image's own channel means, which
    batch statistics average away. w = 0, b = -1 at init: every gate starts at sigmoid(-1) = 0.269.

    The whole layer is x * scale + shift with a scale and shift per image and channel, so it runs
    as a pooled gate: the batch mean and variance come from each image's mean and variance (one
    pass over x when training on the CPU), and BatchNorm2d only keeps the running statistics.
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


register("iebn", "instance-enhanced batch norm: replaces each BN, per-image sigmoid gate on its scale", norm=IEBatchNorm2d)
