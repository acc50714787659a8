#!/usr/bin/env bash
# R2D2 vs SFT under fixed-source GCG (docs/protocol.md §1, item 1), sized for 2 CPU cores
# (about two hours).
#
#   experiments/r2d2-vs-sft-gcg.sh [OUT_DIR]      (default: r2d2-vs-sft-gcg)
#
# 1. Fixed-source GCG test cases, made once against the base model: BEHAVIOURS of the 41 standard
#    HarmBench-val behaviours (a seeded sample), 25 steps of width 64, stopping early once greedy
#    decoding gives the target.
# 2. The built-in `sft` and `r2d2` recipes from the same base, shortened alike (STEPS steps,
#    anchors at SAVE_AT): matched arms that differ only in R2D2's own losses. `trajectory` checks
#    this and says so in the table.
# 3. `trajectory` replays the GCG test cases at every anchor (the `asr_fixed` column, with its
#    interval) next to the refusal suites and the geometry.
# Every step resumes when re-run. Needs `safegeo` on PATH (or SAFEGEO=path/to/safegeo) and the
# datasets (SAFEGEO_DATA or --data-dir's default, ../shared/data).
set -euo pipefail
OUT=${1:-r2d2-vs-sft-gcg}
S=${SAFEGEO:-safegeo}
STEPS=${STEPS:-60}
SAVE_AT=${SAVE_AT:-20,40,60}
BEHAVIOURS=${BEHAVIOURS:-32}
LIMIT=${LIMIT:-50}

"$S" attack gcg --behaviors harmbench-val --category standard --limit "$BEHAVIOURS" \
    --steps 25 --search-width 64 --early-stop --out "$OUT/attack-gcg"

for recipe in sft r2d2; do
    "$S" train --recipe "$recipe" --steps "$STEPS" --save-at "$SAVE_AT" --out "$OUT/runs/$recipe"
done

"$S" trajectory --anchors "$OUT"/runs/*/ckpt-* --base smollm2-135m-instruct \
    --test-cases "$OUT/attack-gcg/test_cases.jsonl" --limit "$LIMIT" --max-new-tokens 48 \
    --n-carrier 32 --n-val 8 --screen 2 --finalists 2 --out "$OUT/report"
echo "table: $OUT/report/trajectory.md  report: $OUT/report/index.html"
