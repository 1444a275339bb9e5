#!/bin/sh
# spire-setup for the docker-compose demo: waits for the SPIRE server, writes a join
# token for the agent, and registers the demo's workloads by container label. Safe to
# run again: existing entries are kept.
set -eu

SOCK=${SPIRE_SERVER_SOCKET:-/tmp/spire-server/private/api.sock}
TD=${TRUST_DOMAIN:-example.org}
PARENT="spiffe://$TD/host"
TOKEN_FILE=${JOIN_TOKEN_FILE:-/run/spire/join/token}
LABEL=org.egress-gateway.workload

until spire-server healthcheck -socketPath "$SOCK" >/dev/null 2>&1; do
    echo "waiting for the SPIRE server..."
    sleep 1
done

# The agent's own ID is $PARENT, so the entries below can name it as their parent.
spire-server token generate -socketPath "$SOCK" -spiffeID "$PARENT" -ttl 3600 \
    | sed -n 's/^Token: //p' >"$TOKEN_FILE.tmp"
test -s "$TOKEN_FILE.tmp"
mv "$TOKEN_FILE.tmp" "$TOKEN_FILE"
echo "join token written to $TOKEN_FILE"

# create SPIFFE_ID SELECTOR_VALUE [extra entry create flags...]
create() {
    id=$1
    workload=$2
    shift 2
    if spire-server entry show -socketPath "$SOCK" -spiffeID "$id" | grep -q "Entry ID"; then
        echo "entry exists: $id"
    else
        spire-server entry create -socketPath "$SOCK" -parentID "$PARENT" -spiffeID "$id" \
            -selector "docker:label:$LABEL:$workload" "$@"
    fi
}

# The gateway: `gateway` is the name agents dial (curl --proxy https://gateway:8443
# checks it against the SVID's DNS names).
create "spiffe://$TD/ns/egress-gateway/sa/egress-gateway" egress-gateway -dns gateway -dns localhost
# Demo agent 1: its SVID helper carries the label; curl uses the files it writes.
create "spiffe://$TD/ns/ai-workloads/sa/research-agent" research-agent
# Demo agent 2: the egress-gateway sidecar carries the label and holds the SVID.
create "spiffe://$TD/ns/ai-workloads/sa/coding-agent" coding-agent

spire-server entry show -socketPath "$SOCK"
