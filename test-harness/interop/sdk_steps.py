"""Shared by openai_client.py and anthropic_client.py: runs the steps and prints one
JSON line per step to stdout.

Environment:
  EGRESS_TEST_MODEL         the model the gateway allows (a default per SDK otherwise)
  EGRESS_TEST_DENIED_MODEL  a model the gateway refuses; empty or unset skips that step
  EGRESS_TEST_TIMEOUT       seconds per SDK call (default 30)
"""

import json
import os
import sys

PROMPT = [{"role": "user", "content": "Say hello."}]


def env(name, default=""):
    return os.environ.get(name, "").strip() or default


def timeout():
    return float(env("EGRESS_TEST_TIMEOUT", "30"))


def emit(line):
    print(json.dumps(line), flush=True)


def body_error(e):
    """The response body's `error.type` ("egress_denied" from the gateway), read from
    the response itself: the SDKs differ in what they keep as `e.body`."""
    try:
        body = e.response.json()
    except Exception:  # noqa: BLE001 - no response, or not JSON
        return None
    error = body.get("error") if isinstance(body, dict) else None
    return error.get("type") if isinstance(error, dict) else error


def run(steps, permission_denied_error):
    """steps: [(name, fn)] where fn() returns the fields of a successful line; the
    "denied" step's fn must raise. Returns the exit code."""
    all_ok = True
    denied_model = env("EGRESS_TEST_DENIED_MODEL")
    for name, fn in steps:
        if name == "denied" and not denied_model:
            emit({"step": name, "ok": True, "skipped": True})
            continue
        try:
            fields = fn()
            if name == "denied":
                line = {
                    "step": name,
                    "ok": False,
                    "error": f"the denied model {denied_model!r} was answered: {fields}",
                }
            else:
                line = {"step": name, "ok": True, **fields}
        except permission_denied_error as e:
            status = getattr(e, "status_code", None)
            line = {"step": name, "ok": name == "denied" and status == 403, "status": status,
                    "message": str(e), "body_error": body_error(e)}
            if not line["ok"]:
                line["error"] = repr(e)
        except Exception as e:  # noqa: BLE001 - every failure becomes a JSON line
            line = {"step": name, "ok": False, "error": repr(e)}
            status = getattr(e, "status_code", None)
            if status is not None:
                line["status"] = status
        all_ok = all_ok and line["ok"]
        emit(line)
    return 0 if all_ok else 1


def main(steps, permission_denied_error):
    sys.exit(run(steps, permission_denied_error))
