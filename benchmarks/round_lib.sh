# The set-up the GPU round scripts share (packed_round.sh, profile_round.sh); sourced, not run.
#   round_setup NAME DEFAULT_STAGES [OUT]
# makes OUT (relative to where the script was started), moves to the repository root, makes
# a work folder with run.log and a copy of auto's backend table, and arms `pack` (what is
# finished so far into OUT/NAME.tar.gz, with OUT/run.log and OUT/backend_table.json beside
# it) to run on exit. `step TEXT` packs and logs a step's heading; `want STAGE` says
# whether STAGES (default DEFAULT_STAGES) asks for it.
round_setup() {
  archive=$1.tar.gz
  stages=" ${STAGES:-$2} "
  out=${3:-${OUT:?give an output folder or set OUT}}
  mkdir -p "$out" && out=$(cd "$out" && pwd)
  cd "$(dirname "$0")/.."
  export PYTHONUNBUFFERED=1
  work=$(mktemp -d)
  log="$work/run.log"
  table="$work/backend_table.json"
  cp scca_eval/attention/backend_table.json "$table"
  trap pack EXIT
}
pack() {
  cp "$log" "$out/run.log"
  [ -f "$table" ] && cp "$table" "$out/backend_table.json"
  tar -czf "$out/$archive.tmp" -C "$work" . && mv "$out/$archive.tmp" "$out/$archive"
}
step() { [ -f "$log" ] && pack; echo "== $(date +%T) $*" | tee -a "$log"; }
want() { [[ $stages == *" $1 "* ]]; }
