#!/usr/bin/env bash
# The compile gate (every shipped kernel config built for sm_80 and sm_90a: no spills, shared
# memory within the card, tensor-core instructions) under another Triton release, in a venv of
# its own (.venv-triton-VERSION). One launch-config table serves every Triton the package
# accepts, and register allocation differs between releases, so a config clean on one can
# spill on another. CI runs it for 3.6 (torch 2.11's pin, the common GPU image); any other:
#     bash tests/aot_triton.sh 3.4.0
# It builds what the spill rule gates (each list's first config and spill-free candidates on
# sm_80 / sm_90a) and runs every card-launch test; ALL_BUILDS=1 builds every config, the
# candidates that may spill and Blackwell's too.
# WITH_INTERPRETER=1 runs the kernel files' interpreter tests under that release too, the
# first and the last case of each (--ends-only: every test and launch path at both ends of its
# dtype and size grid; its interpreter is what the guard hooks to make GPU-only faults fail
# there, testing.interpreter_guard); WITH_INTERPRETER=all runs every interpreter test.
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
# the builds the spill rule gates (666) and every card-launch test; ALL_BUILDS=1: every build
aot="aot and not spills_reported"
[ "${ALL_BUILDS:-0}" = 1 ] && aot="aot"
env -u TRITON_INTERPRET TRITON_DEFAULT_FP_FUSION=1 "$venv/bin/python" -m pytest -q "${par[@]}" -m "$aot" tests/
case "${WITH_INTERPRETER:-0}" in
    0) ;;
    all) TRITON_INTERPRET=1 TRITON_DEFAULT_FP_FUSION=1 "$venv/bin/python" -m pytest -q "${par[@]}" \
             -m interpreter tests/ ;;
    *) TRITON_INTERPRET=1 TRITON_DEFAULT_FP_FUSION=1 "$venv/bin/python" -m pytest -q "${par[@]}" \
           -m interpreter --ends-only tests/test_interpreter_guard.py tests/test_attention.py \
           tests/test_adaln_norm.py tests/test_time_qkv.py tests/test_direct_calls.py ;;
esac
