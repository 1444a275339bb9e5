#!/usr/bin/env bash
# Side-by-side benchmark: the same load sent straight to a local upstream ("direct"),
# through egress-gateway, through Smokescreen and through ghostunnel, on this machine,
# then one markdown table with each system's figures and the gateway's ratios to the
# other two. Not part of the test run.
#
#   bench/compare.sh                 5 rounds, 4 s per timed run (about 9 minutes on 2 cores)
#   QUICK=1 bench/compare.sh         1 round, 1 s runs, smaller downloads: a smoke check
#
#   ROUNDS=N          rounds (default 5; QUICK=1: 1)
#   DURATION=4s       length of each timed run (QUICK=1: 1s)
#   BULK_MB=200       size of the bulk download (QUICK=1: 50)
#   IDLE_TUNNELS=1000 idle tunnels held open for the memory measure (QUICK=1: 200)
#   RATE=1000         open-loop request rate
#   ONLY=bulk,idle    run only these measures (bulk, closed, open, newconn, idle)
#   GATEWAY_BIN=path  use this egress-gateway binary instead of building it
#   CARGO=cargo       the cargo to build the gateway with
#   KEEP=1            keep the work directory (certificates, configs, logs, raw samples)
#   EGRESS_BENCH_DIR  where built tools are cached (default ~/.cache/egress-gateway/bench)
#
# Needs Go (1.26+; Smokescreen, ghostunnel and the load client are built once and cached)
# and, unless GATEWAY_BIN is set, the Rust toolchain.
#
# Set-up, all on loopback, in a temporary directory removed at exit:
# - a test CA and SPIFFE X.509-SVIDs (ECDSA P-256) made by the load client: the proxies'
#   (spiffe://example.org/ns/egress-gateway/sa/egress-gateway, also DNS localhost) and the
#   agent's (spiffe://example.org/ns/ai-workloads/sa/bench-agent). Real SPIRE is not
#   needed: a small SPIFFE Workload API (gRPC FetchX509SVID on a unix socket) serves the
#   gateway its SVID and bundle; Smokescreen and ghostunnel read the same files.
# - an upstream HTTP/1.1 server (GET /small: 100 bytes; GET /bulk?bytes=N), and an
#   OTLP/HTTP sink that answers 200 to POST /v1/traces and counts the spans.
# - egress-gateway (release build) with mTLS and a policy allowing only the upstream;
#   a second one exporting every span to the sink (telemetry.otlp_protocol: http/protobuf).
# - Smokescreen (HTTP CONNECT and forward proxy) with TLS and client certificates from
#   the same CA, loopback allowed, no ACL.
# - ghostunnel in server mode (mTLS listener, L4 pipe to the upstream) allowing the
#   agent's URI SAN. It has no CONNECT: its rows use the tunnel as the connection to the
#   upstream (origin-form requests through it).
# Every system writes its log of connections or requests to a file: the gateways'
# audit_log, Smokescreen's request log (stderr), ghostunnel's connection log (stderr).
#
# The load client (bench/loadclient, Go, standard library only) shares no code with the
# gateway. Each round starts the four proxies afresh, warms them up briefly, then runs
# every measure on each system in turn (the order rotates every round):
# 1. one 200 MB download through one tunnel: MB/s, and the proxy's CPU-seconds per GB
#    (utime+stime from /proc/PID/stat before and after, in 10 ms ticks);
# 2. closed loop, small GETs on 16, 64 and 256 keep-alive connections (absolute-form
#    http:// requests to the gateway and Smokescreen): requests/s; upstream connections
#    opened per 1000 requests, counted by the upstream and, for the gateway, by its
#    egress_upstream_connections_total;
# 3. open loop at RATE requests/s on 64 connections: the proxy's CPU-seconds per 1000
#    requests, and p50/p99 latency (from each request's due time) minus direct's;
# 4. the gateway with span export on against off: closed-loop (16) throughput ratio
#    (off, on, on, off, off, on, on, off, half-length runs right after each other);
# 5. new connections, 16 in parallel, each mTLS handshake + CONNECT + GET + close (no
#    session resumption): connections/s and the proxy's CPU-ms per connection;
# 6. IDLE_TUNNELS tunnels opened (one GET each) and held: the proxy's RSS growth per tunnel
#    (measured first in each round, on fresh processes, so that heap grown and freed by
#    the other measures does not hide it).
# Figures are medians over rounds; ratios are medians of per-round ratios. The load
# client, the upstream and the proxy share the machine's cores, so absolute numbers
# are bounded by the machine and move with whatever else runs on it; compare the
# ratios within one run, not figures across machines or runs.
set -euo pipefail
cd "$(dirname "$0")/.."
root="$PWD"
# shellcheck source=../scripts/go-env.sh
source scripts/go-env.sh

if [[ -n "${QUICK:-}" ]]; then
  ROUNDS="${ROUNDS:-1}" DURATION="${DURATION:-1s}" BULK_MB="${BULK_MB:-50}" IDLE_TUNNELS="${IDLE_TUNNELS:-200}"
fi
ROUNDS="${ROUNDS:-5}"
DURATION="${DURATION:-4s}"
BULK_MB="${BULK_MB:-200}"
IDLE_TUNNELS="${IDLE_TUNNELS:-1000}"
RATE="${RATE:-1000}"
CARGO="${CARGO:-cargo}"
cache="${EGRESS_BENCH_DIR:-$HOME/.cache/egress-gateway/bench}"

die() {
  echo "compare.sh: $*" >&2
  exit 1
}

work="$(mktemp -d "${TMPDIR:-/tmp}/egress-compare.XXXXXX")"
pids=()       # the helpers, for the whole run
round_pids=() # the systems under test, started afresh for every round
logs=()
stop_round() {
  local pid
  for pid in "${round_pids[@]}"; do
    kill "$pid" 2>/dev/null || true
  done
  for pid in "${round_pids[@]}"; do
    wait "$pid" 2>/dev/null || true
  done
  round_pids=()
}
cleanup() {
  local status=$?
  trap - EXIT INT TERM
  stop_round
  local pid
  for pid in "${pids[@]}"; do
    kill "$pid" 2>/dev/null || true
  done
  for pid in "${pids[@]}"; do
    wait "$pid" 2>/dev/null || true
  done
  if [[ $status -ne 0 ]]; then
    for log in "${logs[@]}"; do
      if [[ -s "$log" ]]; then
        echo "--- last lines of $log" >&2
        tail -n 5 "$log" >&2
      fi
    done
  fi
  if [[ -n "${KEEP:-}" ]]; then
    echo "compare.sh: work directory kept: $work" >&2
  else
    rm -rf "$work"
  fi
  exit "$status"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# start LOG CMD...: runs CMD in the background, its output appended to LOG; the PID
# (last_pid) is the program's own, read from /proc for its CPU and memory.
start() {
  local log="$1"
  shift
  "$@" >>"$log" 2>&1 &
  last_pid=$!
  [[ " ${logs[*]} " == *" $log "* ]] || logs+=("$log")
}

# --- tools -------------------------------------------------------------------------
peers="$(bench/install-peers.sh)" || die "bench/install-peers.sh failed"
smokescreen="$(sed -n 1p <<<"$peers")"
ghostunnel="$(sed -n 2p <<<"$peers")"
[[ -x "$smokescreen" ]] || die "Smokescreen binary missing ($smokescreen)"
[[ -x "$ghostunnel" ]] || die "ghostunnel binary missing ($ghostunnel)"

hash="$(cat bench/loadclient/go.mod bench/loadclient/*.go | sha256sum | cut -c1-12)"
loadclient="$cache/loadclient-$hash/loadclient"
if [[ ! -x "$loadclient" ]]; then
  echo "compare.sh: building the load client into $loadclient" >&2
  mkdir -p "$(dirname "$loadclient")"
  mkdir -p "$work/go"
  go_env "$work/go"
  (cd bench/loadclient && CGO_ENABLED=0 go build -trimpath -o "$loadclient.$$" .) \
    || die "cannot build bench/loadclient"
  mv -f "$loadclient.$$" "$loadclient"
  rm -rf "$work/go"
fi

if [[ -n "${GATEWAY_BIN:-}" ]]; then
  gateway="$GATEWAY_BIN"
else
  command -v "$CARGO" >/dev/null 2>&1 || die "'$CARGO' not found: install the Rust toolchain, or set GATEWAY_BIN"
  echo "compare.sh: building egress-gateway (release)" >&2
  "$CARGO" build --release -p egress-gateway || die "cargo build --release -p egress-gateway failed"
  gateway="${CARGO_TARGET_DIR:-$root/target}/release/egress-gateway"
fi
[[ -x "$gateway" ]] || die "egress-gateway binary missing ($gateway)"

# Each idle tunnel is a descriptor or two in the client, the proxy and the upstream.
want_fds=$((IDLE_TUNNELS * 2 + 1024))
if [[ "$(ulimit -n)" != unlimited && "$(ulimit -n)" -lt $want_fds ]]; then
  ulimit -n "$want_fds" 2>/dev/null || ulimit -n "$(ulimit -Hn)"
  [[ "$(ulimit -n)" == unlimited || "$(ulimit -n)" -ge $want_fds ]] \
    || die "open-file limit $(ulimit -n) is below the $want_fds that IDLE_TUNNELS=$IDLE_TUNNELS needs"
fi

# --- set-up -------------------------------------------------------------------------
"$loadclient" certs -dir "$work/certs"
mapfile -t ports < <("$loadclient" ports -n 8)
[[ ${#ports[@]} -eq 8 ]] || die "could not find free loopback ports"
up="127.0.0.1:${ports[0]}" up_ctl="127.0.0.1:${ports[1]}" sink="127.0.0.1:${ports[2]}"
gw="127.0.0.1:${ports[3]}" gw_admin="127.0.0.1:${ports[4]}"
gwo="127.0.0.1:${ports[5]}" gwo_admin="127.0.0.1:${ports[6]}" smoke="127.0.0.1:${ports[7]}"
ghost_port="$("$loadclient" ports -n 1)"
ghost="127.0.0.1:$ghost_port"
agent_id=spiffe://example.org/ns/ai-workloads/sa/bench-agent

start "$work/upstream.log" "$loadclient" upstream -listen "$up" -control "$up_ctl"
pids+=("$last_pid")
start "$work/otlp-sink.log" "$loadclient" otlp-sink -listen "$sink"
pids+=("$last_pid")
start "$work/workload-api.log" "$loadclient" workload-api -socket "$work/agent.sock" \
  -cert "$work/certs/server.pem" -key "$work/certs/server.key" -bundle "$work/certs/ca.pem"
pids+=("$last_pid")

# The policy in a directory of its own, as a ConfigMap mount is: the gateway watches
# the policy's directory, and audit lines written next to it would wake the watcher.
mkdir -p "$work/policy"
cat >"$work/policy/policy.yaml" <<EOF
version: 1
trust_domains: [example.org]
agents:
  - name: bench-agent
    id: $agent_id
    pathways:
      - name: upstream
        destinations: ["$up"]
        allow_cidrs: [127.0.0.0/8]
EOF
"$gateway" policy check "$work/policy/policy.yaml" >/dev/null || die "the generated policy does not load"

# gateway_config NAME LISTEN ADMIN [OTLP_ENDPOINT]
gateway_config() {
  local otlp=""
  if [[ -n "${4:-}" ]]; then
    otlp=$'\n'"  otlp_endpoint: $4"$'\n'"  otlp_protocol: http/protobuf"
  fi
  cat <<EOF
listen: $2
admin: $3
identity:
  workload_api: unix://$work/agent.sock
  startup_timeout: 20s
policy: $work/policy/policy.yaml
telemetry:
  audit_log: $work/$1-audit.log$otlp
limits:
  max_connections: $((IDLE_TUNNELS * 4 + 10000))
  max_connections_per_agent: $((IDLE_TUNNELS * 4 + 10000))
EOF
}
gateway_config gateway "$gw" "$gw_admin" >"$work/gateway.yaml"
gateway_config gateway-otlp "$gwo" "$gwo_admin" "http://$sink" >"$work/gateway-otlp.yaml"

"$loadclient" wait -tcp "$up" || die "the upstream did not start"
"$loadclient" wait -http "http://$sink/stats" || die "the OTLP sink did not start"

# start_round: the four systems, fresh, so no figure depends on what an allocator kept
# from the round before (`env` execs the gateway: the PIDs are the programs' own).
start_round() {
  start "$work/gateway.log" env RUST_LOG=info "$gateway" run --config "$work/gateway.yaml"
  gw_pid=$last_pid
  start "$work/gateway-otlp.log" env RUST_LOG=info "$gateway" run --config "$work/gateway-otlp.yaml"
  gwo_pid=$last_pid
  start "$work/smokescreen.log" "$smokescreen" --listen-ip 127.0.0.1 --listen-port "${smoke##*:}" \
    --tls-server-bundle-file "$work/certs/server-bundle.pem" --tls-client-ca-file "$work/certs/ca.pem" \
    --allow-range 127.0.0.0/8
  smoke_pid=$last_pid
  start "$work/ghostunnel.log" "$ghostunnel" server --listen "$ghost" --target "$up" \
    --keystore "$work/certs/server-bundle.pem" --cacert "$work/certs/ca.pem" --allow-uri "$agent_id"
  ghost_pid=$last_pid
  round_pids=("$gw_pid" "$gwo_pid" "$smoke_pid" "$ghost_pid")
  "$loadclient" wait -http "http://$gw_admin/readyz" || die "egress-gateway did not become ready (see $work/gateway.log)"
  "$loadclient" wait -http "http://$gwo_admin/readyz" || die "egress-gateway with OTLP did not become ready"
  "$loadclient" wait -tcp "$smoke" || die "Smokescreen did not start (see $work/smokescreen.log)"
  "$loadclient" wait -tcp "$ghost" || die "ghostunnel did not start (see $work/ghostunnel.log)"
}

lines() { if [[ -f "$1" ]]; then wc -l <"$1"; else echo 0; fi; }
declare -A logged=()
began=$(date +%s)
echo "compare.sh: $(nproc) cores, load average $(cut -d' ' -f1-3 /proc/loadavg) before the run" >&2
for ((round = 1; round <= ROUNDS; round++)); do
  start_round
  "$loadclient" run \
    -upstream "$up" -upstream-control "$up_ctl" -certs "$work/certs" \
    -gateway "$gw,$gw_pid,http://$gw_admin" \
    -gateway-otlp "$gwo,$gwo_pid,http://$gwo_admin" \
    -smokescreen "$smoke,$smoke_pid" \
    -ghostunnel "$ghost,$ghost_pid" \
    -first-round "$round" -rounds 1 -duration "$DURATION" -bulk-bytes "$((BULK_MB * 1000000))" \
    -idle-tunnels "$IDLE_TUNNELS" -rate "$RATE" -only "${ONLY:-}" -raw "$work/samples.jsonl"
  stop_round
  # Count what each system logged, then drop the files, so long runs do not fill /tmp.
  for log in gateway-audit gateway-otlp-audit smokescreen ghostunnel; do
    logged[$log]=$((${logged[$log]:-0} + $(lines "$work/$log.log")))
    if ((round < ROUNDS)); then rm -f "$work/$log.log"; fi
  done
done

"$loadclient" report -raw "$work/samples.jsonl" -otlp-sink "http://$sink" \
  -duration "$DURATION" -bulk-bytes "$((BULK_MB * 1000000))" -idle-tunnels "$IDLE_TUNNELS" -rate "$RATE"
echo "Log lines written (all rounds): egress-gateway audit ${logged[gateway-audit]}, with OTLP ${logged[gateway-otlp-audit]}; Smokescreen ${logged[smokescreen]}; ghostunnel ${logged[ghostunnel]}."
echo "Took $(( $(date +%s) - began )) s; load average after the run: $(cut -d' ' -f1-3 /proc/loadavg)."
