# experiments/common.sh: what the experiment scripts share (sourced by ablation.sh and sinks.sh, not run).

# data_flag SCRIPT FILE: train_tiny's --data flag for FILE with an absolute path (the scripts move to the
# repository root), or nothing for "" or "-" (the embedded corpus). A file that cannot be read is an error naming
# SCRIPT; use it as DATA_FLAG=$(data_flag ...) under set -e, which then ends the script.
data_flag() {
    local script="$1" file="$2"
    if [ -z "$file" ] || [ "$file" = "-" ]; then return 0; fi
    [ -r "$file" ] || { echo "$script: cannot read data file '$file'" >&2; return 2; }
    echo "--data=$(cd "$(dirname "$file")" && pwd)/$(basename "$file")"
}
