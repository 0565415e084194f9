#!/usr/bin/env bash
# Issue #15's quality table on the main job's trained MoE (docs/quantization.md, "Results: the main
# job's MoE"): bf16 baseline, then int8 RTN, int4 RTN, int4 GPTQ, int4 GPTQ + router calibration
# and MXFP4, each with `moekit quantize`'s report (bpb, KL, same top token, routing agreement, file
# size, decode tok/s on the low-bit kernels), and one summary table.
#
#   benchmarks/quant_mainjob.sh CHECKPOINT DATA [OUT]
#
# CHECKPOINT: a `moekit compare` MoE checkpoint (runs/moe-vs-dense/seed0/moe/checkpoints/LATEST's
# target); DATA: the prepared corpus it trained on (data/en-prose-bpe8192); OUT (default
# runs/quant-mainjob). Two threads; about 10 minutes on a 2-core Zen 4.
set -euo pipefail
CK=$1
DATA=$2
OUT=${3:-runs/quant-mainjob}
mkdir -p "$OUT"
moekit convert "$CK" "$OUT/bf16" --dtype bfloat16 --overwrite
C=(--calib "$DATA" --calib-tokens 8192 --report-data "$DATA" --threads 2)
moekit quantize "$OUT/bf16" "$OUT/int8-rtn" --scheme int8 "${C[@]}"
moekit quantize "$OUT/bf16" "$OUT/int4-rtn" --scheme int4 "${C[@]}"
moekit quantize "$OUT/bf16" "$OUT/int4-gptq" --scheme int4 --method gptq "${C[@]}"
moekit quantize "$OUT/bf16" "$OUT/int4-gptq-rc" --scheme int4 --method gptq --router-calibration "${C[@]}"
moekit quantize "$OUT/bf16" "$OUT/mxfp4-rtn" --scheme mxfp4 "${C[@]}"
python -m moekit.quant.report "$OUT"/{int8-rtn,int4-rtn,int4-gptq,int4-gptq-rc,mxfp4-rtn}/quant_report.json \
  | tee "$OUT/summary.md"
