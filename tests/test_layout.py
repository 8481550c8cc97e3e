"""The package's shape (ebbcast._layout): arrows point down only, no import cycle, no
module or class too long."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from ebbcast import _layout
from helpers import REPO

PACKAGE = REPO / "daemon" / "ebbcast"


def test_the_package_keeps_its_shape():
    assert _layout.problems(PACKAGE) == []


@pytest.mark.processes
def test_the_command_says_so():
    done = subprocess.run([sys.executable, "-m", "ebbcast._layout"], capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 0, done.stdout
    assert done.stdout.splitlines()[-1] == "no upward arrow, no cycle, no module or class too long"


@pytest.fixture
def copy(tmp_path: Path) -> Path:
    root = tmp_path / "ebbcast"
    shutil.copytree(PACKAGE, root, ignore=shutil.ignore_patterns("__pycache__"))
    return root


def add_import(root: Path, module: str, line: str) -> int:
    """Append ``line`` to ebbcast/``module`` in the copy; the line number it got."""
    path = root / module
    text = path.read_text()
    path.write_text(text + line + "\n")
    return text.count("\n") + 1


def test_an_upward_arrow_is_named_with_its_line(copy):
    line = add_import(copy, "core/lifecycle.py", "from ebbcast.serving.wire import encode_frame")
    assert _layout.problems(copy) == [
        f"ebbcast/core/lifecycle.py:{line}: ebbcast.core.lifecycle (core) imports "
        "ebbcast.serving.wire (serving): upward"]


def test_serving_and_process_never_import_each_other_even_for_types(copy):
    line = add_import(copy, "serving/registry.py",
                      "if TYPE_CHECKING:\n    from ebbcast.process import roles")
    assert _layout.problems(copy) == [
        f"ebbcast/serving/registry.py:{line + 1}: ebbcast.serving.registry (serving) imports "
        "ebbcast.process.roles (process): a wing beside it"]


def test_config_imports_no_wing(copy):
    line = add_import(copy, "config.py", "def late() -> None:\n    from ebbcast.core import frames")
    assert _layout.problems(copy) == [
        f"ebbcast/config.py:{line + 1}: ebbcast.config (config) imports "
        "ebbcast.core.frames (core): upward"]


def test_a_cycle_within_a_wing_is_named(copy):
    # ebbcast.core.events imports ebbcast.core.waits: the other way closes a cycle
    add_import(copy, "core/waits.py", "from ebbcast.core import events")
    assert _layout.problems(copy) == [
        "import cycle: ebbcast.core.events -> ebbcast.core.waits -> ebbcast.core.events"]


def test_a_relative_import_counts_too(copy):
    line = add_import(copy, "backplane/history.py", "from ..serving import wire")
    assert _layout.problems(copy) == [
        f"ebbcast/backplane/history.py:{line}: ebbcast.backplane.history (backplane) imports "
        "ebbcast.serving.wire (serving): upward"]


def test_a_class_grown_too_long_is_named(copy):
    path = copy / "core" / "waits.py"
    text = path.read_text()
    padding = "\n".join(f"    x{i} = {i}" for i in range(_layout.MAX_CLASS_LINES))
    path.write_text(text + "\n\nclass Grown:\n" + padding + "\n")
    first = text.count("\n") + 3
    assert _layout.problems(copy) == [
        f"ebbcast/core/waits.py:{first}: class Grown has {_layout.MAX_CLASS_LINES + 1} lines "
        f"(at most {_layout.MAX_CLASS_LINES})"]


def test_a_module_grown_too_long_is_named(copy):
    path = copy / "core" / "waits.py"
    text = path.read_text()
    lines = _layout.MAX_MODULE_LINES + 1
    path.write_text(text + "#\n" * (lines - text.count("\n")))
    assert _layout.problems(copy) == [
        f"ebbcast/core/waits.py: {lines} lines (at most {_layout.MAX_MODULE_LINES})"]


def test_the_configuration_schema_may_be_long(copy):
    path = copy / "config.py"
    path.write_text(path.read_text() + "\n" * 10 + "# the end\n")
    assert _layout.problems(copy) == []
