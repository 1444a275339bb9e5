"""An agent using an MCP server through the gateway, configured only by the standard
proxy variables (HTTP_PROXY/HTTPS_PROXY; the SDK's HTTP client honours them).

usage: mcp_client.py sdk URL      the official SDK's Client: list and call tools,
                                  resources and prompts
       mcp_client.py raw URL      hand-made JSON-RPC over httpx: batches, notifications,
                                  a body that is not JSON-RPC

Prints one JSON line per step ({"step": ..., ...}); exits 0 when every step ran (what
the gateway answered is for the test to judge).
"""

import asyncio
import json
import os
import sys

TIMEOUT = float(os.environ.get("EGRESS_TEST_TIMEOUT", "20"))


def emit(step, **fields):
    print(json.dumps({"step": step, **fields}), flush=True)


def text_of(result):
    return "".join(getattr(c, "text", "") for c in result.content)


async def sdk(url):
    from mcp import Client
    from mcp.shared.exceptions import MCPError

    async def attempt(step, call):
        try:
            emit(step, ok=True, **(await call()))
        except MCPError as e:
            emit(step, ok=False, code=e.error.code, message=e.error.message, data=e.error.data)

    async with Client(url, mode="legacy", read_timeout_seconds=TIMEOUT) as c:
        tools = await c.list_tools()
        emit("list_tools", tools=sorted(t.name for t in tools.tools))

        async def call(name, arguments):
            r = await c.call_tool(name, arguments)
            return {"is_error": bool(r.is_error), "text": text_of(r)}

        await attempt("search_docs", lambda: call("search_docs", {"query": "rust"}))
        await attempt("read_file", lambda: call("read_file", {"path": "/docs/guide.md"}))
        await attempt("read_etc", lambda: call("read_file", {"path": "/etc/passwd"}))
        await attempt("delete_repo", lambda: call("delete_repo", {"repo": "prod"}))

        resources = await c.list_resources()
        emit("list_resources", uris=sorted(str(r.uri) for r in resources.resources))

        async def read(uri):
            r = await c.read_resource(uri)
            return {"text": "".join(getattr(x, "text", "") for x in r.contents)}

        await attempt("read_guide", lambda: read("docs://guide"))
        await attempt("read_keys", lambda: read("secret://keys"))

        prompts = await c.list_prompts()
        emit("list_prompts", prompts=sorted(p.name for p in prompts.prompts))

        async def prompt():
            r = await c.get_prompt("summarize", {"text": "x"})
            return {"messages": len(r.messages)}

        await attempt("get_prompt", prompt)


def messages_of(response):
    """The JSON-RPC messages of a response: a JSON body (one or a list) or SSE events."""
    ctype = response.headers.get("content-type", "")
    if ctype.startswith("text/event-stream"):
        out = []
        for event in response.text.replace("\r\n", "\n").split("\n\n"):
            data = "\n".join(
                line[5:].lstrip(" ") for line in event.split("\n") if line.startswith("data:")
            )
            if data.strip():
                out.append(json.loads(data))
        return out
    if not response.content:
        return []
    body = response.json()
    return body if isinstance(body, list) else [body]


def raw(url):
    import httpx

    accept = {"accept": "application/json, text/event-stream"}
    with httpx.Client(timeout=TIMEOUT) as h:
        init = h.post(
            url,
            headers=accept,
            json={
                "jsonrpc": "2.0",
                "id": 1,
                "method": "initialize",
                "params": {
                    "protocolVersion": "2025-06-18",
                    "capabilities": {},
                    "clientInfo": {"name": "raw", "version": "1"},
                },
            },
        )
        session = init.headers.get("mcp-session-id")
        emit("initialize", status=init.status_code, session=bool(session))
        headers = dict(accept)
        if session:
            headers["mcp-session-id"] = session
        headers["mcp-protocol-version"] = "2025-06-18"

        def post(step, body, **kw):
            r = h.post(url, headers=headers, **({"json": body} if kw.get("raw") is None else {"content": kw["raw"]}))
            emit(
                step,
                status=r.status_code,
                content_type=r.headers.get("content-type", ""),
                messages=messages_of(r) if r.status_code != 202 else [],
            )

        post("initialized", {"jsonrpc": "2.0", "method": "notifications/initialized"})

        def call(id, tool, **arguments):
            return {
                "jsonrpc": "2.0",
                "id": id,
                "method": "tools/call",
                "params": {"name": tool, "arguments": arguments},
            }

        # One allowed and one refused call: the server gets only the first.
        post("batch_mixed", [call(10, "search_docs", query="batch"), call(11, "delete_repo", repo="x")])
        # Everything refused: the gateway answers alone.
        post("batch_denied", [call(12, "delete_repo", repo="y"), call("thirteen", "read_secrets")])
        # A refused call sent as a notification (no id): nothing to answer, nothing forwarded.
        post("denied_notification", {"jsonrpc": "2.0", "method": "tools/call", "params": {"name": "delete_repo", "arguments": {"repo": "z"}}})
        # A list inside a batch with a refused call.
        post("batch_list", [{"jsonrpc": "2.0", "id": 20, "method": "tools/list"}, call(21, "delete_repo", repo="w")])
        # Not JSON-RPC at all.
        post("not_jsonrpc", None, raw=b"hello")
        post("wrong_version", {"jsonrpc": "1.0", "id": 30, "method": "tools/call", "params": {"name": "search_docs", "arguments": {"query": "v"}}})
        # The server's own stream and the end of the session pass through.
        if session:
            r = h.delete(url, headers=headers)
            emit("delete_session", status=r.status_code)


def main():
    mode, url = sys.argv[1], sys.argv[2]
    if mode == "sdk":
        asyncio.run(sdk(url))
    else:
        raw(url)


if __name__ == "__main__":
    main()
