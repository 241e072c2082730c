"""CBAM (Woo et al., "CBAM: Convolutional Block Attention Module", ECCV 2018)."""

import torch
from torch import Tensor, nn

from attnbench.registry import register


@register("cbam", params=lambda c: 2 * c * (c // 16) + c // 16 + c + 2 * 7 * 7 + 2)
class CBAM(nn.Module):
    """CBAM: a channel gate from average and max pooling, then a 7x7 spatial gate.

    Channel: a = sigmoid(MLP(GAP x) + MLP(GMP x)) with one shared MLP; x1 = a * x.
    Spatial: s = sigmoid(BN(conv7x7([max_c x1, mean_c x1]))); out = s * x1.
    As in the authors' code, the spatial conv is Kaiming-initialised (fan out) and the spatial
    BN starts with weight 0, so the spatial gate opens at 0.5 and the block starts close to
    its plain form.
    """

    def __init__(self, channels: int, *, reduction: int = 16):
        super().__init__()
        if not 1 <= reduction <= channels:
            raise ValueError(f"reduction must be between 1 and the channel count {channels}, not {reduction}")
        hidden = channels // reduction
        self.mlp = nn.Sequential(nn.Linear(channels, hidden), nn.ReLU(), nn.Linear(hidden, channels))
        self.spatial_conv = nn.Conv2d(2, 1, 7, padding=3, bias=False)
        self.spatial_bn = nn.BatchNorm2d(1, momentum=0.01)
        nn.init.kaiming_normal_(self.spatial_conv.weight, mode="fan_out")
        nn.init.zeros_(self.spatial_bn.weight)

    def forward(self, x: Tensor) -> Tensor:
        a = (self.mlp(x.mean((2, 3))) + self.mlp(x.amax((2, 3)))).sigmoid()
        x = x * a[:, :, None, None]
        maps = torch.cat((x.amax(1, keepdim=True), x.mean(1, keepdim=True)), dim=1)
        return x * self.spatial_bn(self.spatial_conv(maps)).sigmoid()
