#!/usr/bin/env bash
# Every Kilter-vs-TRL comparison, one after another, then the tables for RESULTS.md.
# Run it on an otherwise idle machine: each script alternates Kilter and TRL runs and
# reports medians, but a busy machine still widens the spread.
#   bash benchmarks/run_all.sh            full measurement
#   bash benchmarks/run_all.sh --quick    correctness check: tiny step counts, one pair each
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
py="$here/.venv-trl/bin/python"
[ -x "$py" ] || bash "$here/setup.sh"
# tiny model: 3 Kilter/TRL pairs per setting; SmolLM2-135M + LoRA: 2 pairs (a run takes minutes)
for bench in sft rm dpo; do
  "$py" "$here/bench_$bench.py" --models tiny --settings same,best-fp32,best-bf16 "$@"
done
"$py" "$here/bench_rl.py" --models tiny --settings same "$@"
for bench in sft rm dpo; do
  "$py" "$here/bench_$bench.py" --models smollm2-lora --settings same,best-bf16 --pairs 2 "$@"
done
"$py" "$here/bench_rl.py" --models smollm2-lora --settings same --pairs 2 "$@"
# issue 20: a GPT-2 (learned positions, LayerNorm, Conv1D) and the real-length case (SmolLM2-135M + LoRA
# on 200-400-token dialogues)
for bench in sft rm dpo; do
  "$py" "$here/bench_$bench.py" --models gpt2-small --settings same,best-fp32 "$@"
done
"$py" "$here/bench_rl.py" --models gpt2-small --settings same "$@"
for bench in sft rm dpo; do
  "$py" "$here/bench_$bench.py" --models smollm2-dialogue --settings same,best-bf16 --pairs 2 "$@"
done
if [[ " $* " != *" --quick "* ]]; then
  "$py" "$here/report.py" > "$here/out/tables.md"
  echo "tables for RESULTS.md: $here/out/tables.md"
fi
