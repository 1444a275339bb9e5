#!/usr/bin/env bash
# Builds real SPIRE (spire-server, spire-agent) from the Go module proxy into a cache
# folder, once. The version is pinned in spire-config/VERSION only.
#
#   EGRESS_SPIRE_DIR  where the binaries go (default ~/.cache/egress-gateway/spire-<version>)
#   FORCE=1           rebuild even when both binaries are present
set -euo pipefail
cd "$(dirname "$0")/.."

version="$(tr -d '[:space:]' < spire-config/VERSION)"
if [[ ! "$version" =~ ^[0-9]+\.[0-9]+\.[0-9]+$ ]]; then
  echo "install-spire: spire-config/VERSION must hold a version like 1.15.3, got '$version'" >&2
  exit 1
fi
dir="${EGRESS_SPIRE_DIR:-$HOME/.cache/egress-gateway/spire-$version}"

installed() {
  [[ -z "${FORCE:-}" && -x "$dir/spire-server" && -x "$dir/spire-agent" ]]
}
report_installed() {
  echo "SPIRE v$version already installed:"
  echo "  $dir/spire-server"
  echo "  $dir/spire-agent"
}
if installed; then report_installed; exit 0; fi

# One build at a time per install dir: a second run (another checkout's test script,
# say) waits for the first and then finds the binaries.
mkdir -p "$dir"
if command -v flock >/dev/null 2>&1; then
  exec 9>"$dir/.install.lock"
  if ! flock -n 9; then
    echo "install-spire: another install into $dir is running; waiting for it"
    flock 9
  fi
  if installed; then report_installed; exit 0; fi
fi

source scripts/go-env.sh
# The server's sqlite datastore (mattn/go-sqlite3) is cgo-only.
if ! command -v gcc >/dev/null 2>&1 && ! command -v cc >/dev/null 2>&1; then
  echo "install-spire: no C compiler; spire-server needs cgo for sqlite (apt-get install gcc)" >&2
  exit 1
fi

module="github.com/spiffe/spire@v$version"
start=$(date +%s)
echo "install-spire: building SPIRE v$version into $dir (takes several minutes on 2 cores)"

tmp="$(mktemp -d)"
trap 'rm -rf "$tmp" "$dir/.spire-server.$$" "$dir/.spire-agent.$$"' EXIT
# Go's caches (about 5 GB for SPIRE) go to $tmp.
go_env "$tmp"

# Download first, so an unreachable checksum DB can be told apart from a build error.
# Outside a module `go mod download` still verifies against the checksum DB.
if ! (cd "$tmp" && go mod download "$module" 2>"$tmp/err"); then
  if [[ "${GOSUMDB:-}" != off ]] && (cd "$tmp" && GOSUMDB=off go mod download "$module"); then
    echo "install-spire: checksum database unreachable ($(tail -n1 "$tmp/err")); continuing with GOSUMDB=off (module proxy only)" >&2
    export GOSUMDB=off
  else
    echo "install-spire: cannot download $module from the module proxy:" >&2
    cat "$tmp/err" >&2
    exit 1
  fi
fi

# Built in a copy of the downloaded module rather than with `go install <pkg>@v<version>`:
# that form also asks the proxy for the module's version list (a deprecation check),
# which some proxies refuse (403), and it cannot substitute an unavailable dependency.
# Inside the module its own go.mod and go.sum pin every dependency, so the result is
# what `go install @v` would build.
src_ro="$(cd "$tmp" && go mod download -json "$module" | sed -n 's/^[[:space:]]*"Dir": "\(.*\)",$/\1/p')"
if [[ ! -f "$src_ro/go.mod" ]]; then
  echo "install-spire: module source for $module not found in the Go module cache" >&2
  exit 1
fi
cp -r "$src_ro" "$tmp/src"
chmod -R u+w "$tmp/src"
src="$tmp/src"

# Some module proxies no longer serve ejbca-go-client-sdk v1.1.0 (403 "This module
# version is not available"). Only the unused EJBCA UpstreamAuthority plugin imports it
# and v1.0.2 has the API it needs, so substitute it when v1.1.0 cannot be fetched.
ejbca_need="$(sed -n 's/^[[:space:]]*github.com\/Keyfactor\/ejbca-go-client-sdk \(v[^ ]*\).*/\1/p' "$src/go.mod")"
if [[ -n "$ejbca_need" ]] && ! (cd "$src" && go mod download "github.com/Keyfactor/ejbca-go-client-sdk@$ejbca_need" 2>/dev/null); then
  echo "install-spire: github.com/Keyfactor/ejbca-go-client-sdk@$ejbca_need is not available; using v1.0.2 (only the EJBCA UpstreamAuthority plugin uses it)" >&2
  (cd "$src" && go mod edit -replace github.com/Keyfactor/ejbca-go-client-sdk=github.com/Keyfactor/ejbca-go-client-sdk@v1.0.2 \
    && go mod download github.com/Keyfactor/ejbca-go-client-sdk)
fi

# Build to temporary names and rename, so an interrupted build never looks installed.
(cd "$src" && CGO_ENABLED=1 go build -trimpath -o "$dir/.spire-server.$$" ./cmd/spire-server)
(cd "$src" && CGO_ENABLED=0 go build -trimpath -o "$dir/.spire-agent.$$" ./cmd/spire-agent)
mv -f "$dir/.spire-server.$$" "$dir/spire-server"
mv -f "$dir/.spire-agent.$$" "$dir/spire-agent"

echo "install-spire: built in $(( $(date +%s) - start ))s"
echo "SPIRE v$version installed ($("$dir/spire-server" --version 2>&1 | head -n1)):"
echo "  $dir/spire-server"
echo "  $dir/spire-agent"
