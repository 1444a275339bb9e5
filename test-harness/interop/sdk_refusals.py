"""What an agent's logs show when the gateway refuses: the official `openai` or
`anthropic` Python SDK, unmodified (default base URL, default HTTP client, proxy and CA
from the environment as in openai_client.py), gets a 403 for a model its pathway does
not list and, once the token budget is spent, a 429. Prints one JSON line per step with
the exception's status and `str(e)`:

  python sdk_refusals.py openai|anthropic

and sdk_steps.py's EGRESS_TEST_MODEL, EGRESS_TEST_DENIED_MODEL, EGRESS_TEST_TIMEOUT.
max_retries=0 (a client option, not a transport change): the SDKs retry 429 otherwise.
"""

import sys

import sdk_steps

MAX_CALLS = 20


def client_for(which):
    if which == "openai":
        import openai

        client = openai.OpenAI(max_retries=0, timeout=sdk_steps.timeout())

        def call(model):
            return client.chat.completions.create(model=model, messages=sdk_steps.PROMPT)

        return call, openai.PermissionDeniedError, openai.RateLimitError
    import anthropic

    client = anthropic.Anthropic(max_retries=0, timeout=sdk_steps.timeout())

    def call(model):
        return client.messages.create(model=model, max_tokens=64, messages=sdk_steps.PROMPT)

    return call, anthropic.PermissionDeniedError, anthropic.RateLimitError


def main():
    call, denied_error, limited_error = client_for(sys.argv[1])
    ok = True
    try:
        call(sdk_steps.env("EGRESS_TEST_DENIED_MODEL"))
        sdk_steps.emit({"step": "denied", "ok": False, "error": "the denied model was answered"})
        ok = False
    except denied_error as e:
        sdk_steps.emit({"step": "denied", "ok": True, "status": e.status_code, "message": str(e)})
    except Exception as e:  # noqa: BLE001 - every failure becomes a JSON line
        sdk_steps.emit({"step": "denied", "ok": False, "error": repr(e)})
        ok = False

    answered = 0
    line = {"step": "limited", "ok": False, "error": f"no 429 after {MAX_CALLS} calls"}
    for _ in range(MAX_CALLS):
        try:
            call(sdk_steps.env("EGRESS_TEST_MODEL"))
            answered += 1
        except limited_error as e:
            line = {"step": "limited", "ok": True, "status": e.status_code, "message": str(e),
                    "answered": answered}
            break
        except Exception as e:  # noqa: BLE001
            line = {"step": "limited", "ok": False, "error": repr(e), "answered": answered}
            break
    sdk_steps.emit(line)
    ok = ok and line["ok"]
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
