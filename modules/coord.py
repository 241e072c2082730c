"""Coordinate attention (Hou, Zhou and Feng, "Coordinate Attention for Efficient Mobile Network
Design", CVPR 2021; the authors' code: houqb/CoordAttention, coordatt.py)."""

import math

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from attnbench.registry import register


def _hidden(channels: int, reduction: int) -> int:
    return max(8, channels // reduction)


@register("coord", aliases=("ca", "coordatt"),
          params=lambda c: 3 * c * _hidden(c, 32) + 3 * _hidden(c, 32) + 2 * c)
class CoordAttention(nn.Module):
    """Coordinate attention: a gate per row and a gate per column, from pooling along each axis.

    Average over width (C x H x 1) and over height (C x 1 x W), joined along the spatial axis;
    a shared conv1x1 to M = max(8, C/32) channels, BN, h-swish; split again; conv1x1 back to C
    for each axis, sigmoid; out = x * a_w * a_h. The floor of 8 is the authors' code (the paper
    names only the reduction 32), so M is 8 at every width of ResNet-164. coordatt.py sets no init,
    but the authors' network (mbv2_ca.py) re-initialises every conv, these included, with
    N(0, sqrt(2 / (k*k*out_channels))) and zero bias, which this follows. The authors place it in
    mobile networks; here it gates a bottleneck's output.
    """

    def __init__(self, channels: int, *, reduction: int = 32):
        super().__init__()
        if reduction < 1:
            raise ValueError(f"reduction must be at least 1, not {reduction}")
        hidden = _hidden(channels, reduction)
        self.conv = nn.Conv2d(channels, hidden, 1)
        self.bn = nn.BatchNorm2d(hidden)
        self.conv_h = nn.Conv2d(hidden, channels, 1)
        self.conv_w = nn.Conv2d(hidden, channels, 1)
        for conv in (self.conv, self.conv_h, self.conv_w):
            nn.init.normal_(conv.weight, 0.0, math.sqrt(2.0 / conv.out_channels))  # k = 1
            nn.init.zeros_(conv.bias)

    def forward(self, x: Tensor) -> Tensor:
        h, w = x.shape[2:]
        pooled = torch.cat((x.mean(3, keepdim=True), x.mean(2, keepdim=True).transpose(2, 3)), dim=2)
        y_h, y_w = F.hardswish(self.bn(self.conv(pooled))).split((h, w), dim=2)
        return x * self.conv_w(y_w.transpose(2, 3)).sigmoid() * self.conv_h(y_h).sigmoid()
