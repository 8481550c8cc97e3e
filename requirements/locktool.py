#!/usr/bin/env python3
"""Small chores around the locks in requirements/<python>/{run,test,bench}.txt.

    locktool.py diff LOCK < `pip freeze`      # what differs from LOCK (make test-newest)
    locktool.py build-system pyproject.toml LOCK...
        # pins pyproject.toml's build requirements (setuptools, wheel) to the locks'
        # versions (make lock); fails when the locks disagree on them

Standard library only: it runs before any lock is installed.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

#: `name==version` at the start of a line of a lock (hashes and comments follow).
PIN = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==([^\s;\\]+)", re.MULTILINE)
BUILD_TOOLS = ("setuptools", "wheel")
REQUIRES = re.compile(r"^requires = \[.*\]$", re.MULTILINE)


def canonical(name: str) -> str:
    """PEP 503's normalized name: `PyJWT` and `pyjwt`, `tomli_w` and `tomli-w` agree."""
    return re.sub(r"[-_.]+", "-", name).lower()


def pins(text: str) -> dict[str, str]:
    """The `name==version` pins of a lock or of `pip freeze` output."""
    return {canonical(name): version for name, version in PIN.findall(text)}


def diff(lock: dict[str, str], installed: dict[str, str]) -> list[str]:
    """One line per package whose installed version is not the locked one."""
    lines = []
    for name in sorted(lock.keys() | installed.keys()):
        want, have = lock.get(name), installed.get(name)
        if want != have:
            lines.append(f"  {name}: {have or 'not installed'} (lock: {want or 'absent'})")
    return lines


def build_system_pins(locks: dict[str, dict[str, str]]) -> dict[str, str]:
    """The one version of each build tool that every lock pins; ValueError otherwise."""
    chosen = {}
    for tool in BUILD_TOOLS:
        versions = {name: pinned.get(tool) for name, pinned in locks.items()}
        found = set(versions.values())
        if len(found) != 1 or None in found:
            raise ValueError(f"the locks pin {tool} differently ({versions}): pin one "
                             f"version in requirements/build.in")
        (chosen[tool],) = found
    return chosen


def main(argv: list[str]) -> int:
    if len(argv) == 2 and argv[0] == "diff":
        lines = diff(pins(Path(argv[1]).read_text()), pins(sys.stdin.read()))
        print(f"{len(lines)} differences from {argv[1]}:" if lines
              else f"the same versions as {argv[1]}")
        for line in lines:
            print(line)
        return 0
    if len(argv) >= 3 and argv[0] == "build-system":
        pyproject = Path(argv[1])
        try:
            chosen = build_system_pins({path: pins(Path(path).read_text())
                                        for path in argv[2:]})
        except ValueError as problem:
            print(f"locktool.py: {problem}", file=sys.stderr)
            return 1
        requires = ", ".join(f'"{tool}=={version}"' for tool, version in chosen.items())
        text = pyproject.read_text()
        if not REQUIRES.search(text):
            print(f"locktool.py: no 'requires = [...]' line in {pyproject}", file=sys.stderr)
            return 1
        pyproject.write_text(REQUIRES.sub(f"requires = [{requires}]", text))
        print(f"{pyproject}: requires = [{requires}]")
        return 0
    print(__doc__, file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
