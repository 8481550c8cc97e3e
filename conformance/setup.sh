#!/usr/bin/env bash
# Creates conformance/.venv27, a Python 2.7 virtualenv with Autobahn|Testsuite
# (wstest) installed from PyPI at the pins of requirements-py27.txt.
#
#   conformance/setup.sh            # creates or updates; a no-op when up to date
#   conformance/setup.sh --force    # deletes the virtualenv and builds it anew
#
# Needs only a CPython 2.7 interpreter: by default pyenv's 2.7.18
# (~/.pyenv/versions/2.7.18/bin/python); PYTHON27=/path/to/python2.7 overrides.
# gcc is needed for wsaccel (a C extension; the interpreter's headers come with it).
# virtualenv itself comes from PyPI too: the legacy 16.7.12 (one module, no
# dependencies, runs on 2.7), installed into conformance/.bootstrap27 with the
# interpreter's own pip, so nothing is installed into the interpreter.
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
py27=${PYTHON27:-$HOME/.pyenv/versions/2.7.18/bin/python}
venv=${VENV27:-$here/.venv27}
boot=$here/.bootstrap27
req=$here/requirements-py27.txt
stamp=$venv/.requirements.sha256
pip_flags=(--disable-pip-version-check --no-input --no-warn-script-location)
# Only the virtualenv's pip 20.3.4 knows this one (the interpreter's may be 19.2.3).
venv_pip_flags=("${pip_flags[@]}" --no-python-version-warning)

if [ "${1:-}" = "--force" ]; then
    rm -rf "$venv" "$boot"
elif [ $# -gt 0 ]; then
    echo "usage: $0 [--force]" >&2
    exit 2
fi

want=$(sha256sum "$req" | cut -d' ' -f1)
if [ -x "$venv/bin/wstest" ] && [ "$(cat "$stamp" 2>/dev/null)" = "$want" ] \
        && "$venv/bin/wstest" --autobahnversion >/dev/null 2>&1; then
    echo "setup.sh: $venv is up to date ($("$venv/bin/wstest" --autobahnversion 2>&1 | tail -n 1))"
    exit 0
fi

if ! [ -x "$py27" ]; then
    echo "setup.sh: no Python 2.7 at $py27 (install it with 'pyenv install 2.7.18' or set PYTHON27)" >&2
    exit 1
fi
if ! "$py27" -c 'import sys; sys.exit(sys.version_info[:2] != (2, 7))'; then
    echo "setup.sh: $py27 is not Python 2.7: $("$py27" --version 2>&1)" >&2
    exit 1
fi

# A virtualenv whose interpreter no longer runs (the base Python moved) is rebuilt.
if [ -e "$venv" ] && ! "$venv/bin/python" -c 'import sys; sys.exit(sys.version_info[:2] != (2, 7))' 2>/dev/null; then
    echo "setup.sh: $venv is broken or not Python 2.7: rebuilding it"
    rm -rf "$venv"
fi

if ! [ -x "$venv/bin/python" ]; then
    if ! PYTHONPATH="$boot" "$py27" -c 'import virtualenv' 2>/dev/null; then
        if ! "$py27" -m pip --version >/dev/null 2>&1; then
            # pyenv builds 2.7 with pip; bootstrap it from the interpreter if absent.
            "$py27" -m ensurepip --default-pip
        fi
        rm -rf "$boot"
        "$py27" -m pip install "${pip_flags[@]}" --quiet --target "$boot" virtualenv==16.7.12
    fi
    # Seeds pip 20.3.4, setuptools 44.1.1 and wheel from the wheels virtualenv bundles.
    PYTHONPATH="$boot" "$py27" -m virtualenv --no-download "$venv"
fi

# pip 20.3.4 is the last pip for Python 2.7 (and has the dependency resolver).
"$venv/bin/python" -m pip install "${venv_pip_flags[@]}" --quiet pip==20.3.4
log=$(mktemp)
if ! "$venv/bin/python" -m pip install "${venv_pip_flags[@]}" -r "$req" >"$log" 2>&1; then
    grep -v -e "is ignored: it is neither a file nor a directory" "$log" >&2 || true
    rm -f "$log"
    echo "setup.sh: pip install -r $req failed" >&2
    exit 1
fi
rm -f "$log"
"$venv/bin/python" -m pip check --disable-pip-version-check --no-python-version-warning
"$venv/bin/wstest" --autobahnversion
echo "$want" > "$stamp"
echo "setup.sh: ready: $venv/bin/wstest"
