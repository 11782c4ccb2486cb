# Shared helpers for the paper's scripts (sourced, not run).
# Environment:
#   NEURON_MERGING_CHECKPOINTS  folder with the released checkpoints (default: ../shared/checkpoints
#                               next to the repository, else ./checkpoints)
#   NEURON_MERGING_DATA         data root (default: ../shared/data next to the repository, else the
#                               library's own search order)
#   NEURON_MERGING              the CLI to run (default: neuron-merging on PATH, else python -m)
set -euo pipefail
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
if [[ -z "${NEURON_MERGING_CHECKPOINTS:-}" ]]; then
  if [[ -d "$REPO/../shared/checkpoints" ]]; then
    NEURON_MERGING_CHECKPOINTS="$REPO/../shared/checkpoints"
  else
    NEURON_MERGING_CHECKPOINTS="$REPO/checkpoints"
  fi
fi
if [[ -z "${NEURON_MERGING_DATA:-}" && -d "$REPO/../shared/data" ]]; then
  export NEURON_MERGING_DATA="$REPO/../shared/data"
fi
if [[ -n "${NEURON_MERGING:-}" ]]; then
  read -r -a NM <<< "$NEURON_MERGING"
elif command -v neuron-merging > /dev/null 2>&1; then
  NM=(neuron-merging)
elif [[ -x "$REPO/.venv/bin/neuron-merging" ]]; then
  NM=("$REPO/.venv/bin/neuron-merging")
else
  NM=(python -m neuron_merging.cli)
fi

TYPE=original
CRITERION=l1-norm
RATIO=""

usage() {
  echo "usage: $(basename "$0") -t original|prune|merge -c l1-norm|l2-norm|l2-GM${1:+ -r RATIO}" >&2
  exit 2
}

parse_args() {  # parse_args WITH_RATIO "$@"
  local with_ratio=$1; shift
  while getopts "t:c:r:h" opt; do
    case $opt in
      t) TYPE=$OPTARG ;;
      c) CRITERION=$OPTARG ;;
      r) if [[ -n "$with_ratio" ]]; then RATIO=$OPTARG; else usage "$with_ratio"; fi ;;
      *) usage "$with_ratio" ;;
    esac
  done
  case $TYPE in original|prune|merge) ;; *) echo "unknown -t $TYPE" >&2; usage "$with_ratio" ;; esac
  if [[ -n "$with_ratio" && "$TYPE" != original && -z "$RATIO" ]]; then
    echo "-r RATIO is required with -t $TYPE" >&2; usage "$with_ratio"
  fi
}

run_compress() {  # run_compress ARCH DATASET CHECKPOINT_FILE
  local ckpt="$NEURON_MERGING_CHECKPOINTS/$3"
  local ratio_args=()
  [[ -n "$RATIO" ]] && ratio_args=(-r "$RATIO")
  "${NM[@]}" compress --quiet --arch "$1" --dataset "$2" --checkpoint "$ckpt" \
    -t "$TYPE" -c "$CRITERION" "${ratio_args[@]}" --preset paper
}
