"""SGE, spatial group-wise enhance (Li, Hu and Yang, "Spatial Group-wise Enhance: Improving
Semantic Feature Learning in Convolutional Networks", arXiv 1905.09646; the authors' code:
implus/PytorchInsight, classification/models/imagenet/resnet_sge.py)."""

import torch
from torch import Tensor, nn

from attnbench.registry import register


@register("sge", params=lambda c: 2 * 64)
class SGE(nn.Module):
    """SGE: a spatial gate per channel group from the group's similarity to its own mean.

    Channels split into G groups; per group, m = sum over its channels of x * GAP(x); m is
    standardised over positions (mean 0, unbiased std + 1e-5), scaled and shifted by a per-group
    weight (init 0) and bias (init 1), and out = sigmoid(.) * x, so the gate starts at sigmoid(1).
    G must divide C: 64 groups as in the paper need C of 64 or a multiple of it, so basic blocks
    (16 channels in the first stage) take `--opt sge.groups=16`.
    """

    def __init__(self, channels: int, *, groups: int = 64):
        super().__init__()
        if groups < 1 or channels % groups:
            raise ValueError(f"groups must be at least 1 and divide the channel count {channels}, not {groups}")
        self.groups = groups
        self.weight = nn.Parameter(torch.zeros(1, groups, 1, 1))
        self.bias = nn.Parameter(torch.ones(1, groups, 1, 1))

    def forward(self, x: Tensor) -> Tensor:
        n, c, h, w = x.shape
        grouped = x.reshape(n * self.groups, c // self.groups, h, w)
        m = (grouped * grouped.mean((2, 3), keepdim=True)).sum(1).reshape(n * self.groups, h * w)
        m = (m - m.mean(1, keepdim=True)) / (m.std(1, keepdim=True) + 1e-5)
        t = m.reshape(n, self.groups, h, w) * self.weight + self.bias
        return (grouped * t.reshape(n * self.groups, 1, h, w).sigmoid()).reshape(n, c, h, w)
