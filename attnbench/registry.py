"""Names every attention module and says where in the backbone it goes.

A module is a plain ``nn.Module`` class, registered once with the ``@register`` decorator:

- role ``"gate"`` (the default): built as ``cls(channels, **options)`` for every block and
  applied to the block's output after its last norm, before the residual add; its
  ``forward(x)`` returns a tensor of x's shape (SE, CBAM, SPE). With ``shared=Cls``, one
  ``Cls(channels, **options)`` is built per stage and handed to each gate of that stage as
  ``cls(channels, shared, **options)``: state shared by the blocks of a stage (DIANet's cell).
  A shared module with a ``reset()`` method has it called as each forward pass enters its stage
  and as it leaves, so that it may carry state from block to block within one pass (DIANet's
  LSTM state) and none from one pass to the next. Such state assumes the stage runs its blocks
  once, in order, in one process: a block called on its own, recomputed by activation
  checkpointing, or replicated by nn.DataParallel would see another block's state.
- role ``"norm"``: replaces every batch norm of the stem and the blocks, built as
  ``cls(channels, **options)`` (IEBN); the projection shortcut's norm stays a BatchNorm2d.

A module's options are the keyword-only constructor arguments with defaults (``--opt``), so
tuning an initialisation needs no code in the harness; a value the module cannot take is a
ValueError from its constructor. ``params`` (and ``shared_params``) declare the parameter count of
one instance at a channel count, with default options: the battery of tests checks every module
against its declaration. A module instance with an
``extra_loss()`` method has it added to the training loss. The first line of the class's
docstring is its description in listings.

Modules come from three places: the files of ``attnbench.modules`` (the project's ``modules/``
folder), the ``attnbench.modules`` entry-point group of installed packages, and files named
with ``--plugin``.
"""

from __future__ import annotations

import importlib
import importlib.util
import inspect
import pkgutil
import sys
from dataclasses import dataclass
from importlib.metadata import entry_points
from pathlib import Path
from typing import Any, Callable

from torch import nn

from attnbench.errors import UserError, first_line

ROLES = ("gate", "norm")


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
    cls: type[nn.Module]
    role: str
    description: str
    shared: type[nn.Module] | None = None
    aliases: tuple[str, ...] = ()
    suggest: Suggest | None = None
    source: str = ""
    params: Callable[[int], int] | None = None
    shared_params: Callable[[int], int] | None = None

    @property
    def kind(self) -> str:
        """Where the module goes, for listings: 'gate', 'gate, stage-shared', 'norm' or 'identity'."""
        if issubclass(self.cls, nn.Identity):
            return "identity"
        return self.role + (", stage-shared" if self.shared is not None else "")

    @property
    def defaults(self) -> dict[str, Any]:
        """The options the module's classes accept, with their default values."""
        found: dict[str, Any] = {}
        for cls in (self.shared, self.cls):
            if cls is None:
                continue
            for p in inspect.signature(cls).parameters.values():
                if p.kind is p.KEYWORD_ONLY and p.default is not p.empty:
                    found[p.name] = p.default
        return found

    def check_options(self, options: dict[str, Any]) -> None:
        unknown = sorted(set(options) - set(self.defaults))
        if unknown:
            accepted = ", ".join(sorted(self.defaults)) or "none"
            raise UserError(f"module '{self.name}' has no option {', '.join(unknown)}; it accepts: {accepted}")

    def build_shared(self, channels: int, options: dict[str, Any]) -> nn.Module | None:
        """A stage's shared module, or None where the module shares nothing."""
        if self.shared is None:
            return None
        return self.shared(channels, **_accepted(self.shared, options))

    def build(self, channels: int, options: dict[str, Any], shared: nn.Module | None = None) -> nn.Module:
        """One gate (with its stage's shared module, if the module has one) or one norm."""
        kwargs = _accepted(self.cls, options)
        return self.cls(channels, **kwargs) if self.shared is None else self.cls(channels, shared, **kwargs)


def _accepted(cls: type, options: dict[str, Any]) -> dict[str, Any]:
    params = inspect.signature(cls).parameters
    return {k: v for k, v in options.items() if k in params}


_REGISTRY: dict[str, ModuleSpec] = {}
_ALIASES: dict[str, str] = {}
_discovered = False


def register(
    name: str,
    *,
    role: str = "gate",
    shared: type[nn.Module] | None = None,
    aliases: tuple[str, ...] = (),
    tunable: dict[str, Tunable] | Suggest | None = None,
    params: Callable[[int], int] | None = None,
    shared_params: Callable[[int], int] | None = None,
) -> Callable[[type[nn.Module]], type[nn.Module]]:
    """Class decorator adding a module to the registry under `name` (and `aliases`).

    `tunable` makes options searchable by the tuner: ranges per option, or a function from an
    Optuna trial to options. `params(channels)` is one instance's parameter count with default
    options (`shared_params` the same for the stage-shared module)."""
    if role not in ROLES:
        raise ValueError(f"module '{name}': role must be one of {ROLES}, not {role!r}")
    if shared is not None and role != "gate":
        raise ValueError(f"module '{name}': only a gate can take a stage-shared module")
    suggest = _suggest_from_ranges(tunable) if isinstance(tunable, dict) else tunable

    def add(cls: type[nn.Module]) -> type[nn.Module]:
        source = getattr(sys.modules.get(cls.__module__), "__file__", None) or cls.__module__
        doc = inspect.getdoc(cls) if cls.__doc__ else None  # not a base class's docstring
        spec = ModuleSpec(name.lower(), cls, role, doc.splitlines()[0] if doc else cls.__name__, shared,
                          tuple(aliases), suggest, source, params, shared_params)
        for key in (name, *aliases):
            key = key.lower()
            if key in _ALIASES:
                other = _REGISTRY[_ALIASES[key]].source
                raise UserError(f"module name '{key}' from {source} is already registered by {other}")
        _REGISTRY[spec.name] = spec
        for key in (name, *aliases):
            _ALIASES[key.lower()] = spec.name
        return cls

    return add


def _suggest_from_ranges(ranges: dict[str, Tunable]) -> Suggest:
    def suggest(trial: Any) -> dict[str, Any]:
        return {name: trial.suggest_float(name, r.low, r.high, log=r.log) for name, r in ranges.items()}

    return suggest


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
            raise UserError(f"entry point '{ep.name}' ({ep.value}) failed to import: {first_line(exc)}") from exc


def load_plugin(path: str | Path) -> None:
    """Import a module file the user named with --plugin; its @register classes join the registry."""
    path = Path(path)
    if not path.is_file():
        what = "is not a file" if path.exists() else "does not exist"
        raise UserError(f"plugin file {path} {what}; pass the path to a .py file")
    _discover()
    module_name = f"attnbench_plugin_{path.stem}"
    spec = importlib.util.spec_from_file_location(module_name, path)
    if spec is None or spec.loader is None:
        raise UserError(f"plugin file {path} is not a Python module; pass a .py file")
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module
    before = set(_REGISTRY)
    try:
        spec.loader.exec_module(module)
    except UserError:
        raise
    except SystemExit as exc:  # a script's sys.exit() would end the whole command, silently
        del sys.modules[module_name]
        raise UserError(f"plugin file {path} called sys.exit({exc.code!r}) while importing; "
                        "a plugin only defines and registers modules") from None
    except Exception as exc:
        del sys.modules[module_name]
        raise UserError(f"plugin file {path} failed to import: {first_line(exc)}") from exc
    if set(_REGISTRY) == before:
        raise UserError(f"plugin file {path} registered no module; decorate its class with "
                        "@register(\"name\") from attnbench.registry")


def get(name: str) -> ModuleSpec:
    _discover()
    key = _ALIASES.get(name.strip().lower())
    if key is None:
        raise UserError(f"unknown module '{name}'; available: {', '.join(available())}")
    return _REGISTRY[key]


def available() -> list[str]:
    _discover()
    return sorted(_REGISTRY)
