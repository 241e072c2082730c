"""A run's configuration as plain values, the presets, and the run key derived from them.

Everything that can change a run's numbers is a field of RunConfig and goes into the run key;
settings that only change where or how fast a run executes (device, compile, paths) do not, so a
run started on one machine can be resumed or skipped on another.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field, fields, replace
from typing import Any

from attnbench.errors import UserError


@dataclass(frozen=True)
class RunConfig:
    module: str = field(default="none", metadata={"help": "attention module (see --list)"})
    dataset: str = field(default="cifar10", metadata={"help": "cifar10, cifar100 or synthetic"})
    seed: int = field(default=0, metadata={"help": "seed of init, data order and augmentation"})
    arch: str = field(default="resnet", metadata={"help": "resnet (post-activation) or preresnet"})
    block: str = field(default="bottleneck", metadata={"help": "bottleneck (depth 9n+2) or basic (6n+2)"})
    depth: int = field(default=164, metadata={"help": "network depth"})
    epochs: int = field(default=164, metadata={"help": "training epochs"})
    batch_size: int = field(default=128, metadata={"help": "training batch size"})
    test_batch_size: int = field(default=100, metadata={"help": "evaluation batch size"})
    lr: float = field(default=0.1, metadata={"help": "initial SGD learning rate"})
    momentum: float = field(default=0.9, metadata={"help": "SGD momentum (no Nesterov)"})
    weight_decay: float = field(default=1e-4, metadata={"help": "weight decay on every parameter"})
    milestones: tuple[int, ...] = field(
        default=(81, 122), metadata={"help": "0-indexed epochs where lr is multiplied by gamma, comma-separated"})
    gamma: float = field(default=0.1, metadata={"help": "lr decay factor at each milestone"})
    train_size: int = field(default=0, metadata={"help": "use only the first N training images (0 = all)"})
    val_split: int = field(default=0, metadata={"help": "hold out N training images as the evaluation set (0 = none; "
                                                        "--tune holds out a tenth unless given)"})
    amp: str = field(default="", metadata={"help": "mixed precision on CUDA: bf16 or fp16 (empty = off)"})
    options: tuple[tuple[str, Any], ...] = field(default=(), metadata={"help": "module options, e.g. spe.p0=1.0"})
    variant: str = field(default="", metadata={"help": "name for the options in tables, e.g. 'tuned'"})

    @property
    def module_options(self) -> dict[str, Any]:
        return dict(self.options)

    @property
    def label(self) -> str:
        """Module name plus its non-default options, as the leaderboard shows it."""
        if self.variant:
            return f"{self.module} ({self.variant})"
        if not self.options:
            return self.module
        return f"{self.module} ({', '.join(f'{k}={v:g}' if isinstance(v, float) else f'{k}={v}' for k, v in self.options)})"

    @property
    def recipe_text(self) -> str:
        """One line naming the recipe, for table headings."""
        schedule = f"x{self.gamma:g} at {list(self.milestones)}" if self.milestones else "constant"
        text = (f"{self.arch}-{self.depth} ({self.block}), {counted(self.epochs, 'epoch')}, batch {self.batch_size}, "
                f"lr {self.lr:g} {schedule}, wd {self.weight_decay:g}")
        if self.train_size:
            text += f", first {self.train_size} train images"
        if self.val_split:
            text += f", {self.val_split} held out for validation"
        return text + (f", {self.amp}" if self.amp else "")

    def attrs(self) -> dict[str, Any]:
        """What the store keeps about a run, so any worker can rebuild the config and group it."""
        return {"run_key": self.key(), "recipe": self.recipe_key(), "module": self.module, "label": self.label,
                "dataset": self.dataset, "recipe_text": self.recipe_text, "config": asdict(self)}

    @classmethod
    def from_attrs(cls, config: dict[str, Any]) -> RunConfig:
        """Inverse of asdict() after a JSON round trip, which turns tuples into lists."""
        values = dict(config)
        values["milestones"] = tuple(values["milestones"])
        values["options"] = tuple((k, v) for k, v in values["options"])
        return cls(**values)

    def key(self) -> str:
        """Stable id of the run: the same config always gives the same key, across machines."""
        return _digest(self._identity())

    def recipe_key(self) -> str:
        """Id of everything but module, options and seed: runs sharing it belong in one table."""
        recipe = {k: v for k, v in self._identity().items() if k not in ("module", "options", "variant", "seed")}
        return _digest(recipe)

    def _identity(self) -> dict[str, Any]:
        """The values that change what the run computes: gamma only acts at a milestone."""
        values = asdict(self)
        if not self.milestones:
            del values["gamma"]
        return values


def counted(n: int, noun: str) -> str:
    """'1 epoch', '2 epochs': for the lines people read."""
    return f"{n} {noun}" if n == 1 else f"{n} {noun}s"


def _digest(values: dict[str, Any]) -> str:
    text = json.dumps(values, sort_keys=True, default=list)
    return hashlib.sha256(text.encode()).hexdigest()[:12]


PRESETS: dict[str, dict[str, Any]] = {
    # The papers' recipe: bearpaw's cifar.py defaults with the ResNet-164 command line.
    "paper": {},
    # Runs anywhere in about a minute: offline data, a shallow net, two epochs.
    "quick": dict(dataset="synthetic", block="basic", depth=8, epochs=2, milestones=(), lr=0.05),
}


def preset(name: str, **overrides: Any) -> RunConfig:
    if name not in PRESETS:
        raise UserError(f"unknown preset '{name}'; available: {', '.join(PRESETS)}")
    return replace(RunConfig(**PRESETS[name]), **overrides)


def config_fields() -> list:
    """The fields a user may override on the command line (module, dataset, seed have own flags)."""
    return [f for f in fields(RunConfig) if f.name not in ("module", "dataset", "seed", "options", "variant")]
