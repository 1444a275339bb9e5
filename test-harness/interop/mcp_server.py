"""A Model Context Protocol server built with the official Python SDK (MCPServer,
Streamable HTTP), for the gateway's MCP pathway tests.

usage: mcp_server.py --calls CALLS.jsonl [--json-response] [--tls-cert C --tls-key K
                    [--client-ca CA]] [--host-name NAME]

Binds a free port on 127.0.0.1 and prints {"port": N} on stdout once it listens. Every
tool it executes, every resource it reads and every prompt it renders is appended to
CALLS.jsonl as one JSON line ({"tool": ..., "arguments": {...}}), so a test can tell what
reached the server. With --json-response, requests are answered with application/json
instead of an SSE stream. With the TLS options it serves HTTPS (with --client-ca it
requires a client certificate from CA: an east-west workload) and logs the headers of
every request as {"method": ..., "headers": {...}} lines. --host-name adds a Host the
SDK's DNS-rebinding protection accepts besides 127.0.0.1 and localhost.
"""

import argparse
import json
import socket
import ssl
import sys

import uvicorn
from mcp.server.mcpserver import MCPServer
from mcp.server.transport_security import TransportSecuritySettings

args = None
server = MCPServer("egress-test-tools")


def record(entry):
    with open(args.calls, "a", encoding="utf-8") as f:
        f.write(json.dumps(entry) + "\n")


@server.tool()
def search_docs(query: str) -> str:
    """Search the documentation."""
    record({"tool": "search_docs", "arguments": {"query": query}})
    return f"3 results for {query}"


@server.tool()
def read_file(path: str) -> str:
    """Read a file from the workspace."""
    record({"tool": "read_file", "arguments": {"path": path}})
    return f"contents of {path}"


@server.tool()
def read_secrets() -> str:
    """Read the deployment secrets."""
    record({"tool": "read_secrets", "arguments": {}})
    return "hunter2"


@server.tool()
def delete_repo(repo: str) -> str:
    """Delete a repository."""
    record({"tool": "delete_repo", "arguments": {"repo": repo}})
    return f"deleted {repo}"


@server.resource("docs://guide")
def guide() -> str:
    """The user guide."""
    record({"resource": "docs://guide"})
    return "the guide"


@server.resource("secret://keys")
def keys() -> str:
    """Signing keys."""
    record({"resource": "secret://keys"})
    return "-----BEGIN KEY-----"


@server.prompt()
def summarize(text: str) -> str:
    """Summarize a text."""
    record({"prompt": "summarize"})
    return f"Summarize: {text}"


class LogHeaders:
    """ASGI middleware: logs each HTTP request's headers (east-west tests)."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http":
            headers = {k.decode("latin-1"): v.decode("latin-1") for k, v in scope["headers"]}
            record({"method": scope["method"], "headers": headers})
        await self.app(scope, receive, send)


def main():
    global args
    p = argparse.ArgumentParser()
    p.add_argument("--calls", required=True)
    p.add_argument("--json-response", action="store_true")
    p.add_argument("--tls-cert")
    p.add_argument("--tls-key")
    p.add_argument("--client-ca")
    p.add_argument("--host-name")
    args = p.parse_args()

    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    sock.listen(128)

    hosts = ["127.0.0.1:*", "localhost:*"] + ([f"{args.host_name}:*"] if args.host_name else [])
    security = TransportSecuritySettings(
        allowed_hosts=hosts,
        allowed_origins=[f"{scheme}://{h}" for scheme in ("http", "https") for h in hosts],
    )
    app = server.streamable_http_app(json_response=args.json_response, transport_security=security)
    options = {"log_level": "warning"}
    if args.tls_cert:
        app = LogHeaders(app)
        options.update(ssl_certfile=args.tls_cert, ssl_keyfile=args.tls_key)
        if args.client_ca:
            options.update(ssl_ca_certs=args.client_ca, ssl_cert_reqs=ssl.CERT_REQUIRED)
    config = uvicorn.Config(app, **options)
    print(json.dumps({"port": sock.getsockname()[1]}), flush=True)
    uvicorn.Server(config).run(sockets=[sock])


if __name__ == "__main__":
    sys.exit(main())
