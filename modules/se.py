"""Squeeze-and-excitation (Hu et al., 2018): channel weights from the global average."""

from torch import Tensor, nn

from attnbench.pooling import global_mean
from attnbench.registry import register


class SEGate(nn.Module):
    """a = sigmoid(FC2(ReLU(FC1(GAP(x))))), out = a * x; FCs keep PyTorch's default init."""

    def __init__(self, channels: int, *, reduction: int = 16):
        super().__init__()
        self.fc1 = nn.Linear(channels, channels // reduction)
        self.fc2 = nn.Linear(channels // reduction, channels)

    def forward(self, x: Tensor) -> Tensor:
        a = self.fc2(self.fc1(global_mean(x)).relu_()).sigmoid_()
        return x * a[:, :, None, None]


register("se", "squeeze-and-excitation: channel gate from global average pooling", gate=SEGate, aliases=("senet",))
