"""The registry: names and aliases, plugin files, entry points, and their errors."""

import sys
import textwrap

import pytest

from attnbench.errors import UserError
from attnbench.models import build_model

PLUGIN = '''
from torch import nn
from attnbench.registry import register

@register("{name}")
class Halve(nn.Module):
    """Multiplies the block output by a constant.

    The rest of the docstring is not the description."""
    def __init__(self, channels, *, factor: float = 0.5):
        super().__init__()
        self.factor = factor
    def forward(self, x):
        return x * self.factor
'''


def test_aliases_resolve_to_one_module(clean_registry):
    assert {clean_registry.get(n).name for n in ("spe", "SPEM", "spenet")} == {"spe"}
    assert set(clean_registry.available()) >= {"none", "se", "cbam", "iebn", "spe"}


def test_kinds_cover_gate_and_norm(clean_registry):
    assert clean_registry.get("se").kind == "gate"
    assert clean_registry.get("iebn").kind == "norm"
    assert clean_registry.get("none").kind == "identity"
    assert clean_registry.get("spe").defaults == {"p0": 0.5, "p1": 0.5, "alpha": 0.1}
    assert clean_registry.get("iebn").defaults == {"eps": 1e-5, "momentum": 0.1}


def test_registry_imports_no_layer_implementation():
    """The registry names modules; which layers exist is the modules' and the backbone's business."""
    from pathlib import Path

    import attnbench.registry

    source = Path(attnbench.registry.__file__).read_text()
    imported = [line for line in source.splitlines() if line.startswith(("import ", "from "))]
    assert not [line for line in imported if "attnbench" in line and "errors" not in line], imported


def test_every_module_file_imports_only_torch_and_the_registry():
    """A module file is exactly what a plugin author writes."""
    from pathlib import Path

    import attnbench.modules

    for path in Path(attnbench.modules.__path__[0]).glob("*.py"):
        imported = {line.split()[1].split(".")[0] for line in path.read_text().splitlines()
                    if line.startswith(("import ", "from "))}
        assert imported <= {"torch", "math", "attnbench"}, path
        assert all(line.startswith(("import torch", "from torch", "import math", "from attnbench.registry import"))
                   for line in path.read_text().splitlines() if line.startswith(("import ", "from "))), path


def test_unknown_module_names_the_available_ones(clean_registry):
    with pytest.raises(UserError, match="unknown module 'sse'; available: cbam, coord, dia, eca, gc, ge, iebn, none, se, sge, spe, srm"):
        clean_registry.get("sse")


def test_unknown_option_is_an_error(clean_registry):
    with pytest.raises(UserError, match="module 'spe' has no option q; it accepts: alpha, p0, p1"):
        build_model("spe", 8, 10, block="basic", options={"q": 1})


def test_plugin_file_adds_a_module(clean_registry, tmp_path):
    path = tmp_path / "halve.py"
    path.write_text(PLUGIN.format(name="halve"))
    clean_registry.load_plugin(path)
    model = build_model("halve", 8, 10, block="basic", options={"factor": 0.25})
    assert model.stages[0][0].gate.factor == 0.25
    spec = clean_registry.get("halve")
    assert spec.source == str(path) and spec.description == "Multiplies the block output by a constant."


def test_plugin_registering_a_taken_name_names_both_files(clean_registry, tmp_path):
    path = tmp_path / "dup.py"
    path.write_text(PLUGIN.format(name="se"))
    with pytest.raises(UserError, match=r"'se' from .*dup\.py is already registered by .*modules/se\.py"):
        clean_registry.load_plugin(path)


def test_plugin_that_fails_to_import_names_the_file(clean_registry, tmp_path):
    path = tmp_path / "broken.py"
    path.write_text("import not_a_real_package_xyz\n")
    with pytest.raises(UserError, match=r"plugin file .*broken\.py failed to import: ModuleNotFoundError"):
        clean_registry.load_plugin(path)
    with pytest.raises(UserError, match="does not exist"):
        clean_registry.load_plugin(tmp_path / "missing.py")


def test_entry_point_group_is_discovered(clean_registry, tmp_path, monkeypatch):
    # A minimal installed distribution: a dist-info folder on sys.path declaring the entry point.
    dist = tmp_path / "thirdparty_attn-1.0.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: thirdparty-attn\nVersion: 1.0\n")
    (dist / "entry_points.txt").write_text("[attnbench.modules]\nthird = thirdparty_attn\n")
    (tmp_path / "thirdparty_attn.py").write_text(PLUGIN.format(name="third"))
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr(clean_registry, "_discovered", False)
    clean_registry._REGISTRY.clear()
    clean_registry._ALIASES.clear()
    for name in [m for m in sys.modules if m.startswith("attnbench.modules.")]:
        monkeypatch.delitem(sys.modules, name)
    assert "third" in clean_registry.available()
    assert "spe" in clean_registry.available()
