"""The zoo's seven modules against REFERENCE.md section 3 and their authors' formulas: exact
parameter counts on ResNet-164 (given, or derived here by hand per stage), and each forward pass
re-derived in plain tensor ops and compared in float64, values and gradients."""

import copy
import math

import pytest
import torch
from torch.nn import functional as F

from attnbench import registry
from attnbench.models import build_model

BASE = {10: 1_704_154, 100: 1_727_284}
STAGES = (64, 128, 256)  # a bottleneck block's output width per stage of ResNet-164
BLOCKS = 18  # per stage


def n_params(model):
    return sum(p.numel() for p in model.parameters())


def extra(module, classes=10, **options):
    return n_params(build_model(module, 164, classes, options=options)) - BASE[classes]


@pytest.mark.parametrize("module, options, expected, totals", [
    ("dia", {}, 218_848, (1_923_002, 1_946_132)),
    ("eca", {}, 234, (1_704_388, 1_727_518)),
    ("eca", {"k": 3}, 162, None),
    ("srm", {}, 32_256, (1_736_410, 1_759_540)),
])
def test_reference_counts(module, options, expected, totals):
    assert extra(module, **options) == expected
    if totals:
        assert [BASE[c] + extra(module, c, **options) for c in (10, 100)] == list(totals)


def test_sge_count_by_hand():
    """A weight and a bias per group, 64 groups, in every block."""
    assert extra("sge") == 3 * BLOCKS * (64 + 64)
    assert extra("sge", groups=16) == 3 * BLOCKS * (16 + 16)


def test_ge_counts_by_hand():
    """GE-theta-minus has no parameters; GE-theta has log2(e) depthwise 3x3 convs (9C weights,
    no bias) each with a BN (2C)."""
    assert extra("ge") == 0 and extra("ge", extent=4) == 0
    for e in (2, 4, 8):
        assert extra("ge", extent=e, learned=True) == sum(BLOCKS * math.log2(e) * (9 * c + 2 * c) for c in STAGES)


def test_gc_count_by_hand():
    """Mask conv C->1 with bias; conv C->C/16 with bias; LayerNorm over C/16 (weight, bias);
    conv C/16->C with bias."""
    def block(c):
        p = c // 16
        return (c + 1) + (c * p + p) + 2 * p + (p * c + c)
    assert extra("gc") == sum(BLOCKS * block(c) for c in STAGES) == 211_230


def test_coord_count_by_hand():
    """Shared conv C->M with bias, its BN (weight, bias), two convs M->C with bias; M = max(8, C/32)."""
    def block(c):
        m = max(8, c // 32)
        return (c * m + m) + 2 * m + 2 * (m * c + c)
    assert extra("coord") == sum(BLOCKS * block(c) for c in STAGES) == 210_960


def randomised(module: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Every parameter random (away from zero inits, which hide terms), in float64."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=generator, dtype=p.dtype) * 0.5)
    return module.double()


def x64(c=64, h=8, w=6):
    return torch.randn(3, c, h, w, dtype=torch.float64, generator=torch.Generator().manual_seed(1), requires_grad=True)


def assert_same_values_and_gradients(module, formula, x, parameters=None):
    """module(x) against formula(x) (the same parameters), and the gradients of a random
    projection of both with respect to x and to every parameter (the module's, or those given)."""
    out, want = module(x), formula(x)
    assert torch.allclose(out, want, rtol=1e-10, atol=1e-12)
    weight = torch.randn(out.shape, dtype=out.dtype, generator=torch.Generator().manual_seed(2))
    params = [x, *(module.parameters() if parameters is None else parameters)]
    got = torch.autograd.grad((out * weight).sum(), params)
    expected = torch.autograd.grad((want * weight).sum(), params)
    for g, e in zip(got, expected):
        assert torch.allclose(g, e, rtol=1e-9, atol=1e-11)


def build(name, channels=64, **options):
    spec = registry.get(name)
    shared = spec.build_shared(channels, options)
    gate = spec.build(channels, options, shared)
    return gate, shared


def test_dia_is_an_lstm_like_cell_with_a_sigmoid_output_shared_across_a_stage():
    gate, cell = build("dia")
    randomised(cell)
    w = {n: p for n, p in cell.named_parameters()}

    def two_layer(prefix, v):
        hidden = F.relu(v @ w[f"{prefix}.0.weight"].T + w[f"{prefix}.0.bias"])
        return hidden @ w[f"{prefix}.2.weight"].T + w[f"{prefix}.2.bias"]

    def formula(x):  # two blocks of one stage: the second sees the first's state
        h = c = torch.zeros(x.shape[:2], dtype=x.dtype)
        outs = []
        for block_input in (x, x.flip(0)):
            s = block_input.mean((2, 3))
            gates = two_layer("input_map", s) + two_layer("hidden_map", h)
            i, f, g, o = (gates[:, k * 64:(k + 1) * 64] for k in range(4))
            c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
            h = torch.sigmoid(o) * torch.sigmoid(c)
            outs.append(block_input * h[:, :, None, None])
        return torch.cat(outs)

    def module(x):
        cell.reset()
        return torch.cat([gate(x), gate(x.flip(0))])

    assert_same_values_and_gradients(module, formula, x64(), list(cell.parameters()))
    assert cell.state is not None and cell.reset() is None and cell.state is None


def test_dia_state_starts_afresh_in_every_stage_and_pass():
    model = build_model("dia", 20, 10)  # two blocks a stage
    x = torch.randn(2, 3, 32, 32)
    first = model(x)
    assert all(stage.shared.state is None for stage in model.stages)  # nothing outlives the pass
    assert torch.equal(model(x), first)
    assert torch.equal(copy.deepcopy(model)(x), first)  # a trained model copies (costs.py does)


@pytest.mark.parametrize("unbiased", [True, False])
def test_srm_formula(unbiased):
    gate, _ = build("srm", unbiased=unbiased)
    randomised(gate).train()

    def formula(x):
        mean = x.mean((2, 3))
        n = x.shape[2] * x.shape[3]
        var = ((x - mean[:, :, None, None]) ** 2).sum((2, 3)) / (n - 1 if unbiased else n)
        z = gate.weight[:, 0] * mean + gate.weight[:, 1] * (var + 1e-5).sqrt()
        z_mean, z_var = z.mean(0), z.var(0, unbiased=False)  # BN in training: batch statistics
        bn = (z - z_mean) / (z_var + gate.bn.eps).sqrt() * gate.bn.weight + gate.bn.bias
        return x * torch.sigmoid(bn)[:, :, None, None]

    assert_same_values_and_gradients(gate, formula, x64())


def test_srm_starts_with_zero_style_weights_and_the_codes_unbiased_variance():
    gate, _ = build("srm")
    assert torch.equal(gate.weight, torch.zeros(64, 2)) and gate.unbiased


def init_std(weight: torch.Tensor) -> float:
    return weight.detach().double().std().item()


def test_the_authors_initialisations():
    gc, _ = build("gc", 256)
    assert init_std(gc.mask.weight) == pytest.approx(math.sqrt(2 / 256), rel=0.15)  # Kaiming, fan in
    assert not gc.mask.bias.any() and not gc.transform[-1].weight.any() and not gc.transform[-1].bias.any()
    ge, _ = build("ge", 256, extent=8, learned=True)
    for conv in (m for m in ge.gather if isinstance(m, torch.nn.Conv2d)):
        assert init_std(conv.weight) == pytest.approx(math.sqrt(2 / 9), rel=0.15)  # MSRA, fan in 3x3x1
    coord, _ = build("coord", 256)
    for conv in (coord.conv, coord.conv_h, coord.conv_w):
        assert init_std(conv.weight) == pytest.approx(math.sqrt(2 / conv.out_channels), rel=0.15)
        assert not conv.bias.any()
    sge, _ = build("sge")
    assert not sge.weight.any() and (sge.bias == 1).all()


@pytest.mark.parametrize("channels, k", [(64, 3), (128, 5), (256, 5), (1024, 5), (8192, 7)])
def test_eca_adaptive_kernel_is_the_papers(channels, k):
    gate, _ = build("eca", channels)
    assert gate.conv.kernel_size == (k,)


@pytest.mark.parametrize("k", [0, 3, 5])
def test_eca_formula(k):
    gate, _ = build("eca", 128, k=k)
    randomised(gate)
    kernel = gate.conv.weight[0, 0]
    size = len(kernel)

    def formula(x):
        y = x.mean((2, 3))
        padded = F.pad(y, (size // 2, size // 2))
        conv = sum(kernel[j] * padded[:, j:j + y.shape[1]] for j in range(size))
        return x * torch.sigmoid(conv)[:, :, None, None]

    assert_same_values_and_gradients(gate, formula, x64(128))


@pytest.mark.parametrize("groups", [64, 16, 8])
def test_sge_formula(groups):
    gate, _ = build("sge", groups=groups)
    randomised(gate)

    def formula(x):
        n, c, h, w = x.shape
        out = torch.empty_like(x)
        for g in range(groups):
            part = x[:, g * c // groups:(g + 1) * c // groups]
            m = (part * part.mean((2, 3), keepdim=True)).sum(1)
            flat = m.reshape(n, -1)
            std = ((flat - flat.mean(1, keepdim=True)) ** 2).sum(1, keepdim=True).div(h * w - 1).sqrt()
            t = ((flat - flat.mean(1, keepdim=True)) / (std + 1e-5)).reshape(n, h, w)
            t = t * gate.weight[0, g, 0, 0] + gate.bias[0, g, 0, 0]
            out[:, g * c // groups:(g + 1) * c // groups] = part * torch.sigmoid(t)[:, None]
        return out

    assert_same_values_and_gradients(gate, formula, x64())


def test_sge_starts_at_sigmoid_1():
    gate, _ = build("sge")
    x = torch.randn(2, 64, 8, 8)
    assert torch.allclose(gate(x), x * torch.sigmoid(torch.tensor(1.0)))


def test_ge_theta_minus_global_is_a_sigmoid_of_the_mean():
    gate, _ = build("ge")
    assert_same_values_and_gradients(gate, lambda x: x * torch.sigmoid(x.mean((2, 3), keepdim=True)), x64())


@pytest.mark.parametrize("extent", [2, 4])
@pytest.mark.parametrize("h, w", [(8, 8), (8, 6)])  # 6 is no multiple of 4: pooled cells cover unequal spans
def test_ge_theta_minus_with_an_extent_averages_windows_then_spreads_them_back(extent, h, w):
    gate, _ = build("ge", extent=extent)
    reach = extent - 1  # a 2e-1 window at stride e, centred: e-1 pixels each way, clipped at the border

    def formula(x):
        n, c = x.shape[:2]
        rows, cols = (h + 2 * reach - (2 * extent - 1)) // extent + 1, (w + 2 * reach - (2 * extent - 1)) // extent + 1
        pooled = torch.empty(n, c, rows, cols, dtype=x.dtype)
        for i in range(rows):
            for j in range(cols):
                r0, c0 = i * extent - reach, j * extent - reach
                window = x[:, :, max(r0, 0):r0 + 2 * extent - 1, max(c0, 0):c0 + 2 * extent - 1]
                pooled[:, :, i, j] = window.mean((2, 3))
        # nearest: output pixel (i, j) takes pooled cell (floor(i * rows / h), floor(j * cols / w))
        spread = pooled[:, :, [i * rows // h for i in range(h)]][:, :, :, [j * cols // w for j in range(w)]]
        return x * torch.sigmoid(spread)

    assert_same_values_and_gradients(gate, formula, x64(h=h, w=w))


def test_ge_theta_stacks_depthwise_strided_convs_with_bn():
    gate, _ = build("ge", extent=4, learned=True)
    randomised(gate).train()
    convs = [m for m in gate.gather if isinstance(m, torch.nn.Conv2d)]
    norms = [m for m in gate.gather if isinstance(m, torch.nn.BatchNorm2d)]
    assert [c.stride for c in convs] == [(2, 2)] * 2 and all(c.groups == 64 for c in convs)

    def formula(x):
        y = x
        for i, (conv, bn) in enumerate(zip(convs, norms)):
            y = F.conv2d(y, conv.weight, stride=2, padding=1, groups=64)
            mean, var = y.mean((0, 2, 3), keepdim=True), y.var((0, 2, 3), unbiased=False, keepdim=True)
            y = (y - mean) / (var + bn.eps).sqrt() * bn.weight[:, None, None] + bn.bias[:, None, None]
            if i == 0:
                y = F.relu(y)
        return x * torch.sigmoid(F.interpolate(y, size=x.shape[2:], mode="nearest"))

    assert_same_values_and_gradients(gate, formula, x64(h=8, w=8))


def test_gc_formula_and_identity_at_init():
    gate, _ = build("gc")
    x = torch.randn(2, 64, 8, 8)
    assert torch.equal(gate(x), x)  # the last conv starts at zero
    randomised(gate)
    mask, (down, norm, _, up) = gate.mask, gate.transform

    def formula(x):
        n, c, h, w = x.shape
        logits = (x * mask.weight[0, :, 0, 0][:, None, None]).sum(1).reshape(n, h * w) + mask.bias
        weights = torch.exp(logits - logits.max(1, keepdim=True).values)
        weights = weights / weights.sum(1, keepdim=True)
        context = (x.reshape(n, c, h * w) * weights[:, None, :]).sum(2)
        t = context @ down.weight[:, :, 0, 0].T + down.bias
        t = (t - t.mean(1, keepdim=True)) / (t.var(1, unbiased=False, keepdim=True) + norm.eps).sqrt()
        t = F.relu(t * norm.weight[:, 0, 0] + norm.bias[:, 0, 0])
        return x + (t @ up.weight[:, :, 0, 0].T + up.bias)[:, :, None, None]

    assert_same_values_and_gradients(gate, formula, x64())


def test_coord_formula():
    gate, _ = build("coord")
    randomised(gate).train()

    def conv1x1(conv, y):
        return torch.einsum("oc,nchw->nohw", conv.weight[:, :, 0, 0], y) + conv.bias[:, None, None]

    def formula(x):
        n, c, h, w = x.shape
        joined = torch.cat((x.mean(3), x.mean(2)), dim=2)[..., None]  # (n, c, h + w, 1)
        y = conv1x1(gate.conv, joined)
        mean, var = y.mean((0, 2, 3), keepdim=True), y.var((0, 2, 3), unbiased=False, keepdim=True)
        y = (y - mean) / (var + gate.bn.eps).sqrt() * gate.bn.weight[:, None, None] + gate.bn.bias[:, None, None]
        y = y * torch.clamp(y + 3, 0, 6) / 6  # h-swish
        a_h = torch.sigmoid(conv1x1(gate.conv_h, y[:, :, :h]))  # (n, c, h, 1)
        a_w = torch.sigmoid(conv1x1(gate.conv_w, y[:, :, h:])).transpose(2, 3)  # (n, c, 1, w)
        return x * a_h * a_w

    assert_same_values_and_gradients(gate, formula, x64(h=8, w=6))
