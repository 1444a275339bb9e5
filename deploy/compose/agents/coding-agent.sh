#!/bin/sh
# Demo agent 2 (coding-agent): a plain HTTPS_PROXY client. It holds no certificate; the
# egress-gateway sidecar whose network namespace it shares (127.0.0.1:15001) speaks
# mTLS to the gateway with the coding-agent SVID.
call() {
    label=$1
    shift
    code=$(curl -sS -o /tmp/body -w '%{http_code}' --max-time 15 "$@" 2>/tmp/err) \
        || code="curl error: $(cat /tmp/err)"
    echo "coding-agent: $label -> $code $(head -c 200 /tmp/body 2>/dev/null | tr '\n' ' ')"
}

until curl -s -o /dev/null http://127.0.0.1:15021/readyz -f; do
    echo "coding-agent: waiting for the sidecar's SVID..."
    sleep 2
done

while true; do
    call "allowed  POST http://upstream/code/build" -X POST -d '{"target":"demo"}' http://upstream/code/build
    call "denied   GET http://upstream/research/papers (no pathway)" http://upstream/research/papers
    call "denied   CONNECT en.wikipedia.org:443 (no pathway)" https://en.wikipedia.org/
    sleep 15
done
