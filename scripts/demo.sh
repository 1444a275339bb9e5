#!/usr/bin/env bash
# Runs the self-contained demo on a fresh machine: the embedded Workload API, the
# gateway with an example policy, upstreams on loopback and agents making allowed and
# denied requests. Pass --serve to keep the gateway running afterwards.
set -euo pipefail
cd "$(dirname "$0")/.."
cargo run --quiet -p test-harness --bin demo -- "$@"
