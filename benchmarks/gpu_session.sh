#!/usr/bin/env bash
# The one-shot GPU session: install check, the gpu-marked tests, `python -m benchmarks --quick`,
# the profiles of the XL/2 and U-Net training steps, the attention tile exploration, Nsight
# Compute's counters of our kernels, results handed back and the goal ratios printed. Run from
# anywhere on the CUDA machine, as ONE command (one device call, 590 s at most):
#     bash benchmarks/gpu_session.sh
# STAGES (comma-separated; all six by default, the install check always runs) picks stages of
# tests, check, bench, profile, explore, ncu; SESSION_S (600 by default) is the call's own
# limit, the later stages' deadlines below (550, 520, 530 s) counted back from it. A session's
# 15 device minutes hold the full call and, on the machine still warm (it waits ~30 s for the
# next call), a short second one for what the first left no time for, e.g. the exploration:
#     SESSION_S=150 STAGES=explore bash benchmarks/gpu_session.sh
# (a stage that is the call's last runs until 10 s before SESSION_S; the kernels the first call
# built load from the machine's Triton cache where it kept it)
# Each stage runs under `timeout`, so a hang in one cannot eat the others' time. The worst case
# at the default limits (each can be set in the environment):
#     install check                                     ~15 s
#     gpu tests     TESTS_TIMEOUT 165 s + 5 s to SIGKILL   170 s  (63 tests took 107 s on an H200
#                   at ec83eac; there are more now, with more autotune candidates and backward
#                   plans to compile; -v prints each test's verdict as it ends, so a stage cut
#                   short still says which passed)
#     diffit check  CHECK_TIMEOUT 45 s + 5 s to SIGKILL      50 s  (DiffiT-XL/2's calls at 256 px,
#                   its table appended to gpu_tests.log; not yet run on a card)
#     benchmarks    BENCH_TIMEOUT 230 s + 15 s to SIGKILL  245 s  (--budget-s BENCH_BUDGET 180:
#                   cases that would start later are skipped rows; the speed-of-light rows keep
#                   a 30 s reserve; a case already running finishes, hence the 50 s margin)
#     tar, summary, goal ratios (the results packed)      ~5 s, again after each later stage
#     profile       what is left of 550 s, PROFILE_TIMEOUT 140 at most, + 10 s to SIGKILL
#                   (skipped below 60 s; --budget-s 40 s less, PROFILE_BUDGET 100 at most):
#                   ours+graphs, ours+compile and compile of the XL/2 256 px B32 step, ~20 s
#                   each, then ours+graphs and compile of the ffhq64 U-Net step, ~35 s each (its
#                   blocks compile one graph per level); PROFILE=0 skips it
#     explore       what is left of 520 s, EXPLORE_TIMEOUT 150 at most (skipped below 40 s;
#                   --budget-s 30 s less, EXPLORE_BUDGET 120 at most): the attention's tiles
#                   beyond the shipped lists, 163 candidates compiled in threads and each timed
#                   at DiffiT-XL/2's 256 and 512 px, then 129 at the ffhq64 U-Net's 8x8
#                   windows, a list at a time; EXPLORE=0 skips it; not yet run on a card (the
#                   full call leaves it little time: a second call, SESSION_S=150 STAGES=explore)
#     ncu           what is left of 530 s, NCU_MIN_S 45 to NCU_TIMEOUT 150 (skipped below the
#                   minimum; the XL/2 step's three ops alone below 90 s), + 3 exports of 12 s
#     total         590 s at most (the last stage's exports past 530 s); expected: ~540 s to
#                   the profile's end at the stages' expected times, which leaves the
#                   exploration and ncu little or nothing: PROFILE=0 gives them its ~2 minutes
# With $OUT set, it gets results.tar.gz (benchmarks/results/<gpu-slug>/ including the profile
# CSVs and plot), summary.md, goals.txt, the four logs and ncu.tar.gz (ncu's details, raw and
# SASS pages as CSV; the device tool returns at most 8 files). Afterwards, on the development machine (the old
# folder goes first: a new run does not rewrite every file an old one had, e.g. its note.md):
#     rm -rf benchmarks/results/<gpu-slug> && tar -xzf results.tar.gz -C benchmarks/results \
#         && python -m benchmarks.summary --readme
# CPU_CHECK=1 runs the same steps without CUDA (the --tiny-cpu harness) to check this script.
set -u -o pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-$(command -v python3 || command -v python)}
TESTS_TIMEOUT=${TESTS_TIMEOUT:-165}
BENCH_BUDGET=${BENCH_BUDGET:-180}
BENCH_TIMEOUT=${BENCH_TIMEOUT:-230}
PROFILE_BUDGET=${PROFILE_BUDGET:-100}
PROFILE_TIMEOUT=${PROFILE_TIMEOUT:-140}
EXPLORE_BUDGET=${EXPLORE_BUDGET:-120}
EXPLORE_TIMEOUT=${EXPLORE_TIMEOUT:-150}
BENCH_OPS=${BENCH_OPS:-all}  # e.g. tmsa_attention,time_qkv: a shorter session for one question
LOGS=${OUT:-benchmarks/results/_tmp-session}
SESSION_S=${SESSION_S:-600}
ALL_STAGES=tests,check,bench,profile,explore,ncu
STAGES=${STAGES-$ALL_STAGES}
[ "${PROFILE:-1}" = 0 ] && STAGES=$(echo ",$STAGES," | sed 's/,profile,/,/; s/^,//; s/,$//')
[ "${EXPLORE:-1}" = 0 ] && STAGES=$(echo ",$STAGES," | sed 's/,explore,/,/; s/^,//; s/,$//')
for st in ${STAGES//,/ }; do
    case ",$ALL_STAGES," in *",$st,"*) ;; *)
        echo "STAGES: unknown stage '$st' (the stages: $ALL_STAGES)"; exit 2 ;; esac
done
want() { case ",$STAGES," in *",$1,"*) return 0 ;; esac; return 1; }
# the deadline of a stage: SESSION_S less its margin (the time later stages keep), or 10 s
# less when no later stage is in STAGES
deadline() {
    local later
    for later in "${@:3}"; do want "$later" && { echo $((SESSION_S - $2)); return; }; done
    echo $((SESSION_S - 10))
}
mkdir -p "$LOGS"
export PYTHONUNBUFFERED=1 TRITON_DEFAULT_FP_FUSION=1 MPLBACKEND=Agg
unset TRITON_INTERPRET

echo "== install check"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader \
    || echo "nvidia-smi: not available (the driver version will read 'unknown')"
"$PY" - <<'EOF' || { echo "install check failed: nothing was run"; exit 3; }
import importlib.util, os, sys
import torch, triton
print(f"python {sys.version.split()[0]} | torch {torch.__version__} (CUDA {torch.version.cuda}) "
      f"| triton {triton.__version__}")
need = ["numpy", "einops", "packaging", "matplotlib", "pytest"]
missing = [m for m in need if importlib.util.find_spec(m) is None]
if missing:
    sys.exit(f"missing Python packages: {missing}")
for m in ("xdist", "pytest_benchmark"):
    print(f"{m}: {'yes' if importlib.util.find_spec(m) else 'no (optional)'}")
if torch.cuda.is_available():
    free, total = torch.cuda.mem_get_info()
    print(f"{torch.cuda.get_device_name()} sm_{''.join(map(str, torch.cuda.get_device_capability()))}"
          f", {free / 2**30:.0f} of {total / 2**30:.0f} GiB free")
elif os.environ.get("CPU_CHECK") != "1":
    sys.exit("no CUDA device is visible")
import benchmarks.__main__, diffit, diffit_kernels  # noqa: E401,F401 - they import cleanly
EOF

tests_rc=skipped
if ! want tests; then
    echo "== gpu tests: not in STAGES, skipped"
else
    echo "== gpu tests (stopped at ${TESTS_TIMEOUT} s)"
    par=() threads=()
    if "$PY" -c "import xdist" 2>/dev/null; then
        # the kernels' compiles in parallel: 8 test processes, each compiling an autotuned
        # launch's candidates in 2 threads (16 cores)
        par=(-n 8) threads=(DIFFIT_KERNELS_COMPILE_THREADS=2)
    fi
    env "${threads[@]}" timeout -k 5 "$TESTS_TIMEOUT" "$PY" -m pytest -v -m gpu -rf "${par[@]}" \
        2>&1 | tee "$LOGS/gpu_tests.log"
    tests_rc=$?
fi

# our kernels against the reference on DiffiT-XL/2's own calls at 256 px (4 samples, bf16,
# forward + backward): the error of every output and gradient next to its bound, the margins
# the card leaves (the gpu tests assert the same rule, and print only on a failure)
check_rc=skipped
if ! want check; then
    echo "== diffit check: not in STAGES, skipped"
else
    echo "== python -m diffit check (stopped at ${CHECK_TIMEOUT:-45} s), into gpu_tests.log"
    if [ "${CPU_CHECK:-0}" = 1 ]; then
        check=(--model DiffiT-tiny --image-size 64 --batch-size 2) check_env=(TRITON_INTERPRET=1)
    else
        check=(--model DiffiT-XL/2 --image-size 256) check_env=()
    fi
    env "${check_env[@]}" timeout -k 5 "${CHECK_TIMEOUT:-45}" "$PY" -m diffit check "${check[@]}" \
        2>&1 | tee -a "$LOGS/gpu_tests.log"
    check_rc=$?
fi

if [ "${CPU_CHECK:-0}" = 1 ]; then
    bench=(--tiny-cpu) prof=(--tiny-cpu) slug=_tmp-tiny-cpu
else
    bench=(--quick --ops "$BENCH_OPS" --budget-s "$BENCH_BUDGET")
    prof=(--quick --budget-s "$PROFILE_BUDGET")
    slug=$("$PY" -c "from benchmarks.common import gpu_slug; print(gpu_slug())")
fi
# the results so far, packed for the device tool to bring back: after the benchmarks, the
# profile and the exploration, so an outer time limit loses only the stage it cut short
dir=benchmarks/results/$slug
pack() {
    [ -f "$dir/run.json" ] || return 0
    "$PY" -m benchmarks.summary "$dir" >/dev/null || echo "summary.md could not be rebuilt"
    tar -czf "$LOGS/results.tar.gz.tmp" -C benchmarks/results "$slug" \
        && mv "$LOGS/results.tar.gz.tmp" "$LOGS/results.tar.gz"
    cp "$dir/summary.md" "$LOGS/summary.md"
    "$PY" -m benchmarks.summary --goals "$dir" > "$LOGS/goals.txt" 2>&1 \
        || echo "the goal ratios could not be computed" >> "$LOGS/goals.txt"
}
# seconds a stage may take: what is left until $1 s into the session, $2 at most
left_until() { local n=$(($1 - SECONDS)); [ "$n" -gt "$2" ] && n=$2; echo "$n"; }

bench_rc=skipped
if ! want bench; then
    echo "== benchmarks: not in STAGES, skipped"
else
    echo "== python -m benchmarks ${bench[*]} (stopped at ${BENCH_TIMEOUT} s)"
    # the autotune picks of each key go into the log, and every candidate's time into
    # autotune.csv (summary.md's Autotune section): the data for choosing the shipped defaults
    TRITON_PRINT_AUTOTUNING=1 timeout -s TERM -k 15 "$BENCH_TIMEOUT" "$PY" -m benchmarks \
        "${bench[@]}" 2>&1 | tee "$LOGS/benchmarks.log"
    bench_rc=$?
    pack
fi

# in a process of its own, added to the same folder (its peak rows reused); what is left of
# 550 s, PROFILE_TIMEOUT at most (its budget 40 s less, PROFILE_BUDGET at most)
left=$(left_until "$(deadline profile 50 explore ncu)" "$PROFILE_TIMEOUT")
if ! want profile; then  # PROFILE=0: a session that wants the exploration and ncu's time
    echo "== profile: not in STAGES, skipped" | tee "$LOGS/profile.log"
    prof_rc=skipped
elif [ "$left" -lt 60 ]; then
    echo "== profile: ${left} s left, skipped" | tee "$LOGS/profile.log"
    prof_rc=skipped
else
    budget=$((left - 40)); [ "$budget" -gt "$PROFILE_BUDGET" ] && budget=$PROFILE_BUDGET
    [ "${CPU_CHECK:-0}" = 1 ] || prof=(--quick --budget-s "$budget")
    echo "== python -m benchmarks --ops profile --append ${prof[*]} (stopped at ${left} s)"
    timeout -s TERM -k 10 "$left" "$PY" -m benchmarks --ops profile --append \
        "${prof[@]}" 2>&1 | tee "$LOGS/profile.log"
    prof_rc=$?
    pack
fi

# the attention tiles beyond the shipped candidate lists, timed at DiffiT-XL/2's training
# shapes (benchmarks/explore.py), added to the same folder: the data to reorder the lists by.
# What is left of 520 s, EXPLORE_TIMEOUT at most (skipped below 40 s).
explore_rc=skipped
left=$(left_until "$(deadline explore 80 ncu)" "$EXPLORE_TIMEOUT")
if ! want explore; then
    echo "== explore: not in STAGES, skipped" | tee -a "$LOGS/profile.log"
elif [ "$left" -lt 40 ]; then
    echo "== explore: ${left} s left, skipped" | tee -a "$LOGS/profile.log"
else
    budget=$((left - 30)); [ "$budget" -gt "$EXPLORE_BUDGET" ] && budget=$EXPLORE_BUDGET
    if [ "${CPU_CHECK:-0}" = 1 ]; then explore=(--tiny-cpu); else explore=(--budget-s "$budget"); fi
    echo "== python -m benchmarks --ops explore --append ${explore[*]} (stopped at ${left} s), into profile.log" \
        | tee -a "$LOGS/profile.log"
    timeout -s TERM -k 10 "$left" "$PY" -m benchmarks --ops explore --append \
        "${explore[@]}" 2>&1 | tee -a "$LOGS/profile.log"  # 8 files at most come back
    explore_rc=$?
    pack
fi

# Nsight Compute on one fwd+bwd of each op at its costliest shapes (benchmarks/ncu_kernels.py):
# stall reasons, occupancy and, per SASS instruction, where the warps stall (ncu.log names the
# config each autotuner picked, i.e. the one profiled). After the results are packed, so a
# stage cut short loses only itself. The profiled run gets what is left of 530 s (at least
# NCU_MIN_S, at most NCU_TIMEOUT; the XL/2 step's three ops alone below 90 s), each export
# 12 s: the details page, the raw page (every metric, one row per kernel) and the SASS page
# (per-instruction stall samples), packed as ncu.tar.gz.
ncu_rc=skipped
left=$(left_until $((SESSION_S - 70)) "${NCU_TIMEOUT:-150}")
ncu_cases=()
[ "$left" -lt 90 ] && ncu_cases=(--cases "attention latent256-B32,time_qkv xl256-B32,adaln_norm xl256-B32")
if ! want ncu; then
    echo "== ncu: not in STAGES, skipped"
elif [ "${CPU_CHECK:-0}" = 1 ]; then
    echo "== benchmarks.ncu_kernels --tiny-cpu (the harness, no ncu)"
    TRITON_INTERPRET=1 timeout -k 5 120 "$PY" -m benchmarks.ncu_kernels --tiny-cpu 2>&1 \
        | tee "$LOGS/ncu.log"
    ncu_rc=$?
elif ! command -v ncu >/dev/null; then
    echo "== ncu: not on PATH, skipped" | tee "$LOGS/ncu.log"
elif [ "$left" -lt "${NCU_MIN_S:-45}" ]; then
    echo "== ncu: ${left} s left, skipped" | tee "$LOGS/ncu.log"
else
    echo "== ncu on benchmarks.ncu_kernels ${ncu_cases[*]} (stopped at ${left} s)"
    nd=${TMPDIR:-/tmp}/diffit_ncu
    rm -rf "$nd" && mkdir -p "$nd"
    TRITON_PRINT_AUTOTUNING=1 timeout -k 5 "$left" ncu --profile-from-start off \
        --clock-control none --nvtx --kernel-name regex:'^_(tmsa|adaln|time_qkv)' \
        --section SpeedOfLight --section LaunchStats --section Occupancy \
        --section WarpStateStats --section SchedulerStats --section MemoryWorkloadAnalysis \
        --section ComputeWorkloadAnalysis --section SourceCounters \
        -f -o "$nd/ncu" "$PY" -m benchmarks.ncu_kernels "${ncu_cases[@]}" 2>&1 | tee "$LOGS/ncu.log"
    ncu_rc=$?
    if [ -f "$nd/ncu.ncu-rep" ]; then
        for page in details raw; do
            timeout -k 2 12 ncu -i "$nd/ncu.ncu-rep" --page "$page" --csv > "$nd/ncu_$page.csv" \
                2>> "$LOGS/ncu.log" || echo "ncu: the $page page: not exported" | tee -a "$LOGS/ncu.log"
        done
        timeout -k 2 12 ncu -i "$nd/ncu.ncu-rep" --page source --csv --print-source sass \
            > "$nd/ncu_sass.csv" 2>> "$LOGS/ncu.log" \
            || echo "ncu: the SASS page: not exported (in full)" | tee -a "$LOGS/ncu.log"
        tar -czf "$LOGS/ncu.tar.gz" -C "$nd" $(cd "$nd" && ls ncu_*.csv 2>/dev/null)
    fi
fi

echo "== done in ${SECONDS} s"
echo "stages: ${STAGES:-none} (skipped: not in STAGES, or no time left)"
echo "gpu tests: exit ${tests_rc} (0 passed, 1 failed, 5 none collected, 124/137 stopped at the limit)"
echo "diffit check: exit ${check_rc} (0 within the rule, 1 beyond it, 2 usage, 124/137 stopped)"
echo "benchmarks: exit ${bench_rc} (0 all ran, 1 errors, 2 time budget left cases out, 124/130/137 stopped)"
echo "profile: exit ${prof_rc} (the same codes)"
echo "explore: exit ${explore_rc} (the same codes)"
echo "ncu: exit ${ncu_rc} (0 profiled, 124/137 stopped at the limit; its CSVs in ncu.tar.gz)"
"$PY" - "$dir" <<'EOF' || true
import json, sys
try:
    m = json.load(open(sys.argv[1] + "/run.json"))
except FileNotFoundError:
    sys.exit(f"{sys.argv[1]}: no run.json (no benchmark stage ran)")
print(f"{sys.argv[1]}: {m.get('seconds')} s, finished={m.get('finished')}")
for e in m["benchmarks"]:
    print(f"  {e['name']:15} {e.get('seconds', '-'):>6} s  {e.get('rows', 0):>3} rows  {e['status']}")
EOF
echo "== the goals, as ratios measured in this run"
cat "$LOGS/goals.txt" 2>/dev/null || echo "no results folder: no ratios"
echo "files: $(cd "$LOGS" && ls | tr '\n' ' ')"
ok() { [ "$1" = 0 ] || [ "$1" = skipped ]; }
ok "$tests_rc" && ok "$bench_rc" && ok "$prof_rc"
