#!/usr/bin/env bash
# Issue #13's measurements for one CPU tier, side by side in one run per benchmark:
#   bash benchmarks/tier_suite.sh avx2        # force the AVX2 tier (any x86-64 v3 CPU reproduces it)
#   bash benchmarks/tier_suite.sh auto        # the CPU's own best tier
# LLAMA_PYTHONPATH=DIR puts a llama-cpp-python build for the tier first on the path (an AVX2-only build:
#   CMAKE_ARGS="-DGGML_NATIVE=OFF -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_AVX512=OFF ..." \
#   pip install --no-deps --target DIR llama-cpp-python).
# Writes benchmarks/results/tier-TIER/{doctor.json, train_step.*, bench-tiny-mixtral/*, moe_layer.*}.
set -euo pipefail
TIER=${1:-auto}
ROUNDS=${ROUNDS:-2}
cd "$(dirname "$0")/.."
OUT=benchmarks/results/tier-$TIER
mkdir -p "$OUT"
export MOEKIT_CPU_ISA=$TIER PYTHONPATH=${LLAMA_PYTHONPATH:-}${LLAMA_PYTHONPATH:+:}${PYTHONPATH:-}
# Cap oneDNN, MKL and ATen at the tier in every process (moekit does it itself only when it is
# imported before torch; the benchmark scripts import torch first).
eval "$(python -c "from moekit._cpuenv import library_caps; print(' '.join(f'export {k}={v}' for k, v in library_caps('$TIER').items()))")"
python -m moekit doctor --json > "$OUT/doctor.json"
# 1. training step, precision auto (fp32 where bf16 is not native), small-moe B16 x S256
python benchmarks/train_step.py --rounds "$ROUNDS" --steps 2 --warmup 1 --out "$OUT/train_step"
# 2. the MoE layer against its lower bound and transformers' blocks (decode sizes)
python benchmarks/moe_layer.py --tokens 1 8 64 --dtypes bfloat16 --shapes mixtral --rounds "$ROUNDS" --min-time 0.5 \
    --no-profile --json "$OUT/moe_layer.json" --md "$OUT/moe_layer.md" --png "$OUT/moe_layer.png"
# 3. end to end: tiny-mixtral bf16 weights, decode at batch 1 and 8, prefill 512, vs transformers and llama.cpp
python -m moekit bench tiny-mixtral --engines moekit transformers llama.cpp --batch-sizes 1 8 --prompt-lens 512 \
    --new-tokens 32 --rounds "$ROUNDS" --dtype bfloat16 --precision auto --out "$OUT/bench-tiny-mixtral"
