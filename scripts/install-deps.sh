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
# The deployment tests render deploy/kubernetes with the real kustomize, lint and
# render deploy/helm with the real helm, and unit-test the alerting rules with promtool.
scripts/install-kustomize.sh
scripts/install-helm.sh
scripts/install-promtool.sh

# Interop tests drive stock Python HTTP clients (requests, httpx) and the official LLM
# SDKs (openai, anthropic) through the sidecar, decode OTLP/HTTP exports with the
# official OpenTelemetry protobuf messages (opentelemetry-proto), and parse /metrics with
# the official Prometheus client's parsers (prometheus-client). They live in their own
# venv outside the repository; tests find it at this path.
interop_venv="${EGRESS_INTEROP_VENV:-$HOME/.cache/egress-gateway/venv-interop}"
# The official MCP SDK (server and client) is pinned to its 2.x API (MCPServer, Client).
py_pkgs=(requests httpx openai anthropic opentelemetry-proto prometheus-client 'mcp>=2.3,<3')
if ! "$interop_venv/bin/python" -c 'import requests, httpx, openai, anthropic, opentelemetry.proto, prometheus_client
from mcp.server.mcpserver import MCPServer
from mcp import Client' >/dev/null 2>&1; then
  echo "installing the Python interop packages (${py_pkgs[*]}) into $interop_venv"
  [ -x "$interop_venv/bin/python" ] || python3 -m venv "$interop_venv"
  "$interop_venv/bin/pip" install -q --disable-pip-version-check "${py_pkgs[@]}"
fi

# The Node interop client: the official `openai` package, and `undici` for the preload
# (test-harness/interop/node-proxy-preload.cjs) that makes Node's global fetch honour
# HTTPS_PROXY. openai 7 needs Node 22 and undici 8 Node 22.19, so on Node 20 the newest
# majors that support it are pinned.
node_interop="${EGRESS_NODE_INTEROP:-$HOME/.cache/egress-gateway/node-interop}"
if command -v node >/dev/null 2>&1 && command -v npm >/dev/null 2>&1; then
  node_major="$(node -p 'process.versions.node.split(".")[0]')"
  if [ "$node_major" -ge 22 ]; then
    node_pkgs=(openai undici)
  else
    node_pkgs=(openai@^6 undici@^7)
  fi
  if ! (cd "$node_interop" 2>/dev/null \
        && node -e 'require.resolve("openai"); require.resolve("undici")' >/dev/null 2>&1); then
    echo "installing the Node interop packages (${node_pkgs[*]}) into $node_interop"
    mkdir -p "$node_interop"
    npm install --prefix "$node_interop" --no-audit --no-fund --loglevel=error "${node_pkgs[@]}"
  fi
else
  echo "warning: node/npm not found; the Node SDK interop test will fail" >&2
fi

# The Go interop client is built by the test itself (standard library only).
command -v go >/dev/null 2>&1 || echo "warning: go not found; the Go interop test will fail" >&2
