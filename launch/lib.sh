# Helpers shared by the launch scripts (sourced, not run). Each script keeps its own usage().
# shellcheck shell=bash

die() { echo "$(basename "$0"): error: $*" >&2; exit 2; }

# DRY_RUN=1 prints the command (shell-quoted, so it can be pasted) instead of running it.
run() {
  if [[ "${DRY_RUN:-0}" == 1 ]]; then
    printf '%q' "$1"; shift; printf ' %q' "$@"; printf '\n'
  else
    exec "$@"
  fi
}

need() {
  local name
  for name in "$@"; do
    [[ -n "${!name:-}" ]] || die "$name is not set ($(basename "$0") -h lists the variables)"
  done
}

# need_int NAME VALUE: decimal, no leading zero (bash arithmetic reads 08 as bad octal).
need_int() {
  [[ "$2" =~ ^(0|[1-9][0-9]*)$ ]] || die "$1 must be a non-negative integer, got '$2'"
}

# count_gpus VAR: the GPUs nvidia-smi lists, for when the variable VAR was not given.
count_gpus() {
  command -v nvidia-smi >/dev/null 2>&1 || die "$1 is not set and nvidia-smi is not found"
  local n
  # grep -c prints 0 but fails when nothing matches: under pipefail that would end silently.
  n=$(nvidia-smi -L | grep -c '^GPU') || true
  [[ "${n:-0}" -gt 0 ]] || die "$1 is not set and nvidia-smi lists no GPU"
  echo "$n"
}

check_overrides() {
  local item
  for item in "$@"; do
    [[ "$item" == *=* ]] || die "override '$item' is not of the form key=value"
  done
}

# check_args "$@": -h prints the script's usage(); CONFIG must exist; overrides are key=value.
# The caller then takes CONFIG with `local config=$1; shift`.
check_args() {
  if [[ "${1:-}" == -h || "${1:-}" == --help ]]; then usage; exit 0; fi
  [[ $# -ge 1 ]] || { usage >&2; die "missing CONFIG (a YAML file under configs/)"; }
  [[ -f "$1" ]] || die "config file not found: $1"
  shift
  check_overrides "$@"
}
