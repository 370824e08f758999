"""`kslm serve`, both backends, through the official `openai` client and raw HTTP, on 127.0.0.1 only."""
import concurrent.futures
import http.client
import json
import os
import shutil
import socket
import threading
import time

import openai
import pytest
import uvicorn
from conftest import random_params
from extras import needs, optional

from kslm_jax.cli import serve
from kslm_jax.core import config as config_lib
from kslm_jax.data import chat
from kslm_jax.data import tokenizer as tok_lib
from kslm_jax.model import llama
from kslm_jax.objectives import finetune_io

gguf, llama_chat_format = optional("gguf"), optional("llama_cpp.llama_chat_format")
LLAMA = [needs("llamacpp", "llama_cpp"), needs("export", "gguf")]  # the llamacpp backend exports and runs a GGUF
BACKENDS = ["jax", pytest.param("llamacpp", marks=LLAMA)]

os.environ["NO_PROXY"] = "127.0.0.1,localhost"
PROMPTS = ["대한민국의 주권은", "국회는", "이 법은", "대통령은 법률이 정하는 바에 의하여"]
# Greedy F16 llama.cpp and float32 JAX agree token for token until two candidates come within F16 rounding of
# each other. The served weights are random with std 0.3 (peaked logits, varied text), which amplifies rounding:
# measured, all 4 prompts agree on 5 tokens and the 4th parts at the 6th, so the backends are compared on 5.
AGREE_TOKENS = 5


class Server:
    def __init__(self, app, stop):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning"))
        self.stop_worker = stop
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.time() + 60
        while not self.server.started:
            assert time.time() < deadline and self.thread.is_alive(), "server did not start"
            time.sleep(0.05)

    def client(self, key="unused", **kw):
        return openai.OpenAI(base_url=f"http://127.0.0.1:{self.port}/v1", api_key=key, max_retries=0, timeout=120,
                             **kw)

    def raw(self, method, path, body=b"", headers=None):
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=60)
        conn.request(method, path, body=body, headers={"Content-Type": "application/json", **(headers or {})})
        r = conn.getresponse()
        data = r.read()
        conn.close()
        return r.status, data

    def close(self):
        self.server.should_exit = True
        self.thread.join(30)
        self.stop_worker()


@pytest.fixture(scope="module")
def served(trained_tiny, tmp_path_factory):
    """The tiny model's shape and tokenizer with random weights (std 0.3): the 20-step model answers every
    prompt with spaces, which would let two backends agree on nothing; these weights give varied tokens."""
    wd = tmp_path_factory.mktemp("serve") / "run"
    shutil.copytree(trained_tiny.workdir, wd, ignore=shutil.ignore_patterns("checkpoints", "export"))
    _, params = random_params(llama.ModelConfig.from_config(trained_tiny.cfg), seed=1, std=0.3)
    finetune_io.save_plain(trained_tiny.cfg, params, wd, force=True)
    return config_lib.read_workdir_config(wd), wd


class Servers(dict):
    """One server per backend, started on first use, stopped at the end of the module."""

    def __init__(self, cfg, wd):
        super().__init__()
        self.cfg, self.wd = cfg, wd

    def __missing__(self, backend):
        opts = serve.Options(backend=backend, n_ctx=256, max_body=64 << 10, model_name="tiny", threads=2)
        self[backend] = Server(*serve.build_app(self.cfg, self.wd, opts))
        return self[backend]


@pytest.fixture(scope="module")
def servers(served):
    started = Servers(*served)
    try:
        yield started
    finally:
        for s in started.values():
            s.close()


@pytest.mark.parametrize("backend", BACKENDS)
def test_completion_chat_and_stream(servers, backend):
    c = servers[backend].client()
    assert [m.id for m in c.models.list().data] == ["tiny"]
    r = c.completions.create(model="tiny", prompt=PROMPTS[0], max_tokens=8, temperature=0)
    assert r.choices[0].finish_reason in ("length", "stop") and r.choices[0].text
    assert 0 < r.usage.completion_tokens <= 8 and r.usage.prompt_tokens > 1
    streamed = "".join(ch.choices[0].text for ch in c.completions.create(
        model="tiny", prompt=PROMPTS[0], max_tokens=8, temperature=0, stream=True))
    assert streamed == r.choices[0].text
    msg = [{"role": "user", "content": PROMPTS[1]}]
    chat = c.chat.completions.create(model="tiny", messages=msg, max_tokens=8, temperature=0)
    assert chat.choices[0].message.role == "assistant" and chat.choices[0].message.content
    parts = [ch.choices[0].delta.content or "" for ch in c.chat.completions.create(
        model="tiny", messages=msg, max_tokens=8, temperature=0, stream=True)]
    assert "".join(parts) == chat.choices[0].message.content
    # A stop string cuts the answer before it, in both backends.
    full = c.completions.create(model="tiny", prompt=PROMPTS[2], max_tokens=12, temperature=0).choices[0].text
    cut = next(ch for ch in full[2:] if not ch.isspace())
    stopped = c.completions.create(model="tiny", prompt=PROMPTS[2], max_tokens=12, temperature=0, stop=["@@", cut])
    assert stopped.choices[0].text == full[:full.index(cut)]
    assert stopped.choices[0].finish_reason == "stop"


@LLAMA[0]
@LLAMA[1]
def test_backends_give_the_same_greedy_text(served, servers):
    sp = tok_lib.load(served[1] / "tokenizer" / "spm.model")
    for prompt in PROMPTS:
        texts = [servers[b].client().completions.create(model="tiny", prompt=prompt, max_tokens=AGREE_TOKENS,
                                                        temperature=0).choices[0].text for b in ("jax", "llamacpp")]
        assert texts[0] == texts[1], prompt
    # Chats: the same prompt (BOS + the messages joined by newlines) and the same greedy answer.
    msgs = [{"role": "system", "content": "국회"}, {"role": "user", "content": PROMPTS[3]}]
    got = [servers[b].client().chat.completions.create(model="tiny", messages=msgs, max_tokens=AGREE_TOKENS,
                                                       temperature=0) for b in ("jax", "llamacpp")]
    assert got[0].usage.prompt_tokens == got[1].usage.prompt_tokens == 1 + len(sp.EncodeAsIds("국회\n" + PROMPTS[3]))
    assert got[0].choices[0].message.content == got[1].choices[0].message.content


@LLAMA[0]
@LLAMA[1]
def test_gguf_carries_our_chat_template(served, servers):
    """The template in the served GGUF, rendered by llama-cpp-python's formatter, gives our prompt text."""
    servers["llamacpp"]  # exports the GGUF
    cfg, wd = served
    field = gguf.GGUFReader(str(wd / "export" / "model-f16.gguf")).fields["tokenizer.chat_template"]
    template = bytes(field.parts[field.data[0]]).decode()
    assert template == chat.chat_template(cfg)
    for kind in ("none", "sft"):
        sft = config_lib.from_dict(config_lib.to_dict(cfg))
        with sft.unlocked():
            sft.finetune.kind = kind
        t = chat.chat_template(sft)
        msgs = [{"role": "system", "content": "헌법"}, {"role": "user", "content": "국회는?"},
                {"role": "assistant", "content": "입법부"}, {"role": "user", "content": "대통령은?"}]
        theirs = llama_chat_format.Jinja2ChatFormatter(template=t, eos_token="</s>", bos_token="<s>")(messages=msgs)
        want = ("헌법\n국회는?\n입법부\n대통령은?" if kind == "none" else
                "<|user|>헌법<|end|><|assistant|><|user|>국회는?<|end|><|assistant|>입법부<|end|>"
                "<|user|>대통령은?<|end|><|assistant|>")
        assert theirs.prompt == "<s>" + want and chat.render(t, msgs) == want


def _error(status, data, want_status, want_code=None):
    assert status == want_status, data
    assert b"Traceback" not in data
    err = json.loads(data)["error"]
    assert err["message"]
    if want_code:
        assert err["code"] == want_code


@pytest.mark.parametrize("backend", BACKENDS)
def test_bad_requests_get_openai_errors(servers, backend):
    s = servers[backend]
    c = s.client()
    _error(*s.raw("POST", "/v1/completions", b'{"prompt": "x", '), 400, "invalid_json")
    _error(*s.raw("POST", "/v1/chat/completions", b"[1, 2]"), 400, "invalid_json")
    with pytest.raises(openai.NotFoundError, match="model_not_found|does not exist"):
        c.completions.create(model="gpt-4", prompt="x", max_tokens=2)
    with pytest.raises(openai.BadRequestError, match="max_tokens"):
        c.completions.create(model="tiny", prompt="x", max_tokens=-1)
    with pytest.raises(openai.BadRequestError, match="context"):
        c.completions.create(model="tiny", prompt="대한민국 국회는 " * 200, max_tokens=2)
    with pytest.raises(openai.BadRequestError, match="context"):
        c.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "국회 " * 400}], max_tokens=2)
    big = json.dumps({"model": "tiny", "prompt": "가" * (80 << 10)}).encode()
    _error(*s.raw("POST", "/v1/completions", big), 413, "request_too_large")
    # A client that leaves mid-stream: the server carries on and answers the next request in full.
    sock = socket.create_connection(("127.0.0.1", s.port), timeout=60)
    body = json.dumps({"model": "tiny", "prompt": PROMPTS[0], "max_tokens": 200, "stream": True}).encode()
    sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                 + f"Content-Length: {len(body)}\r\n\r\n".encode() + body)
    seen = b""
    while b"data:" not in seen:
        part = sock.recv(4096)
        assert part, seen
        seen += part
    sock.close()
    r = c.completions.create(model="tiny", prompt=PROMPTS[1], max_tokens=8, temperature=0)
    assert r.usage.completion_tokens > 0
    status, data = s.raw("GET", "/v1/models")
    assert status == 200 and json.loads(data)["data"][0]["id"] == "tiny"


def test_api_key_is_checked_on_every_request(served):
    s = Server(*serve.build_app(*served,
                                serve.Options(backend="jax", n_ctx=256, api_key="sekrit", model_name="tiny")))
    try:
        for key in ("wrong", None):
            headers = {} if key is None else {"Authorization": f"Bearer {key}"}
            _error(*s.raw("GET", "/v1/models", headers=headers), 401, "invalid_api_key")
            _error(*s.raw("POST", "/v1/completions", b'{"prompt": "x"}', headers), 401)
        with pytest.raises(openai.AuthenticationError):
            s.client("wrong").models.list()
        ok = s.client("sekrit").completions.create(model="tiny", prompt="국회는", max_tokens=2)
        assert ok.usage.completion_tokens > 0
    finally:
        s.close()


@pytest.mark.parametrize("backend", BACKENDS)
def test_32_concurrent_clients_each_get_their_own_answer(servers, backend):
    """Distinct prompts and seeds, sampled at temperature 1: each answer must be the one the same request gets
    alone, so a lost, swapped or cross-seeded request fails."""
    s = servers[backend]
    asks = [dict(model="tiny", prompt=f"{PROMPTS[i % 4]} {i}", max_tokens=6, temperature=1.0, top_p=0.9, seed=i)
            for i in range(32)]
    alone = [s.client().completions.create(**a).choices[0].text for a in asks]
    assert len(set(alone)) > 16  # the seeds and prompts really give different continuations

    def one(i):
        return i, s.client().completions.create(**asks[i]).choices[0].text

    with concurrent.futures.ThreadPoolExecutor(32) as pool:
        got = dict(f.result(timeout=180) for f in [pool.submit(one, i) for i in range(32)])
    assert [got[i] for i in range(32)] == alone


def test_left_padded_rows_decode_as_if_alone(trained_tiny):
    """The cache offset that lets the jax backend batch prompts of different lengths: each padded row's logits,
    for the prompt and for a next token, equal those of the row decoded alone."""
    import jax.numpy as jnp
    import numpy as np

    from kslm_jax.eval import generate as gen
    t = trained_tiny
    prompts = [t.sp.EncodeAsIds(p)[:9] for p in PROMPTS[:3]]
    width = max(map(len, prompts))
    tokens = np.zeros((3, width), np.int32)
    offset = np.array([width - len(p) for p in prompts], np.int32)
    for i, p in enumerate(prompts):
        tokens[i, offset[i]:] = p
    cache = llama.init_cache(t.model.c, 3, 128)
    cache["offset"] = jnp.asarray(offset)
    positions = np.arange(width, dtype=np.int32)[None] - offset[:, None]
    logits, cache = gen.forward_cached(t.model, t.params, jnp.asarray(tokens), jnp.asarray(positions), cache)
    nxt = np.array([[5], [6], [7]], np.int32)
    step, _ = gen.forward_cached(t.model, t.params, jnp.asarray(nxt), jnp.asarray((width - offset)[:, None]), cache)
    for i, p in enumerate(prompts):
        alone, c1 = gen.forward_cached(t.model, t.params, jnp.asarray([p]),
                                       jnp.arange(len(p), dtype=jnp.int32)[None], llama.init_cache(t.model.c, 1, 128))
        np.testing.assert_allclose(logits[i, offset[i]:], alone[0], atol=1e-4)
        one, _ = gen.forward_cached(t.model, t.params, jnp.asarray(nxt[i:i + 1]),
                                    jnp.asarray([[len(p)]], jnp.int32), c1)
        np.testing.assert_allclose(step[i], one[0], atol=1e-4)
