"""Backbones and the five seed modules against REFERENCE.md sections 1 and 3."""

import copy
import math

import pytest
import torch
from torch.nn import functional as F

from attnbench import registry
from attnbench.errors import UserError
from attnbench.models import build_model
from conftest import assert_trained_alike, needs_kernels

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


@pytest.mark.parametrize("arch", ["resnet", "preresnet"])
@pytest.mark.parametrize("block, depth", [("bottleneck", 11), ("basic", 8)])
@pytest.mark.parametrize("module", sorted(EXTRA))
def test_output_shape_and_every_parameter_learns(module, arch, block, depth):
    torch.manual_seed(0)
    model = build_model(module, depth, 10, arch=arch, block=block)
    x, y = torch.randn(4, 3, 32, 32), torch.tensor([0, 1, 2, 3])
    opt = torch.optim.SGD(model.parameters(), lr=0.1)

    def loss_and_grads():
        opt.zero_grad()
        out = model(x)
        assert out.shape == (4, 10)
        loss = F.cross_entropy(out, y)
        extra = model.extra_loss()
        (loss if extra is None else loss + extra).backward()

    # One step first: CBAM's spatial BN starts at weight 0, which blocks its conv's gradient at init.
    loss_and_grads()
    opt.step()
    loss_and_grads()
    assert not [n for n, p in model.named_parameters() if p.grad is None]
    if block == "bottleneck":  # basic blocks' SE has 1 hidden unit at C=16, and it may be a dead ReLU
        assert not [n for n, p in model.named_parameters() if p.grad.abs().sum() == 0]


@pytest.mark.filterwarnings("error:Dynamo detected a call:UserWarning")  # e.g. to a functools.cache
@pytest.mark.parametrize("arch", ["resnet", "preresnet"])
@pytest.mark.parametrize("module", sorted(EXTRA))
def test_every_module_compiles_to_one_graph_that_trains_as_eager(module, arch):
    """torch.compile (--compile) must see the whole model as one graph: a graph break falls back to
    eager for that frame. A check in gate() that reads differently under tracing broke every
    gate's graph (torch 2.14 here, and 2.11 on a GPU). aot_eager traces forward and backward as
    the default backend does, without its minutes of code generation. (The other compile bug,
    an unpacking in residual.finish, showed only under torch 2.11: tests/test_cuda.py catches it
    there.)"""
    results = []
    for compiled in (True, False):
        torch.manual_seed(0)
        model = build_model(module, 8, 10, arch=arch, block="basic").to(memory_format=torch.channels_last)
        torch.compiler.reset()  # each model's graph from scratch, clear of the recompile limit
        forward = torch.compile(model, backend="aot_eager", fullgraph=True) if compiled else model
        x = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(1)).to(memory_format=torch.channels_last)
        out = forward(x)
        F.cross_entropy(out, torch.arange(4)).backward()
        results.append((out.detach(), {n: p.grad for n, p in model.named_parameters()},
                        {n: b.clone() for n, b in model.named_buffers()}))
    assert_trained_alike(*results, grads_rel=1e-3, buffers_rtol=1e-5)


def test_resnet164_forward_shape():
    assert build_model("spe", 164, 100)(torch.randn(2, 3, 32, 32)).shape == (2, 100)


@pytest.mark.parametrize("block, depth", [("bottleneck", 21), ("basic", 9), ("bottleneck", 2)])
def test_invalid_depth_names_valid_forms(block, depth):
    with pytest.raises(UserError, match=r"n\+2"):
        build_model("none", depth, 10, block=block)


def test_spe_initial_attention_is_00321_for_any_input():
    gate = registry.get("spe").make_gate(64, None, {})
    high, low = torch.randn(2, 3, 64, 1, 1) * 5
    a = gate.attention(high, low)
    expected = torch.sigmoid(torch.tensor(-2.0)) * torch.sigmoid(torch.tensor(-1.0))
    assert torch.allclose(a, expected.expand_as(a))
    assert round(expected.item(), 4) == 0.0321


def test_spe_matches_formula_with_random_parameters():
    torch.manual_seed(1)
    gate = registry.get("spe").make_gate(8, None, {"p0": 0.3, "p1": 1.7})
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
    norm = registry.get("iebn").make_norm(6, {})
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
    iebn = type(registry.get("iebn").make_norm(4, {}))
    kinds = {name: type(m) for name, m in model.named_modules() if isinstance(m, torch.nn.BatchNorm2d)}
    assert {n for n, k in kinds.items() if k is not iebn} == {
        "stages.0.0.shortcut.1", "stages.1.0.shortcut.1", "stages.2.0.shortcut.1"}
    assert sum(k is iebn for k in kinds.values()) == 1 + 3 * 3


def test_se_matches_formula():
    torch.manual_seed(3)
    gate = registry.get("se").make_gate(32, None, {})
    x = torch.randn(2, 32, 4, 4)
    a = torch.sigmoid(gate.fc2(torch.relu(gate.fc1(x.mean(dim=(2, 3))))))
    assert gate.fc1.out_features == 2
    assert torch.allclose(gate(x), x * a[:, :, None, None], atol=1e-6)


def test_cbam_matches_formula_and_starts_with_half_open_spatial_gate():
    torch.manual_seed(4)
    gate = registry.get("cbam").make_gate(32, None, {}).eval()
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


# IEBN's own C path, gate()'s fused one (NCHW), and the torch ops (no autograd)
@pytest.mark.parametrize("layout, requires_grad", [(torch.channels_last, True), (torch.contiguous_format, True),
                                                   (torch.contiguous_format, False)])
def test_iebn_keeps_its_digits_far_from_zero(layout: torch.memory_format, requires_grad: bool) -> None:
    """Batch statistics from per-image means and variances, not E[x^2] - E[x]^2 in float32."""
    torch.manual_seed(4)
    norm = registry.get("iebn").make_norm(6, {})
    x = (torch.randn(4, 6, 5, 5) + 600).contiguous(memory_format=layout).requires_grad_(requires_grad)
    expected = torch.nn.functional.batch_norm(x.detach(), None, None, training=True) / (1 + math.e)
    assert torch.allclose(norm(x), expected, atol=1e-3)


def test_iebn_trains_under_autocast() -> None:
    norm = registry.get("iebn").make_norm(6, {})
    x = torch.randn(4, 6, 5, 5, dtype=torch.bfloat16, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = norm(x)
    y.float().sum().backward()
    assert y.dtype == torch.bfloat16 and norm.running_mean.dtype == torch.float32
    assert norm.num_batches_tracked == 1 and x.grad is not None


def _iebn_by_formula(norm, x: torch.Tensor, residual: torch.Tensor | None, relu: bool) -> torch.Tensor:
    """IEBN in training written out (in float64 for a float64 norm and x): batch statistics over
    (N, H, W), the gate from each image's own channel means."""
    mean = x.mean(dim=(0, 2, 3), keepdim=True)
    var = x.var(dim=(0, 2, 3), unbiased=False, keepdim=True)
    s = torch.sigmoid(x.mean(dim=(2, 3), keepdim=True) * norm.gate_weight + norm.gate_bias)
    y = (x - mean) / torch.sqrt(var + norm.eps) * (norm.gamma * s) + norm.beta
    y = y if residual is None else y + residual
    return torch.relu(y) if relu else y


@needs_kernels
@pytest.mark.usefixtures("kernels_built_unless_turned_off")
@pytest.mark.parametrize("shape, offset", [((4, 6, 5, 5), 0.0), ((8, 16, 8, 8), 0.0), ((3, 24, 7, 9), 0.0),
                                           ((2, 40, 4, 4), 0.0), ((2, 64, 3, 3), 0.0), ((2, 5, 1, 3), 0.0),
                                           ((4, 6, 5, 5), 600.0)])
@pytest.mark.parametrize("tail", ["none", "relu", "add", "add+relu"])
def test_iebn_trains_in_c_as_its_formula(shape, offset, tail) -> None:
    """The C path (channels_last, training on the CPU) against the formula in float64 with
    autograd: output, gradients of x, the residual and the four parameters, running statistics."""
    torch.manual_seed(6)
    norm = registry.get("iebn").make_norm(shape[1], {})
    with torch.no_grad():
        for p in (norm.gamma, norm.beta, norm.gate_weight, norm.gate_bias):
            p.normal_()
        norm.gate_weight /= 1 + offset  # keeps the gates off saturation, so their gradients count
    x = (torch.randn(shape) * 2 + offset).contiguous(memory_format=torch.channels_last).requires_grad_()
    residual = None
    if "add" in tail:
        residual = torch.randn(shape).contiguous(memory_format=torch.channels_last).requires_grad_()
    relu = "relu" in tail
    y = norm(x, residual=residual, relu=relu)
    assert type(y.grad_fn).__name__ == "_FusedIEBNBackward"
    dy = torch.randn(shape)
    y.backward(dy)
    reference = registry.get("iebn").make_norm(shape[1], {}).double()
    reference.load_state_dict(norm.state_dict())
    leaves = [None if t is None else t.detach().double().requires_grad_() for t in (x, residual)]
    y_ref = _iebn_by_formula(reference, leaves[0], leaves[1], relu)
    y_ref.backward(dy.double())
    # x * scale + shift rounds x * scale, which is the offset's size: digits go with offset / std
    # (measured: output 5e-7 at offset 0, 2.5e-5 at 600; gradients 2e-7 and 3e-5 relative).
    lost = 1 + offset / 20
    assert torch.allclose(y.double(), y_ref, atol=2e-6 * lost)
    pairs = [(x.grad, leaves[0].grad), *((p.grad, q.grad) for p, q in zip(
        (norm.gamma, norm.beta, norm.gate_weight, norm.gate_bias),
        (reference.gamma, reference.beta, reference.gate_weight, reference.gate_bias)))]
    if residual is not None:
        pairs.append((residual.grad, leaves[1].grad))
    for got, want in pairs:
        assert (got.double() - want).norm() <= 1e-6 * lost * want.norm()
    x64 = x.detach().double()
    assert torch.allclose(norm.running_mean.double(), 0.1 * x64.mean(dim=(0, 2, 3)), rtol=1e-6)
    assert torch.allclose(norm.running_var.double(), 0.9 + 0.1 * x64.var(dim=(0, 2, 3)), rtol=1e-6)
    assert norm.num_batches_tracked == 1


@needs_kernels
@pytest.mark.usefixtures("kernels_built_unless_turned_off")
def test_iebn_in_c_keeps_a_cumulative_average_or_none() -> None:
    """momentum=None: the running statistics are the plain average over the batches so far;
    without running statistics (track_running_stats off) the C path still normalises by the batch."""
    torch.manual_seed(7)
    module = type(registry.get("iebn").make_norm(6, {}))
    norm = module(6, momentum=None)
    batches = [(torch.randn(4, 6, 5, 5) * (1 + i) + i).contiguous(memory_format=torch.channels_last) for i in range(2)]
    for x in batches:
        y = norm(x.requires_grad_())
        assert type(y.grad_fn).__name__ == "_FusedIEBNBackward"
    both = torch.stack(batches).detach().double()
    assert torch.allclose(norm.running_mean.double(), both.mean(dim=(1, 3, 4)).mean(0), rtol=1e-6)
    assert torch.allclose(norm.running_var.double(), both.var(dim=(1, 3, 4)).mean(0), rtol=1e-6)
    untracked = module(6)
    untracked.track_running_stats = False
    untracked.running_mean = untracked.running_var = untracked.num_batches_tracked = None
    x = batches[0].detach().requires_grad_()
    y = untracked(x)
    assert type(y.grad_fn).__name__ == "_FusedIEBNBackward"
    y.backward(torch.arange(y.numel(), dtype=torch.float32).view_as(y) / y.numel())
    x_ref = x.detach().double().requires_grad_()
    y_ref = _iebn_by_formula(copy.deepcopy(untracked).double(), x_ref, None, False)
    y_ref.backward(torch.arange(y.numel(), dtype=torch.float64).view_as(y_ref) / y.numel())
    assert torch.allclose(y.double(), y_ref, atol=1e-5)
    assert (x.grad.double() - x_ref.grad).norm() <= 1e-5 * x_ref.grad.norm()
