# Sourced by tools/dist_*.sh and tools/slurm_*.sh: checks of their counts.

# require_count NAME VALUE: exit 2 unless VALUE is a whole number >= 1.
require_count() {
    if ! [[ $2 =~ ^[0-9]+$ ]] || (( 10#$2 < 1 )); then
        echo "$(basename "$0"): $1 must be a whole number of at least 1, got '$2'" >&2
        exit 2
    fi
}
