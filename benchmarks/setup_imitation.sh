#!/usr/bin/env bash
# Create benchmarks/.venv-imitation: the `imitation` library (PreferenceComparisons) with the older
# gymnasium / stable-baselines3 it pins, beside the pinned CPU torch.  Kept apart from Kilter's
# environment because imitation 1.0 needs gymnasium 0.29 and stable-baselines3 2.2.
#   bash benchmarks/setup_imitation.sh
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
root="$(dirname "$here")"
venv="$here/.venv-imitation"
PY="${PY:-python3}"
if [ ! -x "$venv/bin/python" ]; then
  "$PY" -m venv "$venv"
fi
"$venv/bin/pip" install -q -c "$root/constraints.txt" torch==2.13.0
# gymnasium 0.29 still uses np.bool8, which numpy 2 removed
"$venv/bin/pip" install -q -c "$root/constraints.txt" "numpy<2" "imitation==1.0.1" "pygame"
"$venv/bin/python" -c "import imitation, gymnasium, stable_baselines3, torch; print('benchmarks/.venv-imitation ready:', imitation.__version__, gymnasium.__version__, stable_baselines3.__version__, torch.__version__)"
