#!/usr/bin/env bash
# The one prepared check for a lent GPU (H100/H200; issue 16). From the repository root:
#
#   OUT=/some/dir bash scripts/gpu_check.sh          # on the GPU machine: at most BUDGET (450) seconds
#   OUT=/tmp/dry bash scripts/gpu_check.sh --cpu     # dry run on a CPU: every invocation parsed and checked,
#                                                    # what can run on a CPU runs at tiny sizes
#
# The GPU image has python3 (3.12) with torch, transformers, peft, triton and accelerate, no network and no
# model files: lorakit runs from src/ (PYTHONPATH), models are random weights of real shapes written here
# (Llama-3.2-1B; Llama-2-7B's layers, 8 of its 32), and bitsandbytes (and pytest, if the image lacks it) is
# installed only from wheels carried in .whl/ (an ignored folder; without bitsandbytes the PEFT + bitsandbytes
# peer is left out, as the summary says).
#
# Everything lands in $OUT, in at most 6 files: summary.txt (one line a step: exit code, seconds), gpu_check.log
# (every step's output), pytest.log (the gpu tests), records.jsonl (every benchmark's JSON records, tagged
# with the step), nvidia-smi.txt, triton-tests.log. Each step has a time limit, and the whole run stops
# starting steps once BUDGET seconds are spent; a step it did not start is listed as "not run".
set -u
cd "$(dirname "$0")/.."
MODE=gpu
[ "${1:-}" = "--cpu" ] && MODE=cpu
OUT=${OUT:-gpu_check_out}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
PY=${PYTHON:-python3}
BUDGET=${BUDGET:-450}
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
export TOKENIZERS_PARALLELISM=false
LOG="$OUT/gpu_check.log"
SUMMARY="$OUT/summary.txt"
RECORDS="$OUT/records.jsonl"
WORK=$(mktemp -d /tmp/lorakit-gpu-check.XXXXXX)
trap 'rm -rf "$WORK"' EXIT
: > "$LOG"
: > "$RECORDS"
echo "gpu_check ($MODE) $(date -u '+%Y-%m-%d %H:%M UTC'), commit $(git rev-parse --short HEAD 2>/dev/null || echo '?')" \
    > "$SUMMARY"
START=$SECONDS

# step NAME LIMIT CMD...: run CMD for at most LIMIT seconds (less if the budget is nearly spent), its output
# into the log, one line into the summary
step() {
    local name=$1 limit=$2
    shift 2
    local left=$((BUDGET - (SECONDS - START) - 5))
    if [ "$MODE" = gpu ] && [ "$left" -lt 15 ]; then
        echo "$name: NOT RUN (budget of ${BUDGET}s spent)" | tee -a "$SUMMARY"
        return 0
    fi
    [ "$MODE" = gpu ] && [ "$limit" -gt "$left" ] && limit=$left
    local t=$SECONDS
    echo "=== $name (limit ${limit}s): $*" >> "$LOG"
    timeout -k 10 "$limit" "$@" >> "$LOG" 2>&1
    local rc=$?
    local verdict=ok
    [ "$rc" -ne 0 ] && verdict=FAILED
    [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ] && verdict="TIMED OUT"
    echo "$name: $verdict (exit $rc, $((SECONDS - t))s)" | tee -a "$SUMMARY"
}

# bench NAME LIMIT ARGS...: `lorakit bench ARGS --json`, its records appended to records.jsonl tagged with NAME;
# on the CPU the arguments are only parsed and the suite's settings checked
bench() {
    local name=$1 limit=$2
    shift 2
    if [ "$MODE" = cpu ]; then
        step "$name (arguments)" 60 "$PY" - "$@" <<'EOF'
import importlib, sys
from lorakit.cli import BENCH_SUITES, parser
args = parser().parse_args(["bench", *sys.argv[1:]])
module = importlib.import_module(BENCH_SUITES[args.scenarios[0]])
try:
    print(module.settings(args) if args.scenarios[0] == "gpu" else module.settings(args.set, args.quick))
except ValueError as e:  # valid up to the check that a CUDA device is here
    if "CUDA" not in str(e):
        raise
    print(f"arguments valid; on this machine: {e}")
EOF
        return 0
    fi
    step "$name" "$limit" "$PY" -m lorakit bench "$@" --json "$WORK/$name.jsonl"
    [ -f "$WORK/$name.jsonl" ] && "$PY" - "$name" "$WORK/$name.jsonl" >> "$RECORDS" <<'EOF'
import json, sys
for line in open(sys.argv[2]):
    print(json.dumps({"check": sys.argv[1], **json.loads(line)}))
EOF
}

# ---- environment ---------------------------------------------------------------------------------------
if [ "$MODE" = gpu ]; then
    nvidia-smi > "$OUT/nvidia-smi.txt" 2>&1 || echo "nvidia-smi failed" >> "$OUT/nvidia-smi.txt"
fi
if compgen -G ".whl/*.whl" > /dev/null; then  # carried wheels: bitsandbytes, and pytest's if the image lacks it
    if "$PY" -m pip install --no-index --no-deps --target /tmp/site .whl/*.whl >> "$LOG" 2>&1; then
        export PYTHONPATH="$PYTHONPATH:/tmp/site"
        echo "carried wheels installed: $(cd .whl && echo *.whl)" | tee -a "$SUMMARY"
    else
        echo "carried wheels did not install (see gpu_check.log)" | tee -a "$SUMMARY"
    fi
fi
if ! "$PY" -c "import bitsandbytes" > /dev/null 2>&1; then
    echo "bitsandbytes: not importable (no wheel carried in .whl/): the PEFT + bitsandbytes QLoRA peer and the bnb" \
        "kernel rows are left out" | tee -a "$SUMMARY"
fi
if ! "$PY" -c "import pytest" > /dev/null 2>&1; then
    echo "pytest: not importable: the gpu tests cannot run (carry pytest, pluggy, iniconfig, pygments wheels in .whl/)" \
        | tee -a "$SUMMARY"
fi
step environment 30 "$PY" -c "
import torch, transformers, lorakit
print('lorakit', lorakit.__file__, 'torch', torch.__version__, 'cuda', torch.version.cuda,
      'transformers', transformers.__version__)
print('devices', [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())])
for name in ('peft', 'triton', 'accelerate', 'bitsandbytes'):
    try:
        print(name, __import__(name).__version__)
    except Exception as e:
        print(name, 'missing:', type(e).__name__, e)
"

# ---- correctness: the gpu tests ------------------------------------------------------------------------
GPU_TESTS=(tests/test_gpu.py)
if "$PY" -c "import bitsandbytes" > /dev/null 2>&1; then  # test_optim8bit.py imports it (its reference)
    GPU_TESTS+=(tests/test_optim8bit.py)
else
    echo "tests/test_optim8bit.py (paged state on CUDA): NOT RUN: the file imports bitsandbytes" | tee -a "$SUMMARY"
fi
step "gpu tests" 170 "$PY" -m pytest -q -rs -p no:cacheprovider -m gpu "${GPU_TESTS[@]}" --junitxml="$WORK/junit.xml"
"$PY" - "$LOG" "$OUT/pytest.log" <<'EOF'
import sys
text = open(sys.argv[1]).read()
start = text.rfind("=== gpu tests")
open(sys.argv[2], "w").write(text[start:] if start >= 0 else "gpu tests did not run\n")
EOF

# ---- models of real shapes (random weights) ------------------------------------------------------------
SHAPES="$WORK/shapes"
if [ "$MODE" = gpu ]; then
    step "write 1B and 7B-shape models" 90 "$PY" -c "
from lorakit_bench.workload import write_shaped_model
write_shaped_model('1b', '$SHAPES/1b', device='cuda')
write_shaped_model('7b', '$SHAPES/7b-8', layers=8, device='cuda')
"
else
    step "write a 1B-shape model (1 layer, CPU)" 300 "$PY" -c "
from lorakit_bench.workload import write_shaped_model
write_shaped_model('1b', '$SHAPES/1b', layers=1)
"
fi

# ---- speed and memory beside the peers -----------------------------------------------------------------
bench "bench gpu kernels" 60 gpu --set train=0 --reps 5
bench "train 1B LoRA+QLoRA vs PEFT" 80 gpu --set kernels=0 --set model="$SHAPES/1b" --set batch=4 --set seq=512 \
    --reps 3
bench "train 7B-shape LoRA+QLoRA vs PEFT" 90 gpu --set kernels=0 --set model="$SHAPES/7b-8" --set batch=4 \
    --set seq=512 --reps 3
bench "bench multi on cuda" 75 multi --set device=cuda --set dtype=bfloat16 --set model="$SHAPES/1b" --reps 3
if "$PY" -c "import fastapi, uvicorn" > /dev/null 2>&1; then  # the HTTP server (the image may lack them)
    bench "bench serve on cuda" 50 serve --set device=cuda --set model="$SHAPES/1b" --set adapters=1,8 \
        --set clients=32 --set max_tokens=16 --reps 1
else
    echo "bench serve on cuda: NOT RUN: fastapi/uvicorn are not importable here (carry python3.12 wheels of fastapi," \
        "starlette, pydantic, pydantic_core, annotated_types, typing_inspection, uvicorn in .whl/); the engine on" \
        "CUDA is checked by tests/test_gpu.py without HTTP" | tee -a "$SUMMARY"
fi

# ---- lorakit train end to end on the device: peak memory of the optimizers -----------------------------
train() {  # train NAME ARGS...: `lorakit train` on the 1B shape, results.json appended to records.jsonl
    local name=$1
    shift
    local steps=3 length=512 device=cuda limit=45
    [ "$MODE" = cpu ] && steps=1 length=64 device=cpu limit=150
    step "$name" "$limit" "$PY" -m lorakit train base="$SHAPES/1b" dataset=stdlib max_steps=$steps batch_size=4 \
        max_length=$length eval=false lora.r=16 device=$device output_dir="$WORK/$name" "$@"
    [ -f "$WORK/$name/results.json" ] && "$PY" - "$name" "$WORK/$name/results.json" >> "$RECORDS" <<'EOF'
import json, sys
r = json.load(open(sys.argv[2]))
keep = ("device", "precision", "steps", "first_loss", "last_loss", "train_seconds", "peak_device_mb")
print(json.dumps({"check": sys.argv[1], **{k: r.get(k) for k in keep}, "optim": r["config"]["optim"],
                  "quant": r["config"]["quant"]}))
EOF
}
train "train LoRA adamw" optim=adamw
train "train LoRA paged_adamw8bit" optim=paged_adamw8bit
train "train QLoRA paged_adamw8bit" optim=paged_adamw8bit "quant={}"

# ---- the Triton kernels' own tests, natively on the GPU (last: they compile many kernels) --------------
if [ "$MODE" = gpu ]; then
    step "triton kernel tests" 120 "$PY" -m pytest -q -p no:cacheprovider tests/test_triton_kernels.py \
        -o log_cli=false
    "$PY" - "$LOG" "$OUT/triton-tests.log" <<'EOF'
import sys
text = open(sys.argv[1]).read()
start = text.rfind("=== triton kernel tests")
open(sys.argv[2], "w").write(text[start:] if start >= 0 else "triton kernel tests did not run\n")
EOF
fi
echo "done in $((SECONDS - START))s; records: $(wc -l < "$RECORDS") lines" | tee -a "$SUMMARY"
