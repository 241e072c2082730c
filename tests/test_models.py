"""Backbones and the five seed modules against REFERENCE.md sections 1 and 3."""

import math

import pytest
import torch
from torch.nn import functional as F

from attnbench import registry
from attnbench.errors import UserError
from attnbench.models import build_model

# REFERENCE.md section 1 and 3: exact parameter counts of ResNet-164 (post-activation).
BASE = {10: 1_704_154, 100: 1_727_284}
EXTRA = {"none": 0, "se": 202_104, "cbam": 207_504, "iebn": 24_224, "spe": 32_364}


def n_params(model):
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("classes", [10, 100])
@pytest.mark.parametrize("module", sorted(EXTRA))
def test_resnet164_parameter_counts(module, classes):
    assert n_params(build_model(module, 164, classes)) == BASE[classes] + EXTRA[module]


@pytest.mark.parametrize("classes, expected", [(10, 1_703_258), (100, 1_726_388)])
def test_preresnet164_parameter_count(classes, expected):
    assert n_params(build_model("none", 164, classes, arch="preresnet")) == expected


def test_resnet164_forward_shape():
    assert build_model("spe", 164, 100)(torch.randn(2, 3, 32, 32)).shape == (2, 100)


@pytest.mark.parametrize("block, depth", [("bottleneck", 21), ("basic", 9), ("bottleneck", 2)])
def test_invalid_depth_names_valid_forms(block, depth):
    with pytest.raises(UserError, match=r"n\+2"):
        build_model("none", depth, 10, block=block)


def test_spe_initial_attention_is_00321_for_any_input():
    gate = registry.get("spe").build(64, {})
    x = torch.randn(2, 64, 5, 5) * 5
    expected = torch.sigmoid(torch.tensor(-2.0)) * torch.sigmoid(torch.tensor(-1.0))
    assert torch.allclose(gate(x), x * expected)
    assert round(expected.item(), 4) == 0.0321


def test_spe_matches_formula_with_random_parameters():
    torch.manual_seed(1)
    gate = registry.get("spe").build(8, {"p0": 0.3, "p1": 1.7})
    with torch.no_grad():
        for p in (gate.w1, gate.b1, gate.w2, gate.b2):
            p.normal_()
    x = torch.randn(2, 8, 5, 5)
    big = x.amax(dim=(2, 3), keepdim=True)
    small = x.amin(dim=(2, 3), keepdim=True)
    big2, small2 = gate.w2 * big + gate.b2, gate.w2 * small + gate.b2
    p_hat = torch.tensor([0.3**2, 1.7**2]) / (0.3**2 + 1.7**2)
    mix = gate.w1 * (p_hat[0] * big2 + p_hat[1] * small2) + gate.b1
    expected = torch.sigmoid(big2 + small2) * torch.sigmoid(mix) * x
    assert torch.allclose(gate(x), expected, atol=1e-6)
    assert torch.isclose(gate.extra_loss(), torch.tensor(0.1 * (0.3**2 + 1.7**2)))


def test_resnet_extra_loss_sums_spe_blocks():
    model = build_model("spe", 20, 10, block="basic")  # 9 blocks, p = (0.5, 0.5) each
    assert torch.isclose(model.extra_loss(), torch.tensor(9 * 0.1 * 0.5))
    assert build_model("se", 20, 10, block="basic").extra_loss() is None


def test_iebn_initial_gate_and_formula():
    torch.manual_seed(2)
    norm = registry.get("iebn").build(6, {})
    x = torch.randn(4, 6, 5, 5) * 3 + 1
    normalised = torch.nn.functional.batch_norm(x, None, None, training=True)
    assert torch.allclose(norm(x), normalised / (1 + math.e), atol=1e-5)  # every gate sigmoid(-1) at init
    with torch.no_grad():
        for p in (norm.gamma, norm.beta, norm.gate_weight, norm.gate_bias):
            p.normal_()
    mean = x.mean(dim=(0, 2, 3), keepdim=True)
    var = x.var(dim=(0, 2, 3), unbiased=False, keepdim=True)
    s = torch.sigmoid(x.mean(dim=(2, 3), keepdim=True) * norm.gate_weight + norm.gate_bias)
    expected = (x - mean) / torch.sqrt(var + 1e-5) * (norm.gamma * s) + norm.beta
    assert torch.allclose(norm(x), expected, atol=1e-5)


def test_iebn_replaces_every_block_and_stem_bn_but_not_projection_bn():
    model = build_model("iebn", 11, 10)
    iebn = type(registry.get("iebn").build(4, {}))
    kinds = {name: type(m) for name, m in model.named_modules() if isinstance(m, torch.nn.BatchNorm2d)}
    assert {n for n, k in kinds.items() if k is not iebn} == {
        "stages.0.0.shortcut.1", "stages.1.0.shortcut.1", "stages.2.0.shortcut.1"}
    assert sum(k is iebn for k in kinds.values()) == 1 + 3 * 3


def test_se_matches_formula():
    torch.manual_seed(3)
    gate = registry.get("se").build(32, {})
    x = torch.randn(2, 32, 4, 4)
    a = torch.sigmoid(gate.fc2(torch.relu(gate.fc1(x.mean(dim=(2, 3))))))
    assert gate.fc1.out_features == 2
    assert torch.allclose(gate(x), x * a[:, :, None, None], atol=1e-6)


def test_cbam_matches_formula_and_starts_with_half_open_spatial_gate():
    torch.manual_seed(4)
    gate = registry.get("cbam").build(32, {}).eval()
    assert gate.spatial_bn.weight.item() == 0 and gate.spatial_bn.momentum == 0.01
    with torch.no_grad():
        gate.spatial_bn.weight.fill_(0.7)
        gate.spatial_bn.running_mean.fill_(0.2)
    x = torch.randn(2, 32, 6, 6)
    mlp = gate.mlp
    a = torch.sigmoid(mlp(x.mean(dim=(2, 3))) + mlp(x.amax(dim=(2, 3))))[:, :, None, None]
    x1 = a * x
    maps = torch.cat([x1.amax(dim=1, keepdim=True), x1.mean(dim=1, keepdim=True)], dim=1)
    conv = F.conv2d(maps, gate.spatial_conv.weight, padding=3)
    bn = (conv - 0.2) / math.sqrt(1 + 1e-5) * 0.7 + gate.spatial_bn.bias
    assert torch.allclose(gate(x), x1 * torch.sigmoid(bn), atol=1e-5)


def test_conv_init_follows_the_originals():
    torch.manual_seed(5)
    conv = build_model("none", 164, 10).stages[2][5].conv2  # 3x3, 64 -> 64
    assert conv.weight.std().item() == pytest.approx(math.sqrt(2 / (9 * 64)), rel=0.05)


@pytest.mark.parametrize("layout", [torch.channels_last, torch.contiguous_format])
def test_iebn_keeps_its_digits_far_from_zero(layout: torch.memory_format) -> None:
    """Batch statistics as torch's batch norm computes them, not E[x^2] - E[x]^2 in float32."""
    torch.manual_seed(4)
    norm = registry.get("iebn").build(6, {})
    x = (torch.randn(4, 6, 5, 5) + 600).contiguous(memory_format=layout).requires_grad_()
    expected = torch.nn.functional.batch_norm(x.detach(), None, None, training=True) / (1 + math.e)
    assert torch.allclose(norm(x), expected, atol=1e-3)


def test_iebn_trains_under_autocast() -> None:
    norm = registry.get("iebn").build(6, {})
    x = torch.randn(4, 6, 5, 5, dtype=torch.bfloat16, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = norm(x)
    y.float().sum().backward()
    assert norm.running_mean.dtype == torch.float32
    assert norm.num_batches_tracked == 1 and x.grad is not None


SHARED = '''
import torch
from torch import nn
from attnbench.registry import register

class Counter(nn.Module):
    def __init__(self, channels, *, start: float = 1.0):
        super().__init__()
        self.scale = nn.Parameter(torch.full((channels,), start))

@register("stage_scale", shared=Counter)
class StageScale(nn.Module):
    """Every gate of a stage multiplies by one shared per-channel scale."""
    def __init__(self, channels, shared, *, start: float = 1.0):
        super().__init__()
        self.shared = [shared]  # a reference, not a submodule: the stage holds it

    def forward(self, x):
        return x * self.shared[0].scale[:, None, None]
'''


def test_a_stage_shared_module_is_built_once_per_stage_and_handed_to_its_gates(clean_registry, tmp_path):
    path = tmp_path / "stage_scale.py"
    path.write_text(SHARED)
    clean_registry.load_plugin(path)
    assert clean_registry.get("stage_scale").kind == "gate, stage-shared"
    model = build_model("stage_scale", 20, 10, block="basic", options={"start": 0.5})  # 3 blocks a stage
    stages = list(model.stages)
    for stage, channels in zip(stages, (16, 32, 64)):
        assert {id(block.gate.shared[0]) for block in stage if block is not stage.shared} == {id(stage.shared)}
        assert torch.equal(stage.shared.scale, torch.full((channels,), 0.5))
    assert [k for k in model.state_dict() if "scale" in k] == [f"stages.{i}.shared.scale" for i in range(3)]
    assert sum(p.numel() for p in model.parameters()) == sum(
        p.numel() for p in build_model("none", 20, 10, block="basic").parameters()) + 16 + 32 + 64
    x = torch.randn(2, 3, 32, 32)
    model(x).sum().backward()  # the shared module is not run as a block, and its gradient sums over the stage
    assert all(stage.shared.scale.grad is not None for stage in stages)
