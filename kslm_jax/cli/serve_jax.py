"""`kslm serve --backend jax`: the OpenAI routes of llama-cpp-python's server over our KV-cache decoder.

One thread owns the model. Requests that wait when it is free (up to max_batch) become one batch: prompts are
left-padded to a shared length (the cache's per-row offset hides the padding) and decoded together, one step for
all rows; each row samples with its own temperature, top_p and seed-derived key, split per step as
eval/generate.py does, so a request decodes the same alone or in company. Requests arriving during a batch wait
for the next (at most max_queue of them; more are refused with 429).
"""

# No `from __future__ import annotations`: FastAPI reads the handlers' annotations (Request), imported locally.
import asyncio
import functools
import json
import logging
import queue
import random
import threading
import time
import uuid

import jax
import jax.numpy as jnp
import numpy as np

from kslm_jax.cli import serve_http
from kslm_jax.data import chat
from kslm_jax.eval import generate as gen
from kslm_jax.model import llama

log = logging.getLogger("kslm")


@functools.partial(jax.jit, static_argnames=("vocab_limit",))
def _sample_rows(logits, rngs, temperature, top_p, *, vocab_limit: int):
    """Per row: split its key as generate_ids does, then sample with the row's own settings."""
    pairs = jax.vmap(jax.random.split)(rngs)
    one = functools.partial(gen.sample, top_k=0, vocab_limit=vocab_limit)
    ids = jax.vmap(lambda lg, k, t, p: one(lg[None], k, t, p)[0])(logits, pairs[:, 1], temperature, top_p)
    return ids, pairs[:, 0]


class Job:
    """One request: its prompt ids and settings in, events out (to the event loop that waits on them)."""

    def __init__(self, ids, max_new, temperature, top_p, seed, stop, loop):
        self.ids, self.max_new, self.temperature, self.top_p = ids, max_new, temperature, top_p
        self.seed, self.stop, self.loop = seed, stop, loop
        self.events: asyncio.Queue = asyncio.Queue()
        self.out: list[int] = []
        self.sent = ""
        self.cancelled = False
        self.done = False

    def emit(self, *event):
        self.loop.call_soon_threadsafe(self.events.put_nowait, event)


class Engine:
    def __init__(self, model: llama.Transformer, params, sp, stop_ids, n_ctx: int, max_batch: int = 8,
                 max_queue: int = 64):
        self.model, self.params, self.sp, self.stop_ids, self.n_ctx = model, params, sp, set(stop_ids), n_ctx
        self.max_batch = max_batch
        self.waiting: queue.Queue = queue.Queue(maxsize=max_queue)
        self.thread = threading.Thread(target=self._loop, name="kslm-serve-decoder", daemon=True)
        self.thread.start()

    def submit(self, job: Job) -> bool:
        try:
            self.waiting.put_nowait(job)
            return True
        except queue.Full:
            return False

    def close(self):
        self.waiting.put(None)

    def _loop(self):
        while True:
            job = self.waiting.get()
            if job is None:
                return
            batch = [job]
            while len(batch) < self.max_batch:
                try:
                    more = self.waiting.get_nowait()
                except queue.Empty:
                    break
                if more is None:
                    self.waiting.put(None)
                    break
                batch.append(more)
            batch = [j for j in batch if not j.cancelled]
            try:
                if batch:
                    self._decode(batch)
            except Exception as e:  # a failed batch ends its requests with a 500, never the server
                log.exception("decoding failed")
                for j in batch:
                    j.emit("error", f"{type(e).__name__}: {e}")

    def _decode(self, jobs: list[Job]):
        # Shapes come in buckets (rows a power of two, prompt length a multiple of 16) so that a new mix of
        # requests rarely compiles a new program.
        rows = 1 << (len(jobs) - 1).bit_length()
        width = -(-max(len(j.ids) for j in jobs) // 16) * 16
        steps = max(j.max_new for j in jobs)
        tokens = np.zeros((rows, width), np.int32)
        offset = np.full((rows,), width, np.int32)
        temperature = np.zeros((rows,), np.float32)
        top_p = np.ones((rows,), np.float32)
        rngs = np.zeros((rows, 2), np.uint32)
        for i, j in enumerate(jobs):
            offset[i] = width - len(j.ids)
            tokens[i, offset[i]:] = j.ids
            temperature[i], top_p[i] = j.temperature, j.top_p
            rngs[i] = np.asarray(jax.random.key_data(jax.random.PRNGKey(j.seed)))
        cache = llama.init_cache(self.model.c, rows, gen.cache_len(width + steps), jnp.float32)
        cache["offset"] = jnp.asarray(offset)
        positions = np.arange(width, dtype=np.int32)[None] - offset[:, None]
        logits, cache = gen.forward_cached(self.model, self.params, jnp.asarray(tokens), jnp.asarray(positions),
                                           cache)
        last, rngs = logits[:, -1], jnp.asarray(rngs)
        pos = width - offset
        limit = self.sp.GetPieceSize()
        for _ in range(steps):
            nxt, rngs = _sample_rows(last, rngs, jnp.asarray(temperature), jnp.asarray(top_p), vocab_limit=limit)
            nxt = np.asarray(nxt)
            for i, j in enumerate(jobs):
                if not j.done:
                    self._advance(j, int(nxt[i]))
            if all(j.done for j in jobs):
                return
            logits, cache = gen.forward_cached(self.model, self.params, jnp.asarray(nxt[:, None]),
                                               jnp.asarray(pos[:, None]), cache)
            last, pos = logits[:, -1], pos + 1

    def _advance(self, j: Job, token: int):
        if j.cancelled:
            j.done = True
            return
        finish = None
        if token in self.stop_ids:
            finish = "stop"
        else:
            j.out.append(token)
        text = self._text(j)
        for s in j.stop:
            at = text.find(s)
            if at >= 0:
                text, finish = text[:at], "stop"
        if finish is None and len(j.out) >= j.max_new:
            finish = "length"
        if finish is None:  # hold back what could still become a stop string
            text = text[:len(text) - max((len(s) - 1 for s in j.stop), default=0)]
        # Bytes that are no UTF-8 (yet) are left out, as llama-cpp-python decodes with errors="ignore".
        text = text.replace("\ufffd", "")
        if len(text) > len(j.sent) and text.startswith(j.sent):
            j.emit("delta", text[len(j.sent):])
            j.sent = text
        if finish is not None:
            j.done = True
            j.emit("done", finish, len(j.ids), len(j.out))

    def _text(self, j: Job) -> str:
        # Decoded after the prompt's last token, so a leading word space survives as llama.cpp keeps it.
        anchor = self.sp.DecodeIds(j.ids[-1:])
        full = self.sp.DecodeIds(j.ids[-1:] + j.out)
        return full[len(anchor):] if full.startswith(anchor) else self.sp.DecodeIds(j.out)


def _error(status: int, message: str, param: str | None = None, code: str | None = None):
    from fastapi.responses import JSONResponse
    return JSONResponse(serve_http.error_body(message, param=param, code=code), status_code=status)


def make_app(engine: Engine, model_name: str, template: str, default_max_tokens: int = 16):
    """The FastAPI app: /v1/models, /v1/completions, /v1/chat/completions (answers shaped as llama-cpp-python's)."""
    from fastapi import FastAPI, Request
    from fastapi.responses import JSONResponse, StreamingResponse

    app = FastAPI(title="kslm serve (jax)")
    sp = engine.sp

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": model_name, "object": "model", "owned_by": "me",
                                            "permissions": []}]}

    @app.post("/v1/completions")
    async def completions(request: Request):
        body = await request.json()
        prompt = body.get("prompt", "")
        if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
            prompt = prompt[0]
        if not isinstance(prompt, str):
            return _error(400, "`prompt` must be one string", "prompt", "invalid_value")
        return await _answer(body, chat.encode(sp, prompt), False, default_max_tokens)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        body = await request.json()
        messages = body.get("messages")
        if not (isinstance(messages, list) and messages and all(
                isinstance(m, dict) and isinstance(m.get("content"), str) and isinstance(m.get("role"), str)
                for m in messages)):
            return _error(400, "`messages` must be a non-empty list of {role, content} with string content",
                          "messages", "invalid_value")
        return await _answer(body, chat.encode(sp, chat.render(template, messages)), True, None)

    async def _answer(body: dict, ids: list[int], is_chat: bool, default_max):
        if len(ids) >= engine.n_ctx:
            kind = "messages" if is_chat else "prompt"
            return _error(400, f"This model's maximum context length is {engine.n_ctx} tokens; the {kind} has "
                          f"{len(ids)}. Please reduce the length of the {kind}.", kind, "context_length_exceeded")
        room = engine.n_ctx - len(ids)
        max_new = min(body.get("max_tokens") or default_max or room, room)
        stop = body.get("stop") or []
        seed = body.get("seed")
        job = Job(ids, max_new, float(body.get("temperature", 0.8)),
                  float(body.get("top_p", 0.95)), random.getrandbits(31) if seed is None else seed,
                  [stop] if isinstance(stop, str) else list(stop), asyncio.get_running_loop())
        if not engine.submit(job):
            return _error(429, "The server's queue is full; retry shortly", code="server_busy")
        ident = ("chatcmpl-" if is_chat else "cmpl-") + uuid.uuid4().hex
        created = int(time.time())
        if body.get("stream"):
            return StreamingResponse(_stream(job, ident, created, is_chat), media_type="text/event-stream")
        text, finish, usage = "", None, None
        try:
            while finish is None:
                event = await job.events.get()
                if event[0] == "error":
                    return _error(500, f"decoding failed: {event[1]}", code="internal_error")
                if event[0] == "delta":
                    text += event[1]
                else:
                    finish, usage = event[1], _usage(event[2], event[3])
        finally:
            job.cancelled = True  # a client gone before the end frees its row
        choice = ({"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": None,
                   "finish_reason": finish} if is_chat else
                  {"index": 0, "text": text, "logprobs": None, "finish_reason": finish})
        return JSONResponse({"id": ident, "object": "chat.completion" if is_chat else "text_completion",
                             "created": created, "model": model_name, "choices": [choice], "usage": usage})

    async def _stream(job: Job, ident: str, created: int, is_chat: bool):
        kind = "chat.completion.chunk" if is_chat else "text_completion"

        def chunk(text: str | None, finish: str | None, role: bool = False) -> str:
            if is_chat:
                delta = {"role": "assistant"} if role else ({"content": text} if text is not None else {})
                choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
            else:
                choice = {"index": 0, "text": text or "", "logprobs": None, "finish_reason": finish}
            data = {"id": ident, "object": kind, "created": created, "model": model_name, "choices": [choice]}
            return f"data: {json.dumps(data, ensure_ascii=False)}\n\n"

        try:
            if is_chat:
                yield chunk(None, None, role=True)
            while True:
                event = await job.events.get()
                if event[0] == "error":
                    yield f"data: {json.dumps(serve_http.error_body(event[1], 'server_error'))}\n\n"
                    break
                if event[0] == "delta":
                    yield chunk(event[1], None)
                else:
                    yield chunk(None, event[1])
                    break
            yield "data: [DONE]\n\n"
        finally:
            job.cancelled = True  # a client that left mid-stream: its row stops at the next step

    return app


def _usage(prompt: int, completion: int) -> dict:
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}
