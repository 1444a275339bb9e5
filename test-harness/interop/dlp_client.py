"""The official `openai` Python SDK, unmodified, against a pathway with `inspect`:
default base URL and HTTP client; the network comes from the environment
(HTTPS_PROXY, SSL_CERT_FILE, OPENAI_API_KEY) as for an agent in a pod.

Steps (one JSON line each, as sdk_steps.py prints them):
  leak      a prompt carrying an AWS access key ID: the SDK must raise
            PermissionDeniedError (403) whose message names the detector
  answer    a clean prompt: the answer, as the agent sees it after response redaction
  stream    the same, streamed
"""

import functools

import openai

import sdk_steps

MODEL = sdk_steps.env("EGRESS_TEST_MODEL", "gpt-4o-mini")
LEAKED = "AKIAQ3EGRXMPLE7KD2VA"


@functools.cache
def client():
    return openai.OpenAI(max_retries=0, timeout=sdk_steps.timeout())


def leak():
    try:
        client().chat.completions.create(
            model=MODEL,
            messages=[{"role": "user", "content": f"store this: {LEAKED}"}],
        )
    except openai.PermissionDeniedError as e:
        return {"ok": True, "status": e.status_code, "message": str(e),
                "body_error": sdk_steps.body_error(e)}
    return {"ok": False, "error": "the leaking prompt was answered"}


def answer():
    r = client().chat.completions.create(model=MODEL, messages=sdk_steps.PROMPT)
    return {"ok": True, "text": r.choices[0].message.content}


def stream():
    text = ""
    for chunk in client().chat.completions.create(
        model=MODEL, messages=sdk_steps.PROMPT, stream=True
    ):
        for choice in chunk.choices:
            if choice.delta and choice.delta.content:
                text += choice.delta.content
    return {"ok": True, "text": text}


if __name__ == "__main__":
    code = 0
    for name, fn in [("leak", leak), ("answer", answer), ("stream", stream)]:
        try:
            line = {"step": name, **fn()}
        except Exception as e:  # noqa: BLE001 - every failure becomes a JSON line
            line = {"step": name, "ok": False, "error": repr(e)}
        code = code if line["ok"] else 1
        sdk_steps.emit(line)
    raise SystemExit(code)
