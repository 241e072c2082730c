"""What a module costs: parameters, multiply-accumulates in two conventions, and measured speed.

Why two MAC conventions. The papers quote conv + linear multiply-accumulates only, which scores
most of an attention module (pooling, sigmoids, elementwise products) as free; fvcore's default
count adds batch norm and average pooling but still skips the rest with a warning. A fair table
shows both, each labelled:

- ``paper``: multiply-accumulates of convolutions and matrix products (conv, linear, addmm,
  matmul, mm, bmm, einsum) only. ResNet-164 at 32x32 gives 247,646,720 = 247,644,160 in its
  166 convs + 2,560 in the 256->10 classifier.
- ``full``: ``paper`` plus everything else the forward pass computes, by one rule, in MAC units:

  - conv/linear: one per multiply-accumulate; a bias is the accumulator's starting value, so it
    adds nothing (fvcore's rule).
  - elementwise ops (add, sub, mul, div, neg, ..., and activations, ReLU and sigmoid included):
    one per output element, two for ``addcmul`` (a multiply and an add). Activations count
    because they are real passes over memory and a gate is mostly made of them; a sigmoid is
    scored like an add, so transcendental work is undercounted rather than guessed.
  - reductions (mean, sum, amax, amin, global max/min, adaptive pooling): one per input element
    per result, so ``aminmax`` costs as much as ``amax`` plus ``amin``: the fused kernel is an
    implementation detail, not less arithmetic.
  - batch norm: fvcore's rule, in eval mode one per element to normalise plus one for the affine
    (IEBN's BN has no affine, so one); training mode would be four plus one, as it also computes
    the statistics. Counts are taken in eval mode.
  - views, reshapes, slicing, cat, split, flatten: zero (fvcore's ignore list plus a few views
    it lacks).

  Any other op is an error (UserError naming it), in both conventions: it could be a matrix
  product in disguise, so neither count could be trusted without it.

Counts are per image: eager model, eval mode, batch 1. Throughput is timed in interleaved blocks
after a warm-up and reported as a median with its interquartile range, since a mean is dragged by
the occasional slow block (GC, another process, turbo states).
"""

from __future__ import annotations

import copy
import math
import os
import re
import sys
import time
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import nn
from tqdm.auto import tqdm

from attnbench import registry
from attnbench.config import preset
from attnbench.errors import UserError
from attnbench.models import build_model, count_params
from attnbench.train import Runtime, Stepper, check_amp, resolve_device

with warnings.catch_warnings():  # fvcore scripts a helper at import, which torch 2.14 calls deprecated
    warnings.filterwarnings("ignore", message="`torch.jit.script` is deprecated", category=FutureWarning)
    from fvcore.nn import FlopCountAnalysis

CONVENTIONS = ("paper", "full")
MODES = ("train", "inference")

# Operator names (as fvcore's handles label them) that make up the papers' count.
_PAPER_OPS = frozenset({"conv", "linear", "addmm", "matmul", "mm", "bmm", "einsum"})


def _numel(value: Any) -> int:
    return math.prod(value.type().sizes())


def _per_output_element(ops: int) -> Callable[[list, list], int]:
    def handle(inputs: list, outputs: list) -> int:
        return ops * _numel(outputs[0])

    return handle


def _per_input_element(results: int) -> Callable[[list, list], int]:
    def handle(inputs: list, outputs: list) -> int:
        return results * _numel(inputs[0])

    return handle


def _max_or_min(inputs: list, outputs: list) -> int:
    """aten::max/min are both a reduction (one tensor argument) and a binary elementwise op."""
    binary = len(inputs) > 1 and inputs[1].isCompleteTensor()
    return _numel(outputs[0]) if binary else _numel(inputs[0])


_ELEMENTWISE = (
    "add", "add_", "sub", "sub_", "rsub", "mul", "mul_", "div", "div_", "neg",
    "relu", "relu_", "sigmoid", "sigmoid_", "tanh", "tanh_", "hardsigmoid", "silu", "gelu",
    "exp", "sqrt", "rsqrt", "pow",
)
_REDUCTIONS = ("mean", "sum", "amax", "amin", "adaptive_max_pool2d")
_FREE = ("expand_as", "view_as", "unflatten", "movedim")

FULL_HANDLES: dict[str, Callable[[list, list], int] | None] = {
    **{f"aten::{op}": _per_output_element(1) for op in _ELEMENTWISE},
    **{f"aten::{op}": _per_input_element(1) for op in _REDUCTIONS},
    "aten::addcmul": _per_output_element(2),
    "aten::aminmax": _per_input_element(2),
    "aten::max": _max_or_min,
    "aten::min": _max_or_min,
    **{f"aten::{op}": None for op in _FREE},
}
"""Handles added to fvcore's defaults for the ``full`` convention (None: explicitly free)."""


@contextmanager
def _eval_mode(model: nn.Module) -> Iterator[None]:
    """Eval for the duration, then every submodule back to its own mode (they may differ)."""
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield
    finally:
        for m, training in modes:
            m.training = training


@contextmanager
def _single_thread() -> Iterator[None]:
    """A batch-1 trace has nothing to parallelise, and when another process holds a core,
    OpenMP barriers made it about 100x slower (8 s instead of 0.05 s for ResNet-164)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def mac_analysis(model: nn.Module, input_size: int = 32) -> FlopCountAnalysis:
    """fvcore's analysis with the ``full`` handles, already run (eval mode, batch 1).

    Exposed for per-operator and per-submodule breakdowns. fvcore's own unsupported-operator
    warnings stay on, so a model nothing here covers is also visible in the log, and the same
    ops raise UserError. fvcore cannot trace a torch.compile'd model, so its eager module is used.
    """
    model = getattr(model, "_orig_mod", model)
    param = next(model.parameters(), None)
    device = param.device if param is not None else torch.device("cpu")
    x = torch.zeros(1, 3, input_size, input_size, device=device)
    analysis = FlopCountAnalysis(model, x).set_op_handle(**FULL_HANDLES).uncalled_modules_warnings(False)
    try:
        with _eval_mode(model), _single_thread(), torch.no_grad():
            analysis.total()
    except RuntimeError as exc:
        raise UserError(f"cannot trace the model to count MACs: {str(exc).splitlines()[0]}") from exc
    unsupported = analysis.unsupported_ops()
    if unsupported:
        ops = ", ".join(f"{op} (x{n})" for op, n in sorted(unsupported.items()))
        raise UserError(f"cannot count MACs: no counting rule for {ops}; add a handle to attnbench.measure.FULL_HANDLES")
    return analysis


def _macs_by_convention(model: nn.Module, input_size: int) -> dict[str, int]:
    """Both conventions from one trace (tracing ResNet-164 takes seconds)."""
    by_op = mac_analysis(model, input_size).by_operator()
    return {
        "paper": int(sum(n for op, n in by_op.items() if op in _PAPER_OPS)),
        "full": int(sum(by_op.values())),
    }


def count_macs(model: nn.Module, convention: str, input_size: int = 32) -> int:
    """Multiply-accumulates per image in the named convention (see the module docstring)."""
    if convention not in CONVENTIONS:
        raise UserError(f"unknown MAC convention '{convention}'; use one of: {', '.join(CONVENTIONS)}")
    return _macs_by_convention(model, input_size)[convention]


@contextmanager
def _quiet_stderr() -> Iterator[None]:
    """Kineto, under torch's profiler, writes lines straight to file descriptor 2 when a profile
    starts and stops (and an error when it finds no GPU), whatever its log level. Without a
    usable fd 2 (a closed or replaced stderr) there is nothing to silence."""
    try:
        sys.stderr.flush()
        saved = os.dup(2)
    except (AttributeError, OSError, ValueError):
        yield
        return
    try:
        with open(os.devnull, "w") as null:
            os.dup2(null.fileno(), 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def _walk(events: list[Any]) -> Iterator[Any]:
    """Every event of the profiler's tree; an allocation sits under the op that made it."""
    for event in events:
        yield event
        yield from _walk(event.children)


_MEASURED = "attnbench.allocation_peak"


def allocation_peak(run: Callable[[], Any], before: Callable[[], Any] = lambda: None) -> int:
    """The most bytes that CPU tensors held while `run()` ran, above what they held when it began,
    as torch's profiler saw each allocation and free in order.

    Why the profiler: on the CPU torch keeps no allocator statistics (CUDA's max_memory_allocated
    has no CPU twin), and the process's resident set cannot tell one model from another once the
    heap keeps freed memory (attnbench.train.keep_freed_memory). A free counts only where the
    profile saw the allocation: the profiler misses frees of blocks made before it started, or
    reports them with sizes left from an earlier profile. `before()` runs first in the same
    profile, so that what `run()` frees of what `before()` made (a train step's free of the last
    step's gradients) is seen. It reads torch's private event tree (torch._C._profiler), as
    torch 2.14 has it.
    """
    profiler = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True)
    with _quiet_stderr():
        profiler.start()
    try:
        before()
        with torch.profiler.record_function(_MEASURED):
            run()
    finally:
        with _quiet_stderr():
            profiler.stop()
    events = list(_walk(profiler.profiler.kineto_results.experimental_event_tree()))
    measured = next(e for e in events if e.name == _MEASURED)
    allocation = torch._C._profiler._EventType.Allocation
    live: dict[int, int] = {}  # address -> size of each block allocated under this profile
    held = peak = 0  # relative to where run() began
    for event in sorted((e for e in events if e.tag == allocation and e.extra_fields.device.type == "cpu"),
                        key=lambda e: e.start_time_ns):
        fields = event.extra_fields
        if fields.alloc_size > 0:
            live[fields.ptr] = change = fields.alloc_size
        else:
            change = -live.pop(fields.ptr, 0)
        if measured.start_time_ns <= event.start_time_ns <= measured.end_time_ns:
            held += change
            peak = max(peak, held)
    return peak


def tensor_bytes(tensors: Iterable[torch.Tensor]) -> int:
    """Bytes of the storages behind `tensors`, each storage once (views share one)."""
    storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in tensors}
    return sum(storages.values())


def _process_peak_rss() -> int | None:
    """The process's resident-set high-water mark (Linux), every model copy included."""
    try:
        with open("/proc/self/status") as f:
            found = re.search(r"VmHWM:\s+(\d+) kB", f.read())
    except OSError:
        return None
    return int(found.group(1)) * 1024 if found else None


class _Timer:
    """One model copy prepared to run timed blocks of steps, so several can be timed in turns.

    The copy keeps the caller's model untouched by SGD steps, device moves and channels_last.
    Data is one fixed random batch already on the device: this times the model, not a loader.
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        batch_size: int,
        mode: str,
        device: torch.device,
        channels_last: bool,
        amp: str | None,
        input_size: int,
    ):
        if mode not in MODES:
            raise UserError(f"unknown throughput mode '{mode}'; use one of: {', '.join(MODES)}")
        check_amp(amp or "", device)
        self.device, self.mode, self.batch_size = device, mode, batch_size
        fmt = torch.channels_last if channels_last else torch.contiguous_format
        # The training side is the trainer's own step (Stepper), so this times what trains.
        recipe = preset("paper")
        self.stepper = Stepper.wrap(copy.deepcopy(model), Runtime(device=device, channels_last=channels_last),
                                    lr=recipe.lr, momentum=recipe.momentum, weight_decay=recipe.weight_decay,
                                    amp=amp or "")
        self.model = self.stepper.model
        gen = torch.Generator().manual_seed(0)
        self.x = torch.randn(batch_size, 3, input_size, input_size, generator=gen).to(device, memory_format=fmt)
        with _eval_mode(self.model), torch.no_grad():
            classes = self.model(self.x[:1]).shape[1]
        self.y = torch.randint(0, classes, (batch_size,), generator=gen).to(device)
        self.model.train(mode == "train")

    def _train_step(self) -> None:
        self.stepper.run(((self.x, self.y),))

    def _inference_step(self) -> None:
        with torch.inference_mode(), self.stepper.autocast():
            self.model(self.x)

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def block(self, steps: int) -> float:
        """Seconds for `steps` steps, with queued GPU work finished at both ends."""
        step = self._train_step if self.mode == "train" else self._inference_step
        self._sync()
        start = time.perf_counter()
        for _ in range(steps):
            step()
        self._sync()
        return time.perf_counter() - start

    def peak_memory(self) -> int:
        """Peak bytes of this model's tensors over a train step: its weights, gradients,
        optimiser state and batch, plus the most that the step's own allocations held at once.

        Only this copy counts, not the other modules' copies living in the same process, so the
        rows of a table compare like for like, on the GPU (from the allocator's statistics) and
        on the CPU (allocation_peak) alike. On the CPU the gradients are dropped first, so that
        a first profiled step makes them and the second, the one measured, frees them in sight;
        what lives between steps is then the same before and after it.
        """
        if self.mode != "train":
            raise ValueError("peak_memory() runs a train step; this timer times inference")
        if self.device.type != "cuda":
            self.stepper.optimizer.zero_grad(set_to_none=True)
            step_peak = allocation_peak(self._train_step, before=self._train_step)
            return self._state_bytes() + step_peak
        held = self._state_bytes()
        self._sync()
        torch.cuda.reset_peak_memory_stats(self.device)
        before = torch.cuda.memory_allocated(self.device)
        self._train_step()
        self._sync()
        return held + torch.cuda.max_memory_allocated(self.device) - before

    def _state_bytes(self) -> int:
        """What lives between train steps: weights, buffers, gradients, optimiser state, batch."""
        params = list(self.model.parameters())
        return tensor_bytes([*params, *self.model.buffers(), self.x, self.y,
                             *(p.grad for p in params if p.grad is not None),
                             *(t for s in self.stepper.optimizer.state.values() for t in s.values()
                               if torch.is_tensor(t))])


def _time_interleaved(timers: Mapping[str, _Timer], *, warmup: int, repeats: int, steps: int,
                      desc: str = "timing", progress: bool | None = False) -> dict[str, list[float]]:
    """Block times per timer; each round rotates the order so slow drift (thermal, other
    processes) and position effects (cache state left by the previous model) hit all alike.
    `progress` shows a bar over the blocks (None: only on an interactive terminal)."""
    names = list(timers)
    seconds: dict[str, list[float]] = {name: [] for name in names}
    with tqdm(total=len(names) * (warmup + repeats), desc=desc, unit="block", leave=False, file=sys.stderr,
              disable=None if progress is None else not progress) as bar:  # tqdm's None: only on a terminal
        for name in names:
            for _ in range(warmup):
                timers[name].block(steps)
                bar.update()
        for r in range(repeats):
            shift = r % len(names)
            for name in names[shift:] + names[:shift]:
                seconds[name].append(timers[name].block(steps))
                bar.update()
    return seconds


def _summary(timer: _Timer, seconds: list[float], steps: int) -> dict[str, Any]:
    rates = [timer.batch_size * steps / s for s in seconds]
    q1, median, q3 = np.percentile(rates, [25, 50, 75])
    return {
        "images_per_s": float(median),
        "images_per_s_q1": float(q1),
        "images_per_s_q3": float(q3),
        "step_s": float(np.median(seconds)) / steps,
    }


def _environment(device: torch.device) -> dict[str, Any]:
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    return {"device": str(device), "device_name": name, "threads": torch.get_num_threads(),
            "process_peak_rss_bytes": _process_peak_rss()}


def measure_throughput(
    model: nn.Module,
    *,
    batch_size: int = 128,
    mode: str = "train",
    device: str | torch.device = "cpu",
    channels_last: bool = False,
    amp: str | None = None,
    input_size: int = 32,
    warmup: int = 2,
    repeats: int = 10,
    steps_per_block: int = 1,
) -> dict[str, Any]:
    """Images per second of one model: median and quartiles over `repeats` timed blocks.

    A train step is forward + cross-entropy (+ the model's extra_loss()) + backward + SGD
    (momentum 0.9, weight decay 1e-4), the papers' recipe, so optimiser cost is included.
    In train mode `peak_memory_bytes` is the peak of the model's own tensors over one more
    step (_Timer.peak_memory); `process_peak_rss_bytes` is the whole process's high-water mark.
    """
    device = resolve_device(str(device))
    timer = _Timer(model, batch_size=batch_size, mode=mode, device=device,
                   channels_last=channels_last, amp=amp, input_size=input_size)
    seconds = _time_interleaved({"": timer}, warmup=warmup, repeats=repeats, steps=steps_per_block)[""]
    return {
        "mode": mode,
        "batch_size": batch_size,
        **_summary(timer, seconds, steps_per_block),
        "peak_memory_bytes": timer.peak_memory() if mode == "train" else None,
        **_environment(device),
        "channels_last": channels_last,
        "amp": amp,
        "repeats": repeats,
        "steps_per_block": steps_per_block,
    }


def cost_table(
    modules: list[str],
    *,
    depth: int = 164,
    block: str = "bottleneck",
    arch: str = "resnet",
    num_classes: int = 10,
    input_size: int = 32,
    batch_size: int = 128,
    device: str | torch.device = "cpu",
    throughput: bool = True,
    channels_last: bool = False,
    amp: str | None = None,
    warmup: int = 2,
    repeats: int = 10,
    steps_per_block: int = 1,
    options: Mapping[str, Mapping[str, Any]] | None = None,
    progress: bool | None = False,
) -> pd.DataFrame:
    """One row per module (canonical names; `none` always included, first, as the baseline).

    Columns: params, MACs per image in both conventions (macs_paper, macs_full) and the extra
    over `none` of each; with `throughput`, train and inference images/s (median, q1, q3), the
    train-step time relative to `none` with its quartiles, and the train peak memory. The relative
    time is the median over rounds of the ratio within a round: all modules are timed in turns in
    the same call, so drift during the measurement cancels out of the ratio; what is left (a
    round's ratio varied by about +-10% on a shared 2-core CPU) shows in the quartiles, which say
    how close to a target one run can tell a module to be. `options` maps a module
    name to its constructor options; `progress` shows a bar while timing (None: only on an
    interactive terminal). The environment (threads, device, the process's peak resident set) is in
    ``df.attrs``.
    """
    dev = resolve_device(str(device))  # before minutes of MAC counting, not after
    names = list(dict.fromkeys(["none", *(registry.get(m).name for m in modules)]))
    opts = {registry.get(k).name: dict(v) for k, v in (options or {}).items()}
    models = {n: build_model(n, depth, num_classes, arch, block, opts.get(n)) for n in names}
    rows: dict[str, dict[str, Any]] = {n: {"module": n, "params": count_params(m)} for n, m in models.items()}
    for n, m in models.items():
        rows[n].update({f"macs_{c}": v for c, v in _macs_by_convention(m, input_size).items()})
    for n in names:
        for col in ("params", *(f"macs_{c}" for c in CONVENTIONS)):
            rows[n][f"extra_{col}"] = rows[n][col] - rows["none"][col]
    table = pd.DataFrame(list(rows.values()))
    if not throughput:
        return table

    for mode, prefix in (("train", "train"), ("inference", "infer")):
        timers = {n: _Timer(m, batch_size=batch_size, mode=mode, device=dev, channels_last=channels_last,
                            amp=amp, input_size=input_size) for n, m in models.items()}
        seconds = _time_interleaved(timers, warmup=warmup, repeats=repeats, steps=steps_per_block,
                                    desc=f"timing {mode} steps", progress=progress)
        summaries = {n: _summary(timers[n], seconds[n], steps_per_block) for n in names}
        for stat in ("images_per_s", "images_per_s_q1", "images_per_s_q3"):
            table[f"{prefix}_{stat}"] = [summaries[n][stat] for n in names]
        if mode == "train":
            baseline = np.asarray(seconds["none"])
            ratios = {n: np.asarray(seconds[n]) / baseline for n in names}  # one per round
            for suffix, q in (("", 50), ("_q1", 25), ("_q3", 75)):
                table["train_step_rel_none" + suffix] = [float(np.percentile(ratios[n], q)) for n in names]
            table["train_peak_memory_bytes"] = [timers[n].peak_memory() for n in names]
        del timers  # free one mode's model copies before building the next
    table.attrs.update(_environment(dev), batch_size=batch_size, channels_last=channels_last, amp=amp,
                       repeats=repeats, steps_per_block=steps_per_block)
    return table


def cost_markdown(table: pd.DataFrame, title: str) -> str:
    """The cost table with each MAC convention named in its column."""
    out = pd.DataFrame({
        "module": table["module"],
        "params": table["params"].map("{:,}".format),
        "extra params": table["extra_params"].map("{:+,}".format),
        "MACs, paper: conv+linear (M)": (table["macs_paper"] / 1e6).map("{:.2f}".format),
        "extra (M)": (table["extra_macs_paper"] / 1e6).map("{:+.2f}".format),
        "MACs, full: all ops (M)": (table["macs_full"] / 1e6).map("{:.2f}".format),
        "extra full (M)": (table["extra_macs_full"] / 1e6).map("{:+.2f}".format),
    })
    notes = ["MACs per 32x32 image (fvcore, eval mode, batch 1); 'full' adds elementwise ops, activations, "
             "reductions and batch norm, one MAC per element (see attnbench/measure.py)."]
    if "train_images_per_s" in table:
        iqr = lambda col, fmt: [f"{fmt(m)} [{fmt(a)}, {fmt(b)}]" for m, a, b in
                                zip(table[col], table[col + "_q1"], table[col + "_q3"])]
        out["train img/s [IQR]"] = iqr("train_images_per_s", "{:.0f}".format)
        out["inference img/s [IQR]"] = iqr("infer_images_per_s", "{:.0f}".format)
        out["train step vs none [IQR]"] = iqr("train_step_rel_none", "{:.2f}x".format)
        out["train peak memory (MiB)"] = (table["train_peak_memory_bytes"] / 2**20).map("{:.0f}".format)
        a = table.attrs
        notes.append(f"Throughput: {a.get('device')} ({a.get('device_name', '')}), {a.get('threads')} threads, "
                     f"batch {a.get('batch_size')}, channels_last={a.get('channels_last')}, amp={a.get('amp')}, "
                     f"median of {a.get('repeats')} interleaved blocks.")
        rss = a.get("process_peak_rss_bytes")
        notes.append("Train peak memory: each model's own torch tensors over a train step (weights, gradients, "
                     "momentum, batch and all the step allocates; the CUDA allocator's statistics on a GPU, torch's "
                     "profiler on the CPU)" + ("." if rss is None else
                                               f"; the whole process peaked at {rss / 2**20:,.0f} MiB resident."))
    return "\n".join([f"# Cost of each module: {title}", "", out.to_markdown(index=False, disable_numparse=True), "",
                      *notes, ""])
