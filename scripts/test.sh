#!/usr/bin/env bash
# Runs every test of the project on a fresh machine: installs what the tests need
# (real SPIRE, redis-server, kustomize, helm, promtool, curl, Python clients), then the whole
# Cargo test suite.
set -euo pipefail
cd "$(dirname "$0")/.."

scripts/install-deps.sh
# Installed just now, so a test that finds one missing fails instead of skipping.
export EGRESS_REQUIRE_DEPS=1

# Real-SPIRE tests find the binaries here (scripts/install-spire.sh puts them there).
export EGRESS_SPIRE_DIR="${EGRESS_SPIRE_DIR:-$HOME/.cache/egress-gateway/spire-$(cat spire-config/VERSION 2>/dev/null || echo 1.15.3)}"

# A one-shot build gains nothing from incremental artifacts, which only take disk.
export CARGO_INCREMENTAL="${CARGO_INCREMENTAL:-0}"

# Unit, integration and end-to-end tests (benchmarks are built by clippy, run apart).
cargo test --workspace --lib --bins --tests -- --test-threads="${TEST_THREADS:-4}"
