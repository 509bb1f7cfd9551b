"""The chat server of chapter 08b, against real uvicorn servers on loopback: bad requests answered 4xx with a message,
16 concurrent streams with /health answering throughout, clients that hang up mid-stream, generation that fails,
and the official `openai` package against `nanochat-nb serve`."""
import asyncio, json, os, socket, subprocess, sys, time

import httpx
import openai
import pytest
import torch

from nanochat_nb.chat import chat_prompt
from nanochat_nb.engine import Engine, load_for_inference
from nanochat_nb.serve import ServerThread, Worker, WorkerPool, create_app, load_pool

ENV = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1")
HI = [{"role": "user", "content": "Hello"}]


@pytest.fixture(scope="module")
def server(tiny_run):
    "A two-worker server on the tiny model: (base URL, pool)."
    pool = load_pool(tiny_run, workers=2, seed=0)
    with ServerThread(create_app(pool)) as url:
        yield url, pool


def events_of(text):
    "The JSON payloads of a server-sent event stream."
    assert text.endswith("\n\n")
    return [json.loads(block[len("data: "):]) for block in text.strip().split("\n\n")]


def wait_all_free(url, pool, timeout=5.0):
    "Seconds until /stats reports every worker free; fails after `timeout`."
    t0 = time.perf_counter()
    while httpx.get(url + "/stats").json()["available_workers"] != len(pool.workers):
        assert time.perf_counter() - t0 < timeout, "a worker never came back to the pool"
        time.sleep(0.01)
    return time.perf_counter() - t0


BAD = [  # (name, raw body, text expected in the message)
    ("bad JSON", b'{"messages": [', "not valid JSON"),
    ("not JSON", b"hello", "not valid JSON"),
    ("not UTF-8", b'{"messages": "\xff\xfe"}', "not valid JSON"),
    ("deeply nested", b"[" * 100_000 + b"]" * 100_000, "not valid JSON"),
    ("a list", b"[1, 2]", "JSON object"),
    ("no messages", b'{"temperature": 1}', "'messages' list"),
    ("messages not a list", b'{"messages": "hi"}', "list of 1 to 500"),
    ("no message", b'{"messages": []}', "list of 1 to 500"),
    ("501 messages", json.dumps({"messages": [{"role": "user", "content": "a"}] * 501}).encode(), "1 to 500"),
    ("message not an object", b'{"messages": ["hi"]}', "must be an object"),
    ("unknown role", b'{"messages": [{"role": "wizard", "content": "hi"}]}', "role \"wizard\""),
    ("system role", b'{"messages": [{"role": "system", "content": "hi"}, {"role": "user", "content": "hi"}]}',
     "role \"system\""),
    ("no role", b'{"messages": [{"content": "hi"}]}', "role null"),
    ("no content", b'{"messages": [{"role": "user"}]}', "non-empty text"),
    ("content a number", b'{"messages": [{"role": "user", "content": 5}]}', "non-empty text"),
    ("content an object", b'{"messages": [{"role": "user", "content": {"a": 1}}]}', "non-empty text"),
    ("empty content", b'{"messages": [{"role": "user", "content": ""}]}', "non-empty text"),
    ("200k characters", json.dumps({"messages": [{"role": "user", "content": "x" * 200_000}]}).encode(),
     "8,000 a message"),
    ("40k characters in all", json.dumps({"messages": [{"role": r, "content": "x" * 8000} for r in
                                                       ["user", "assistant"] * 2 + ["user"]]}).encode(), "32,000"),
    ("ends with the assistant", b'{"messages": [{"role": "user", "content": "a"}, '
                                b'{"role": "assistant", "content": "b"}]}', "last message"),
    ("temperature -0.1", json.dumps({"messages": HI, "temperature": -0.1}).encode(), "temperature must be"),
    ("temperature 2.5", json.dumps({"messages": HI, "temperature": 2.5}).encode(), "temperature must be"),
    ("temperature a string", json.dumps({"messages": HI, "temperature": "0.5"}).encode(), "temperature must be"),
    ("temperature NaN", b'{"messages": [{"role": "user", "content": "a"}], "temperature": NaN}', "temperature"),
    ("temperature Infinity", b'{"messages": [{"role": "user", "content": "a"}], "temperature": Infinity}',
     "temperature"),
    ("top_k 0", json.dumps({"messages": HI, "top_k": 0}).encode(), "top_k must be"),
    ("top_k 201", json.dumps({"messages": HI, "top_k": 201}).encode(), "top_k must be"),
    ("top_k 1.5", json.dumps({"messages": HI, "top_k": 1.5}).encode(), "top_k must be"),
    ("top_k true", json.dumps({"messages": HI, "top_k": True}).encode(), "top_k must be"),
    ("max_tokens 0", json.dumps({"messages": HI, "max_tokens": 0}).encode(), "max_tokens must be"),
    ("max_tokens 4097", json.dumps({"messages": HI, "max_tokens": 4097}).encode(), "max_tokens must be"),
    ("max_tokens a list", json.dumps({"messages": HI, "max_tokens": [5]}).encode(), "max_tokens must be"),
    ("seed a string", json.dumps({"messages": HI, "seed": "x"}).encode(), "seed must be"),
    ("too long for the model", json.dumps({"messages": [{"role": "user", "content": "x " * 3999}]}).encode(),
     "fix: clear it"),
]


def test_bad_requests_get_4xx_with_a_message(server):
    url, pool = server
    with httpx.Client(base_url=url, timeout=30) as client:
        for name, body, expected in BAD:
            r = client.post("/chat/completions", content=body, headers={"content-type": "application/json"})
            assert r.status_code == 400, (name, r.status_code, r.text)
            assert expected in r.json()["detail"], (name, r.json())
        r = client.post("/chat/completions", content=b"x" * 2_000_000)
        assert r.status_code == 413 and "over 1,000,000 bytes" in r.json()["detail"]
        assert client.get("/chat/completions").status_code == 405 and client.get("/nowhere").status_code == 404
        health = client.get("/health").json()
        assert health["status"] == "ok" and health["available_workers"] == 2
        r = client.post("/chat/completions", json={"messages": HI, "max_tokens": 4})  # still serving
        assert r.status_code == 200 and events_of(r.text)[-1] == {"done": True}


OPENAI_BAD = [
    ({"messages": [{"role": "tool", "content": "x"}]}, "role \"tool\""),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]}, "only text"),
    ({"messages": HI, "stream": "yes"}, "stream must be"),
    ({"messages": HI, "n": 2}, "n must be 1"),
    ({"messages": HI, "stop": ["a", "b", "c", "d", "e"]}, "stop must be"),
    ({"messages": HI, "stop": 5}, "stop must be"),
    ({"messages": HI, "stream_options": "usage"}, "stream_options"),
    ({"messages": HI, "model": 3}, "model must be"),
    ({"messages": HI, "max_completion_tokens": 10_000}, "max_tokens must be"),
    ({"messages": [{"role": "user", "content": "a"}, {"role": "system", "content": "b"},
                   {"role": "user", "content": "c"}]}, "only the first message may have role 'system'"),
]


def test_openai_bad_requests_use_openai_error_shape(server):
    url, _ = server
    with httpx.Client(base_url=url, timeout=30) as client:
        for body, expected in OPENAI_BAD:
            r = client.post("/v1/chat/completions", json=body)
            assert r.status_code == 400, (body, r.text)
            error = r.json()["error"]
            assert error["type"] == "invalid_request_error" and expected in error["message"], (body, error)
        assert client.post("/v1/chat/completions", content=b"{").status_code == 400
        assert client.get("/health").json()["available_workers"] == 2


def test_stream_is_the_engines_reply(server, tiny_run):
    url, pool = server
    body = {"messages": [{"role": "user", "content": "Hello"}, {"role": "assistant", "content": "Hi!"},
                         {"role": "user", "content": "How are you?"}],
            "temperature": 0.9, "top_k": 20, "max_tokens": 24, "seed": 7}
    r = httpx.post(url + "/chat/completions", json=body, timeout=30)
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
    events = events_of(r.text)
    assert events[-1] == {"done": True} and all(set(e) == {"token", "gpu"} for e in events[:-1])
    assert {e["gpu"] for e in events[:-1]} <= {0, 1} and len(events) > 2
    engine = pool.workers[0].engine  # the same reply, straight from the engine: nothing lost or reordered
    prompt = chat_prompt(engine.tokenizer, body["messages"])
    (row,), _ = engine.generate_batch(prompt, max_tokens=24, temperature=0.9, top_k=20, seed=7)
    assert "".join(e["token"] for e in events[:-1]) == engine.tokenizer.decode(row[len(prompt):])


def test_sixteen_concurrent_streams_and_health_throughout(server):
    url, pool = server
    before = httpx.get(url + "/stats").json()

    async def main():
        async with httpx.AsyncClient(base_url=url, timeout=60) as client:
            async def chat(i):
                body = {"messages": [{"role": "user", "content": f"Request {i}"}], "max_tokens": 16, "seed": i}
                async with client.stream("POST", "/chat/completions", json=body) as r:
                    assert r.status_code == 200
                    return events_of("".join([chunk async for chunk in r.aiter_text()]))
            async def health(done):
                answers = []
                while not done.is_set():
                    t0 = time.perf_counter()
                    r = await client.get("/health")
                    answers.append((r.status_code, time.perf_counter() - t0))
                    await asyncio.sleep(0.05)
                return answers
            done = asyncio.Event()
            probe = asyncio.create_task(health(done))
            results = await asyncio.gather(*(chat(i) for i in range(16)))
            done.set()
            return results, await probe

    results, answers = asyncio.run(main())
    assert len(results) == 16
    for events in results:
        assert events[-1] == {"done": True} and not any("error" in e for e in events)
    assert len(answers) >= 3 and all(status == 200 for status, _ in answers)
    assert max(seconds for _, seconds in answers) < 2.0  # the event loop never blocked on the model
    wait_all_free(url, pool)
    after = httpx.get(url + "/stats").json()
    served = [a["requests"] - b["requests"] for a, b in zip(after["workers"], before["workers"])]
    assert sum(served) == 16 and all(n > 0 for n in served), served  # both workers took requests


def hang_up_after(url, path, body, events=2):
    "Send a request over a raw socket, read `events` events (0: none), and close the connection."
    host, port = url.removeprefix("http://").split(":")
    data = json.dumps(body).encode()
    with socket.create_connection((host, int(port)), timeout=30) as s:
        s.sendall(f"POST {path} HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
                  f"Content-Length: {len(data)}\r\n\r\n".encode() + data)
        received = b""
        while received.count(b"data: ") < events:
            received += s.recv(4096)
        if not events:
            time.sleep(0.3)  # the request is being served


def test_client_that_hangs_up_frees_its_worker(server):
    url, pool = server
    body = {"messages": [{"role": "user", "content": "Go on forever."}], "temperature": 0.0, "max_tokens": 2000}
    control = httpx.post(url + "/v1/chat/completions", json={**body, "max_tokens": 300}, timeout=60).json()
    assert control["choices"][0]["finish_reason"] == "length"  # greedy, this model never stops by itself
    for path, events in [("/chat/completions", 2), ("/v1/chat/completions", 0), ("/v1/chat/completions", 2)]:
        tokens = sum(w.tokens for w in pool.workers)
        extra = {"stream": True} if events and path.startswith("/v1") else {}
        hang_up_after(url, path, {**body, **extra}, events)
        seconds = wait_all_free(url, pool)
        made = sum(w.tokens for w in pool.workers) - tokens
        assert made < 500 and seconds < 2, (path, made, seconds)  # stopped, not run on to 2,000 tokens
    r = httpx.post(url + "/chat/completions", json={"messages": HI, "max_tokens": 5}, timeout=30)
    assert events_of(r.text)[-1] == {"done": True}


def test_failed_generation_returns_the_worker(tiny_run):
    model, tokenizer, meta = load_for_inference(tiny_run)
    model.lm_head.weight = torch.nn.Parameter(torch.zeros(3, 3))  # a model that raises in every forward pass
    pool = WorkerPool([Worker(0, "cpu", Engine(model, tokenizer))], meta)
    with ServerThread(create_app(pool)) as url, httpx.Client(base_url=url, timeout=30) as client:
        for _ in range(2):
            events = events_of(client.post("/chat/completions", json={"messages": HI}).text)
            assert events[-1] == {"done": True} and events[0]["error"].startswith("generation failed: RuntimeError")
            assert client.get("/stats").json()["available_workers"] == 1
        r = client.post("/v1/chat/completions", json={"messages": HI})
        assert r.status_code == 500 and r.json()["error"]["type"] == "server_error"
        r = client.post("/v1/chat/completions", json={"messages": HI, "stream": True})
        assert '"server_error"' in r.text and r.text.endswith("data: [DONE]\n\n")
        assert client.get("/stats").json() == {"total_workers": 1, "available_workers": 1, "busy_workers": 0,
                                               "workers": [{"gpu_id": 0, "device": "cpu", "requests": 4,
                                                            "tokens": 0}]}


@pytest.fixture(scope="module")
def cli_server(tiny_run):
    "`nanochat-nb serve` in a subprocess on a port of its choosing (--port 0): its base URL."
    proc = subprocess.Popen([sys.executable, "-m", "nanochat_nb.cli", "serve", "--run-dir", str(tiny_run),
                             "--port", "0", "--seed", "0"], env=ENV, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    try:
        output = ""
        while "chat page: " not in output:
            line = proc.stdout.readline()
            assert line, f"nanochat-nb serve exited: {output}"
            output += line
        url = output.split("chat page: ")[1].split("/ ")[0]
        assert httpx.get(url + "/health").json()["ready"]
        yield url
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def test_openai_package(cli_server, tiny_run):
    client = openai.OpenAI(base_url=cli_server + "/v1", api_key="unused", max_retries=0, timeout=60)
    (model,) = client.models.list().data
    assert model.id.endswith("-base") and model.owned_by == "nanochat-nb"
    messages = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Name a colour."}]
    reply = client.chat.completions.create(model=model.id, messages=messages, max_tokens=12, seed=5)
    choice = reply.choices[0]
    assert reply.object == "chat.completion" and choice.message.role == "assistant"
    assert isinstance(choice.message.content, str) and choice.finish_reason in ("stop", "length")
    tokenizer = load_for_inference(tiny_run)[1]  # the system message is merged into the first user turn
    assert reply.usage.prompt_tokens == len(chat_prompt(tokenizer, messages))
    assert 0 < reply.usage.completion_tokens <= 12
    assert reply.usage.total_tokens == reply.usage.prompt_tokens + reply.usage.completion_tokens

    chunks = list(client.chat.completions.create(model=model.id, messages=messages, max_tokens=12, seed=5,
                                                 stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant" and chunks[0].object == "chat.completion.chunk"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == choice.message.content  # same seed, same reply, streamed or not
    assert len([c for c in chunks if c.choices and c.choices[0].delta.content]) > 1
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == choice.finish_reason
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == reply.usage.completion_tokens

    cut = text[len(text) // 2:][:2]  # a stop string from the middle of the reply: it ends just before it
    stopped = client.chat.completions.create(model=model.id, messages=messages, max_tokens=12, seed=5, stop=[cut])
    assert stopped.choices[0].message.content == text[:text.index(cut)]
    assert stopped.choices[0].finish_reason == "stop"

    with pytest.raises(openai.BadRequestError, match="temperature must be a number from 0.0 to 2.0"):
        client.chat.completions.create(model=model.id, messages=messages, temperature=3)
    page = httpx.get(cli_server + "/").text
    assert page.startswith("<!doctype html>") and '<textarea id="input"' in page


@pytest.mark.parametrize("args, message", [
    (["--model", "/nonexistent/run"], "is not a directory"),
    (["--port", "70000"], "port must be"),
    (["--workers", "0"], "workers must be"),
    (["--host", "203.0.113.9"], "Cannot assign requested address"),  # not an address of this machine
])
def test_serve_cli_errors_are_one_line(tiny_run, args, message):
    from nanochat_nb.cli import main
    with pytest.raises(SystemExit) as e:
        main(["serve", "--run-dir", str(tiny_run), *args])
    assert str(e.value).startswith("nanochat-nb serve: error:") and message in str(e.value)
