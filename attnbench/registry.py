"""Names every attention module and says how it plugs into a backbone.

A module plugs in through up to three hooks, and the backbone calls all three for every
block without knowing which module it is building:

- ``norm``: a factory ``norm(channels)`` replacing the block's batch norms (IEBN);
- ``stage``: a factory ``stage(channels)`` for state shared by all blocks of a stage (DIA);
- ``gate``: a factory for the gate applied to the block output after its last norm, before
  the residual add (SE, CBAM, SPE, ...). It is called as ``gate(channels)``, or as
  ``gate(channels, shared)`` when the module also has a ``stage`` hook.

A gate, or a norm, may take the block's residual add and the ReLU after it: if its forward
accepts ``residual`` and ``relu`` keywords, it is called as ``forward(x, residual=shortcut,
relu=...)`` where it ends a block (the shortcut is None where it is a norm with a ReLU after it
inside a block) and returns ``out + shortcut``, through a ReLU when ``relu`` is true; see
attnbench.residual. The gates built on attnbench.pooling pass both on, and the default norm
(attnbench.norm.BatchNorm2d) and IEBN apply them in their own pass. Hooks and per-module counts
then see the add and ReLU in it. A gate whose forward also takes ``before`` is handed the layer
before it as ``forward(x, residual=..., relu=..., before=layer)`` with x that layer's input,
and applies it first: the block's last norm in post-activation blocks, its last conv in
pre-activation ones. gate() and channel_spatial_gate() fold the default norm into the gate's
own passes when training on the CPU, so that norm's forward (and its hooks) do not run there.

Every factory also receives the module's options (its constructor keywords, for example
SPE's initial pooling weights), so tuning an initialisation needs no code in the harness.
A module that wants a term added to the training loss gives its ``nn.Module`` an
``extra_loss()`` method; the backbone collects those once.

Modules come from three places: the files of ``attnbench.modules`` (the project's
``modules/`` folder), the ``attnbench.modules`` entry-point group of installed packages, and
files named with ``--plugin``.
"""

from __future__ import annotations

import importlib
import importlib.util
import inspect
import pkgutil
import sys
from dataclasses import dataclass, field
from importlib.metadata import entry_points
from pathlib import Path
from typing import Any, Callable

from torch import nn

from attnbench.errors import UserError
from attnbench.norm import BatchNorm2d

Factory = Callable[..., nn.Module]


@dataclass(frozen=True)
class Tunable:
    """A search range for one module option: the simple way to make an option tunable."""

    low: float
    high: float
    log: bool = False


# A module's search space: given an Optuna trial, the module options to try. Modules whose
# options interact (SPE: only p0 : p1 sets the mix) search a better-shaped space this way.
Suggest = Callable[[Any], dict[str, Any]]


@dataclass(frozen=True)
class ModuleSpec:
    name: str
    description: str
    gate: Factory | None = None
    norm: Factory | None = None
    stage: Factory | None = None
    aliases: tuple[str, ...] = ()
    suggest: Suggest | None = None
    source: str = ""

    @property
    def kind(self) -> str:
        """How the module plugs in, for listings: 'norm', 'stage+gate', 'gate' or 'identity'."""
        hooks = [h for h in ("norm", "stage", "gate") if getattr(self, h) is not None]
        return "+".join(hooks) or "identity"

    @property
    def defaults(self) -> dict[str, Any]:
        """The options the module's factories accept, with their default values."""
        found: dict[str, Any] = {}
        for factory in (self.norm, self.stage, self.gate):
            if factory is None:
                continue
            for p in inspect.signature(factory).parameters.values():
                if p.kind is p.KEYWORD_ONLY and p.default is not p.empty:
                    found[p.name] = p.default
        return found

    def check_options(self, options: dict[str, Any]) -> None:
        unknown = sorted(set(options) - set(self.defaults))
        if unknown:
            accepted = ", ".join(sorted(self.defaults)) or "none"
            raise UserError(
                f"module '{self.name}' has no option {', '.join(unknown)}; it accepts: {accepted}"
            )

    def _options_for(self, factory: Factory, options: dict[str, Any]) -> dict[str, Any]:
        params = inspect.signature(factory).parameters
        return {k: v for k, v in options.items() if k in params}

    def make_norm(self, channels: int, options: dict[str, Any]) -> nn.Module:
        if self.norm is None:
            return BatchNorm2d(channels)
        return self.norm(channels, **self._options_for(self.norm, options))

    def make_stage(self, channels: int, options: dict[str, Any]) -> nn.Module | None:
        if self.stage is None:
            return None
        return self.stage(channels, **self._options_for(self.stage, options))

    def make_gate(self, channels: int, shared: nn.Module | None, options: dict[str, Any]) -> nn.Module:
        if self.gate is None:
            return nn.Identity()
        kwargs = self._options_for(self.gate, options)
        if self.stage is None:
            return self.gate(channels, **kwargs)
        return self.gate(channels, shared, **kwargs)


_REGISTRY: dict[str, ModuleSpec] = {}
_ALIASES: dict[str, str] = {}
_discovered = False


def register(
    name: str,
    description: str,
    *,
    gate: Factory | None = None,
    norm: Factory | None = None,
    stage: Factory | None = None,
    aliases: tuple[str, ...] = (),
    tunable: dict[str, Tunable] | Suggest | None = None,
) -> ModuleSpec:
    """Add a module to the registry; called once at the bottom of each module file.

    `tunable` makes options searchable by the tuner: ranges per option, or a function from an
    Optuna trial to options."""
    if stage is not None and gate is None:
        raise ValueError(f"module '{name}': a stage hook needs a gate that uses its state")
    source = _caller_file()
    suggest = _suggest_from_ranges(tunable) if isinstance(tunable, dict) else tunable
    spec = ModuleSpec(name, description, gate, norm, stage, tuple(aliases), suggest, source)
    for key in (name, *aliases):
        key = key.lower()
        if key in _ALIASES:
            other = _REGISTRY[_ALIASES[key]].source
            raise UserError(f"module name '{key}' from {source} is already registered by {other}")
    _REGISTRY[name.lower()] = spec
    for key in (name, *aliases):
        _ALIASES[key.lower()] = name.lower()
    return spec


def _suggest_from_ranges(ranges: dict[str, Tunable]) -> Suggest:
    def suggest(trial: Any) -> dict[str, Any]:
        return {name: trial.suggest_float(name, r.low, r.high, log=r.log) for name, r in ranges.items()}

    return suggest


def _caller_file() -> str:
    """The file that called register(), so duplicate-name errors can name both files."""
    return sys._getframe(2).f_code.co_filename


def _discover() -> None:
    """Import the built-in module files and the installed entry points, once."""
    global _discovered
    if _discovered:
        return
    _discovered = True
    import attnbench.modules as package

    for info in sorted(pkgutil.iter_modules(package.__path__), key=lambda i: i.name):
        importlib.import_module(f"{package.__name__}.{info.name}")
    for ep in entry_points(group="attnbench.modules"):
        try:
            ep.load()
        except UserError:
            raise
        except Exception as exc:  # a broken third-party package must not look like our bug
            raise UserError(f"entry point '{ep.name}' ({ep.value}) failed to import: {exc}") from exc


def load_plugin(path: str | Path) -> None:
    """Import a module file the user named with --plugin; its register() calls add modules."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"plugin file {path} does not exist; pass the path to a .py file")
    _discover()
    module_name = f"attnbench_plugin_{path.stem}"
    spec = importlib.util.spec_from_file_location(module_name, path)
    if spec is None or spec.loader is None:
        raise UserError(f"plugin file {path} is not a Python module; pass a .py file")
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module
    try:
        spec.loader.exec_module(module)
    except UserError:
        raise
    except Exception as exc:
        del sys.modules[module_name]
        raise UserError(f"plugin file {path} failed to import: {type(exc).__name__}: {exc}") from exc


def get(name: str) -> ModuleSpec:
    _discover()
    key = _ALIASES.get(name.strip().lower())
    if key is None:
        raise UserError(f"unknown module '{name}'; available: {', '.join(available())}")
    return _REGISTRY[key]


def available() -> list[str]:
    _discover()
    return sorted(_REGISTRY)
