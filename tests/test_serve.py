"""`perseus serve`: the OpenAI client against a live server on a free loopback port.

Each server here runs the fp32 export of the tiny checkpoint in a background thread (started and
stopped by its fixture). Answers are checked token for token against `perseus_edge.load` running
the same request alone, so batching several requests into one decode step changes nothing.
"""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import textwrap
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

import perseus_edge

pytest.importorskip("onnx")
pytest.importorskip("torch")
openai = pytest.importorskip("openai")
try:
    import httpx
except ImportError:  # openai >= 3 ships the same client as httpx2
    httpx = pytest.importorskip("httpx2")
pytest.importorskip("starlette")
pytest.importorskip("uvicorn")

from perseus_edge.serve import Limits, Server, load  # noqa: E402
from perseus_edge.serve.protocol import Message, chat_prompt  # noqa: E402

NAME = "tiny"
GREEDY = dict(temperature=0.0, extra_body={"ignore_eos": True})
PROMPTS = ["Once upon a time", "The old captain looked at the sea and said", "It was",
           "Chapter I. The House on the Hill", "She opened the door and", "In the morning the",
           "He had never seen", "A long way from home, the children"]


@pytest.fixture(scope="module")
def folder(make_checkpoint, tmp_path_factory):
    from perseus_edge.build import export_checkpoint

    return export_checkpoint(make_checkpoint("moe-mla-rope"), tmp_path_factory.mktemp("serve") / "onnx")


@pytest.fixture(scope="module")
def lm(folder):
    return perseus_edge.load(folder, threads=1)


def start(folder, **kw) -> Server:
    limits = kw.pop("limits", Limits(max_body_bytes=64 << 10, max_prompt_tokens=100, max_tokens=64))
    return Server(load(folder, model_name=NAME, threads=1, limits=limits, **kw), port=0)


@pytest.fixture(scope="module")
def server(folder):
    with start(folder, slots=4) as s:
        yield s


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)


def single(lm, prompt, n, **kw) -> str:
    return lm.generate(prompt, n, ignore_eos=True, **kw)


class Gate:
    """Wraps Model.forward so that a test decides when the engine may run, and how fast."""

    def __init__(self, engine, delay: float = 0.0):
        self.open, self.delay, self.forward = threading.Event(), delay, engine.model.forward
        engine.model.forward = self

    def __call__(self, *a, **kw):
        self.open.wait()
        time.sleep(self.delay)
        return self.forward(*a, **kw)


def _wait(cond, timeout=10.0) -> bool:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if cond():
            return True
        time.sleep(0.02)
    return False


# ----------------------------------------------------------------------------- happy paths
def test_models_and_health(client, server):
    assert [m.id for m in client.models.list().data] == [NAME]
    assert client.models.retrieve(NAME).id == NAME
    health = httpx.get(server.url + "/health").json()
    assert health["status"] == "ok" and health["slots"] == 4 and health["running"] == 0


def test_completion_matches_the_api(client, lm):
    r = client.completions.create(model=NAME, prompt=PROMPTS[1], max_tokens=16, **GREEDY)
    assert r.object == "text_completion" and r.model == NAME and r.id.startswith("cmpl-")
    assert r.choices[0].text == single(lm, PROMPTS[1], 16, temperature=0.0)
    assert r.choices[0].finish_reason == "length"
    n = len(lm.encode(PROMPTS[1]))
    assert (r.usage.prompt_tokens, r.usage.completion_tokens, r.usage.total_tokens) == (n, 16, n + 16)
    echo = client.completions.create(model=NAME, prompt=PROMPTS[1], max_tokens=16, echo=True, **GREEDY)
    assert echo.choices[0].text == PROMPTS[1] + r.choices[0].text
    ids = client.completions.create(model=NAME, prompt=lm.encode(PROMPTS[1]), max_tokens=16, **GREEDY)
    assert ids.choices[0].text == r.choices[0].text  # a prompt given as token ids


def test_streaming_completion(client, lm):
    chunks = list(client.completions.create(model=NAME, prompt=PROMPTS[0], max_tokens=20, stream=True,
                                            stream_options={"include_usage": True}, **GREEDY))
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    assert text == single(lm, PROMPTS[0], 20, temperature=0.0)
    assert sum(1 for c in chunks if c.choices and c.choices[0].text) > 1  # really streamed
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 20


def test_sse_framing(server):
    body = {"model": NAME, "prompt": "Once", "max_tokens": 3, "stream": True, "temperature": 0}
    with httpx.stream("POST", server.url + "/v1/completions", json=body) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        lines = [line for line in r.iter_lines() if line]
    assert all(line.startswith("data: ") for line in lines) and lines[-1] == "data: [DONE]"
    assert json.loads(lines[-2][6:])["choices"][0]["finish_reason"] in ("length", "stop")


def test_chat_template_and_reply(client, lm):
    msgs = [{"role": "system", "content": "A story."}, {"role": "user", "content": "Tell me"},
            {"role": "assistant", "content": "Once"}, {"role": "user", "content": [{"type": "text", "text": "More"}]}]
    prompt = chat_prompt([Message(**m) for m in msgs])
    assert prompt == "A story.\n\nUser: Tell me\nAssistant: Once\nUser: More\nAssistant:"
    expect = lm.generate(prompt, 24, temperature=0.0, stop=["\nUser:"]).lstrip(" ")
    r = client.chat.completions.create(model=NAME, messages=msgs, max_tokens=24, temperature=0)
    assert r.object == "chat.completion" and r.choices[0].message.role == "assistant"
    assert r.choices[0].message.content == expect
    assert r.usage.prompt_tokens == len(lm.encode(prompt))
    chunks = list(client.chat.completions.create(model=NAME, messages=msgs, max_completion_tokens=24,
                                                 temperature=0, stream=True))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == expect
    assert chunks[-1].choices[0].finish_reason == r.choices[0].finish_reason


def test_sampling_params_and_seed(client, lm):
    kw = dict(temperature=0.9, top_p=0.95, seed=7)
    extra = {"top_k": 40, "repetition_penalty": 1.1, "ignore_eos": True}
    a = client.completions.create(model=NAME, prompt=PROMPTS[0], max_tokens=24, extra_body=extra, **kw)
    b = client.completions.create(model=NAME, prompt=PROMPTS[0], max_tokens=24, extra_body=extra, **kw)
    assert a.choices[0].text == b.choices[0].text == single(
        lm, PROMPTS[0], 24, top_k=40, repetition_penalty=1.1, **kw)


def test_stop_string(client, lm):
    full = single(lm, PROMPTS[2], 30, temperature=0.0)
    stop = full[6:9]
    r = client.completions.create(model=NAME, prompt=PROMPTS[2], max_tokens=30, stop=[stop], **GREEDY)
    assert r.choices[0].text == full[:full.index(stop)] and r.choices[0].finish_reason == "stop"


def test_concurrent_requests_decode_together(folder, lm):
    """8 clients at once on 4 slots: every answer equals its request run alone, though steps were
    batched and finished requests' slots were refilled (moving the last slot's sequence down)."""
    lengths = [12, 30, 7, 25, 18, 8, 40, 22]
    with start(folder, slots=4) as s:
        model, moves = s.app.engine.model, []
        copy_slot = model.copy_slot
        model.copy_slot = lambda src, dst, n: (moves.append((src, dst)), copy_slot(src, dst, n))
        client = openai.OpenAI(base_url=s.url + "/v1", api_key="x", max_retries=0)
        gate, engine = Gate(s.app.engine), s.app.engine  # all 8 queued before the engine goes on

        def ask(i):
            return client.completions.create(model=NAME, prompt=PROMPTS[i], max_tokens=lengths[i], **GREEDY)

        with ThreadPoolExecutor(8) as pool:
            futures = [pool.submit(ask, i) for i in range(8)]
            assert _wait(lambda: engine.stats()["running"] + engine.stats()["waiting"] == 8)
            gate.open.set()
            answers = [f.result(timeout=60) for f in futures]
        assert _wait(lambda: s.app.engine.stats()["running"] == 0)  # slots free just after the answers
        stats = s.app.engine.stats()
    for i, r in enumerate(answers):
        assert r.choices[0].text == single(lm, PROMPTS[i], lengths[i], temperature=0.0), i
        assert r.usage.completion_tokens == lengths[i]
    assert stats["busiest_step"] == 4 and moves
    assert stats["steps"] < sum(lengths)  # fewer graph runs than tokens: batched


def test_long_prompt_prefills_in_chunks_between_decode_steps(folder, lm):
    """A 200-token prompt is prefilled 64 tokens at a time while others decode; when a decoding
    request finishes meanwhile, the half-prefilled sequence moves down a slot and still answers
    exactly as if run alone."""
    long_ids = (lm.encode(" ".join(PROMPTS)) * 4)[:200]
    with start(folder, slots=3, limits=Limits(max_prompt_tokens=250, max_tokens=64)) as s:
        engine = s.app.engine
        model, moves = engine.model, []
        copy_slot = model.copy_slot
        model.copy_slot = lambda src, dst, n: (moves.append((src, dst, n)), copy_slot(src, dst, n))
        gate = Gate(engine)
        client = openai.OpenAI(base_url=s.url + "/v1", api_key="x", max_retries=0)
        asks = [(PROMPTS[0], 4), (PROMPTS[1], 30), (long_ids, 10)]
        with ThreadPoolExecutor(3) as pool:
            futures = []
            for k, (prompt, n) in enumerate(asks):  # queued in this order while the gate is shut
                futures.append(pool.submit(client.completions.create, model=NAME, prompt=prompt,
                                           max_tokens=n, **GREEDY))
                assert _wait(lambda: engine.stats()["running"] + engine.stats()["waiting"] == k + 1)
            gate.open.set()
            answers = [f.result(timeout=60) for f in futures]
    for (prompt, n), r in zip(asks, answers):
        assert r.choices[0].text == single(lm, prompt, n, temperature=0.0)
    from perseus_edge.serve.engine import PREFILL_CHUNK_SHARED

    assert PREFILL_CHUNK_SHARED == 64
    assert (2, 1, 64) in moves  # the prefilling sequence, one chunk in, moved from slot 2 to 1


def test_context_full_finishes_with_length(client, lm):
    ctx = lm.max_context
    with start(lm.path, slots=1, limits=Limits(max_tokens=ctx - 1)) as s:
        c = openai.OpenAI(base_url=s.url + "/v1", api_key="x", max_retries=0)
        ids = lm.encode(PROMPTS[1])
        r = c.completions.create(model=NAME, prompt=ids, max_tokens=ctx - 1, **GREEDY)
    assert r.choices[0].finish_reason == "length" and r.usage.completion_tokens == ctx - len(ids)


# ----------------------------------------------------------------------------- refusals
def _post(server, body, path="/v1/completions", **kw):
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    return httpx.post(server.url + path, content=content, headers={"content-type": "application/json"}, **kw)


OK = {"model": NAME, "prompt": "Once", "max_tokens": 2}


@pytest.mark.parametrize("body, status, param, message", [
    (b"{not json", 400, None, "not valid JSON"),
    (b"[1, 2]", 400, None, "must be a JSON object"),
    (b"", 400, None, "not valid JSON"),
    ({**OK, "temperature": "hot"}, 400, "temperature", "Invalid value for 'temperature'"),
    ({**OK, "temperature": 5}, 400, "temperature", "less than or equal to 2"),
    ({**OK, "max_tokens": "10"}, 400, "max_tokens", "valid integer"),
    ({**OK, "max_tokens": 0}, 400, "max_tokens", "greater than or equal to 1"),
    ({**OK, "stream": "yes"}, 400, "stream", "valid boolean"),
    ({**OK, "foo": 1}, 400, "foo", "Unrecognized request argument supplied: foo"),
    ({"prompt": "x"}, 400, "model", "Missing required parameter: 'model'"),
    ({**OK, "model": "gpt-4"}, 404, "model", "The model 'gpt-4' does not exist"),
    ({**OK, "prompt": ""}, 400, "prompt", "the prompt is empty"),
    ({**OK, "prompt": [1, 10**6]}, 400, "prompt", "outside the vocabulary"),
    ({**OK, "prompt": "word " * 200}, 400, "prompt", "your prompt has"),
    ({**OK, "max_tokens": 65}, 400, "max_tokens", "max_tokens is too large: 65"),
    ({**OK, "n": 2}, 400, "n", "only n=1"),
    ({**OK, "presence_penalty": 0.5}, 400, "presence_penalty", "use repetition_penalty"),
    ({**OK, "logprobs": 3}, 400, "logprobs", "not supported"),
    ({**OK, "stop": ["a", "b", "c", "d", "e"]}, 400, "stop", "at most 4 stop strings"),
    ({**OK, "seed": -1}, 400, "seed", "greater than or equal to 0"),
    (b'{"model": "tiny", "prompt": "x", "temperature": NaN}', 400, None, ""),
    (b'{"model": "tiny", "prompt": "x", "temperature": 1e999}', 400, "temperature", "finite"),
    ({**OK, "prompt": "x" * (70 << 10)}, 413, None, "exceeds the limit"),
])
def test_bad_requests_get_openai_errors(server, body, status, param, message):
    r = _post(server, body)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and message in err["message"]
    if param is not None:
        assert err["param"] == param


def test_chat_refusals(server):
    r = _post(server, {"model": NAME, "messages": []}, "/v1/chat/completions")
    assert r.status_code == 400 and r.json()["error"]["param"] == "messages"
    r = _post(server, {"model": NAME, "messages": [{"role": "robot", "content": "x"}]}, "/v1/chat/completions")
    assert r.status_code == 400 and r.json()["error"]["param"] == "messages"
    r = _post(server, {"model": NAME, "messages": [{"role": "user", "content": "x"}], "tools": []},
              "/v1/chat/completions")
    assert r.status_code == 400 and "Unrecognized request argument supplied: tools" in r.json()["error"]["message"]


def test_routes_methods_and_chunked_huge_body(server):
    r = httpx.get(server.url + "/v1/nope")
    assert r.status_code == 404 and r.json()["error"]["type"] == "not_found_error"
    assert httpx.get(server.url + "/v1/completions").status_code == 405

    def chunks():  # no Content-Length: the limit applies while reading
        for _ in range(100):
            yield b"x" * 4096

    r = httpx.post(server.url + "/v1/completions", content=chunks())
    assert r.status_code == 413
    assert httpx.get(server.url + "/health").json()["status"] == "ok"  # still serving


def test_api_key(folder):
    with start(folder, slots=1, api_key="s3cret") as s:
        base = s.url + "/v1"
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=base, api_key="wrong", max_retries=0).models.list()
        r = httpx.post(base + "/completions", json=OK)
        assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
        good = openai.OpenAI(base_url=base, api_key="s3cret", max_retries=0)
        assert good.completions.create(model=NAME, prompt="Once", max_tokens=2).usage.completion_tokens >= 1
        assert httpx.get(s.url + "/health").status_code == 200  # health needs no key


def test_full_queue_is_refused_then_everyone_is_answered(folder):
    with start(folder, slots=1, max_waiting=1) as s:
        engine = s.app.engine
        gate = Gate(engine)
        c = openai.OpenAI(base_url=s.url + "/v1", api_key="x", max_retries=0)
        with ThreadPoolExecutor(2) as pool:
            futures = [pool.submit(c.completions.create, model=NAME, prompt="Once", max_tokens=5, **GREEDY)]
            assert _wait(lambda: engine.stats()["running"] == 1)  # the first one is in its prefill
            futures.append(pool.submit(c.completions.create, model=NAME, prompt="Once", max_tokens=5, **GREEDY))
            assert _wait(lambda: engine.stats()["waiting"] == 1)
            with pytest.raises(openai.RateLimitError) as e:
                c.completions.create(model=NAME, prompt="Once", max_tokens=5)
            assert e.value.status_code == 429 and "server busy" in str(e.value)
            gate.open.set()
            answers = [f.result(timeout=30) for f in futures]
        assert [a.usage.completion_tokens for a in answers] == [5, 5]


@pytest.mark.parametrize("stream", [True, False])
def test_disconnect_frees_the_slot(folder, stream):
    with start(folder, slots=1) as s:
        engine = s.app.engine
        gate = Gate(engine, delay=0.02)  # 60 tokens would take over a second
        gate.open.set()
        body = {**OK, "max_tokens": 60, "ignore_eos": True, "stream": stream}
        if stream:
            with httpx.stream("POST", s.url + "/v1/completions", json=body) as r:
                next(r.iter_lines())
                assert engine.stats()["running"] == 1
        else:
            with pytest.raises(httpx.ReadTimeout):
                httpx.post(s.url + "/v1/completions", json=body, timeout=0.3)
        gone = engine.stats()["steps"]
        assert _wait(lambda: engine.stats()["running"] == 0, timeout=5)
        assert engine.stats()["steps"] - gone < 40  # freed long before its 60 tokens (slack for a loaded machine)
        r = httpx.post(s.url + "/v1/completions", json={**OK, "max_tokens": 3})  # the slot serves again
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] <= 3


def test_the_address_takes_connections_before_serving_starts(folder):
    # the CLI prints the address before uvicorn runs: a client connecting then must wait, not be refused
    s = start(folder, slots=1)
    try:
        socket.create_connection(("127.0.0.1", s.port), timeout=5).close()
    finally:
        s.sock.close()


def test_cli_serves_and_reports_errors(folder, tmp_path):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    bad = subprocess.run([sys.executable, "-m", "perseus_edge.cli", "serve", str(tmp_path / "missing")],
                         capture_output=True, text=True, env=env, timeout=60)
    assert bad.returncode == 1 and bad.stderr.startswith("error: ") and "Traceback" not in bad.stderr
    proc = subprocess.Popen([sys.executable, "-m", "perseus_edge.cli", "serve", str(folder), "--port", "0",
                             "--slots", "2", "-t", "1", "--model-name", NAME],
                            stderr=subprocess.PIPE, text=True, env=env)
    try:
        line = proc.stderr.readline()
        url = re.search(r"at (http://127\.0\.0\.1:\d+)/v1", line)
        assert url, line
        assert httpx.get(url.group(1) + "/health").json()["slots"] == 2
        r = httpx.post(url.group(1) + "/v1/completions", json=OK)
        assert r.status_code == 200 and r.json()["model"] == NAME
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def test_a_failing_step_fails_its_requests_not_the_server(folder):
    with start(folder, slots=2) as s:
        engine = s.app.engine
        forward = engine.model.forward

        def broken(*a, **kw):
            raise RuntimeError("boom")

        engine.model.forward = broken
        r = httpx.post(s.url + "/v1/completions", json=OK)
        assert r.status_code == 500 and r.json()["error"]["message"] == "internal error: RuntimeError: boom"
        with httpx.stream("POST", s.url + "/v1/completions", json={**OK, "stream": True}) as r:
            lines = [line for line in r.iter_lines() if line]
        assert json.loads(lines[-1][6:])["error"]["type"] == "server_error"
        engine.model.forward = forward
        assert httpx.post(s.url + "/v1/completions", json=OK).status_code == 200
        assert _wait(lambda: engine.stats()["running"] == 0) and engine.stats()["alive"]
    assert not engine.stats()["alive"]  # the server stopped its engine on the way out
    with pytest.raises(openai.APIConnectionError):  # and nothing listens any more
        openai.OpenAI(base_url=s.url + "/v1", api_key="x", max_retries=0).models.list()


def test_api_and_server_run_without_torch(folder):
    """The device install: torch blocked, the Python API and the server still work."""
    code = textwrap.dedent(f"""
        import sys
        sys.modules["torch"] = None  # any `import torch` now fails
        import json, urllib.request
        import perseus_edge
        from perseus_edge.serve import Server, load
        lm = perseus_edge.load({str(folder)!r}, threads=1)
        text = lm.generate("Once upon a time", 8, temperature=0.0, ignore_eos=True)
        with Server(load({str(folder)!r}, threads=1, slots=2, model_name="m"), port=0) as s:
            body = json.dumps({{"model": "m", "prompt": "Once upon a time", "max_tokens": 8,
                               "temperature": 0, "ignore_eos": True}}).encode()
            req = urllib.request.Request(s.url + "/v1/completions", body, {{"Content-Type": "application/json"}})
            answer = json.load(urllib.request.urlopen(req))["choices"][0]["text"]
        print(answer == text, "torch" in sys.modules and sys.modules["torch"] is not None)
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.stdout.split() == ["True", "False"], out.stderr


def test_serve_without_the_extra_says_what_to_install(tmp_path):
    code = ("import sys; sys.modules['starlette'] = None; from perseus_edge.cli import main; "
            f"sys.argv = ['perseus', 'serve', {str(tmp_path)!r}]; main()")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 1
    assert out.stderr.strip() == ("error: `perseus serve` needs the serve extra: "
                                  "pip install 'perseus-edge[serve]' (starlette is missing)")
