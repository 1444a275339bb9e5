#!/usr/bin/env bash
# Builds the proxies the gateway is benchmarked against, Smokescreen (HTTP CONNECT and
# forward proxy with an egress ACL) and ghostunnel (an L4 mTLS tunnel), from the Go
# module proxy, once, into a cache outside the repository. Versions are pinned here only.
#
#   EGRESS_BENCH_DIR  where the binaries go (default ~/.cache/egress-gateway/bench)
#   FORCE=1           rebuild even when a binary is present
#
# Prints the path of each binary. Not part of the test run.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/go-env.sh

smokescreen_version=v0.1.0
ghostunnel_version=v1.8.4
dir="${EGRESS_BENCH_DIR:-$HOME/.cache/egress-gateway/bench}"

# build NAME MODULE VERSION CGO: builds inside the downloaded module, so its own go.mod
# and go.sum pin every dependency, without `go install …@v` asking the proxy for a
# version list (which it refuses for some modules).
build() {
  local name="$1" module="$2" version="$3" cgo="$4"
  local out="$dir/$name-$version/$name"
  if [[ -z "${FORCE:-}" && -x "$out" ]]; then
    echo "$out"
    return
  fi
  local start tmp src_ro
  start=$(date +%s)
  echo "install-peers: building $name $version into $out" >&2
  mkdir -p "$(dirname "$out")"
  tmp="$(mktemp -d)"
  go_env "$tmp"
  if ! src_ro="$(cd "$tmp" && go mod download -json "$module@$version" | sed -n 's/^[[:space:]]*"Dir": "\(.*\)",$/\1/p')" \
    || [[ ! -f "$src_ro/go.mod" ]]; then
    echo "install-peers: cannot download $module@$version from the module proxy" >&2
    rm -rf "$tmp"
    exit 1
  fi
  cp -r "$src_ro" "$tmp/src"
  chmod -R u+w "$tmp/src"
  # -mod=mod: a module zip leaves out vendor/ but not its modules.txt, so vendored
  # builds (ghostunnel's) would find no packages; go.sum still pins every dependency.
  (cd "$tmp/src" && CGO_ENABLED="$cgo" go build -mod=mod -trimpath -o "$out.$$" .)
  mv -f "$out.$$" "$out"
  rm -rf "$tmp"
  echo "install-peers: built $name in $(( $(date +%s) - start ))s" >&2
  echo "$out"
}

build smokescreen github.com/stripe/smokescreen "$smokescreen_version" 0
# ghostunnel's PKCS#11 and keychain support link C code.
build ghostunnel github.com/ghostunnel/ghostunnel "$ghostunnel_version" 1
