#!/usr/bin/env bash
# experiments/sinks.sh: does standard attention form an attention sink at a size this project can train, and if
# it does, does GOAT's key term u take that job over (GOAT.md section 6; docs/EXPERIMENTS.md)?
#
#   bash experiments/sinks.sh [DATA_FILE]        (default: the embedded corpus)
#
# For each setting below, largest first: one model without a prior and one GOAT model (default init), seed 1,
# both with --sink-stats, then build/report sink on the pair: per layer the mean mass on token 0 against what
# uniform attention would give, and the share of heads whose mean mass on token 0 exceeds 0.3 (Gu et al.'s sink
# metric). It goes on to the next (smaller) setting only while the no-prior model still forms a sink, so the last
# setting that does is the smallest found; a setting without one ends the search.
#
# Environment: TRAIN_TINY (default build/train_tiny), REPORT (default build/report), OUT_DIR (default
# build/sinks), SETTINGS (lines "name|train_tiny flags", largest first; default below), EXP_TOY=1 (a toy size on
# the CPU: checks this script only).
set -euo pipefail
DATA="${1:-}"
. "$(dirname "$0")/common.sh"
DATA_FLAG=$(data_flag sinks.sh "$DATA")
cd "$(dirname "$0")/.."
TRAIN_TINY="${TRAIN_TINY:-build/train_tiny}"
REPORT="${REPORT:-build/report}"
OUT_DIR="${OUT_DIR:-build/sinks}"
if [ "${EXP_TOY:-0}" = 1 ]; then
    DEFAULT_SETTINGS="toy-2|--device cpu --layers 2 --heads 2 --head-dim 8 --context 16 --batch 4 --steps 20
toy-1|--device cpu --layers 1 --heads 2 --head-dim 8 --context 16 --batch 4 --steps 20"
else
    DEFAULT_SETTINGS="deep|--device gpu --precision bf16 --layers 12 --heads 8 --head-dim 64 --context 1024 --batch 16 --steps 3000 --warmup 200 --lr 6e-4
grid|--device gpu --precision bf16 --layers 6 --heads 6 --head-dim 64 --context 512 --batch 32 --steps 1200 --warmup 100 --lr 1e-3"
fi
SETTINGS="${SETTINGS:-$DEFAULT_SETTINGS}"
for f in "$TRAIN_TINY" "$REPORT"; do
    [ -x "$f" ] || { echo "sinks.sh: $f not found or not executable (make $f)" >&2; exit 2; }
done
mkdir -p "$OUT_DIR"

START=$(date +%s)
FOUND=""
while IFS='|' read -r name flags; do
    [ -n "$name" ] || continue
    echo "== $name: $flags"
    for prior in none goat; do
        log="$OUT_DIR/${name}_$prior.log"
        # shellcheck disable=SC2086  # the flags are a word list on purpose
        if ! "$TRAIN_TINY" $flags --prior "$prior" --seed 1 --val-every 0 --sample-len 0 $DATA_FLAG \
                --sink-stats "$OUT_DIR/${name}_$prior.csv" > "$log" 2>&1; then
            echo "$name, $prior: FAILED; the end of $log:"
            tail -5 "$log" | sed 's/^/    /'
            exit 1
        fi
        echo "$name, $prior: $(grep '^final:' "$log" | sed 's/^final: //; s/, [0-9:]* total$//')"
    done
    "$REPORT" sink "$OUT_DIR/${name}_goat.csv" "$OUT_DIR/${name}_none.csv" "$OUT_DIR/sink_$name.svg" \
        "Attention mass on token 0 against content range, setting $name: GOAT (left), no prior (right)" \
        | tee "$OUT_DIR/${name}_report.txt" | grep -E "exceeds|layer [0-9]+:"
    if grep -q "^sink none  heads whose mean mass on token 0 exceeds 0.3: 0 of" "$OUT_DIR/${name}_report.txt"; then
        echo "== $name: no sink in standard attention; the search ends here ($(( $(date +%s) - START )) s)"
        break
    fi
    FOUND="$name"
done <<< "$SETTINGS"
if [ -n "$FOUND" ]; then
    echo "== the smallest setting tried in which standard attention formed a sink: $FOUND"
else
    echo "== standard attention formed no sink in any setting tried (largest first, above)"
fi
