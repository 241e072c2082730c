"""CBAM (Woo et al., 2018): a channel gate from average and max pooling, then a spatial gate."""

import torch
from torch import Tensor, nn

from attnbench.pooling import channel_max_and_mean, global_max, global_mean
from attnbench.registry import register


class CBAMGate(nn.Module):
    """Channel: a = sigmoid(MLP(GAP x) + MLP(GMP x)) with one shared MLP; x1 = a * x.
    Spatial: s = sigmoid(BN(conv7x7([max_c x1, mean_c x1]))); out = s * x1.

    The spatial BN starts with weight 0 (the original's init), so the spatial gate opens at 0.5
    and the block starts close to its plain form.
    """

    def __init__(self, channels: int, *, reduction: int = 16):
        super().__init__()
        hidden = channels // reduction
        self.mlp = nn.Sequential(nn.Linear(channels, hidden), nn.ReLU(inplace=True), nn.Linear(hidden, channels))
        self.spatial_conv = nn.Conv2d(2, 1, 7, padding=3, bias=False)
        self.spatial_bn = nn.BatchNorm2d(1, momentum=0.01)
        nn.init.kaiming_normal_(self.spatial_conv.weight, mode="fan_out")
        nn.init.zeros_(self.spatial_bn.weight)

    def forward(self, x: Tensor) -> Tensor:
        n, c = x.shape[:2]
        # One MLP call over both pooled descriptors instead of two.
        pooled = torch.cat((global_mean(x), global_max(x)))
        avg_out, max_out = self.mlp(pooled).split(n)
        x1 = x * (avg_out + max_out).sigmoid_().view(n, c, 1, 1)
        return x1 * self.spatial_bn(self.spatial_conv(channel_max_and_mean(x1))).sigmoid_()


register("cbam", "CBAM: channel gate (avg+max pooling MLP) then 7x7 spatial gate", gate=CBAMGate)
