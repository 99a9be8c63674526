#!/usr/bin/env bash
# Set up what is missing, build proxyattn, and run its tests:
#
#   bash tools/test.sh [pytest options, e.g. -m gpu, -k sass, -x]
#
# Steps 1 and 2 of tools/quickstart.sh (build dependencies, then the package and its CUDA
# extension, each only when missing or stale), then the test dependencies pytest, hypothesis and
# transformers==5.24.0 (each only when it does not import), then python3 -m pytest -q tests "$@".
# Tests that need a GPU carry the `gpu` marker and skip without one; the rest run on the CPU.
set -euo pipefail

# shellcheck source=tools/quickstart.sh
source "$(dirname "${BASH_SOURCE[0]}")/quickstart.sh"

pa_setup_build_deps
pa_build
pa_pip_missing "pytest=pytest" "hypothesis=hypothesis" "transformers=transformers==5.24.0"
cd "$PA_ROOT"
exec "$PA_PYTHON" -m pytest -q tests "$@"
