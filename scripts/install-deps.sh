#!/usr/bin/env bash
# Installs what the tests and the demo need beyond the Rust toolchain. Idempotent.
set -euo pipefail
cd "$(dirname "$0")/.."

need_apt=()
command -v curl >/dev/null 2>&1 || need_apt+=(curl)
command -v gcc >/dev/null 2>&1 || need_apt+=(gcc)
# Shared-limits tests start a real Redis on loopback.
command -v redis-server >/dev/null 2>&1 || need_apt+=(redis-server)
if [ "${#need_apt[@]}" -gt 0 ]; then
  echo "installing: ${need_apt[*]}"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need_apt[@]}"
fi

if [ -x scripts/install-spire.sh ]; then
  scripts/install-spire.sh
fi
# The deployment tests render deploy/kubernetes with the real kustomize.
scripts/install-kustomize.sh

# Interop tests drive stock Python HTTP clients (requests, httpx) through the sidecar.
# They live in their own venv outside the repository; tests find it at this path.
interop_venv="${EGRESS_INTEROP_VENV:-$HOME/.cache/egress-gateway/venv-interop}"
if ! "$interop_venv/bin/python" -c 'import requests, httpx' >/dev/null 2>&1; then
  echo "installing the Python interop clients (requests, httpx) into $interop_venv"
  python3 -m venv "$interop_venv"
  "$interop_venv/bin/pip" install -q --disable-pip-version-check requests httpx
fi

# The Go interop client is built by the test itself (standard library only).
command -v go >/dev/null 2>&1 || echo "warning: go not found; the Go interop test will fail" >&2
