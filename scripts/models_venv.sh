#!/usr/bin/env bash
# A separate virtual environment for the torchvision/timm zoo models (tv_*, timm_*).
#
# PyPI's torchvision does not load beside the main environment's torch==2.13.0+cpu
# ("operator torchvision::nms does not exist"), and once installed it breaks
# `import transformers` and `import timm` there too. So the vision models get their own venv
# with a torch/torchvision pair built together; the main venv is never touched.
#
#   bash scripts/models_venv.sh [VENV]     # default: .venv-vision (or $MPSEARCH_VISION_VENV)
#   MPSEARCH_VISION_PYTHON=.venv-vision/bin/python .venv/bin/python -m pytest tests/workloads/test_zoo_vision.py
#
# Idempotent: a second run only checks what is installed. About 6 GB (torch 2.14.1 is a CUDA
# build; it runs on the CPU).
set -euo pipefail
cd "$(dirname "$0")/.."

VENV="${1:-${MPSEARCH_VISION_VENV:-.venv-vision}}"
TORCH="${MPSEARCH_VISION_TORCH:-torch==2.14.1}"
TORCHVISION="${MPSEARCH_VISION_TORCHVISION:-torchvision==0.29.1}"

[ -x "$VENV/bin/python" ] || python3 -m venv "$VENV"
echo '*' >"$VENV/.gitignore" # git ignores the venv whatever the repo's .gitignore says
PY="$VENV/bin/python"

# mpsearch's runtime dependencies and the repo's pins, less torch (its own version here).
REQS="$VENV/mpsearch-requirements.txt"
PINS="$VENV/mpsearch-constraints.txt"
"$PY" - "$REQS" "$PINS" <<'EOF'
import re, sys, tomllib
name = lambda req: re.match(r"[A-Za-z0-9_.-]+", req).group().lower()
deps = tomllib.load(open("pyproject.toml", "rb"))["project"]["dependencies"]
open(sys.argv[1], "w").write("".join(f"{d}\n" for d in deps if name(d) != "torch"))
pins = [p.strip() for p in open("constraints.txt") if p.strip() and not p.startswith("#")]
open(sys.argv[2], "w").write("".join(f"{p}\n" for p in pins if name(p) != "torch"))
EOF

pip() { # quiet, less this machine's notes on absent local package folders
    "$PY" -m pip -q --disable-pip-version-check "$@" 2> >(grep -v "neither a file nor a directory" >&2)
}
pip install -c "$PINS" "$TORCH" "$TORCHVISION" timm transformers pytest -r "$REQS"
pip install --no-deps -e .

"$PY" - <<'EOF'
import sys
from importlib.metadata import version
import timm, torch, torchvision, transformers  # noqa: F401  (fails here if the pair is broken)
import mpsearch
from mpsearch.workloads._zoo import ZOO, zoo_available
vision = [n for n, e in ZOO.items() if e.needs in ("torchvision", "timm")]
print(f"python       {sys.executable}")
for pkg in ("torch", "torchvision", "timm", "transformers", "torchao", "mpsearch"):
    print(f"{pkg:<12} {version(pkg)}")
print(f"mpsearch from {mpsearch.__file__}")
print(f"zoo models   {', '.join(n for n in vision if zoo_available(n))}")
EOF
echo "size         $(du -sh "$VENV" | cut -f1) in $VENV"
echo "test with    MPSEARCH_VISION_PYTHON=$PY .venv/bin/python -m pytest tests/workloads/test_zoo_vision.py"
