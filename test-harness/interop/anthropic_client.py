"""The official `anthropic` Python SDK, unmodified: default base URL, default HTTP
client. Everything about the network comes from the environment, as for an agent in a
pod:

  ANTHROPIC_API_KEY   the agent-side key (a dummy the gateway replaces)
  HTTPS_PROXY         e.g. http://127.0.0.1:<sidecar port>
  SSL_CERT_FILE       the CA bundle to trust (the gateway's interception CA)
  ANTHROPIC_BASE_URL  only when a test talks to a fake directly (no gateway)
and sdk_steps.py's EGRESS_TEST_MODEL, EGRESS_TEST_DENIED_MODEL, EGRESS_TEST_TIMEOUT.

Prints one JSON line per step (completion, stream, denied); exits 0 when all are ok.
max_retries=0 (a client option, not a transport change) makes errors surface at once.
"""

import functools

import anthropic

import sdk_steps

MODEL = sdk_steps.env("EGRESS_TEST_MODEL", "claude-haiku-4-5")
MAX_TOKENS = 64


@functools.cache
def client():
    # One client for every step, as an agent keeps one: its connection is reused.
    return anthropic.Anthropic(max_retries=0, timeout=sdk_steps.timeout())


def completion():
    r = client().messages.create(model=MODEL, max_tokens=MAX_TOKENS, messages=sdk_steps.PROMPT)
    text = "".join(b.text for b in r.content if b.type == "text")
    usage = {"input_tokens": r.usage.input_tokens, "output_tokens": r.usage.output_tokens}
    return {"text": text, "model": r.model, "usage": usage}


def stream():
    text, chunks = "", 0
    with client().messages.stream(
        model=MODEL, max_tokens=MAX_TOKENS, messages=sdk_steps.PROMPT
    ) as s:
        for delta in s.text_stream:
            text += delta
            chunks += 1
        final = s.get_final_message()
    usage = {"input_tokens": final.usage.input_tokens, "output_tokens": final.usage.output_tokens}
    return {"text": text, "chunks": chunks, "model": final.model,
            "stop_reason": final.stop_reason, "usage": usage}


def denied():
    r = client().messages.create(
        model=sdk_steps.env("EGRESS_TEST_DENIED_MODEL"),
        max_tokens=MAX_TOKENS,
        messages=sdk_steps.PROMPT,
    )
    return {"model": r.model}


if __name__ == "__main__":
    sdk_steps.main(
        [("completion", completion), ("stream", stream), ("denied", denied)],
        anthropic.PermissionDeniedError,
    )
