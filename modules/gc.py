"""GC, the global context block (Cao, Xu, Lin, Wei and Hu, "GCNet: Non-local Networks Meet
Squeeze-Excitation Networks and Beyond", ICCV Workshops 2019; the authors' code: xvjiarui/GCNet,
mmdet/ops/gcb/context_block.py)."""

import torch
from torch import Tensor, nn

from attnbench.registry import register


@register("gc", aliases=("gcnet",), params=lambda c: 2 * c * (c // 16) + 2 * c + 3 * (c // 16) + 1)
class GlobalContext(nn.Module):
    """GC: one context vector per image, pooled by learned attention over positions, added to x.

    w = softmax over positions of conv1x1(C -> 1)(x); context = sum over positions of w * x;
    out = x + conv1x1(ReLU(LayerNorm(conv1x1(context)))) through C/16 channels (the authors'
    default: attention pooling, channel_add fusion, ratio 1/16). The mask conv is Kaiming-
    initialised (fan in) with bias 0, and the last conv starts at 0, so the block starts as the
    identity. The authors add it to their ImageNet ResNets' stages 3 to 5; here every block has one.
    """

    def __init__(self, channels: int, *, reduction: int = 16):
        super().__init__()
        if not 1 <= reduction <= channels:
            raise ValueError(f"reduction must be between 1 and the channel count {channels}, not {reduction}")
        hidden = channels // reduction
        self.mask = nn.Conv2d(channels, 1, 1)
        self.transform = nn.Sequential(nn.Conv2d(channels, hidden, 1), nn.LayerNorm([hidden, 1, 1]), nn.ReLU(),
                                       nn.Conv2d(hidden, channels, 1))
        nn.init.kaiming_normal_(self.mask.weight, mode="fan_in", nonlinearity="relu")
        nn.init.zeros_(self.mask.bias)
        nn.init.zeros_(self.transform[-1].weight)
        nn.init.zeros_(self.transform[-1].bias)

    def forward(self, x: Tensor) -> Tensor:
        n, c, h, w = x.shape
        weights = self.mask(x).reshape(n, 1, h * w).softmax(-1)
        context = torch.bmm(x.reshape(n, c, h * w), weights.transpose(1, 2))
        return x + self.transform(context[..., None])
