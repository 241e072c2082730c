"""Squeeze-and-excitation (Hu et al., "Squeeze-and-Excitation Networks", CVPR 2018)."""

from torch import Tensor, nn

from attnbench.registry import register


@register("se", params=lambda c: 2 * c * (c // 16) + c // 16 + c, aliases=("senet",))
class SqueezeExcite(nn.Module):
    """Squeeze-and-excitation: a channel gate from global average pooling.

    a = sigmoid(FC2(ReLU(FC1(GAP(x))))), out = a * x, with C/16 hidden units; the FCs keep
    PyTorch's default init, as in the CIFAR ResNet-164 code the SE baselines come from.
    """

    def __init__(self, channels: int, *, reduction: int = 16):
        super().__init__()
        if not 1 <= reduction <= channels:
            raise ValueError(f"reduction must be between 1 and the channel count {channels}, not {reduction}")
        self.fc1 = nn.Linear(channels, channels // reduction)
        self.fc2 = nn.Linear(channels // reduction, channels)

    def forward(self, x: Tensor) -> Tensor:
        a = self.fc2(self.fc1(x.mean((2, 3))).relu()).sigmoid()
        return x * a[:, :, None, None]
