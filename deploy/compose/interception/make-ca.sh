#!/bin/sh
# One-shot (service `interception-ca`): the demo's TLS interception CA.
#
#   /ca/ca.crt, /ca/ca.key   the CA (ECDSA P-256, PKCS#8 key): the gateway's volume only
#   /trust/ca.crt            the public roots plus the CA: what the agents trust
#   /trust/interception-ca.crt  the CA alone (what admin:/interception-ca.pem serves)
#
# The CA is kept across `docker compose up`s while it has more than a day left, so the
# agents' trust survives restarts; `docker compose down -v` removes it.
set -eu
umask 077

if [ -s /ca/ca.crt ] && [ -s /ca/ca.key ] && openssl x509 -in /ca/ca.crt -noout -checkend 86400 >/dev/null; then
    echo "interception-ca: keeping $(openssl x509 -in /ca/ca.crt -noout -subject)"
else
    cat >/tmp/ca.cnf <<'CNF'
[req]
distinguished_name = dn
x509_extensions = ca
prompt = no
[dn]
O = egress-gateway demo
CN = egress-gateway demo interception CA
[ca]
basicConstraints = critical, CA:TRUE, pathlen:0
keyUsage = critical, keyCertSign, cRLSign
subjectKeyIdentifier = hash
CNF
    openssl req -x509 -new -config /tmp/ca.cnf -days 30 \
        -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes \
        -keyout /ca/ca.key.new -out /ca/ca.crt.new
    mv /ca/ca.key.new /ca/ca.key
    mv /ca/ca.crt.new /ca/ca.crt
    echo "interception-ca: created $(openssl x509 -in /ca/ca.crt -noout -subject)"
fi
# The gateway runs as uid 65532 (distroless nonroot): it alone reads the key.
chown 65532:65532 /ca/ca.key /ca/ca.crt
chmod 0400 /ca/ca.key
chmod 0444 /ca/ca.crt

# SSL_CERT_FILE, CURL_CA_BUNDLE and REQUESTS_CA_BUNDLE replace a client's system store,
# so the agents' file carries the public roots as well (for the tunnels the gateway does
# not intercept, such as en.wikipedia.org).
cat /etc/ssl/certs/ca-certificates.crt /ca/ca.crt >/trust/ca.crt.new
cp /ca/ca.crt /trust/interception-ca.crt.new
chmod 0444 /trust/ca.crt.new /trust/interception-ca.crt.new
mv /trust/ca.crt.new /trust/ca.crt
mv /trust/interception-ca.crt.new /trust/interception-ca.crt
openssl x509 -in /ca/ca.crt -noout -fingerprint -sha256 | sed 's/^/interception-ca: /'
