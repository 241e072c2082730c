"""CBAM (Woo et al., 2018): a channel gate from average and max pooling, then a spatial gate."""

import torch
from torch import Tensor, nn

from attnbench.models.conv import Conv2d
from attnbench.pooling import channel_spatial_gate
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
        self.spatial_conv = Conv2d(2, 1, 7, padding=3, bias=False)
        self.spatial_bn = nn.BatchNorm2d(1, momentum=0.01)
        nn.init.kaiming_normal_(self.spatial_conv.weight, mode="fan_out")
        nn.init.zeros_(self.spatial_bn.weight)

    def channel_attention(self, mean: Tensor, high: Tensor) -> Tensor:
        # One MLP call over both pooled descriptors instead of two.
        avg_out, max_out = self.mlp(torch.cat((mean, high)).flatten(1)).split(len(mean))
        return (avg_out + max_out).sigmoid_().view_as(mean)

    def spatial_attention(self, high: Tensor, mean: Tensor) -> Tensor:
        # NCHW maps: training on the CPU, attnbench's Conv2d runs this 2-to-1 conv as a direct C
        # loop over planes (1.15 ms forward and backward at (128, 2, 32, 32), oneDNN 26 ms).
        maps = torch.cat((high, mean), dim=1).contiguous()
        return self.spatial_bn(self.spatial_conv(maps)).sigmoid_()

    def forward(self, x: Tensor, residual: Tensor | None = None, relu: bool = False,
                before: nn.Module | None = None) -> Tensor:
        return channel_spatial_gate(x, ["mean", "max"], self.channel_attention, ["max", "mean"], self.spatial_attention,
                                    residual=residual, relu=relu, before=before)


register("cbam", "CBAM: channel gate (avg+max pooling MLP) then 7x7 spatial gate", gate=CBAMGate)
