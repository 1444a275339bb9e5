#!/bin/sh
# Demo agent 1 (research-agent): presents its own SVID to the gateway. The SVID files
# come from its spiffe-helper container (research-agent-svid volume). It trusts the
# gateway's interception CA through CURL_CA_BUNDLE (the public roots plus the CA, from
# the interception-trust volume), so intercepted HTTPS looks like any other HTTPS.
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
    # Intercepted (pathway wikimedia-api is L7): curl sees a leaf for api.wikimedia.org
    # signed by the interception CA; the gateway decides the GET inside the tunnel.
    call "allowed  GET https://api.wikimedia.org/core/v1/wikipedia/... (intercepted)" -o /dev/null \
        -A "egress-gateway-demo/0.1 (research-agent)" \
        https://api.wikimedia.org/core/v1/wikipedia/en/page/SPIFFE/bare
    call "denied   GET https://api.wikimedia.org/feed/... (intercepted, path outside the pathway)" \
        -A "egress-gateway-demo/0.1 (research-agent)" \
        https://api.wikimedia.org/feed/v1/wikipedia/en/featured/2025/01/01
    sleep 15
done
