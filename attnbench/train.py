"""The training loop of the paper recipe, one speed path for every module.

Speed comes from what applies to any nn.Module alike: data is a device tensor (see data.py),
per-step metrics accumulate on the device and are read once per epoch, the model runs
channels_last, with autocast on CUDA where asked and torch.compile where asked. Everything
random is a pure function of the seed and the epoch, and the checkpoint holds model, optimiser
and history, so a run killed at any point resumes to bit-identical weights on the same machine.
"""

from __future__ import annotations

import math
import os
import shutil
import sys
import time
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable

import torch
from torch import Tensor, nn
from torch.nn import functional as F
from tqdm.auto import tqdm

from attnbench import checkpoints
from attnbench.config import RunConfig
from attnbench.data import Splits, eval_batches, train_batches
from attnbench.errors import UserError
from attnbench.models import build_model, count_params

AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


class Diverged(RuntimeError):
    """The loss became NaN or infinite: the run is recorded as failed and the grid goes on."""


@dataclass
class Runtime:
    """How a run executes; none of this changes what it computes, so none of it is in the run key."""

    device: torch.device = field(default_factory=lambda: default_device())
    compile: bool = False
    channels_last: bool = True
    progress: bool | None = None  # None: bars only on an interactive terminal


@dataclass
class RunResult:
    params: int
    history: list[dict] = field(default_factory=list)

    @property
    def best_acc(self) -> float:
        return max(h["eval_acc"] for h in self.history)

    @property
    def last_acc(self) -> float:
        return self.history[-1]["eval_acc"]


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def resolve_device(name: str | None) -> torch.device:
    if not name:
        return default_device()
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UserError(f"--device '{name}' is not a device name; use cpu, cuda or cuda:N") from None
    if device.type == "cuda":
        count = torch.cuda.device_count()
        if count == 0:
            raise UserError(f"--device {name}: no CUDA device is visible here; use --device cpu")
        if device.index is not None and device.index >= count:
            raise UserError(f"--device {name}: only {count} CUDA device(s) visible (0..{count - 1})")
    return device


def check_amp(amp: str, device: torch.device) -> None:
    if not amp:
        return
    if amp not in AMP_DTYPES:
        raise UserError(f"--amp '{amp}' is not supported; use bf16 or fp16")
    if device.type != "cuda":
        raise UserError(f"--amp {amp} needs a CUDA device, and this run is on {device}; drop --amp")
    if amp == "bf16" and not torch.cuda.is_bf16_supported():
        raise UserError("--amp bf16: this GPU has no bfloat16 support; use --amp fp16")


def check_compile(compile: bool, device: torch.device) -> None:
    """On the CPU torch.compile writes C++ and builds it with the system's compiler (CXX, else g++)."""
    compiler = os.environ.get("CXX") or "g++"
    if compile and device.type == "cpu" and shutil.which(compiler) is None:
        raise UserError(f"--compile on the CPU needs a C++ compiler ({compiler}, or what CXX names), and there is "
                        "none here; install one or drop --compile")


def autocast_for(device: torch.device, amp: str) -> Callable[[], AbstractContextManager]:
    """A context factory for the forward pass: autocast to `amp`'s dtype, or nothing for fp32."""
    dtype = AMP_DTYPES.get(amp)

    def autocast() -> AbstractContextManager:
        return torch.autocast(device.type, dtype=dtype) if dtype else nullcontext()

    return autocast


def lr_at(cfg: RunConfig, epoch: int) -> float:
    return cfg.lr * cfg.gamma ** sum(epoch >= m for m in cfg.milestones)


def evaluate(model: nn.Module, splits: Splits, cfg: RunConfig, rt: Runtime, autocast) -> float:
    model.eval()
    correct = torch.zeros((), dtype=torch.long, device=rt.device)
    with torch.inference_mode(), autocast():
        for x, y in eval_batches(splits, cfg.test_batch_size, channels_last=rt.channels_last):
            correct += (model(x).argmax(1) == y).sum()
    return 100.0 * correct.item() / len(splits.eval_labels)


@dataclass
class Stepper:
    """A run's model and optimiser with the per-step work of training: the one copy of the hot
    loop, driven by train() and timed by attnbench.costs and benchmarks/plain_loop.py, so the
    benchmarks measure what trains."""

    model: nn.Module
    optimizer: torch.optim.Optimizer
    forward: Callable[[Tensor], Tensor]  # the model, or its compiled form
    autocast: Callable[[], AbstractContextManager]
    scaler: torch.amp.GradScaler | None  # fp16 only: with bf16 or fp32 it would be calls doing nothing
    device: torch.device

    @classmethod
    def build(cls, cfg: RunConfig, num_classes: int, rt: Runtime) -> Stepper:
        """The freshly initialised model of `cfg` (seeded by cfg.seed) and its optimiser."""
        torch.manual_seed(cfg.seed)
        model = build_model(cfg.module, cfg.depth, num_classes, cfg.arch, cfg.block, cfg.module_options)
        return cls.wrap(model, rt, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay, amp=cfg.amp)

    @classmethod
    def wrap(cls, model: nn.Module, rt: Runtime, *, lr: float, momentum: float, weight_decay: float,
             amp: str = "") -> Stepper:
        """Move `model` to the runtime's device and layout and give it the recipe's optimiser;
        costs.py times its train steps through this too. With rt.compile the model is compiled
        as one graph (a graph break is an error, not a silent fall back to eager), after the
        process's earlier compiled graphs are cleared."""
        model.to(rt.device, memory_format=torch.channels_last if rt.channels_last else torch.contiguous_format)
        optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum, weight_decay=weight_decay,
                                    foreach=True)
        if rt.device.type == "cuda":
            torch.backends.cudnn.benchmark = True
        if rt.compile:
            # A worker compiles run after run in one process; past torch's recompile limit (8 graphs
            # of ResNet.forward) it would train the rest eagerly, with one logged warning.
            torch.compiler.reset()
        return cls(model, optimizer, torch.compile(model, fullgraph=True) if rt.compile else model,
                   autocast_for(rt.device, amp),
                   torch.amp.GradScaler(rt.device.type) if amp == "fp16" else None, rt.device)

    def run(self, batches: Iterable[tuple[Tensor, Tensor]]) -> tuple[Tensor, Tensor]:
        """Train on every batch; return the summed loss and the count of correct predictions as
        device tensors, so that no step waits for the device to report back."""
        model, optimizer, scaler = self.model, self.optimizer, self.scaler
        model.train()
        loss_sum = torch.zeros((), device=self.device)
        correct = torch.zeros((), dtype=torch.long, device=self.device)
        for x, y in batches:
            with self.autocast():
                logits = self.forward(x)
                loss = F.cross_entropy(logits, y)
                extra = model.extra_loss()
                if extra is not None:
                    loss = loss + extra
            optimizer.zero_grad(set_to_none=True)
            if scaler is None:
                loss.backward()
                optimizer.step()
            else:
                scaler.scale(loss).backward()
                scaler.step(optimizer)
                scaler.update()
            loss_sum += loss.detach() * len(y)
            correct += (logits.argmax(1) == y).sum()
        return loss_sum, correct


def train(
    cfg: RunConfig,
    splits: Splits,
    rt: Runtime,
    checkpoint: Path | None = None,
    on_epoch: Callable[[dict], None] | None = None,
) -> RunResult:
    """Train one run to the end, resuming from `checkpoint` if it holds an earlier state."""
    check_amp(cfg.amp, rt.device)
    stepper = Stepper.build(cfg, splits.num_classes, rt)
    model, optimizer = stepper.model, stepper.optimizer
    result = RunResult(params=count_params(model))
    name = f"{cfg.label} {cfg.dataset} seed {cfg.seed}"
    state = checkpoints.load(checkpoint, cfg.key()) if checkpoint is not None else None
    if state is not None:
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        result.history = state["history"]
        print(f"{name}: resuming after epoch {len(result.history)} from {checkpoint}", file=sys.stderr)
        for record in result.history:
            if on_epoch is not None:
                on_epoch(record)

    progress = sys.stderr.isatty() if rt.progress is None else rt.progress
    steps = math.ceil(len(splits.train_labels) / cfg.batch_size)
    epochs = tqdm(range(len(result.history), cfg.epochs), desc=name, initial=len(result.history),
                  total=cfg.epochs, unit="epoch", disable=not progress, leave=False)
    for epoch in epochs:
        started = time.perf_counter()
        lr = lr_at(cfg, epoch)
        for group in optimizer.param_groups:
            group["lr"] = lr
        batches = train_batches(splits, cfg.batch_size, epoch, cfg.seed, channels_last=rt.channels_last)
        loss_sum, correct = stepper.run(
            tqdm(batches, total=steps, desc=f"epoch {epoch + 1}", leave=False, disable=not progress))

        n = len(splits.train_labels)
        train_loss = loss_sum.item() / n  # the epoch's one host sync for training metrics
        if not math.isfinite(train_loss):
            raise Diverged(f"training loss became {train_loss} in epoch {epoch + 1}")
        record = {
            "epoch": epoch,
            "train_loss": train_loss,
            "train_acc": 100.0 * correct.item() / n,
            "eval_acc": evaluate(stepper.forward, splits, cfg, rt, stepper.autocast),
            "lr": lr,
            "seconds": time.perf_counter() - started,
        }
        result.history.append(record)
        if checkpoint is not None:
            state = {"key": cfg.key(), "model": model.state_dict(), "optimizer": optimizer.state_dict(),
                     "history": result.history}
            checkpoints.save(checkpoint, state)
        if on_epoch is not None:
            on_epoch(record)
        line = (f"{name}: epoch {epoch + 1}/{cfg.epochs} loss {train_loss:.3f} train {record['train_acc']:.2f}% "
                f"{splits.eval_name} {record['eval_acc']:.2f}% lr {lr:g} {record['seconds']:.1f}s")
        tqdm.write(line, file=sys.stderr)
    epochs.close()
    if checkpoint is not None:
        checkpoints.finish(checkpoint)
    return result

