#!/usr/bin/env bash
# Builds promtool (Prometheus's rule checker and unit-test runner) from the Go module
# proxy, once, so the tests can run `promtool check rules` and `promtool test rules`
# on the shipped PrometheusRule. The version is pinned here only.
#
#   EGRESS_PROMTOOL_DIR  where the binary goes (default ~/.cache/egress-gateway/promtool-<version>)
#   FORCE=1              rebuild even when the binary is present
#
# The tests look for it in $EGRESS_PROMTOOL, then ~/.cache/egress-gateway/bin/promtool
# (a link this script makes), then on PATH.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/go-env.sh

# Prometheus 3.16.0 (its Go module is versioned v0.<major><minor>.<patch>).
version=0.316.0
module="github.com/prometheus/prometheus@v$version"
cache="$HOME/.cache/egress-gateway"
dir="${EGRESS_PROMTOOL_DIR:-$cache/promtool-$version}"

link() {
  mkdir -p "$cache/bin"
  ln -sfn "$dir/promtool" "$cache/bin/promtool"
}
if [[ -z "${FORCE:-}" && -x "$dir/promtool" ]]; then
  link
  echo "promtool v$version already installed: $dir/promtool"
  exit 0
fi

start=$(date +%s)
echo "install-promtool: building promtool (prometheus module v$version) into $dir"
mkdir -p "$dir"
tmp="$(mktemp -d)"
trap 'rm -rf "$tmp" "$dir/.promtool.$$"' EXIT
go_env "$tmp"

# As for kustomize: build inside the downloaded module, so its own go.mod and go.sum
# pin every dependency.
if ! src_ro="$(cd "$tmp" && go mod download -json "$module" | sed -n 's/^[[:space:]]*"Dir": "\(.*\)",$/\1/p')" \
  || [[ ! -f "$src_ro/go.mod" ]]; then
  echo "install-promtool: cannot download $module from the module proxy" >&2
  exit 1
fi
cp -r "$src_ro" "$tmp/src"
chmod -R u+w "$tmp/src"
# Only rule checks and rule unit tests are needed: `remove_all_sd` leaves out the
# service-discovery plugins (cloud SDKs, the Kubernetes client), half the build.
# Stripped (-s -w): a smaller binary and a faster link. The module zip carries a
# go.work naming folders it does not include, hence GOWORK=off.
(cd "$tmp/src" && GOWORK=off CGO_ENABLED=0 go build -trimpath -tags remove_all_sd -ldflags "-s -w" \
  -o "$dir/.promtool.$$" ./cmd/promtool)
mv -f "$dir/.promtool.$$" "$dir/promtool"
link
echo "install-promtool: built in $(( $(date +%s) - start ))s: $dir/promtool"
