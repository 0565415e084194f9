#!/usr/bin/env bash
# Build llama.cpp's llama-server from the sources the llama-cpp-python sdist ships (PyPI only, no
# git clone), for benchmarks/serve_vs_llama_server.py. Usage:
#   bash benchmarks/build_llama_server.sh [VERSION] [DIR]      # prints the binary's path
# Defaults: the installed llama-cpp-python's version (else 0.3.36), DIR=~/.cache/moekit/llama-server.
# A native build (GGML_NATIVE, as `pip install llama-cpp-python` does); add e.g.
# CMAKE_EXTRA="-DGGML_NATIVE=OFF -DGGML_AVX2=ON -DGGML_AVX512=OFF" for an AVX2-only build.
set -euo pipefail
VER="${1:-$(python -c 'import importlib.metadata as m; print(m.version("llama_cpp_python"))' 2>/dev/null || echo 0.3.36)}"
DIR="${2:-${XDG_CACHE_HOME:-$HOME/.cache}/moekit/llama-server}/$VER"
BIN="$DIR/build/bin/llama-server"
if [ -x "$BIN" ]; then echo "$BIN"; exit 0; fi
mkdir -p "$DIR"
python -m pip download -q --no-deps --no-binary :all: "llama-cpp-python==$VER" -d "$DIR/sdist" >&2
tar xzf "$DIR"/sdist/llama_cpp_python-*.tar.gz -C "$DIR" >&2
SRC="$(ls -d "$DIR"/llama_cpp_python-*/vendor/llama.cpp)"
cmake -S "$SRC" -B "$DIR/build" -DCMAKE_BUILD_TYPE=Release -DLLAMA_CURL=OFF -DLLAMA_BUILD_TESTS=OFF \
  -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_SERVER=ON -DBUILD_SHARED_LIBS=OFF ${CMAKE_EXTRA:-} >&2
cmake --build "$DIR/build" --target llama-server -j "$(nproc)" >&2
echo "$BIN"
