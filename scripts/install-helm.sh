#!/usr/bin/env bash
# Builds helm from the Go module proxy, once, so the tests can lint and render
# deploy/helm/egress-gateway exactly as a cluster operator would.
# The version is pinned here only.
#
#   EGRESS_HELM_DIR  where the binary goes (default ~/.cache/egress-gateway/helm-<version>)
#   FORCE=1          rebuild even when the binary is present
#
# The tests look for it in $EGRESS_HELM, then ~/.cache/egress-gateway/bin/helm (a link
# this script makes), then on PATH.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/go-env.sh

version=4.3.2
module="helm.sh/helm/v4@v$version"
cache="$HOME/.cache/egress-gateway"
dir="${EGRESS_HELM_DIR:-$cache/helm-$version}"

link() {
  mkdir -p "$cache/bin"
  ln -sfn "$dir/helm" "$cache/bin/helm"
}
if [[ -z "${FORCE:-}" && -x "$dir/helm" ]]; then
  link
  echo "helm v$version already installed: $dir/helm"
  exit 0
fi

start=$(date +%s)
echo "install-helm: building helm v$version into $dir"
mkdir -p "$dir"
tmp="$(mktemp -d)"
trap 'rm -rf "$tmp" "$dir/.helm.$$"' EXIT
go_env "$tmp"

# As for kustomize: build inside the downloaded module, so its own go.mod and go.sum
# pin every dependency.
if ! src_ro="$(cd "$tmp" && go mod download -json "$module" | sed -n 's/^[[:space:]]*"Dir": "\(.*\)",$/\1/p')" \
  || [[ ! -f "$src_ro/go.mod" ]]; then
  echo "install-helm: cannot download $module from the module proxy" >&2
  exit 1
fi
cp -r "$src_ro" "$tmp/src"
chmod -R u+w "$tmp/src"
# Stripped (-s -w): a smaller binary and a faster link; the version is what
# `helm version` prints.
(cd "$tmp/src" && CGO_ENABLED=0 go build -trimpath \
  -ldflags "-s -w -X helm.sh/helm/v4/internal/version.version=v$version" \
  -o "$dir/.helm.$$" ./cmd/helm)
mv -f "$dir/.helm.$$" "$dir/helm"
link
echo "install-helm: built in $(( $(date +%s) - start ))s: $dir/helm"
