#!/bin/sh
# Demo agent 1 (research-agent): presents its own SVID to the gateway. The SVID files
# come from its spiffe-helper container (research-agent-svid volume).
until [ -s /svid/svid.pem ] && [ -s /svid/svid_key.pem ] && [ -s /svid/bundle.pem ]; do
    echo "research-agent: waiting for the SVID from spiffe-helper..."
    sleep 2
done

call() {
    label=$1
    shift
    code=$(curl -sS -o /tmp/body -w '%{http_code}' --max-time 15 \
        --proxy https://gateway:8443 \
        --proxy-cert /svid/svid.pem --proxy-key /svid/svid_key.pem \
        --proxy-cacert /svid/bundle.pem "$@" 2>/tmp/err) || code="curl error: $(cat /tmp/err)"
    echo "research-agent: $label -> $code $(head -c 200 /tmp/body 2>/dev/null | tr '\n' ' ')"
}

while true; do
    call "allowed  GET http://upstream/research/papers" http://upstream/research/papers
    call "denied   GET http://upstream/code/repo (no pathway)" http://upstream/code/repo
    call "denied   CONNECT pastebin.com:443 (rule no-paste-sites)" https://pastebin.com/
    # Needs the host's internet access; without it the gateway answers 502.
    call "allowed  CONNECT en.wikipedia.org:443" -o /dev/null https://en.wikipedia.org/wiki/SPIFFE
    sleep 15
done
