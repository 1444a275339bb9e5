# Sourced by the install scripts that build Go programs from the module proxy.
#
# go_env TMP: finds `go` (also in the usual install folders) or fails with a clear
# message, and points Go's caches at TMP. The built binaries are cached, the Go caches
# never reused, so they live and die with TMP (set EGRESS_KEEP_GO_CACHE=1 to keep
# using your own).
go_env() {
  local tmp="$1"
  if ! command -v go >/dev/null 2>&1; then
    for candidate in /usr/local/go/bin /usr/lib/go/bin; do
      if [[ -x "$candidate/go" ]]; then PATH="$candidate:$PATH"; break; fi
    done
  fi
  if ! command -v go >/dev/null 2>&1; then
    echo "$(basename "$0"): 'go' not found. Install Go (1.26+) and run $0 again." >&2
    exit 1
  fi
  if [[ -z "${EGRESS_KEEP_GO_CACHE:-}" ]]; then
    export GOCACHE="$tmp/go-build" GOMODCACHE="$tmp/go-mod" GOTMPDIR="$tmp"
  fi
  # A read-write module cache can be deleted with rm -rf.
  export GOFLAGS="${GOFLAGS:+$GOFLAGS }-modcacherw -buildvcs=false"
  export GOTOOLCHAIN="${GOTOOLCHAIN:-auto}"
}
