#!/usr/bin/env bash
# Build llama.cpp's reference tools for tests/test_gguf.py and the GGUF benchmark, once, into the cache:
#   $LLAMA_CPP_CACHE/download/   the llama-cpp-python sdist (its vendor/llama.cpp is llama.cpp at a released commit)
#   $LLAMA_CPP_CACHE/src/        the extracted sdist: vendor/llama.cpp/convert_hf_to_gguf.py, gguf-py, llama_cpp
#   $LLAMA_CPP_CACHE/build/bin/  llama-quantize, libllama.so, libggml*.so (cmake, CPU only)
#   $LLAMA_CPP_CACHE/qwen2-tokenizer/  Qwen2's BPE tokenizer, rebuilt from llama.cpp's ggml-vocab-qwen2.gguf
# A no-op when the cache is complete. The build (llama-quantize and libllama only) takes about 4 minutes on 2 cores.
# Usage: tools/llama_cpp.sh PYTHON
set -euo pipefail
PY=${1:?usage: tools/llama_cpp.sh PYTHON}
VERSION=0.3.36
CACHE=${LLAMA_CPP_CACHE:-${LORASTREAM_CACHE:-$HOME/.cache/lorastream}/llama.cpp}
if [[ -x $CACHE/build/bin/llama-quantize && -f $CACHE/src/vendor/llama.cpp/convert_hf_to_gguf.py
      && -f $CACHE/qwen2-tokenizer/tokenizer.json ]]; then
    exit 0
fi
mkdir -p "$CACHE/download"
if [[ ! -f $CACHE/download/llama_cpp_python-$VERSION.tar.gz ]]; then
    "$PY" -m pip download -q --no-binary :all: --no-deps "llama-cpp-python==$VERSION" -d "$CACHE/download"
fi
if [[ ! -f $CACHE/src/vendor/llama.cpp/convert_hf_to_gguf.py ]]; then
    rm -rf "$CACHE/src.partial" && mkdir -p "$CACHE/src.partial"
    tar -xzf "$CACHE/download/llama_cpp_python-$VERSION.tar.gz" -C "$CACHE/src.partial" --strip-components=1
    mv "$CACHE/src.partial" "$CACHE/src"
fi
if [[ ! -x $CACHE/build/bin/llama-quantize ]]; then
    cmake -S "$CACHE/src/vendor/llama.cpp" -B "$CACHE/build" -DCMAKE_BUILD_TYPE=Release -DBUILD_SHARED_LIBS=ON \
        -DLLAMA_CURL=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_SERVER=OFF >/dev/null
    cmake --build "$CACHE/build" --config Release -j "$(nproc)" --target llama-quantize llama >/dev/null
fi
if [[ ! -f $CACHE/qwen2-tokenizer/tokenizer.json ]]; then
    "$PY" "$(dirname "$0")/qwen2_tokenizer.py" "$CACHE/src/vendor/llama.cpp/models/ggml-vocab-qwen2.gguf" \
        "$CACHE/qwen2-tokenizer"
fi
