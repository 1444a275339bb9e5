"""Fetch one URL with a stock Python HTTP client, configured only by the standard
proxy environment variables (HTTP_PROXY/HTTPS_PROXY, lower-case too) and the CA bundle
variables (REQUESTS_CA_BUNDLE for requests, SSL_CERT_FILE for httpx).

usage: proxy_client.py requests|httpx URL [HEADER=VALUE...]

Prints one JSON object: {"status": N, "body": "..."} when a response arrived, or
{"error": "..."} when the client raised (e.g. a refused CONNECT). Exits 0 either way;
the test decides.
"""

import json
import os
import sys


def with_requests(url, headers):
    import requests

    try:
        r = requests.get(url, headers=headers, timeout=20)
        return {"status": r.status_code, "body": r.text}
    except requests.RequestException as e:
        return {"error": f"{type(e).__name__}: {e}"}


def with_httpx(url, headers):
    import httpx

    # trust_env (the default) reads the proxy variables; verify takes the CA bundle
    # the same way a deployment would point it at one.
    verify = os.environ.get("SSL_CERT_FILE", True)
    try:
        with httpx.Client(verify=verify, timeout=20) as client:
            r = client.get(url, headers=headers)
            return {"status": r.status_code, "body": r.text}
    except httpx.HTTPError as e:
        return {"error": f"{type(e).__name__}: {e}"}


def main():
    lib, url = sys.argv[1], sys.argv[2]
    headers = dict(h.split("=", 1) for h in sys.argv[3:])
    fetch = {"requests": with_requests, "httpx": with_httpx}[lib]
    print(json.dumps(fetch(url, headers)))


if __name__ == "__main__":
    main()
