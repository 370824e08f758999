"""What both `kslm serve` backends share in front of their app: the API key, a body size limit, and the checks on a
request body that llama-cpp-python's server leaves out (it ignores an unknown model and reads max_tokens <= 0 as
"up to the context"), each answered with an OpenAI-style JSON error, never a traceback.

A plain ASGI wrapper (no framework): it reads a POST body once, checks it, and hands the same bytes on.
"""
from __future__ import annotations

import hmac
import json
import logging

log = logging.getLogger("kslm")

GENERATION_PATHS = ("/v1/completions", "/v1/chat/completions")


def error_body(message: str, kind: str = "invalid_request_error", param: str | None = None,
               code: str | None = None) -> dict:
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


async def send_json(send, status: int, payload: dict, headers: list | None = None) -> None:
    body = json.dumps(payload, ensure_ascii=False).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                            *(headers or [])]})
    await send({"type": "http.response.body", "body": body})


def check_body(body: dict, model_name: str) -> tuple[int, dict] | None:
    """(status, error) for a generation request body the server must refuse, else None."""
    model = body.get("model")
    if model is not None and model != model_name:
        return 404, error_body(f"The model `{model}` does not exist; this server serves `{model_name}` "
                               "(GET /v1/models)", param="model", code="model_not_found")
    for key, low, high in (("max_tokens", 1, None), ("temperature", 0, 2), ("top_p", 0, 1), ("seed", None, None)):
        v = body.get(key)
        if v is None:
            continue
        if isinstance(v, bool) or not isinstance(v, (int, float)) or (key in ("max_tokens", "seed")
                                                                     and not isinstance(v, int)):
            return 400, error_body(f"`{key}` must be a number, got {json.dumps(v)[:40]}", param=key,
                                   code="invalid_value")
        if (low is not None and v < low) or (high is not None and v > high):
            bounds = f"at least {low}" if high is None else f"between {low} and {high}"
            return 400, error_body(f"`{key}` must be {bounds}, got {v}", param=key, code="invalid_value")
    stop = body.get("stop")
    if stop is not None and not (isinstance(stop, str) or (isinstance(stop, list)
                                                           and all(isinstance(s, str) for s in stop))):
        return 400, error_body("`stop` must be a string or a list of strings", param="stop", code="invalid_value")
    return None


class Guard:
    """ASGI middleware: 401 without the API key, 413 past max_body bytes, 400/404 for bodies check_body refuses."""

    def __init__(self, app, model_name: str, api_key: str | None = None, max_body: int = 1 << 20,
                 defaults: dict | None = None):
        self.app, self.model_name, self.api_key, self.max_body = app, model_name, api_key, max_body
        self.defaults = defaults or {}  # body keys set when a request leaves them out

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = dict(scope.get("headers") or [])
        if self.api_key is not None:
            given = headers.get(b"authorization", b"").decode("latin-1")
            if not hmac.compare_digest(given.encode(), f"Bearer {self.api_key}".encode()):
                return await send_json(send, 401, error_body("Invalid or missing API key (Authorization: Bearer KEY)",
                                                             "authentication_error", code="invalid_api_key"),
                                       [(b"www-authenticate", b"Bearer")])
        if scope["method"] != "POST":
            return await self.app(scope, receive, send)
        length = headers.get(b"content-length")
        if length is not None and length.isdigit() and int(length) > self.max_body:
            return await self._too_large(send)
        chunks, size = [], 0
        while True:
            msg = await receive()
            if msg["type"] == "http.disconnect":
                return None
            chunks.append(msg.get("body", b""))
            size += len(chunks[-1])
            if size > self.max_body:
                return await self._too_large(send)
            if not msg.get("more_body"):
                break
        raw = b"".join(chunks)
        if scope["path"] in GENERATION_PATHS:
            try:
                body = json.loads(raw)
            except (ValueError, UnicodeDecodeError) as e:
                return await send_json(send, 400, error_body(f"The body is not valid JSON: {e}",
                                                             code="invalid_json"))
            if not isinstance(body, dict):
                return await send_json(send, 400, error_body("The body must be a JSON object", code="invalid_json"))
            refused = check_body(body, self.model_name)
            if refused:
                return await send_json(send, *refused)
            if any(k not in body for k in self.defaults):
                raw = json.dumps({**self.defaults, **body}).encode()
                scope = {**scope, "headers": [(k, v) for k, v in scope["headers"] if k != b"content-length"]
                         + [(b"content-length", str(len(raw)).encode())]}
        replayed = False

        async def replay():
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": raw, "more_body": False}
            return await receive()  # afterwards only http.disconnect, which streaming responses watch for

        return await self.app(scope, replay, send)

    async def _too_large(self, send):
        return await send_json(send, 413, error_body(f"The body is over the server's limit of {self.max_body} bytes",
                                                     code="request_too_large"))


def run(app, host: str, port: int) -> None:
    """uvicorn until SIGINT/SIGTERM; its access log off (one line per token request would drown our own)."""
    import uvicorn
    log.info("serving on http://%s:%d/v1", host, port)
    uvicorn.run(app, host=host, port=port, log_level="warning", access_log=False)
