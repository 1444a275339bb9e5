"""The official `openai` Python SDK, unmodified: default base URL, default HTTP client.
Everything about the network comes from the environment, as for an agent in a pod:

  OPENAI_API_KEY   the agent-side key (a dummy the gateway replaces)
  HTTPS_PROXY      e.g. http://127.0.0.1:<sidecar port>
  SSL_CERT_FILE    the CA bundle to trust (the gateway's interception CA)
  OPENAI_BASE_URL  only when a test talks to a fake directly (no gateway)
and sdk_steps.py's EGRESS_TEST_MODEL, EGRESS_TEST_DENIED_MODEL, EGRESS_TEST_TIMEOUT.

Prints one JSON line per step (completion, stream, denied); exits 0 when all are ok.
max_retries=0 (a client option, not a transport change) makes errors surface at once.
"""

import functools

import openai

import sdk_steps

MODEL = sdk_steps.env("EGRESS_TEST_MODEL", "gpt-4o-mini")


@functools.cache
def client():
    # One client for every step, as an agent keeps one: its connection is reused.
    return openai.OpenAI(max_retries=0, timeout=sdk_steps.timeout())


def completion():
    r = client().chat.completions.create(model=MODEL, messages=sdk_steps.PROMPT)
    usage = r.usage.model_dump() if r.usage else None
    return {"text": r.choices[0].message.content, "model": r.model, "usage": usage}


def stream():
    text, chunks, model = "", 0, None
    for chunk in client().chat.completions.create(
        model=MODEL, messages=sdk_steps.PROMPT, stream=True
    ):
        model = model or chunk.model
        for choice in chunk.choices:
            if choice.delta and choice.delta.content:
                text += choice.delta.content
                chunks += 1
    return {"text": text, "chunks": chunks, "model": model}


def denied():
    r = client().chat.completions.create(
        model=sdk_steps.env("EGRESS_TEST_DENIED_MODEL"), messages=sdk_steps.PROMPT
    )
    return {"model": r.model}


if __name__ == "__main__":
    sdk_steps.main(
        [("completion", completion), ("stream", stream), ("denied", denied)],
        openai.PermissionDeniedError,
    )
