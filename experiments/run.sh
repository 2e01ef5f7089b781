#!/usr/bin/env bash
# experiments/run.sh: the README's "Reproducing the paper's claims in miniature" (what `make experiments` runs).
#
#   bash experiments/run.sh [TINYSHAKESPEARE_PATH]
#
# Trains the same tiny model (train_tiny.cu) with each attention prior, 3 seeds each, same data, steps, seeds and
# budget, then evaluates every model at the training context T and at 2T, 4T and 8T (train_tiny --eval-contexts:
# same backend, the real kernel at the longer L, no window). In this order:
#   1. the embedded grammar corpus: GOAT (uniform init), GOAT (ALiBi init), ALiBi fixed, no prior, learned
#      absolute positions; seed 1 of GOAT (uniform) and of no prior also write the sink statistics;
#   2. the copy-mixture task, GOAT (uniform init), seed 1: the learned prior's tables for the prior picture;
#   3. tinyshakespeare, when its path is given (otherwise skipped with a notice: the project does not need it),
#      the same five priors x 3 seeds, sink statistics as in 1;
#   4. build/report: the Markdown table (mean and min-max over the seeds) and the SVG pictures.
# Every run's full log is kept; results.tsv holds every number the table is made of.
#
# Environment: OUT_DIR (default build/experiments), TRAIN_TINY (default build/train_tiny), REPORT (default
# build/report), EXP_DEADLINE_S (0 = none: after this many seconds no new run starts; the rest is reported as
# skipped and the table says which seeds are missing), EXP_TOY=1 (a toy size on the CPU, seconds in all: checks
# this script, not the claims). Without EXP_TOY the runs need a GPU (--device gpu).
set -euo pipefail
cd "$(dirname "$0")/.."

SHAKESPEARE="${1:-}"
OUT_DIR="${OUT_DIR:-build/experiments}"
TRAIN_TINY="${TRAIN_TINY:-build/train_tiny}"
REPORT="${REPORT:-build/report}"
DEADLINE="${EXP_DEADLINE_S:-0}"
SEEDS="1 2 3"
MULTS="1,2,4,8"

# The model and budget every prior gets: everything took 59 s on one H200 (measured; README).
if [ "${EXP_TOY:-0}" = 1 ]; then
    CONTEXT=16
    MODEL="--device cpu --layers 1 --heads 2 --head-dim 8 --context $CONTEXT --batch 4 --steps 20 --warmup 5"
    EVAL="--eval-contexts $MULTS --eval-seqs 4"
    COPY_CONTEXT=16
    echo "== EXP_TOY=1: toy size on the CPU (checks the pipeline; the numbers mean nothing)"
else
    CONTEXT=128
    MODEL="--device gpu --layers 3 --heads 4 --head-dim 32 --context $CONTEXT --batch 32 --steps 600 --warmup 50"
    EVAL="--eval-contexts $MULTS --eval-seqs 64"
    COPY_CONTEXT=64
fi
COMMON="$MODEL --val-every 0 --sample-len 0 --svg="

for f in "$TRAIN_TINY" "$REPORT"; do
    [ -x "$f" ] || { echo "run.sh: $f not found or not executable (run 'make experiments')" >&2; exit 1; }
done
if [ -n "$SHAKESPEARE" ] && [ ! -r "$SHAKESPEARE" ]; then
    echo "run.sh: cannot read '$SHAKESPEARE'" >&2
    exit 1
fi
mkdir -p "$OUT_DIR/logs"
RESULTS="$OUT_DIR/results.tsv"
: > "$RESULTS"

# The priors, as "label|flags".
PRIORS=("goat-uniform|--prior goat --prior-init uniform"
        "goat-alibi|--prior goat --prior-init alibi"
        "alibi|--prior alibi"
        "none|--prior none"
        "abs|--prior abs")

N_DATA=1
[ -n "$SHAKESPEARE" ] && N_DATA=2
TOTAL=$(( N_DATA * ${#PRIORS[@]} * 3 + 1 ))
START=$(date +%s)
COUNT=0
FAILED=0
SKIPPED=0

elapsed() { echo $(( $(date +%s) - START )); }

# run NAME DATA_LABEL PRIOR_LABEL SEED FLAGS...: one train_tiny run; its eval lines go to results.tsv
run() {
    local name="$1" data="$2" label="$3" seed="$4"
    shift 4
    COUNT=$(( COUNT + 1 ))
    if [ "$DEADLINE" -gt 0 ] && [ "$(elapsed)" -ge "$DEADLINE" ]; then
        echo "[$COUNT/$TOTAL] $name: SKIPPED (EXP_DEADLINE_S=$DEADLINE reached at $(elapsed) s)"
        SKIPPED=$(( SKIPPED + 1 ))
        return 0
    fi
    local log="$OUT_DIR/logs/$name.log" t0
    t0=$(date +%s)
    # shellcheck disable=SC2086  # COMMON and the flags are word lists on purpose
    if "$TRAIN_TINY" $COMMON --seed "$seed" "$@" > "$log" 2>&1; then
        awk -v d="$data" -v p="$label" -v s="$seed" '/^eval ctx=/ {
                for (k = 2; k <= NF; ++k) { split($k, kv, "="); v[kv[1]] = kv[2] }
                printf "%s\t%s\t%s\t%s\t%s\t%s\n", d, p, s, v["mult"], v["ctx"], v["loss"] }' "$log" >> "$RESULTS"
        local final
        final=$(grep '^final:' "$log" | sed 's/^final: //; s/ (last batch)//; s/, [0-9:]* total$//')
        echo "[$COUNT/$TOTAL] $name: $final | $(( $(date +%s) - t0 )) s, $(elapsed) s elapsed"
    else
        echo "[$COUNT/$TOTAL] $name: FAILED (exit $?); the end of $log:"
        tail -5 "$log" | sed 's/^/    /'
        FAILED=$(( FAILED + 1 ))
    fi
}

# one_dataset LABEL [--data PATH]: every prior x every seed; seed 1 of goat-uniform and none write sink stats
one_dataset() {
    local data="$1"
    shift
    for entry in "${PRIORS[@]}"; do
        local label="${entry%%|*}" flags="${entry#*|}"
        for seed in $SEEDS; do
            local extra=()
            if [ "$seed" = 1 ] && { [ "$label" = goat-uniform ] || [ "$label" = none ]; }; then
                extra=(--sink-stats "$OUT_DIR/sink_${data}_${label}.csv")
            fi
            # shellcheck disable=SC2086
            run "${data}_${label}_s${seed}" "$data" "$label" "$seed" $flags $EVAL "$@" "${extra[@]}"
        done
    done
}

echo "== experiments: ${TOTAL} runs (5 priors x 3 seeds x ${N_DATA} data set(s), + the copy task); outputs in $OUT_DIR"
echo "== every run: train_tiny $COMMON --seed S <prior> $EVAL"
one_dataset embedded
run "copy_goat-uniform_s1" copy goat-uniform 1 --prior goat --prior-init uniform --task copy --context "$COPY_CONTEXT" \
    --prior-csv "$OUT_DIR/prior_copy.csv"
if [ -n "$SHAKESPEARE" ]; then
    one_dataset shakespeare --data "$SHAKESPEARE"
else
    echo "== tinyshakespeare: skipped (no path given; make experiments SHAKESPEARE=/path/to/tinyshakespeare.txt adds it)"
fi

# ---- the report: table, pictures, the numbers the README quotes
echo "== report ($(elapsed) s elapsed)"
SUMMARY="$OUT_DIR/summary.txt"
{
    echo "# experiments/run.sh results ($(date -u '+%Y-%m-%d %H:%M UTC'))"
    echo
    echo "GPU: $(nvidia-smi --query-gpu=name,driver_version --format=csv,noheader 2>/dev/null || echo none)"
    echo "Every run: train_tiny $COMMON --seed S <prior> $EVAL (copy task: --task copy --context $COPY_CONTEXT)"
    echo
    if [ -s "$RESULTS" ]; then
        echo "Validation loss (nats per character) at context L; mean over seeds (min-max):"
        echo
        "$REPORT" table "$RESULTS"
    else
        echo "(no results)"
    fi
} > "$OUT_DIR/results.md"
cat "$OUT_DIR/results.md"
{
    for data in embedded shakespeare; do
        g="$OUT_DIR/sink_${data}_goat-uniform.csv" n="$OUT_DIR/sink_${data}_none.csv"
        if [ -s "$g" ] && [ -s "$n" ]; then
            echo "-- sink statistics, $data (seed 1, all layers and heads, 4 validation sequences)"
            "$REPORT" sink "$g" "$n" "$OUT_DIR/sink_${data}.svg" \
                "Attention mass on token 0 against content range, $data data, T = $CONTEXT (seed 1)"
        fi
    done
    if [ -s "$OUT_DIR/prior_copy.csv" ]; then
        echo "-- learned prior on the copy task (GOAT, uniform init): u(0) - mean u(1..) per layer and head"
        grep -E '^  L[0-9]+ h[0-9]+ kappa|u\(0\)-mean' "$OUT_DIR/logs/copy_goat-uniform_s1.log" || true
        layers=$(awk -F, 'NR > 1 && $1 + 1 > n { n = $1 + 1 } END { print n }' "$OUT_DIR/prior_copy.csv")
        for l in $(seq 0 $(( layers - 1 ))); do
            "$REPORT" prior "$OUT_DIR/prior_copy.csv" "$OUT_DIR/prior_copy_L$l.svg" "$l" \
                "Learned GOAT prior on the copy-mixture task (uniform init, T = $COPY_CONTEXT, seed 1), layer $l"
        done
    fi
    echo "-- per-run training: final lines"
    for log in "$OUT_DIR"/logs/*.log; do
        echo "$(basename "$log" .log): $(grep '^final:' "$log" || echo 'no final line')"
    done
} > "$SUMMARY" 2>&1
cat "$SUMMARY"
echo "== done in $(elapsed) s: $COUNT runs, $FAILED failed, $SKIPPED skipped; table $OUT_DIR/results.md, details $SUMMARY"
[ "$FAILED" -eq 0 ]
