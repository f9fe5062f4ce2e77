#!/usr/bin/env bash
# One-shot GPU benchmark: funclora vs PEFT on CUDA, full mode, in well under 8 minutes.
#
# Run with python3 that has torch, peft, transformers, timm and optree (nothing is installed here):
#     bash benchmarks/gpu.sh          (funclora is imported from this checkout)
# Results go to "$OUT/" when OUT is set, else to benchmarks/results/:
#     gpu.json, gpu.txt              benchmarks/run.py --device cuda (rows + the printed table)
#     multi_adapter_gpu.json, .txt   benchmarks/multi_adapter.py --device cuda --dtype bfloat16
# Time caps: run.py 270 s (it stops starting compile rows after 140 s and new workloads after
# 235 s, and writes its JSON after every row), multi_adapter.py 150 s. Every step runs even if
# an earlier one failed.
set -u
export PYTHONUNBUFFERED=1
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"   # funclora from this checkout
OUTDIR="${OUT:-benchmarks/results}"
mkdir -p "$OUTDIR"
PY=python3
start=$(date +%s)
say() { echo "=== [gpu.sh $(( $(date +%s) - start )) s] $*"; }

say "machine"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>&1 | head -2
$PY -c 'import torch, sys; print("python", sys.version.split()[0], "torch", torch.__version__, "cuda", torch.version.cuda, torch.cuda.is_available())' 2>&1
$PY -c 'import funclora, optree, peft, transformers; print("funclora", funclora.__file__, "| optree", optree.__version__, "| peft", peft.__version__, "| transformers", transformers.__version__)' 2>&1

say "benchmarks/run.py --device cuda (cap 270 s)"
timeout -k 10 270 $PY benchmarks/run.py --device cuda --budget-s 235 --compile-until-s 140 --warm-compile-cache \
    --json "$OUTDIR/gpu.json" 2>&1 | tee "$OUTDIR/gpu.txt"
rc=${PIPESTATUS[0]}
[ "$rc" = 0 ] || say "run.py exited with $rc (124 = time cap; the rows measured so far are in gpu.json and above)"

if [ -f benchmarks/multi_adapter.py ] && $PY benchmarks/multi_adapter.py --help 2>/dev/null | grep -q -- "--dtype"; then
    say "benchmarks/multi_adapter.py --device cuda --dtype bfloat16 (cap 150 s)"
    timeout -k 10 150 $PY benchmarks/multi_adapter.py --device cuda --dtype bfloat16 \
        --json "$OUTDIR/multi_adapter_gpu.json" 2>&1 | tee "$OUTDIR/multi_adapter_gpu.txt"
    rc=${PIPESTATUS[0]}
    [ "$rc" = 0 ] || say "multi_adapter.py exited with $rc (124 = time cap)"
else
    say "benchmarks/multi_adapter.py missing or without --device/--dtype: skipped"
fi
say "done; files in $OUTDIR:"
ls -la "$OUTDIR"
