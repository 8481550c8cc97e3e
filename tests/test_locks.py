"""The locks in requirements/: complete, hashed, nested, within setup.py's ranges, in
step with pyproject.toml's build tools, and what this very environment holds."""

from __future__ import annotations

import importlib.metadata
import importlib.util
import re
import sys
from types import ModuleType

import pytest
from packaging.requirements import Requirement

from helpers import REPO

LOCKS = REPO / "requirements"
KINDS = ("run", "test", "bench")


def load_locktool() -> ModuleType:
    spec = importlib.util.spec_from_file_location("locktool", LOCKS / "locktool.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


locktool = load_locktool()


def lock_pythons() -> list[str]:
    (line,) = re.findall(r"^LOCK_PYTHONS := (.+)$", (REPO / "Makefile").read_text(),
                         re.MULTILINE)
    return line.split()


def pinned(python: str, kind: str) -> dict[str, str]:
    return dict(locktool.pins((LOCKS / python / f"{kind}.txt").read_text()))


def package_requirements() -> list[Requirement]:
    """setup.py's requirements, extras included, as installed from this tree."""
    return [Requirement(text) for text in importlib.metadata.requires("ebbcast") or []]


def applies(requirement: Requirement, python: str, extra: str) -> bool:
    if requirement.marker is None:
        return True
    return requirement.marker.evaluate({"python_version": python, "extra": extra})


def test_every_supported_python_has_all_three_locks_and_nothing_else():
    assert lock_pythons() == ["3.10", "3.11", "3.12", "3.13"]
    assert sorted(p.name for p in LOCKS.iterdir() if p.is_dir()) == lock_pythons()
    for python in lock_pythons():
        assert sorted(p.name for p in (LOCKS / python).iterdir()) == sorted(
            f"{kind}.txt" for kind in KINDS)


@pytest.mark.parametrize("kind", KINDS)
def test_every_pin_carries_hashes(kind):
    for python in lock_pythons():
        text = (LOCKS / python / f"{kind}.txt").read_text()
        blocks = re.split(r"\n(?=[A-Za-z0-9])", text.split("\n", 2)[2])
        pins = [b for b in blocks if locktool.PIN.match(b)]
        assert len(pins) == len(pinned(python, kind)) > 10
        unhashed = [b.split()[0] for b in pins if "--hash=sha256:" not in b]
        assert unhashed == [], f"requirements/{python}/{kind}.txt"


def test_the_locks_nest_with_the_same_versions():
    for python in lock_pythons():
        run, test, bench = (pinned(python, kind) for kind in KINDS)
        assert run.items() <= test.items() <= bench.items(), python
        assert {"pip", "setuptools", "wheel"} <= run.keys()
        assert {"matplotlib", "py-spy"} <= bench.keys() - test.keys()


@pytest.mark.parametrize("kind, extra", [("run", ""), ("test", "test")])
def test_each_lock_holds_setup_pys_requirements_within_their_ranges(kind, extra):
    for python in lock_pythons():
        locked = pinned(python, kind)
        for requirement in package_requirements():
            name = locktool.canonical(requirement.name)
            if not applies(requirement, python, extra):
                continue
            assert name in locked, f"{name} missing from requirements/{python}/{kind}.txt"
            assert requirement.specifier.contains(locked[name], prereleases=True), (
                f"requirements/{python}/{kind}.txt pins {name}=={locked[name]}, "
                f"outside setup.py's {requirement}")


def test_pyproject_pins_the_build_tools_the_locks_pin():
    locks = {f"{python}/{kind}": pinned(python, kind)
             for python in lock_pythons() for kind in KINDS}
    chosen = locktool.build_system_pins(locks)
    requires = re.search(r"^requires = \[(.*)\]$", (REPO / "pyproject.toml").read_text(),
                         re.MULTILINE)
    assert requires is not None
    assert requires.group(1) == ", ".join(f'"{t}=={v}"' for t, v in chosen.items())


def test_locktool_diff_names_every_difference_both_ways():
    lock = locktool.pins("redis==8.1.0 \\\n    --hash=sha256:00\nPyJWT==2.15.1 \\\n")
    installed = locktool.pins("redis==8.2.0\npyjwt==2.15.1\nextra-thing==1.0\n")
    assert locktool.diff(lock, installed) == [
        "  extra-thing: 1.0 (lock: absent)",
        "  redis: 8.2.0 (lock: 8.1.0)",
    ]
    assert locktool.diff(lock, {**installed, "redis": "8.1.0", "extra-thing": "x"}) == [
        "  extra-thing: x (lock: absent)"]


def test_locktool_refuses_locks_that_disagree_on_a_build_tool():
    with pytest.raises(ValueError, match="the locks pin wheel differently"):
        locktool.build_system_pins({"a": {"setuptools": "80", "wheel": "0.45"},
                                    "b": {"setuptools": "80", "wheel": "0.46"}})


@pytest.mark.locked_env
def test_this_environment_holds_exactly_its_pythons_locked_versions():
    """`make test` installs the test lock (perhaps the bench lock on top): every
    distribution here is at its pin, and every pin of the test lock is here."""
    python = "%d.%d" % sys.version_info[:2]
    test, bench = pinned(python, "test"), pinned(python, "bench")
    installed = {locktool.canonical(d.metadata["Name"]): d.version
                 for d in importlib.metadata.distributions()}
    installed.pop("ebbcast")
    assert {n: v for n, v in installed.items() if bench.get(n) != v} == {}
    assert {n: v for n, v in test.items() if installed.get(n) != v} == {}
