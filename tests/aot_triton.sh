#!/usr/bin/env bash
# The compile gate (every shipped kernel config built for sm_80 and sm_90a: no spills, shared
# memory within the card, tensor-core instructions) under another Triton release, in a venv of
# its own (.venv-triton-VERSION). One launch-config table serves every Triton the package
# accepts, and register allocation differs between releases, so a config clean on one can
# spill on another. CI runs it for 3.6 (torch 2.11's pin, the common GPU image); any other:
#     bash tests/aot_triton.sh 3.4.0
# WITH_INTERPRETER=1 runs the interpreter tests under that release too (its interpreter is what
# the tests hook to make GPU-only faults fail there: testing.interpreter_guard).
set -euo pipefail
cd "$(dirname "$0")/.."
version=${1:?usage: bash tests/aot_triton.sh TRITON_VERSION}
venv=.venv-triton-$version
[ -x "$venv/bin/python" ] || python3 -m venv "$venv"
"$venv/bin/python" -m pip install -q --upgrade pip
"$venv/bin/python" -m pip install -q torch==2.13.0
# Tritons before 3.7 cannot run their interpreter with NumPy >= 2.4 (see testing.interpreter_problem)
"$venv/bin/python" -m pip install -q -e ".[dev]" "triton==$version" "numpy<2.4"
"$venv/bin/python" -c "import triton; print('triton', triton.__version__)"
par=()
if "$venv/bin/python" -c "import xdist" 2>/dev/null; then par=(-n "$(nproc)"); fi
env -u TRITON_INTERPRET TRITON_DEFAULT_FP_FUSION=1 "$venv/bin/python" -m pytest -q "${par[@]}" -m aot tests/
if [ "${WITH_INTERPRETER:-0}" = 1 ]; then
    TRITON_INTERPRET=1 TRITON_DEFAULT_FP_FUSION=1 "$venv/bin/python" -m pytest -q "${par[@]}" \
        -m interpreter tests/
fi
