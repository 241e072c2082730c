"""The training loop of the paper recipe, made fast by keeping the hot loop free of host syncs.

Data is a device tensor (see data.py), per-step metrics accumulate on the device and are read
once per epoch, and the model runs channels_last. Everything random is a pure function of the
seed and the epoch, and the checkpoint holds model, optimiser and history, so a run killed at
any point resumes to bit-identical weights on the same machine.
"""

from __future__ import annotations

import math
import sys
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
from torch import nn
from torch.nn import functional as F
from tqdm.auto import tqdm

from attnbench.config import RunConfig
from attnbench.data import Splits, eval_batches, train_batches
from attnbench.errors import UserError
from attnbench.files import write_atomic
from attnbench.models import build_model

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
    history: list[dict] = field(default_factory=list)

    @property
    def best_acc(self) -> float:
        return max(h["eval_acc"] for h in self.history)

    @property
    def best_epoch(self) -> int:
        return max(self.history, key=lambda h: h["eval_acc"])["epoch"]

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


def lr_at(cfg: RunConfig, epoch: int) -> float:
    return cfg.lr * cfg.gamma ** sum(epoch >= m for m in cfg.milestones)


def evaluate(model: nn.Module, splits: Splits, cfg: RunConfig, rt: Runtime, autocast) -> float:
    model.eval()
    correct = torch.zeros((), dtype=torch.long, device=rt.device)
    with torch.inference_mode(), autocast():
        for x, y in eval_batches(splits, cfg.test_batch_size, channels_last=rt.channels_last):
            correct += (model(x).argmax(1) == y).sum()
    return 100.0 * correct.item() / len(splits.eval_labels)


def train(
    cfg: RunConfig,
    splits: Splits,
    rt: Runtime,
    checkpoint: Path | None = None,
    on_epoch: Callable[[dict], None] | None = None,
) -> RunResult:
    """Train one run to the end, resuming from `checkpoint` if it holds an earlier state."""
    check_amp(cfg.amp, rt.device)
    torch.manual_seed(cfg.seed)
    model = build_model(cfg.module, cfg.depth, splits.num_classes, cfg.arch, cfg.block, cfg.module_options)
    model.to(rt.device, memory_format=torch.channels_last if rt.channels_last else torch.contiguous_format)
    optimizer = torch.optim.SGD(
        model.parameters(), lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay, foreach=True
    )
    result = RunResult()
    if checkpoint is not None and checkpoint.exists():
        state = load_checkpoint(checkpoint, cfg)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        result.history = state["history"]
        for record in result.history:
            if on_epoch is not None:
                on_epoch(record)

    if rt.device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    step_model = torch.compile(model) if rt.compile else model
    dtype = AMP_DTYPES.get(cfg.amp)

    def autocast():
        return torch.autocast(rt.device.type, dtype=dtype) if dtype else nullcontext()

    scaler = torch.amp.GradScaler(enabled=cfg.amp == "fp16")
    progress = sys.stderr.isatty() if rt.progress is None else rt.progress
    steps = math.ceil(len(splits.train_labels) / cfg.batch_size)
    name = f"{cfg.label} {cfg.dataset} seed {cfg.seed}"
    epochs = tqdm(range(len(result.history), cfg.epochs), desc=name, initial=len(result.history),
                  total=cfg.epochs, unit="epoch", disable=not progress, leave=False)
    for epoch in epochs:
        started = time.perf_counter()
        lr = lr_at(cfg, epoch)
        for group in optimizer.param_groups:
            group["lr"] = lr
        model.train()
        loss_sum = torch.zeros((), device=rt.device)
        correct = torch.zeros((), dtype=torch.long, device=rt.device)
        batches = train_batches(splits, cfg.batch_size, epoch, cfg.seed, channels_last=rt.channels_last)
        for x, y in tqdm(batches, total=steps, desc=f"epoch {epoch + 1}", leave=False, disable=not progress):
            with autocast():
                logits = step_model(x)
                loss = F.cross_entropy(logits, y)
                extra = model.extra_loss()
                if extra is not None:
                    loss = loss + extra
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
            loss_sum += loss.detach() * len(y)
            correct += (logits.argmax(1) == y).sum()

        n = len(splits.train_labels)
        train_loss = loss_sum.item() / n  # the epoch's one host sync for training metrics
        if not math.isfinite(train_loss):
            raise Diverged(f"training loss became {train_loss} in epoch {epoch + 1}")
        record = {
            "epoch": epoch,
            "train_loss": train_loss,
            "train_acc": 100.0 * correct.item() / n,
            "eval_acc": evaluate(step_model, splits, cfg, rt, autocast),
            "lr": lr,
            "seconds": time.perf_counter() - started,
        }
        result.history.append(record)
        if checkpoint is not None:
            state = {"key": cfg.key(), "model": model.state_dict(), "optimizer": optimizer.state_dict(),
                     "history": result.history}
            write_atomic(checkpoint, lambda tmp: torch.save(state, tmp))
        if on_epoch is not None:
            on_epoch(record)
        line = (f"{name}: epoch {epoch + 1}/{cfg.epochs} loss {train_loss:.3f} train {record['train_acc']:.2f}% "
                f"{splits.eval_name} {record['eval_acc']:.2f}% lr {lr:g} {record['seconds']:.1f}s")
        tqdm.write(line, file=sys.stderr)
    epochs.close()
    return result


def load_checkpoint(path: Path, cfg: RunConfig) -> dict:
    """Read a checkpoint without running code from it (weights_only), and check it is this run's."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise UserError(f"checkpoint {path} cannot be read ({type(exc).__name__}); delete it to restart the run") from exc
    if state.get("key") != cfg.key():
        raise UserError(f"checkpoint {path} belongs to another run; delete it or use another --checkpoint-dir")
    return state
