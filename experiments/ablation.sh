#!/usr/bin/env bash
# experiments/ablation.sh: which part of the GOAT prior keeps a model trained from uniform init from extrapolating.
#
#   bash experiments/ablation.sh DATA_FILE [SEEDS]        (SEEDS default "1"; e.g. "1 2 3"; DATA_FILE "-": the
#                                                          embedded corpus)
#
# Trains one small model per variant below (train_tiny, the same data, size, steps and seed for each), evaluates
# every model at 1x, 2x, 4x, 8x and 16x its training context, and prints a Markdown table of validation losses
# (mean over the seeds, min-max when there are several). Each variant changes one thing against the first row:
#   uniform         GOAT from uniform init (standard attention at step 0), everything learned
#   alibi-init      GOAT from ALiBi init (the recency slope at ALiBi's slopes, small kappa)
#   u-alone         no kappa (--pos-rank 0): the sink mlp, bump and recency slope
#   kappa-alone     no u (--sink off): the relative kernel alone
#   feat-fourier    the sink mlp sees only its Fourier features (no t / T_train, no log1p(t) / log1p(T_train))
#   feat-held       all features, t held at T_train - 1 in the two ramps beyond the training window
#   feat-none       the sink mlp sees nothing (u = bump at t = 0 + recency slope)
#   slope-live      the recency slope starts at 0.01 instead of softplus(-40) (its gradient is then alive)
#   kappa-alibi     no u, from ALiBi init (kappa's own extrapolation when it starts small and random)
#   none-slope      the sink mlp sees nothing and the recency slope starts at 0.01 (live): the slope the only
#                   route to a recency bias in u
#   alibi-feat-none ALiBi init, the sink mlp sees nothing
#   none-slope-fast none-slope with the prior's learning rate x10 (the slope's gradient is damped by
#                   softplus' = 0.01 at 0.01)
#   uniform-fast    uniform with the prior's learning rate x10 (is the learning rate alone the fix?)
#   alibi-fast      alibi-init with the prior's learning rate x10
# Environment: TRAIN_TINY (default build/train_tiny), OUT_DIR (default build/ablation), JOBS (runs at a time,
# default 2), MODEL (the size and budget; default a CPU size of about 1.5 min per run on one core), VARIANTS (a
# subset of the names above).
set -euo pipefail
DATA="${1:?usage: bash experiments/ablation.sh DATA_FILE|- [SEEDS]}"
. "$(dirname "$0")/common.sh"
DATA_FLAG=$(data_flag ablation.sh "$DATA")
cd "$(dirname "$0")/.."
SEEDS="${2:-1}"
TRAIN_TINY="${TRAIN_TINY:-build/train_tiny}"
OUT_DIR="${OUT_DIR:-build/ablation}"
JOBS="${JOBS:-2}"
MODEL="${MODEL:---device cpu --layers 2 --heads 4 --head-dim 16 --context 64 --batch 16 --steps 800 --warmup 40}"
MULTS="1,2,4,8,16"
VARIANTS="${VARIANTS:-uniform alibi-init u-alone kappa-alone feat-fourier feat-held feat-none slope-live kappa-alibi
            none-slope alibi-feat-none none-slope-fast uniform-fast alibi-fast}"
mkdir -p "$OUT_DIR"
[ -x "$TRAIN_TINY" ] || { echo "ablation.sh: no train_tiny at '$TRAIN_TINY' (make build/train_tiny)" >&2; exit 2; }

flags_of() {
    case "$1" in
        uniform) echo "--prior-init uniform" ;;
        alibi-init) echo "--prior-init alibi" ;;
        u-alone) echo "--prior-init uniform --pos-rank 0" ;;
        kappa-alone) echo "--prior-init uniform --sink off" ;;
        feat-fourier) echo "--prior-init uniform --sink-features fourier" ;;
        feat-held) echo "--prior-init uniform --sink-features held" ;;
        feat-none) echo "--prior-init uniform --sink-features none" ;;
        slope-live) echo "--prior-init uniform --slope-init 0.01" ;;
        kappa-alibi) echo "--prior-init alibi --sink off" ;;
        none-slope) echo "--prior-init uniform --sink-features none --slope-init 0.01" ;;
        alibi-feat-none) echo "--prior-init alibi --sink-features none" ;;
        none-slope-fast) echo "--prior-init uniform --sink-features none --slope-init 0.01 --prior-lr-mult 10" ;;
        uniform-fast) echo "--prior-init uniform --prior-lr-mult 10" ;;
        alibi-fast) echo "--prior-init alibi --prior-lr-mult 10" ;;
        *) echo "unknown variant $1" >&2; exit 2 ;;
    esac
}

for v in $VARIANTS; do flags_of "$v" > /dev/null || exit 2; done   # every name known before anything runs

run_one() {   # variant seed
    local log="$OUT_DIR/$1-seed$2.log" line
    # shellcheck disable=SC2046,SC2086   (MODEL and the variant's flags are lists of words)
    local -a cmd=("$TRAIN_TINY" $MODEL ${DATA_FLAG:+"$DATA_FLAG"} --seed "$2" --val-every 0 --sample-len 0
                  $(flags_of "$1") --eval-contexts "$MULTS" --eval-seqs 32 --prior-csv "$OUT_DIR/$1-seed$2.prior.csv")
    line="# $(printf '%q ' "${cmd[@]}")"
    # done before with this very command: kept (the script resumes); otherwise run (again)
    if [ -f "$log" ] && [ "$(head -n 1 "$log")" = "$line" ] && grep -q "mult=16 " "$log"; then return 0; fi
    echo "$line" > "$log"
    "${cmd[@]}" >> "$log" 2>&1 || echo "run $1 seed $2 failed: see $log" >&2
}

start=$(date +%s)
for v in $VARIANTS; do
    for s in $SEEDS; do
        while [ "$(jobs -rp | wc -l)" -ge "$JOBS" ]; do sleep 1; done
        echo "== $v seed $s ($(( $(date +%s) - start )) s)"
        run_one "$v" "$s" &
    done
done
wait

echo
echo "| variant | 1x | 2x | 4x | 8x | 16x |"
echo "|---|---|---|---|---|---|"
for v in $VARIANTS; do
    row="| $v |"
    for m in 1 2 4 8 16; do
        # one value per seed: the loss, "nan"/"inf" for a diverged one, "-" for a missing one; a cell says n/N
        # when fewer than all seeds have a finite loss
        cell=$(for s in $SEEDS; do
                   x=$(sed -n "s/^eval ctx=[0-9]* mult=$m loss=\([^ ]*\).*/\1/p" "$OUT_DIR/$v-seed$s.log" 2>/dev/null)
                   echo "${x:--}"
               done |
               awk -v N="$(echo $SEEDS | wc -w)" '
                    $1 ~ /^[0-9.]+$/ { n++; x += $1; if (n == 1 || $1 < lo) lo = $1; if (n == 1 || $1 > hi) hi = $1 }
                    END { if (!n) { print "missing"; exit }
                          out = n == 1 ? sprintf("%.3f", x) : sprintf("%.3f (%.3f-%.3f)", x / n, lo, hi)
                          if (n < N) out = out sprintf(" [%d/%d seeds]", n, N)
                          print out }')
        row="$row $cell |"
    done
    echo "$row"
done
echo "(validation loss in nats per character; $(echo $SEEDS | wc -w) seed(s); $(( $(date +%s) - start )) s)"
