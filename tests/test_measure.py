"""Cost measurement: MAC counts against a hand derivation, throughput and the cost table.

The MAC oracles below walk ResNet-164 layer by layer from the architecture facts (REFERENCE.md
sections 1 and 3) and apply the counting rule of attnbench.measure by hand, without fvcore,
so a wrong handle, a missed op or a module change shows up as an exact mismatch.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterator

import pytest
import torch
from torch import nn

from attnbench import measure, registry
from attnbench.errors import UserError
from attnbench.measure import cost_markdown, cost_table, count_macs, mac_analysis, measure_throughput
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
    """Eval mode folds normalisation, gate and affine into x * scale + shift per channel."""
    t.reduction(c * hw)  # GAP of the raw input
    t.elementwise(3 * c)  # * w, + b, sigmoid
    t.elementwise(4 * c)  # scale = gamma * s * rsqrt(running_var + eps)
    t.elementwise(2 * c)  # shift = beta - running_mean * scale
    t.elementwise(2 * c * hw)  # x * scale + shift


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
        measure.FlopCountAnalysis(build_model("se", 11, CLASSES).eval(), torch.zeros(1, 3, 32, 32)).total()
    assert any("Unsupported operator aten::mul" in r.getMessage() for r in caplog.records)


class StdGate(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * x.std((2, 3), keepdim=True)


@pytest.mark.parametrize("convention", ["paper", "full"])
def test_uncovered_op_is_an_error_naming_it(convention: str) -> None:
    model = nn.Sequential(nn.Conv2d(3, 4, 3), StdGate())
    with pytest.raises(UserError, match=r"aten::std"):
        count_macs(model, convention)


def test_count_macs_checks_convention_and_keeps_mode() -> None:
    model = build_model("se", 11, CLASSES).train()
    with pytest.raises(UserError, match="convention"):
        count_macs(model, "fvcore")
    count_macs(model, "full")
    assert all(m.training for m in model.modules())


@pytest.mark.parametrize("mode", ["train", "inference"])
def test_throughput_reports_median_and_quartiles(mode: str) -> None:
    model = build_model("spe", 11, CLASSES)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    result = measure_throughput(model, batch_size=8, mode=mode, warmup=1, repeats=4)
    assert 0 < result["images_per_s_q1"] <= result["images_per_s"] <= result["images_per_s_q3"]
    assert result["threads"] == torch.get_num_threads() and result["device"] == "cpu"
    assert result["process_peak_rss_bytes"] > 0
    if mode == "train":  # at least the weights, their gradients and SGD's momentum, in float32
        assert result["peak_memory_bytes"] > 3 * 4 * sum(p.numel() for p in model.parameters())
    else:
        assert result["peak_memory_bytes"] is None
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # timed a copy


def test_allocation_peak_follows_allocations_and_frees_in_order() -> None:
    older = [torch.empty(10_000)]  # made before the profile: its free is not subtracted
    kept = []

    def run() -> None:
        older.clear()
        a = torch.empty(1000)  # 4,000 bytes
        b = torch.empty(2000)  # 12,000 held
        del a  # 8,000
        c = torch.empty(500, dtype=torch.float64)  # 12,000 again
        del b, c  # 0
        kept.append(torch.empty(250))  # 1,000, still held at the end

    assert measure.allocation_peak(run) == 12_000
    # the column's copy (12 bytes) is made while the whole (12,000) is still held
    assert measure.allocation_peak(lambda: torch.empty(3, 1000)[:, 0].contiguous()) == 12_012


def test_allocation_peak_sees_run_free_what_before_made() -> None:
    """Measured from where run() starts: it frees before()'s 4,000 bytes, then holds 12,000."""
    made: list[torch.Tensor] = []

    def run() -> None:
        made.clear()
        made.append(torch.empty(3000))

    assert measure.allocation_peak(run, before=lambda: made.append(torch.empty(1000))) == 8_000


def test_tensor_bytes_counts_a_shared_storage_once() -> None:
    x = torch.empty(10, 100)
    assert measure.tensor_bytes([x, x[2:], x.t(), torch.empty(7, dtype=torch.int64)]) == 4000 + 56


def _cpu_timer(module: str, batch_size: int, mode: str = "train") -> measure._Timer:
    return measure._Timer(build_model(module, 11, CLASSES), batch_size=batch_size, mode=mode,
                          device=torch.device("cpu"), channels_last=True, amp=None, input_size=32)


def _train_peak(module: str, batch_size: int, warm: bool = True) -> tuple[int, int]:
    """The train-step peak of a ResNet-11 with `module` (after one warm-up step, if `warm`) and
    the bytes of its weights, gradients, momentum and batch, counted here from the sizes alone."""
    timer = _cpu_timer(module, batch_size)
    if warm:
        timer.block(1)
    params = sum(p.numel() for p in timer.model.parameters())
    buffers = sum(b.numel() * b.element_size() for b in timer.model.buffers())
    state = 3 * 4 * params + buffers + batch_size * 3 * 32 * 32 * 4 + batch_size * 8
    return timer.peak_memory(), state


@pytest.mark.parametrize("module", ["none", "spe"])
def test_train_peak_memory_is_the_models_own_and_scales_with_the_batch(module: str) -> None:
    """Unlike the process's resident set, the peak belongs to one model: memory held elsewhere in
    the process does not move it, and what the step itself allocates (activations, saved tensors,
    the gates' buffers) doubles with the batch."""
    peak, state = _train_peak(module, 8)
    ballast = torch.ones(5_000_000)  # 20 MB held elsewhere
    again, _ = _train_peak(module, 8)
    del ballast
    assert again == peak
    doubled, state_doubled = _train_peak(module, 16)
    step, step_doubled = peak - state, doubled - state_doubled
    assert step > 0.5 * peak  # activations dominate a training step's memory even at batch 8
    assert step_doubled / step == pytest.approx(2.0, rel=0.02)


def test_train_peak_memory_counts_the_last_steps_gradients_once() -> None:
    """A step frees the last step's gradients and makes new ones: whether a step ran before (the
    gradients exist) or not, the peak is the same, neither short of the old ones nor counting them
    after their free."""
    assert _train_peak("spe", 8, warm=False) == _train_peak("spe", 8, warm=True)


def test_train_peak_memory_refuses_an_inference_timer() -> None:
    """It would run an SGD step and put the model back in train mode, under the inference timing."""
    with pytest.raises(ValueError, match="inference"):
        _cpu_timer("none", 2, mode="inference").peak_memory()


def test_throughput_rejects_bad_settings() -> None:
    model = build_model("none", 11, CLASSES)
    with pytest.raises(UserError, match="mode"):
        measure_throughput(model, mode="eval")
    with pytest.raises(UserError, match="--amp 'fp8' is not supported"):
        measure_throughput(model, amp="fp8")
    with pytest.raises(UserError, match="needs a CUDA device"):  # the trainer's own check
        measure_throughput(model, amp="bf16", device="cpu")


def test_cost_table_rows_and_baseline() -> None:
    table = cost_table(["se", "senet", "spe"], depth=11, batch_size=4, warmup=1, repeats=2)
    assert list(table["module"]) == ["none", "se", "spe"]  # baseline added, aliases merged
    row = table.set_index("module")
    assert row.loc["none", "train_step_rel_none"] == 1.0
    assert (row[["extra_params", "extra_macs_paper", "extra_macs_full"]].loc["none"] == 0).all()
    assert row.loc["se", "extra_macs_paper"] > 0 and row.loc["spe", "extra_macs_paper"] == 0
    assert (row["train_images_per_s"] > 0).all() and (row["infer_images_per_s"] > 0).all()
    assert table.attrs["threads"] == torch.get_num_threads()


def test_cost_table_reports_the_spread_of_the_per_round_ratio(monkeypatch: pytest.MonkeyPatch) -> None:
    """The relative step time is the median of the rounds' ratios, with their quartiles (not a
    ratio of medians): here `none` varies from round to round and SE's ratio to it is, by round,
    1.12, 1.00, 1.30, 1.04, 1.08, so median 1.08, quartiles 1.04 and 1.12."""
    none = [1.0, 2.0, 1.0, 3.0, 2.0]
    se = [t * r for t, r in zip(none, [1.12, 1.0, 1.3, 1.04, 1.08])]
    monkeypatch.setattr(measure, "_time_interleaved", lambda timers, **_: {"none": none, "se": se})
    table = cost_table(["se"], depth=11, batch_size=2, warmup=0, repeats=5).set_index("module")
    assert table.loc["se", ["train_step_rel_none_q1", "train_step_rel_none", "train_step_rel_none_q3"]].tolist() \
        == pytest.approx([1.04, 1.08, 1.12])
    assert table.loc["none", ["train_step_rel_none_q1", "train_step_rel_none_q3"]].tolist() == [1.0, 1.0]
    markdown = cost_markdown(table.reset_index(), "test")
    assert "train step vs none [IQR]" in markdown and " 1.08x [1.04x, 1.12x] " in markdown


def test_cost_table_without_throughput_has_counts_only() -> None:
    table = cost_table(["iebn"], depth=11, throughput=False)
    assert list(table.columns) == [
        "module", "params", "macs_paper", "macs_full", "extra_params", "extra_macs_paper", "extra_macs_full",
    ]
