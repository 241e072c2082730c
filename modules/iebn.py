"""Instance enhancement batch norm (Liang et al., "Instance Enhancement Batch Normalization: an
Adaptive Regulator of Batch Noise", AAAI 2020)."""

import torch
from torch import Tensor, nn

from attnbench.registry import register


@register("iebn", role="norm", params=lambda c: 4 * c)
class IEBatchNorm2d(nn.BatchNorm2d):
    """Instance-enhanced batch norm: replaces each BN, a per-image sigmoid gate on its scale.

    y = BN(x) * (gamma * s) + beta with s = sigmoid(GAP(x) * w + b), the gate computed on the
    raw input, so it sees each image's own channel means, which batch statistics average away.
    The BN itself has no affine. w = 0, b = -1 at init: every gate starts at sigmoid(-1) = 0.269.
    """

    def __init__(self, channels: int, *, eps: float = 1e-5, momentum: float = 0.1):
        if not (eps > 0 and 0 <= momentum <= 1):
            raise ValueError(f"eps must be positive and momentum within [0, 1], not {eps} and {momentum}")
        super().__init__(channels, eps=eps, momentum=momentum, affine=False)
        shape = (1, channels, 1, 1)
        self.gamma = nn.Parameter(torch.ones(shape))
        self.beta = nn.Parameter(torch.zeros(shape))
        self.gate_weight = nn.Parameter(torch.zeros(shape))
        self.gate_bias = nn.Parameter(torch.full(shape, -1.0))

    def forward(self, x: Tensor) -> Tensor:
        s = torch.sigmoid(x.mean((2, 3), keepdim=True) * self.gate_weight + self.gate_bias)
        return super().forward(x) * (self.gamma * s) + self.beta
