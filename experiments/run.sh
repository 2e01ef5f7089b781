#!/usr/bin/env bash
# experiments/run.sh: the paper's claims at a scale where they can show (what `make experiments` runs; the
# results and what they mean are in docs/EXPERIMENTS.md).
#
#   bash experiments/run.sh            SHAKESPEARE=path and DEBIAN_TEXT=path in the environment add those data
#
# One model size for every run: 6 layers of 6 heads of 64 (C = 384, 10.6M parameters in the blocks), trained at
# T = 512 in bf16 (train_tiny --precision bf16: the fast kernels), the same data, steps and seeds for each prior,
# then evaluated at 1x, 2x, 4x, 8x and 16x T (--eval-contexts: the real kernel at the longer L, no window) with the
# weights of its lowest validation loss (--keep-best, validation every 100 steps): the texts are small next to
# the model, and some priors overfit long before the last step.
#   priors  goat          GOAT with the default init (ALiBi's slopes: the paper's and the official package's)
#           goat-uniform  GOAT from uniform init (standard attention at step 0)
#           goat-r0       GOAT without kappa (--pos-rank 0: the sink and the recency slope; the official GPT preset)
#           alibi         the fixed ALiBi bias
#           none          no positional information at all
#           abs           learned absolute position embeddings (they end at T: no longer contexts)
#   data    embedded      the embedded grammar corpus (always)
#           shakespeare   tinyshakespeare (SHAKESPEARE=path)
#           debian        the Debian Reference, English text (DEBIAN_TEXT=path; docs/EXPERIMENTS.md says how to
#                         get it and why this text)
#   seeds   1 2 3; seed 1 of goat, goat-uniform and none also writes the sink statistics (--sink-stats)
# Then the copy-mixture task (GOAT, default init, seed 1) for the learned-prior picture, and build/report: the
# Markdown table (mean and min-max over seeds), loss against context, the sink pictures, the prior picture.
#
# Resumable: each run writes NAME.log.part and renames it NAME.log only when train_tiny exits 0, every output
# written; a log starts with the run's name and exact command, and one with the same two lines counts as done and
# is not run again. So a run cut short by EXP_DEADLINE_S, a failure or a lost machine is redone by running the
# script again on the same OUT_DIR. results.tsv is rebuilt from the finished logs each time, and the summary names
# every run still missing. Data paths are relative to the repository root (or absolute), without spaces.
#
# Environment: OUT_DIR (default build/experiments), TRAIN_TINY (default build/train_tiny), REPORT (default
# build/report), EXP_DEADLINE_S (0 = none: no run starts after this many seconds), DATASETS (which of "embedded
# shakespeare debian" to run now, in that order; default all that are available), EXP_TOY=1 (a toy size on the CPU, seconds in
# all: checks this script, not the claims). Without EXP_TOY the runs need a GPU.
set -euo pipefail
cd "$(dirname "$0")/.."

SHAKESPEARE="${SHAKESPEARE:-}"
DEBIAN_TEXT="${DEBIAN_TEXT:-}"
OUT_DIR="${OUT_DIR:-build/experiments}"
TRAIN_TINY="${TRAIN_TINY:-build/train_tiny}"
REPORT="${REPORT:-build/report}"
DEADLINE="${EXP_DEADLINE_S:-0}"
case "$DEADLINE" in ''|*[!0-9]*) echo "run.sh: EXP_DEADLINE_S must be a whole number of seconds (got '$DEADLINE')" >&2; exit 1 ;; esac
SEEDS="1 2 3"
MULTS="1,2,4,8,16"

if [ "${EXP_TOY:-0}" = 1 ]; then
    CONTEXT=16
    MODEL="--device cpu --layers 1 --heads 2 --head-dim 8 --context $CONTEXT --batch 4 --steps 20 --warmup 5
           --val-every 5 --keep-best 1"
    EVAL="--eval-contexts $MULTS --eval-seqs 4"
    COPY="--context 16"
    echo "== EXP_TOY=1: toy size on the CPU (checks the pipeline; the numbers mean nothing)"
else
    CONTEXT=512
    MODEL="--device gpu --precision bf16 --layers 6 --heads 6 --head-dim 64 --context $CONTEXT --batch 32
           --steps 1200 --warmup 100 --lr 1e-3 --val-every 100 --keep-best 1"
    EVAL="--eval-contexts $MULTS --eval-seqs 64"
    COPY="--context 128 --steps 600"
fi
MODEL=$(echo $MODEL)   # one line
COMMON="$MODEL --sample-len 0"

for f in "$TRAIN_TINY" "$REPORT"; do
    [ -x "$f" ] || { echo "run.sh: $f not found or not executable (run 'make experiments')" >&2; exit 1; }
done
for f in "$SHAKESPEARE" "$DEBIAN_TEXT"; do
    if [ -n "$f" ] && [ ! -r "$f" ]; then echo "run.sh: cannot read '$f'" >&2; exit 1; fi
done
AVAILABLE="embedded"
[ -n "$SHAKESPEARE" ] && AVAILABLE="$AVAILABLE shakespeare"
[ -n "$DEBIAN_TEXT" ] && AVAILABLE="$AVAILABLE debian"
DATASETS="${DATASETS:-$AVAILABLE}"
for d in $DATASETS; do
    case " $AVAILABLE " in *" $d "*) ;; *) echo "run.sh: data set '$d' is not available (one of: $AVAILABLE;"\
        "SHAKESPEARE=path and DEBIAN_TEXT=path add the last two)" >&2; exit 1 ;; esac
done
data_flags() {
    case "$1" in
        embedded) echo "" ;;
        shakespeare) echo "--data $SHAKESPEARE" ;;
        debian) echo "--data $DEBIAN_TEXT" ;;
    esac
}
mkdir -p "$OUT_DIR/logs"

# The priors, as "label|flags".
PRIORS=("goat|--prior goat --prior-init alibi"
        "goat-uniform|--prior goat --prior-init uniform"
        "goat-r0|--prior goat --prior-init alibi --pos-rank 0"
        "alibi|--prior alibi"
        "none|--prior none"
        "abs|--prior abs")

# The plan: "name|data|prior|seed|flags" per run, in the order they run (the data sets of DATASETS first).
ORDER="$DATASETS"
for d in embedded shakespeare debian; do case " $ORDER " in *" $d "*) ;; *) ORDER="$ORDER $d" ;; esac; done
PLAN=()
for data in $ORDER; do
    for entry in "${PRIORS[@]}"; do
        label="${entry%%|*}" flags="${entry#*|}"
        for seed in $SEEDS; do
            extra=""
            if [ "$seed" = 1 ] && { [ "$label" = goat ] || [ "$label" = goat-uniform ] || [ "$label" = none ]; }; then
                extra=" --sink-stats $OUT_DIR/sink_${data}_${label}.csv"
            fi
            PLAN+=("${data}_${label}_s${seed}|$data|$label|$seed|--seed $seed $flags $EVAL $(data_flags $data)$extra")
        done
    done
done
PLAN+=("copy_goat_s1|copy|goat|1|--seed 1 --prior goat --prior-init alibi --task copy $COPY --prior-csv $OUT_DIR/prior_copy.csv")

START=$(date +%s)
elapsed() { echo $(( $(date +%s) - START )); }
log_of() { echo "$OUT_DIR/logs/$1.log"; }
header_of() { printf '# run %s\n# command %s %s\n' "$1" "$TRAIN_TINY" "$COMMON $2"; }
# finished NAME FLAGS: the run's log exists (renamed from .part after exit status 0) and was written by this very
# command
finished() {
    local log
    log=$(log_of "$1")
    [ -f "$log" ] && [ "$(head -2 "$log")" = "$(header_of "$1" "$2")" ]
}

RAN=0 FAILED=0 SKIPPED=0 EARLIER=0
echo "== experiments: data sets now: $DATASETS; outputs in $OUT_DIR"
echo "== every run: $TRAIN_TINY $COMMON <seed, prior, data> $EVAL"
for item in "${PLAN[@]}"; do
    IFS='|' read -r name data label seed flags <<< "$item"
    case " $DATASETS copy " in *" $data "*) ;; *) continue ;; esac
    if finished "$name" "$flags"; then EARLIER=$(( EARLIER + 1 )); continue; fi
    if [ "$DEADLINE" -gt 0 ] && [ "$(elapsed)" -ge "$DEADLINE" ]; then
        echo "$name: not started (EXP_DEADLINE_S=$DEADLINE reached at $(elapsed) s; run the script again to go on)"
        SKIPPED=$(( SKIPPED + 1 ))
        continue
    fi
    log=$(log_of "$name")
    t0=$(date +%s)
    header_of "$name" "$flags" > "$log.part"
    # shellcheck disable=SC2086  # COMMON and the flags are word lists on purpose
    if "$TRAIN_TINY" $COMMON $flags >> "$log.part" 2>&1; then
        mv "$log.part" "$log"
        RAN=$(( RAN + 1 ))
        final=$(grep '^final:' "$log" | sed 's/^final: //; s/ (last batch)//; s/, [0-9:]* total$//')
        best=$(grep -o 'weights of step [0-9]*, validation loss [0-9.]*' "$log" || true)
        echo "$name: $final${best:+; evaluated with the $best} | $(( $(date +%s) - t0 )) s, $(elapsed) s elapsed"
    else
        echo "$name: FAILED (exit $?); the end of $log.part:"
        tail -5 "$log.part" | sed 's/^/    /'
        FAILED=$(( FAILED + 1 ))
    fi
done

# ---- the report, from every finished log of the plan
RESULTS="$OUT_DIR/results.tsv"
: > "$RESULTS"
MISSING=()
for item in "${PLAN[@]}"; do
    IFS='|' read -r name data label seed flags <<< "$item"
    if ! finished "$name" "$flags"; then MISSING+=("$name"); continue; fi
    awk -v d="$data" -v p="$label" -v s="$seed" '/^eval ctx=/ {
            for (k = 2; k <= NF; ++k) { split($k, kv, "="); v[kv[1]] = kv[2] }
            printf "%s\t%s\t%s\t%s\t%s\t%s\n", d, p, s, v["mult"], v["ctx"], v["loss"] }' "$(log_of "$name")" >> "$RESULTS"
done
echo "== report ($(elapsed) s elapsed)"
{
    echo "# experiments/run.sh results ($(date -u '+%Y-%m-%d %H:%M UTC'))"
    echo
    echo "GPU: $(nvidia-smi --query-gpu=name,driver_version --format=csv,noheader 2>/dev/null || echo none)"
    echo "Every run: train_tiny $COMMON --seed S <prior> $EVAL [--data FILE]"
    echo
    if [ -s "$RESULTS" ]; then
        echo "Validation loss (nats per character) at context L; mean over seeds (min-max):"
        echo
        "$REPORT" table "$RESULTS"
    else
        echo "(no results yet)"
    fi
    echo
    if [ ${#MISSING[@]} -gt 0 ]; then
        echo "Missing (${#MISSING[@]} of ${#PLAN[@]} runs; run the script again with their data to finish): ${MISSING[*]}"
    else
        echo "All ${#PLAN[@]} runs finished."
    fi
} > "$OUT_DIR/results.md"
cat "$OUT_DIR/results.md"
SUMMARY="$OUT_DIR/summary.txt"
{
    if [ -s "$RESULTS" ]; then
        "$REPORT" contexts "$RESULTS" "$OUT_DIR/contexts.svg" \
            "Validation loss against context, $CONTEXT x m, mean over seeds: $(echo $MODEL | sed 's/--device [a-z]* //')"
    fi
    for data in embedded shakespeare debian; do
        for label in goat goat-uniform; do
            g="$OUT_DIR/sink_${data}_${label}.csv" n="$OUT_DIR/sink_${data}_none.csv"
            if [ -s "$g" ] && [ -s "$n" ]; then
                echo "-- sink statistics, $data, $label against none (seed 1, all layers and heads, 4 validation sequences)"
                "$REPORT" sink "$g" "$n" "$OUT_DIR/sink_${data}_${label}.svg" \
                    "Attention mass on token 0 against content range, $data data, T = $CONTEXT, seed 1: $label (left), none (right)"
            fi
        done
    done
    if [ -s "$OUT_DIR/prior_copy.csv" ]; then
        echo "-- learned prior on the copy task (GOAT, default init)"
        layers=$(awk -F, 'NR > 1 && $1 + 1 > n { n = $1 + 1 } END { print n }' "$OUT_DIR/prior_copy.csv")
        for l in $(seq 0 $(( layers - 1 ))); do
            "$REPORT" prior "$OUT_DIR/prior_copy.csv" "$OUT_DIR/prior_copy_L$l.svg" "$l" \
                "Learned GOAT prior on the copy-mixture task (default init, seed 1), layer $l"
        done
    fi
    echo "-- per-run training: final lines"
    for item in "${PLAN[@]}"; do
        IFS='|' read -r name _ <<< "$item"
        log=$(log_of "$name")
        [ -f "$log" ] && echo "$name: $(grep '^final:' "$log")$(grep -o '; --keep-best: .*' <(sed 's/^--keep-best/; --keep-best/' "$log") || true)"
    done
} > "$SUMMARY" 2>&1
cat "$SUMMARY"
echo "== done in $(elapsed) s: $RAN runs now, $EARLIER finished earlier, $FAILED failed, $SKIPPED not started;" \
     "${#MISSING[@]} of ${#PLAN[@]} missing; table $OUT_DIR/results.md, details $SUMMARY"
[ "$FAILED" -eq 0 ]
