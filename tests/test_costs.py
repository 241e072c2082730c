"""Cost measurement: MAC counts against a hand derivation, saved activations against sizes
counted by hand, throughput and the cost table.

The MAC oracles below walk ResNet-164 layer by layer from the architecture facts (REFERENCE.md
sections 1 and 3) and apply the counting rule of attnbench.costs by hand, without fvcore,
so a wrong handle, a missed op or a module change shows up as an exact mismatch.
"""

from __future__ import annotations

import gc
import logging
import math
from collections.abc import Callable, Iterator

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from attnbench import costs, registry
from attnbench.errors import UserError
from attnbench.costs import cost_markdown, cost_table, count_macs, mac_analysis, saved_activation_bytes
from attnbench.models import build_model

SEED_MODULES = ("none", "se", "cbam", "iebn", "spe")
CLASSES = 10
REDUCTION = 16  # SE's and CBAM's MLP reduction


class Tally:
    """Both conventions at once: paper = conv + linear MACs; full adds the rest by the rule."""

    def __init__(self) -> None:
        self.paper = 0
        self.full = 0

    def conv(self, k: int, cin: int, cout: int, out_hw: int) -> None:
        self._both(k * k * cin * cout * out_hw)

    def linear(self, rows: int, fin: int, fout: int) -> None:
        self._both(rows * fin * fout)  # bias = accumulator start, free

    def elementwise(self, out_elements: int) -> None:
        self.full += out_elements

    def reduction(self, in_elements: int, results: int = 1) -> None:
        self.full += results * in_elements

    def bn(self, c: int, hw: int, affine: bool = True) -> None:
        self.full += c * hw * (2 if affine else 1)  # eval mode: normalise (+ affine)

    def _both(self, n: int) -> None:
        self.paper += n
        self.full += n


Hook = Callable[[Tally, int, int], None]


def plain_bn(t: Tally, c: int, hw: int) -> None:
    t.bn(c, hw)


def iebn(t: Tally, c: int, hw: int) -> None:
    """BN(x) * (gamma * s) + beta, the BN without affine, s from x's own channel means."""
    t.reduction(c * hw)  # GAP of the raw input
    t.elementwise(3 * c)  # * w, + b, sigmoid
    t.elementwise(c)  # gamma * s
    t.bn(c, hw, affine=False)
    t.elementwise(2 * c * hw)  # * (gamma * s), + beta


def no_gate(t: Tally, c: int, hw: int) -> None:
    pass


def se(t: Tally, c: int, hw: int) -> None:
    hidden = c // REDUCTION
    t.reduction(c * hw)
    t.linear(1, c, hidden)
    t.elementwise(hidden)  # ReLU
    t.linear(1, hidden, c)
    t.elementwise(c)  # sigmoid
    t.elementwise(c * hw)  # a * x


def cbam(t: Tally, c: int, hw: int) -> None:
    hidden = c // REDUCTION
    t.reduction(c * hw)  # GAP
    t.reduction(c * hw)  # GMP
    t.linear(2, c, hidden)  # shared MLP on both descriptors
    t.elementwise(2 * hidden)
    t.linear(2, hidden, c)
    t.elementwise(c)  # avg + max
    t.elementwise(c)  # sigmoid
    t.elementwise(c * hw)  # x1 = a * x
    t.reduction(c * hw)  # max over channels
    t.reduction(c * hw)  # mean over channels
    t.conv(7, 2, 1, hw)
    t.bn(1, hw)
    t.elementwise(hw)  # sigmoid
    t.elementwise(c * hw)  # s * x1


def spe(t: Tally, c: int, hw: int) -> None:
    t.reduction(c * hw, results=2)  # global max and min
    t.elementwise(4 * c)  # M' = w2 M + b2, m' = w2 m + b2
    t.elementwise(2)  # p^2
    t.reduction(2)  # sum p^2
    t.elementwise(2)  # p_hat
    t.elementwise(5 * c)  # p_hat0 M' + p_hat1 m' (3), * w1, + b1
    t.elementwise(c)  # M' + m'
    t.elementwise(2 * c)  # two sigmoids
    t.elementwise(c)  # their product
    t.elementwise(c * hw)  # * x


HOOKS: dict[str, tuple[Hook, Hook]] = {  # module -> (norm, gate)
    "none": (plain_bn, no_gate),
    "se": (plain_bn, se),
    "cbam": (plain_bn, cbam),
    "iebn": (iebn, no_gate),
    "spe": (plain_bn, spe),
}


def resnet164_macs(module: str) -> Tally:
    """Post-activation bottleneck ResNet-164 at 32x32, batch 1, eval mode."""
    norm, gate = HOOKS[module]
    blocks = (164 - 2) // 9
    t = Tally()
    hw = 32 * 32
    t.conv(3, 3, 16, hw)
    norm(t, 16, hw)
    t.elementwise(16 * hw)  # ReLU
    cin = 16
    for planes, stride in ((16, 1), (32, 2), (64, 2)):
        cout = 4 * planes
        for i in range(blocks):
            hw_in = hw
            if i == 0:
                hw //= stride * stride  # the 3x3 conv of the first block strides
            t.conv(1, cin, planes, hw_in)
            norm(t, planes, hw_in)
            t.elementwise(planes * hw_in)
            t.conv(3, planes, planes, hw)
            norm(t, planes, hw)
            t.elementwise(planes * hw)
            t.conv(1, planes, cout, hw)
            norm(t, cout, hw)
            gate(t, cout, hw)
            if i == 0:  # projection shortcut; its BN stays plain under IEBN
                t.conv(1, cin, cout, hw)
                t.bn(cout, hw)
            t.elementwise(2 * cout * hw)  # residual add, ReLU
            cin = cout
    t.reduction(cin * hw)  # global average pool
    t.linear(1, cin, CLASSES)
    return t


@pytest.fixture(scope="module", autouse=True)
def one_thread() -> Iterator[None]:
    """Everything here is small; with a second OpenMP thread, a busy neighbour on a 2-core
    machine stretches each op to a scheduler tick and this file from seconds to minutes."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def macs() -> dict[str, dict[str, int]]:
    counts = {}
    for module in SEED_MODULES:
        model = build_model(module, 164, CLASSES)
        counts[module] = {c: count_macs(model, c) for c in ("paper", "full")}
    return counts


@pytest.mark.parametrize("convention", ["paper", "full"])
@pytest.mark.parametrize("module", SEED_MODULES)
def test_macs_match_hand_derivation(macs: dict, module: str, convention: str) -> None:
    assert macs[module][convention] == getattr(resnet164_macs(module), convention)


def test_paper_macs_match_reference(macs: dict) -> None:
    base = macs["none"]["paper"]
    assert base == 247_644_160 + 256 * CLASSES  # 166 convs + the classifier
    assert round(base / 1e4) / 100 == 247.65
    extra = {m: macs[m]["paper"] - base for m in SEED_MODULES}
    assert extra["se"] == 193_536 and round(extra["se"] / 1e4) / 100 == 0.19
    # 2,370,816 (7x7 spatial convs) + 387,072 (MLP run on both descriptors) = 2.758 M:
    # REFERENCE.md's "+2.75M" is this number truncated, not rounded.
    assert extra["cbam"] == 2_757_888 and math.floor(extra["cbam"] / 1e4) / 100 == 2.75
    assert extra["iebn"] == 0 and extra["spe"] == 0


@pytest.mark.parametrize("module", registry.available())
def test_every_registered_module_is_fully_counted(module: str, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="fvcore"):
        analysis = mac_analysis(build_model(module, 11, CLASSES))
    assert not analysis.unsupported_ops()
    assert not [r for r in caplog.records if "Unsupported operator" in r.getMessage()]


def test_fvcore_alone_would_warn(caplog: pytest.LogCaptureFixture) -> None:
    """The capture above sees fvcore's warnings: without our handles SE's gate is unsupported."""
    with caplog.at_level(logging.WARNING, logger="fvcore"):
        costs.FlopCountAnalysis(build_model("se", 11, CLASSES).eval(), torch.zeros(1, 3, 32, 32)).total()
    assert any("Unsupported operator aten::mul" in r.getMessage() for r in caplog.records)


class CumsumGate(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * x.cumsum(2)


@pytest.mark.parametrize("convention", ["paper", "full"])
def test_uncovered_op_is_an_error_naming_it(convention: str) -> None:
    model = nn.Sequential(nn.Conv2d(3, 4, 3), CumsumGate())
    with pytest.raises(UserError, match=r"aten::cumsum"):
        count_macs(model, convention)


def test_count_macs_checks_convention_and_keeps_mode() -> None:
    model = build_model("se", 11, CLASSES).train()
    with pytest.raises(UserError, match="convention"):
        count_macs(model, "fvcore")
    count_macs(model, "full")
    assert all(m.training for m in model.modules())


def test_saved_bytes_of_a_small_net_are_its_saved_inputs_and_outputs() -> None:
    """The conv keeps its input, the ReLU its output, the linear layer its input (a view of the
    ReLU's output: the same storage, counted once); weights are the model's, left out."""
    model = nn.Sequential(nn.Conv2d(3, 4, 3, bias=False), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 2))
    x = torch.randn(2, 3, 8, 8)
    assert saved_activation_bytes(model, x) == 4 * (2 * 3 * 8 * 8 + 2 * 4 * 6 * 6)


def test_saved_bytes_of_se_are_its_formulas_activations() -> None:
    """Over `none`, SE's multiply keeps the block's last norm output (which `none` frees after the
    add), its first FC keeps the pooled means, the second the ReLU's output, the product the
    sigmoid's output (the view a[:, :, None, None] shares its storage): per block and image,
    C*H*W + C + C/16 + C floats. ResNet-11 has one bottleneck block a stage."""
    batch = 4
    x = torch.randn(batch, 3, 32, 32)
    none, se = (saved_activation_bytes(build_model(m, 11, CLASSES), x) for m in ("none", "se"))
    per_image = sum(c * hw + c + c // REDUCTION + c for c, hw in ((64, 32 * 32), (128, 16 * 16), (256, 8 * 8)))
    assert se - none == 4 * batch * per_image


def test_saved_bytes_grow_by_the_same_amount_per_image_and_keep_the_mode() -> None:
    """Activations scale with the batch; what does not (a batch norm's per-channel statistics)
    stays: the count is affine in the batch size, exactly."""
    model = build_model("spe", 11, CLASSES).eval()
    sizes = [saved_activation_bytes(model, torch.randn(n, 3, 32, 32)) for n in (2, 4, 6)]
    assert sizes[2] - sizes[1] == sizes[1] - sizes[0] > 0
    assert not any(m.training for m in model.modules())


def test_counting_saved_bytes_leaves_no_tensor_alive() -> None:
    """The hooks are held by the graph: a saved tensor kept with its grad_fn by them would be a
    cycle through C++ that outlives the count (it did: 3 GiB a module at ResNet-164)."""
    model, x = build_model("spe", 11, CLASSES), torch.randn(2, 3, 32, 32)

    def tensors() -> int:
        gc.collect()
        return sum(1 for o in gc.get_objects() if issubclass(type(o), torch.Tensor))

    before = tensors()
    saved_activation_bytes(model, x)
    assert tensors() == before


def test_se_as_a_plain_plugin_costs_what_the_built_in_se_costs(plain_se: str) -> None:
    table = cost_table(["se", plain_se], depth=11, batch_size=4, throughput=False).set_index("module")
    columns = ["params", "macs_paper", "macs_full", "saved_bytes"]
    assert table.loc["se", columns].tolist() == table.loc[plain_se, columns].tolist()
    assert (table.loc["se", ["extra_" + c for c in columns]] > 0).all()


def test_throughput_rejects_bad_settings() -> None:
    with pytest.raises(UserError, match="--amp 'fp8' is not supported"):
        cost_table(["se"], depth=11, amp="fp8")
    with pytest.raises(UserError, match="needs a CUDA device"):  # the trainer's own check
        cost_table(["se"], depth=11, amp="bf16", device="cpu")


def test_cost_table_rows_and_baseline() -> None:
    table = cost_table(["se", "senet", "spe"], depth=11, batch_size=4, warmup=1, repeats=2)
    assert list(table["module"]) == ["none", "se", "spe"]  # baseline added, aliases merged
    row = table.set_index("module")
    assert row.loc["none", "train_step_rel_none"] == 1.0
    assert (row[["extra_params", "extra_macs_paper", "extra_macs_full", "extra_saved_bytes"]].loc["none"] == 0).all()
    assert row.loc["se", "extra_macs_paper"] > 0 and row.loc["spe", "extra_macs_paper"] == 0
    for column in ("train_images_per_s", "infer_images_per_s"):
        assert (0 < row[column + "_q1"]).all() and (row[column + "_q1"] <= row[column]).all()
        assert (row[column] <= row[column + "_q3"]).all()
    assert "compiled_train_images_per_s" not in row and "cuda_peak_bytes" not in row
    assert table.attrs["threads"] == torch.get_num_threads()


def test_cost_table_times_compiled_steps_beside_eager_ones(monkeypatch: pytest.MonkeyPatch) -> None:
    """With compile, every module is also timed compiled, in the same interleaved rounds; its
    ratio is to `none` compiled. (aot_eager here: inductor's code generation takes minutes.)"""
    compile_ = torch.compile
    monkeypatch.setattr(torch, "compile", lambda model, **kw: compile_(model, backend="aot_eager", **kw))
    timed = []
    time_interleaved = costs._time_interleaved
    monkeypatch.setattr(costs, "_time_interleaved", lambda timers, **kw: timed.append(list(timers)) or
                        time_interleaved(timers, **kw))
    table = cost_table(["spe"], depth=11, batch_size=4, warmup=1, repeats=2, compile=True).set_index("module")
    assert timed == [[("none", False), ("spe", False), ("none", True), ("spe", True)]] * 2  # train, then inference
    assert table.loc["none", "compiled_train_step_rel_none"] == 1.0
    assert (table[["compiled_train_images_per_s", "compiled_infer_images_per_s"]] > 0).all().all()
    markdown = cost_markdown(table.reset_index(), "test")
    assert "train img/s, compiled [IQR]" in markdown and "train step vs none, eager [IQR]" in markdown


def test_cost_table_reports_the_spread_of_the_per_round_ratio(monkeypatch: pytest.MonkeyPatch) -> None:
    """The relative step time is the median of the rounds' ratios, with their quartiles (not a
    ratio of medians): here `none` varies from round to round and SE's ratio to it is, by round,
    1.12, 1.00, 1.30, 1.04, 1.08, so median 1.08, quartiles 1.04 and 1.12."""
    none = [1.0, 2.0, 1.0, 3.0, 2.0]
    se = [t * r for t, r in zip(none, [1.12, 1.0, 1.3, 1.04, 1.08])]
    monkeypatch.setattr(costs, "_time_interleaved", lambda timers, **_: {("none", False): none, ("se", False): se})
    table = cost_table(["se"], depth=11, batch_size=2, warmup=0, repeats=5).set_index("module")
    assert table.loc["se", ["train_step_rel_none_q1", "train_step_rel_none", "train_step_rel_none_q3"]].tolist() \
        == pytest.approx([1.04, 1.08, 1.12])
    assert table.loc["none", ["train_step_rel_none_q1", "train_step_rel_none_q3"]].tolist() == [1.0, 1.0]
    markdown = cost_markdown(table.reset_index(), "test")
    assert "train step vs none, eager [IQR]" in markdown and " 1.08x [1.04x, 1.12x] " in markdown


def test_cost_table_without_throughput_has_counts_only() -> None:
    table = cost_table(["iebn"], depth=11, throughput=False)
    assert list(table.columns) == [
        "module", "params", "macs_paper", "macs_full", "saved_bytes",
        "extra_params", "extra_macs_paper", "extra_macs_full", "extra_saved_bytes",
    ]


class ZooOps(nn.Module):
    """The ops the zoo's modules brought, each once on a (1, 3, 32, 32) input."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        spread = x.var((2, 3), keepdim=True)
        weights = x.flatten(2).softmax(-1).view_as(x)
        pooled = F.avg_pool2d(x, 3, stride=2, padding=1, count_include_pad=False)
        return x * spread + weights + F.interpolate(pooled, size=x.shape[2:], mode="nearest")


def test_the_zoos_ops_count_by_their_rules() -> None:
    n = 3 * 32 * 32
    var, softmax, pool, upsample = 2 * n, 3 * n, (3 * 16 * 16) * 9, n  # views are free
    assert count_macs(ZooOps(), "full") == var + softmax + pool + upsample + 3 * n  # a mul and two adds
    assert count_macs(ZooOps(), "paper") == 0
