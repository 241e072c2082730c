"""What a module costs, by one rule for every module: parameters, multiply-accumulates in two
conventions, the activations a training step keeps, and measured speed.

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
    implementation detail, not less arithmetic; variance and standard deviation two per input
    element (the mean, then the squared deviations); softmax three per element (exponential,
    sum, division); an average pool one per window element per output; upsampling one per output
    element (fvcore's rule).
  - batch norm: fvcore's rule, in eval mode one per element to normalise plus one for the affine
    (IEBN's BN has no affine, so one); training mode would be four plus one, as it also computes
    the statistics. Counts are taken in eval mode.
  - views, reshapes, slicing, cat, split, chunk, flatten: zero (fvcore's ignore list plus a few
    it lacks).

  Any other op is an error (UserError naming it), in both conventions: it could be a matrix
  product in disguise, so neither count could be trusted without it.

Counts are per image: eager model, eval mode, batch 1.

Memory is the bytes of the tensors autograd saves for the backward pass of one training batch
(torch.autograd.graph.saved_tensors_hooks; each storage once; the model's own parameters and
buffers left out, as they are held whatever the batch). It is what a module's formula makes a step
keep, the same on every device and in every run, with nothing of the allocator or the process in
it. On CUDA the table adds the allocator's peak over a train step above what was held before it.

Throughput is timed in interleaved blocks after a warm-up and reported as a median with its
interquartile range, since a mean is dragged by the occasional slow block (GC, another process,
turbo states).
"""

from __future__ import annotations

import copy
import math
import sys
import time
import warnings
from collections.abc import Callable, Iterator, Mapping
from contextlib import AbstractContextManager, contextmanager, nullcontext
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import nn
from tqdm.auto import tqdm

from attnbench import registry
from attnbench.config import preset
from attnbench.errors import UserError, first_line
from attnbench.models import build_model, count_params
from attnbench.train import Runtime, Stepper, autocast_for, check_amp, check_compile, resolve_device

with warnings.catch_warnings():  # fvcore scripts a helper at import, which torch 2.14 calls deprecated
    warnings.filterwarnings("ignore", message="`torch.jit.script` is deprecated", category=FutureWarning)
    from fvcore.nn import FlopCountAnalysis

CONVENTIONS = ("paper", "full")
VARIANTS = {False: "", True: "compiled_"}  # compiled or not -> column prefix

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
    "relu", "relu_", "sigmoid", "sigmoid_", "tanh", "tanh_", "hardsigmoid", "hardswish", "hardtanh",
    "hardtanh_", "silu", "gelu", "exp", "sqrt", "rsqrt", "pow",
)
_REDUCTIONS = ("mean", "sum", "amax", "amin", "adaptive_max_pool2d")
_FREE = ("expand_as", "view_as", "unflatten", "movedim", "zeros_like", "chunk")


def _avg_pool(inputs: list, outputs: list) -> int:
    """One per window element per output: a k x k window adds k*k values."""
    kernel = inputs[1].toIValue() or [v.toIValue() for v in inputs[1].node().inputs()]  # a list built in the graph
    return _numel(outputs[0]) * math.prod(kernel if len(kernel) == 2 else kernel * 2)

FULL_HANDLES: dict[str, Callable[[list, list], int] | None] = {
    **{f"aten::{op}": _per_output_element(1) for op in _ELEMENTWISE},
    **{f"aten::{op}": _per_input_element(1) for op in _REDUCTIONS},
    "aten::addcmul": _per_output_element(2),
    "aten::aminmax": _per_input_element(2),
    "aten::max": _max_or_min,
    "aten::min": _max_or_min,
    "aten::var": _per_input_element(2),  # a pass for the mean, one for the squared deviations
    "aten::std": _per_input_element(2),
    "aten::softmax": _per_output_element(3),  # exponential, the sum it is divided by, the division
    "aten::avg_pool2d": _avg_pool,
    **{f"aten::{op}": None for op in _FREE},
}
"""Handles added to fvcore's defaults for the ``full`` convention (None: explicitly free)."""


@contextmanager
def _in_mode(model: nn.Module, training: bool) -> Iterator[None]:
    """Train or eval mode for the duration, then every submodule back to its own (they may differ)."""
    modes = [(m, m.training) for m in model.modules()]
    model.train(training)
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
        with _in_mode(model, False), _single_thread(), torch.no_grad():
            analysis.total()
    except RuntimeError as exc:
        raise UserError(f"cannot trace the model to count MACs: {first_line(exc)}") from exc
    unsupported = analysis.unsupported_ops()
    if unsupported:
        ops = ", ".join(f"{op} (x{n})" for op, n in sorted(unsupported.items()))
        raise UserError(f"cannot count MACs: no counting rule for {ops}; add a handle to attnbench.costs.FULL_HANDLES")
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


def saved_activation_bytes(model: nn.Module, x: torch.Tensor,
                           autocast: Callable[[], AbstractContextManager] = nullcontext) -> int:
    """Bytes of the tensors autograd saves for the backward pass of model(x) in training mode, each
    storage once, the model's parameters and buffers left out. Runs one forward pass, so batch
    norms' running statistics move as in a training step; the graph is dropped unused."""
    held = {t.untyped_storage().data_ptr() for t in (*model.parameters(), *model.buffers())}
    saved: dict[int, int] = {}  # by address: the graph keeps each saved storage alive, so none is reused

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in held:
            saved[storage.data_ptr()] = storage.nbytes()
        # Nothing here may hold a saved tensor with its grad_fn: the graph holds this hook, so that
        # would be a reference cycle through C++ that no garbage collector frees.
        return t.detach()

    with _in_mode(model, True), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), autocast():
        model(x)
    return sum(saved.values())


class _Timer:
    """One model copy prepared to run timed blocks of steps, so several can be timed in turns.

    The copy keeps the caller's model untouched by SGD steps, device moves and channels_last.
    Data is one fixed random batch already on the device: this times the model, not a loader.
    """

    def __init__(self, model: nn.Module, *, batch_size: int, mode: str, device: torch.device, channels_last: bool,
                 amp: str | None, compiled: bool, input_size: int):
        self.device, self.mode, self.batch_size = device, mode, batch_size
        fmt = torch.channels_last if channels_last else torch.contiguous_format
        # The trainer's own step (Stepper), so this times what trains.
        recipe = preset("paper")
        self.stepper = Stepper.wrap(copy.deepcopy(model),
                                    Runtime(device=device, compile=compiled, channels_last=channels_last),
                                    lr=recipe.lr, momentum=recipe.momentum, weight_decay=recipe.weight_decay,
                                    amp=amp or "")
        gen = torch.Generator().manual_seed(0)
        self.x = torch.randn(batch_size, 3, input_size, input_size, generator=gen).to(device, memory_format=fmt)
        self.y = torch.randint(0, model.fc.out_features, (batch_size,), generator=gen).to(device)
        self.stepper.model.train(mode == "train")

    def _train_step(self) -> None:
        self.stepper.run(((self.x, self.y),))

    def _inference_step(self) -> None:
        with torch.inference_mode(), self.stepper.autocast():
            self.stepper.forward(self.x)

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

    def cuda_peak_bytes(self) -> int:
        """The CUDA allocator's peak over one train step, above what it held before the step."""
        self._sync()
        torch.cuda.reset_peak_memory_stats(self.device)
        before = torch.cuda.memory_allocated(self.device)
        self._train_step()
        self._sync()
        return torch.cuda.max_memory_allocated(self.device) - before


def _time_interleaved(timers: Mapping[Any, _Timer], *, warmup: int, repeats: int, steps: int,
                      desc: str = "timing", progress: bool | None = False) -> dict[Any, list[float]]:
    """Block times per timer; each round rotates the order so slow drift (thermal, other
    processes) and position effects (cache state left by the previous model) hit all alike.
    `progress` shows a bar over the blocks (None: only on an interactive terminal)."""
    names = list(timers)
    seconds: dict[Any, list[float]] = {name: [] for name in names}
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


def _quartiles(values: list[float] | np.ndarray) -> tuple[float, float, float]:
    q1, median, q3 = np.percentile(values, [25, 50, 75])
    return float(q1), float(median), float(q3)


def _environment(device: torch.device) -> dict[str, Any]:
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    return {"device": str(device), "device_name": name, "threads": torch.get_num_threads()}


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
    compile: bool = False,
    warmup: int = 2,
    repeats: int = 10,
    steps_per_block: int = 1,
    options: Mapping[str, Mapping[str, Any]] | None = None,
    progress: bool | None = False,
) -> pd.DataFrame:
    """One row per module (canonical names; `none` always included, first, as the baseline).

    Columns: params, MACs per image in both conventions (macs_paper, macs_full), the bytes a
    training batch of `batch_size` saves for its backward pass (saved_bytes), and the extra over
    `none` of each. With `throughput`: train and inference images/s (median, q1, q3) and the
    train-step time relative to `none` with its quartiles, eager, and compiled too where
    `compile` (columns prefixed compiled_); on CUDA the allocator's peak over a train step
    (cuda_peak_bytes). The relative time is the median over rounds of the ratio within a round:
    all modules (eager and compiled) are timed in turns in the same call, so drift during the
    measurement cancels out of the ratio; what is left (a round's ratio varied by about +-10% on a
    shared 2-core CPU) shows in the quartiles. `options` maps a module name to its constructor
    options; `progress` shows a bar while timing (None: only on an interactive terminal). The
    environment (threads, device) is in ``df.attrs``.
    """
    dev = resolve_device(str(device))  # before minutes of MAC counting, not after
    check_amp(amp or "", dev)
    check_compile(compile, dev)
    names = list(dict.fromkeys(["none", *(registry.get(m).name for m in modules)]))
    opts = {registry.get(k).name: dict(v) for k, v in (options or {}).items()}
    models = {n: build_model(n, depth, num_classes, arch, block, opts.get(n)) for n in names}
    autocast = autocast_for(dev, amp or "")
    x = torch.randn(batch_size, 3, input_size, input_size, generator=torch.Generator().manual_seed(0)).to(dev)
    rows: dict[str, dict[str, Any]] = {}
    for n, m in models.items():
        rows[n] = {"module": n, "params": count_params(m),
                   **{f"macs_{c}": v for c, v in _macs_by_convention(m, input_size).items()},
                   "saved_bytes": saved_activation_bytes(copy.deepcopy(m).to(dev), x, autocast)}
    for n in names:
        for col in ("params", *(f"macs_{c}" for c in CONVENTIONS), "saved_bytes"):
            rows[n][f"extra_{col}"] = rows[n][col] - rows["none"][col]
    table = pd.DataFrame(list(rows.values()))
    table.attrs.update(_environment(dev), batch_size=batch_size, amp=amp)
    if not throughput:
        return table

    variants = [False, True] if compile else [False]
    for mode, prefix in (("train", "train"), ("inference", "infer")):
        timers = {(n, c): _Timer(m, batch_size=batch_size, mode=mode, device=dev, channels_last=channels_last,
                                 amp=amp, compiled=c, input_size=input_size)
                  for c in variants for n, m in models.items()}
        # every model is its own compiled graph of the same forward: more than torch's default 8
        with torch._dynamo.config.patch(recompile_limit=max(8, len(timers))):
            seconds = _time_interleaved(timers, warmup=warmup, repeats=repeats, steps=steps_per_block,
                                        desc=f"timing {mode} steps", progress=progress)
        for c in variants:
            column = f"{VARIANTS[c]}{prefix}_images_per_s"
            rates = {n: _quartiles([batch_size * steps_per_block / s for s in seconds[n, c]]) for n in names}
            for i, suffix in enumerate(("_q1", "", "_q3")):
                table[column + suffix] = [rates[n][i] for n in names]
            if mode == "train":
                baseline = np.asarray(seconds["none", c])
                ratios = {n: _quartiles(np.asarray(seconds[n, c]) / baseline) for n in names}  # one per round
                for i, suffix in enumerate(("_q1", "", "_q3")):
                    table[f"{VARIANTS[c]}train_step_rel_none{suffix}"] = [ratios[n][i] for n in names]
        if mode == "train" and dev.type == "cuda":
            table["cuda_peak_bytes"] = [timers[n, False].cuda_peak_bytes() for n in names]
        del timers  # free one mode's model copies before building the next
    table.attrs.update(channels_last=channels_last, compile=compile, repeats=repeats, steps_per_block=steps_per_block)
    return table


def cost_markdown(table: pd.DataFrame, title: str) -> str:
    """The cost table with each MAC convention named in its column."""
    mib = lambda col, fmt: (table[col] / 2**20).map(fmt.format)
    out = pd.DataFrame({
        "module": table["module"],
        "params": table["params"].map("{:,}".format),
        "extra params": table["extra_params"].map("{:+,}".format),
        "MACs, paper: conv+linear (M)": (table["macs_paper"] / 1e6).map("{:.2f}".format),
        "extra (M)": (table["extra_macs_paper"] / 1e6).map("{:+.2f}".format),
        "MACs, full: all ops (M)": (table["macs_full"] / 1e6).map("{:.2f}".format),
        "extra full (M)": (table["extra_macs_full"] / 1e6).map("{:+.2f}".format),
        "saved for backward (MiB)": mib("saved_bytes", "{:,.0f}"),
        "extra saved (MiB)": mib("extra_saved_bytes", "{:+,.0f}"),
    })
    a = table.attrs
    notes = ["MACs per 32x32 image (fvcore, eval mode, batch 1); 'full' adds elementwise ops, activations, "
             "reductions and batch norm, one MAC per element (see attnbench/costs.py).",
             f"Saved for backward: the bytes of the tensors autograd keeps for the backward pass of one training "
             f"batch of {a.get('batch_size')} (each storage once, parameters left out), amp={a.get('amp')}."]
    iqr = lambda col, fmt: [f"{fmt(m)} [{fmt(lo)}, {fmt(hi)}]" for m, lo, hi in
                            zip(table[col], table[col + "_q1"], table[col + "_q3"])]
    for compiled, prefix in VARIANTS.items():
        if prefix + "train_images_per_s" not in table:
            continue
        how = "compiled" if compiled else "eager"
        out[f"train img/s, {how} [IQR]"] = iqr(prefix + "train_images_per_s", "{:.0f}".format)
        out[f"inference img/s, {how} [IQR]"] = iqr(prefix + "infer_images_per_s", "{:.0f}".format)
        out[f"train step vs none, {how} [IQR]"] = iqr(prefix + "train_step_rel_none", "{:.2f}x".format)
    if "cuda_peak_bytes" in table:
        out["CUDA peak over a train step (MiB)"] = mib("cuda_peak_bytes", "{:,.0f}")
    if "train_images_per_s" in table:
        notes.append(f"Throughput: {a.get('device')} ({a.get('device_name', '')}), {a.get('threads')} threads, "
                     f"batch {a.get('batch_size')}, channels_last={a.get('channels_last')}, amp={a.get('amp')}, "
                     f"median of {a.get('repeats')} interleaved blocks.")
    return "\n".join([f"# Cost of each module: {title}", "", out.to_markdown(index=False, disable_numparse=True), "",
                      *notes, ""])
