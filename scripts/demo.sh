#!/usr/bin/env bash
# Runs the self-contained demo on a fresh machine: the embedded Workload API, the
# gateway with an example policy, upstreams on loopback and agents making allowed and
# denied requests. Pass --serve to keep the gateway running afterwards, --real-spire to
# take every identity from real spire-server/spire-agent (scripts/install-spire.sh).
set -euo pipefail
cd "$(dirname "$0")/.."
cargo run --quiet -p test-harness --bin demo -- "$@"
