#!/usr/bin/env bash
# Builds kustomize (the renderer behind `kubectl apply -k`) from the Go module proxy,
# once, so the tests can render deploy/kubernetes exactly as a cluster operator would.
# The version is pinned here only.
#
#   EGRESS_KUSTOMIZE_DIR  where the binary goes (default ~/.cache/egress-gateway/kustomize-<version>)
#   FORCE=1               rebuild even when the binary is present
#
# The tests look for it in $EGRESS_KUSTOMIZE, then ~/.cache/egress-gateway/bin/kustomize
# (a link this script makes), then on PATH.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/go-env.sh

version=5.7.1
module="sigs.k8s.io/kustomize/kustomize/v5@v$version"
cache="$HOME/.cache/egress-gateway"
dir="${EGRESS_KUSTOMIZE_DIR:-$cache/kustomize-$version}"

link() {
  mkdir -p "$cache/bin"
  ln -sfn "$dir/kustomize" "$cache/bin/kustomize"
}
if [[ -z "${FORCE:-}" && -x "$dir/kustomize" ]]; then
  link
  echo "kustomize v$version already installed: $dir/kustomize"
  exit 0
fi

start=$(date +%s)
echo "install-kustomize: building kustomize v$version into $dir"
mkdir -p "$dir"
tmp="$(mktemp -d)"
trap 'rm -rf "$tmp" "$dir/.kustomize.$$"' EXIT
go_env "$tmp"

# As for SPIRE: build inside the downloaded module, so its own go.mod and go.sum pin
# every dependency, without `go install …@v` asking the proxy for a version list.
if ! src_ro="$(cd "$tmp" && go mod download -json "$module" | sed -n 's/^[[:space:]]*"Dir": "\(.*\)",$/\1/p')" \
  || [[ ! -f "$src_ro/go.mod" ]]; then
  echo "install-kustomize: cannot download $module from the module proxy" >&2
  exit 1
fi
cp -r "$src_ro" "$tmp/src"
chmod -R u+w "$tmp/src"
(cd "$tmp/src" && CGO_ENABLED=0 go build -trimpath -o "$dir/.kustomize.$$" .)
mv -f "$dir/.kustomize.$$" "$dir/kustomize"
link
echo "install-kustomize: built in $(( $(date +%s) - start ))s: $dir/kustomize"
