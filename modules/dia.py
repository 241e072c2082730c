"""DIA, dense-and-implicit attention (Huang et al., "DIANet: Dense-and-Implicit Attention
Network", AAAI 2020; the authors' code: gbup-group/DIANet, models/cifar/dia_resnet.py)."""

import torch
from torch import Tensor, nn

from attnbench.registry import register


def _two_layer_map(channels: int, reduction: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(channels, channels // reduction), nn.ReLU(),
                         nn.Linear(channels // reduction, 4 * channels))


class DIACell(nn.Module):
    """The LSTM-like cell one stage shares: its state runs from block to block within a pass.

    gates = F_in(s) + F_hid(h) split into i, f, g, o; c' = sigmoid(f) c + sigmoid(i) tanh(g);
    h' = sigmoid(o) sigmoid(c'), the authors' sigmoid where an LSTM has tanh, so h' is a gate in
    (0, 1). Each F is Linear(C, C/r) - ReLU - Linear(C/r, 4C) with PyTorch's default init; h and c
    start at 0 in each stage of each pass.
    """

    def __init__(self, channels: int, *, reduction: int = 4):
        super().__init__()
        if not 1 <= reduction <= channels:
            raise ValueError(f"reduction must be between 1 and the channel count {channels}, not {reduction}")
        self.input_map = _two_layer_map(channels, reduction)
        self.hidden_map = _two_layer_map(channels, reduction)
        self.state: tuple[Tensor, Tensor] | None = None

    def reset(self) -> None:
        self.state = None

    def forward(self, s: Tensor) -> Tensor:
        h, c = self.state if self.state is not None else (torch.zeros_like(s), torch.zeros_like(s))
        i, f, g, o = (self.input_map(s) + self.hidden_map(h)).chunk(4, dim=1)
        c = f.sigmoid() * c + i.sigmoid() * g.tanh()
        h = o.sigmoid() * c.sigmoid()
        self.state = (h, c)
        return h


@register("dia", aliases=("dianet",), shared=DIACell, params=lambda c: 0,
          shared_params=lambda c: 2 * (c * (c // 4) + c // 4 + (c // 4) * 4 * c + 4 * c))
class DIA(nn.Module):
    """DIA: a channel gate from one LSTM-like cell shared by all blocks of a stage.

    Each block feeds GAP(x) to its stage's cell and gates x with the cell's new hidden state:
    out = x * h'. The cell follows the authors' code (models/cifar/dia_resnet.py), whose tanh on
    the output is commented out in favour of the sigmoid. Their bottleneck gates bn3's output
    before the residual add, as here; their basic-block variant gates after the add, and the
    pre-activation placement is this project's (the gate on the block's last conv).
    """

    def __init__(self, channels: int, cell: DIACell):
        super().__init__()
        self.cell = [cell]  # a reference, not a submodule: the stage holds the cell

    def forward(self, x: Tensor) -> Tensor:
        h = self.cell[0](x.mean((2, 3)))
        return x * h[:, :, None, None]
