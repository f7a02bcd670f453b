#!/usr/bin/env bash
# Installs the load generator inference-perf (PyPI `inference-perf`, kubernetes-sigs) into the
# git-ignored venv bench/inference-perf/.venv, on Python 3.12 from pyenv, and prints the path of
# its CLI as the last line of stdout.
#
# - Pinned: inference-perf==$INFERENCE_PERF_VERSION, every dependency at the version in
#   constraints.txt (beside this script).
# - Idempotent: a venv whose stamp matches the pin and the constraints is reused as it is.
# - Concurrent callers are serialized with flock on bench/inference-perf/.venv.lock.
# - Python: $INFERENCE_PERF_PYTHON if set, else the newest 3.12.x under `pyenv root`/versions
#   (~/.pyenv), else python3.12 on PATH. inference-perf needs Python >= 3.12.
#
# Needs PyPI only on the first run. Usage: bench/inference-perf/install.sh
set -euo pipefail

INFERENCE_PERF_VERSION=0.7.0

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
venv="$here/.venv"
cli="$venv/bin/inference-perf"
constraints="$here/constraints.txt"
stamp_file="$venv/.fleetpick-stamp"

fail() {
    echo "install.sh: cannot install inference-perf==$INFERENCE_PERF_VERSION into $venv: $*" >&2
    exit 1
}

[[ -f "$constraints" ]] || fail "$constraints is missing."
stamp="inference-perf==$INFERENCE_PERF_VERSION $(sha256sum "$constraints" | cut -d' ' -f1)"

installed() {
    [[ -x "$cli" && -x "$venv/bin/python" && -f "$stamp_file" ]] || return 1
    [[ "$(cat "$stamp_file")" == "$stamp" ]] || return 1
    local have
    have="$("$venv/bin/python" -c 'import importlib.metadata as m; print(m.version("inference-perf"))' \
        2>/dev/null)" || return 1
    [[ "$have" == "$INFERENCE_PERF_VERSION" ]]
}

if installed; then
    echo "$cli"
    exit 0
fi

command -v flock >/dev/null 2>&1 || fail "the 'flock' command (util-linux) is missing."
exec 9>"$here/.venv.lock"
flock 9
# Another caller may have finished while this one waited for the lock.
if installed; then
    echo "$cli"
    exit 0
fi

find_python() {
    if [[ -n "${INFERENCE_PERF_PYTHON:-}" ]]; then
        echo "$INFERENCE_PERF_PYTHON"
        return
    fi
    local root
    root="$(pyenv root 2>/dev/null || echo "${PYENV_ROOT:-$HOME/.pyenv}")"
    local best
    best="$(ls -d "$root"/versions/3.12.* 2>/dev/null | sort -V | tail -n 1 || true)"
    if [[ -n "$best" && -x "$best/bin/python3.12" ]]; then
        echo "$best/bin/python3.12"
        return
    fi
    command -v python3.12 2>/dev/null || true
}

python="$(find_python)"
[[ -n "$python" ]] || fail "no Python 3.12 found. inference-perf $INFERENCE_PERF_VERSION needs Python >= 3.12;\
 this script looks for \$INFERENCE_PERF_PYTHON, then the newest 3.12.x under \`pyenv root\`/versions\
 (install one with 'pyenv install 3.12'), then python3.12 on PATH."
"$python" -c 'import sys; assert sys.version_info[:2] == (3, 12), sys.version' >/dev/null 2>&1 \
    || fail "'$python' is not a working Python 3.12 (the pins in constraints.txt were resolved on 3.12)."

# A half-made venv (an interrupted run, an old pin) is rebuilt from scratch.
rm -rf "$venv"
echo "install.sh: creating $venv with $python" >&2
"$python" -m venv "$venv" >&2 \
    || { rm -rf "$venv"; fail "'$python -m venv' failed."; }
echo "install.sh: installing inference-perf==$INFERENCE_PERF_VERSION (about 800 MB with its dependencies)" >&2
"$venv/bin/python" -m pip install --disable-pip-version-check --quiet \
    -c "$constraints" "inference-perf==$INFERENCE_PERF_VERSION" >&2 \
    || { rm -rf "$venv"; fail "pip install failed (see pip's output above; it needs PyPI)."; }
[[ -x "$cli" ]] || fail "inference-perf installed, but $cli does not exist."
TRANSFORMERS_VERBOSITY=error "$venv/bin/python" -c 'import inference_perf.main, tokenizers, transformers' >&2 \
    || fail "the installed packages do not import (see above)."
echo "$stamp" > "$stamp_file"
echo "$cli"
