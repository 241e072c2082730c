"""Instance enhancement batch norm (Liang et al., AAAI 2020): BN whose scale is gated per instance."""

import torch
from torch import Tensor, nn

from attnbench.pooling import global_mean
from attnbench.registry import register


class IEBatchNorm2d(nn.BatchNorm2d):
    """y = BN(x) * (gamma * s) + beta with s = sigmoid(GAP(x) * w + b), GAP on the raw input.

    The gate is computed before normalisation, so it sees each image's own channel means, which
    batch statistics average away. w = 0, b = -1 at init: every gate starts at sigmoid(-1) = 0.269.
    """

    def __init__(self, channels: int, *, eps: float = 1e-5, momentum: float = 0.1):
        super().__init__(channels, eps=eps, momentum=momentum, affine=False)
        shape = (1, channels, 1, 1)
        self.gamma = nn.Parameter(torch.full(shape, 1.0))
        self.beta = nn.Parameter(torch.full(shape, 0.0))
        self.gate_weight = nn.Parameter(torch.full(shape, 0.0))
        self.gate_bias = nn.Parameter(torch.full(shape, -1.0))

    def gate(self, x: Tensor) -> Tensor:
        return (global_mean(x)[:, :, None, None] * self.gate_weight + self.gate_bias).sigmoid()

    def forward(self, x: Tensor) -> Tensor:
        s = self.gate(x)
        # beta + normalised * (gamma * s) in one pass over the tensor instead of two.
        return torch.addcmul(self.beta, super().forward(x), self.gamma * s)


register("iebn", "instance-enhanced batch norm: replaces each BN, per-image sigmoid gate on its scale", norm=IEBatchNorm2d)
