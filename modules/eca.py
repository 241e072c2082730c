"""ECA, efficient channel attention (Wang et al., "ECA-Net: Efficient Channel Attention for Deep
Convolutional Neural Networks", CVPR 2020; the authors' code: BangguWu/ECANet)."""

import math

from torch import Tensor, nn

from attnbench.registry import register


def adaptive_k(channels: int) -> int:
    """The paper's kernel size: t = int(|(log2 C + 1) / 2|), made odd by adding 1 if it is even;
    3, 5, 5 for C = 64, 128, 256."""
    t = int(abs((math.log2(channels) + 1) / 2))
    return t if t % 2 else t + 1


@register("eca", params=adaptive_k)
class ECA(nn.Module):
    """ECA: a channel gate from a 1-D convolution across the pooled channels.

    a = sigmoid(conv1d_k(GAP(x))) over the channel axis, no bias, PyTorch's default init; out = a * x.
    The paper sizes k from C (the default here, k = 0); the authors' released models pass k per
    stage and mostly use 3: `k=3` gives that.
    """

    def __init__(self, channels: int, *, k: int = 0):
        super().__init__()
        if k < 0 or (k and k % 2 == 0):
            raise ValueError(f"k must be odd and at least 1 (or 0 for the paper's size from C), not {k}")
        k = k or adaptive_k(channels)
        self.conv = nn.Conv1d(1, 1, k, padding=(k - 1) // 2, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        a = self.conv(x.mean((2, 3))[:, None, :]).sigmoid()
        return x * a[:, 0, :, None, None]
