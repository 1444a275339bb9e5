#!/usr/bin/env bash
# Installs what the tests and the demo need beyond the Rust toolchain. Idempotent.
set -euo pipefail
cd "$(dirname "$0")/.."

need_apt=()
command -v curl >/dev/null 2>&1 || need_apt+=(curl)
command -v gcc >/dev/null 2>&1 || need_apt+=(gcc)
if [ "${#need_apt[@]}" -gt 0 ]; then
  echo "installing: ${need_apt[*]}"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need_apt[@]}"
fi

if [ -x scripts/install-spire.sh ]; then
  scripts/install-spire.sh
fi
