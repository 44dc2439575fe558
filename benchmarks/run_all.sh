#!/usr/bin/env bash
# Every Kilter-vs-TRL comparison, one after another, then the tables for RESULTS.md.
# Run it on an otherwise idle machine (each script alternates Kilter and TRL runs and
# reports medians, but a busy machine still widens the spread).
#   bash benchmarks/run_all.sh            full measurement (about 2 hours on 2 cores)
#   bash benchmarks/run_all.sh --quick    correctness check: tiny step counts, one pair
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
py="$here/.venv-trl/bin/python"
[ -x "$py" ] || bash "$here/setup.sh"
"$py" "$here/bench_sft.py" "$@"
"$py" "$here/bench_rm.py" "$@"
"$py" "$here/bench_dpo.py" "$@"
"$py" "$here/bench_rl.py" "$@"
if [[ " $* " != *" --quick "* ]]; then
  "$py" "$here/report.py" > "$here/out/tables.md"
  echo "tables for RESULTS.md: $here/out/tables.md"
fi
