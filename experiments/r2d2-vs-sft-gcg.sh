#!/usr/bin/env bash
# R2D2 vs SFT under fixed-source GCG (the study of docs/protocol.md §1, item 1), sized for 2 CPU cores (~1 hour).
#
#   experiments/r2d2-vs-sft-gcg.sh [OUT_DIR]      (default: r2d2-vs-sft-gcg)
#
# 1. Fixed-source GCG test cases, made once against the base model (12 standard HarmBench-val
#    behaviours, 25 steps of width 64, stopping early once greedy decoding gives the target).
# 2. SFT and R2D2 (CPU preset) from the same base, same data, same seed, anchors at steps 8, 16, 24
#    (LoRA r=16 on every block, lr 2e-4, batch 8; all 260 harmful-train prompts, 128 harmless + 128
#    hard negatives; plain SFT, no decision stream, as measured in the README).
# 3. `trajectory` replays the GCG test cases at every anchor (the `asr_fixed` column) next to the
#    plain refusal suites and the geometry.
# Every step resumes when re-run. Needs `safegeo` on PATH (or SAFEGEO=path/to/safegeo) and the
# datasets (SAFEGEO_DATA or --data-dir's default, ../shared/data).
set -euo pipefail
OUT=${1:-r2d2-vs-sft-gcg}
S=${SAFEGEO:-safegeo}
STEPS=${STEPS:-24}
SAVE_AT=${SAVE_AT:-8,16,24}

"$S" attack gcg --behaviors harmbench-val --category standard --limit 12 \
    --steps 25 --search-width 64 --early-stop --out "$OUT/attack-gcg"

for recipe in sft r2d2; do
    "$S" train --recipe "$recipe" --steps "$STEPS" --save-at "$SAVE_AT" \
        --n-harmless 128 --n-hard-negatives 128 --batch-size 8 \
        --decision-weight 0 --lora-layers all \
        --out "$OUT/runs/$recipe"
done

"$S" trajectory --anchors "$OUT"/runs/*/ckpt-* --base smollm2-135m-instruct \
    --test-cases "$OUT/attack-gcg/test_cases.jsonl" --limit 30 --max-new-tokens 48 \
    --n-carrier 32 --n-val 8 --screen 2 --finalists 2 --out "$OUT/report"
echo "table: $OUT/report/trajectory.md  report: $OUT/report/index.html"
