# ---
# jupyter:
#   jupytext:
#     cell_metadata_filter: tags,-all
#     formats: ipynb,py:percent
#     text_representation:
#       extension: .py
#       format_name: percent
#       format_version: '1.3'
#       jupytext_version: 1.19.6
#   kernelspec:
#     display_name: python3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # The chat server
# > One web server for everyone who wants to talk to the model: a chat page in the browser, nanochat's streaming API,
# > and the OpenAI chat-completions protocol that existing tools already speak.

# %% [markdown]
# Chapter 08 put a conversation in the notebook and the terminal, on the machine that holds the model. A chat app is
# a server: many people, in browsers, on other machines, talking to one model at once. This chapter builds nanochat's
# `chat_web` (FastAPI + uvicorn) and extends it with the protocol that the rest of the world uses, so that the
# `openai` Python package, OpenWebUI or an editor plugin can use a model trained here by changing one URL.
#
# What the server must get right is mostly not the model: requests from strangers are checked against limits and
# refused with a message that says what to fix; several requests share a few model workers without losing any; and a
# client that walks away mid-answer stops the generation at once and gives its worker back.
#
# *Pipeline:* the engine and loader (07) and the chat pieces (08: streaming text, tool parts, the prompt) come before;
# `nanochat-nb serve` (99) runs it, and the chat-tuned stages (11-13) are what it is for.

# %%
#| default_exp serve

# %%
#| export
import asyncio, json, random, socket, threading, time, uuid
from contextlib import aclosing, asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

import torch, uvicorn
from fastapi import FastAPI, Request
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import HTMLResponse, JSONResponse, StreamingResponse

from nanochat_nb.chat import TextStream, chat_prompt, context_room, parts_from_text
from nanochat_nb.engine import Engine, load_for_inference
from nanochat_nb.model import get_device

# %%
#| hide
import shutil, urllib.error, urllib.request

from fastcore.test import test_eq
from IPython.display import Image, display

from nanochat_nb.engine import demo_run

# %% [markdown]
# ## A model to serve
#
# The same choice as in chapters 07 and 08: a finished run (`"../runs/speedrun"`), or a tiny model trained here in
# about twenty seconds by chapter 07's `demo_run`.

# %%
run_dir = None  # a run directory with a checkpoint; None trains a tiny model here

# %%
if run_dir is None:
    run_dir = demo_run()

# %% [markdown]
# ## Checking requests
#
# A request to nanochat's `/chat/completions` is `{"messages": [{"role", "content"}, ...], "temperature"?,
# "top_k"?, "max_tokens"?}`. nanochat's limits (HTTP 400 otherwise): 1 to 500 messages; each content non-empty and at
# most 8,000 characters, 32,000 in all; temperature 0 to 2, top-k 1 to 200, max_tokens 1 to 4,096. Its defaults are
# temperature 0.8, top-k 50 and 512 tokens.
#
# Everything a client sends is checked here, before any model work, and every refusal is a `BadRequest` whose
# message names the field and the allowed values. Nothing a client can send reaches the model unchecked, so no
# request can end in a 500. JSON has its own traps, which the checks close: `true` is an `int` to Python, and
# Python's JSON reader accepts `NaN` (which fails every comparison, so it fails the range check too).

# %%
#| export
LIMITS = {"messages": 500, "chars": 8_000, "total_chars": 32_000,
          "temperature": (0.0, 2.0), "top_k": (1, 200), "max_tokens": (1, 4096)}
DEFAULTS = {"temperature": 0.8, "top_k": 50, "max_tokens": 512}
MAX_BODY_BYTES = 1_000_000


class BadRequest(ValueError):
    "A request the server refuses: an HTTP status (400 unless said) and a message saying what to fix."

    def __init__(self, message, status=400):
        super().__init__(message)
        self.status = status


def _show(value):
    "A client's value, short, for an error message."
    return json.dumps(value)[:40]


def _setting(body, name, integer, default):
    "body[name] checked against LIMITS: a number (an int if `integer`) in range; `default` when absent or null."
    value = body.get(name)
    if value is None:
        return default
    lo, hi = LIMITS[name]
    if isinstance(value, bool) or not isinstance(value, int if integer else (int, float)) or not lo <= value <= hi:
        raise BadRequest(f"{name} must be {'an integer' if integer else 'a number'} from {lo} to {hi}, "
                         f"got {_show(value)}")
    return value if integer else float(value)


# %% [markdown]
# Messages: a role from the allowed list (nanochat's endpoint takes `user` and `assistant`; the OpenAI one also
# `system`, and `developer`, its newer name) and text content, which OpenAI clients may send as a list of text parts.
# Two turns in a row from the same role are joined, since the chat format alternates; the last turn must be the
# user's. An assistant turn that comes back with tool markers (as the page shows them) becomes parts again.

# %%
#| export
def _text(i, content):
    "Message i's content as one string: a string, or a list of OpenAI text parts; non-empty, within the limit."
    if isinstance(content, list):
        if not all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str) for p in content):
            raise BadRequest(f'message {i}: only text is supported: a string or a list of {{"type": "text", '
                             f'"text": ...}} parts')
        content = "".join(p["text"] for p in content)
    if not isinstance(content, str) or not content:
        raise BadRequest(f"message {i} needs non-empty text content, got {_show(content)}")
    if len(content) > LIMITS["chars"]:
        raise BadRequest(f"message {i} is {len(content):,} characters; the limit is {LIMITS['chars']:,} a message")
    return content


def check_messages(messages, roles):
    "Messages within nanochat's limits; same-role runs joined, assistant tool markers parsed back into parts."
    if not isinstance(messages, list) or not 1 <= len(messages) <= LIMITS["messages"]:
        raise BadRequest(f"'messages' must be a list of 1 to {LIMITS['messages']} messages")
    out, total = [], 0
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise BadRequest(f'message {i} must be an object {{"role": ..., "content": ...}}, got {_show(m)}')
        if m.get("role") not in roles:
            raise BadRequest(f"message {i} has role {_show(m.get('role'))}; the roles are {', '.join(roles)}")
        content, role = _text(i, m.get("content")), "system" if m["role"] == "developer" else m["role"]
        total += len(content)
        if out and out[-1]["role"] == role:
            out[-1]["content"] += "\n\n" + content
        else:
            out.append({"role": role, "content": content})
    if total > LIMITS["total_chars"]:
        raise BadRequest(f"the messages hold {total:,} characters; the limit is {LIMITS['total_chars']:,} in all")
    if out[-1]["role"] != "user":
        raise BadRequest("the last message must be the user's: it is the one the model answers")
    return [{**m, "content": parts_from_text(m["content"])} if m["role"] == "assistant" else m for m in out]


# %% [markdown]
# The whole request: messages and settings, plus, for the OpenAI protocol, the fields we honour: `stream`,
# `stream_options.include_usage`, `max_completion_tokens` (the newer name of `max_tokens`), `seed`, `stop` (up to four
# strings) and `n` (only 1). Other OpenAI fields (`top_p`, penalties, `user`, ...) are accepted and ignored, as many
# servers do, so that clients which always send them work. `top_k` is not OpenAI's, but we take it, as vLLM does.

# %%
#| export
def _openai_options(body):
    "The OpenAI-only fields we honour: stream, stream_options.include_usage, stop, n (only 1), model (a string)."
    stream, stop, options = body.get("stream") or False, body.get("stop"), body.get("stream_options") or {}
    stop = [stop] if isinstance(stop, str) else stop or []
    if not isinstance(stream, bool):
        raise BadRequest(f"stream must be true or false, got {_show(stream)}")
    if not isinstance(options, dict):
        raise BadRequest(f'stream_options must be an object such as {{"include_usage": true}}, got {_show(options)}')
    if not isinstance(stop, list) or len(stop) > 4 or not all(isinstance(s, str) and s for s in stop):
        raise BadRequest(f"stop must be a string or a list of up to 4 non-empty strings, got {_show(stop)}")
    if body.get("n") not in (None, 1):
        raise BadRequest(f"n must be 1 (one choice per request), got {_show(body.get('n'))}")
    if not isinstance(body.get("model", ""), str):
        raise BadRequest(f"model must be a string, got {_show(body.get('model'))}")
    return {"stream": stream, "stop": stop, "include_usage": bool(options.get("include_usage"))}


def check_request(body, openai=False):
    "The checked messages and sampling settings of a chat request (nanochat's or OpenAI's), or BadRequest."
    if not isinstance(body, dict) or "messages" not in body:
        raise BadRequest("the body must be a JSON object with a 'messages' list")
    roles = ("system", "developer", "user", "assistant") if openai else ("user", "assistant")
    req = {"messages": check_messages(body["messages"], roles),
           "temperature": _setting(body, "temperature", False, DEFAULTS["temperature"]),
           "top_k": _setting(body, "top_k", True, DEFAULTS["top_k"]),
           "max_tokens": _setting({"max_tokens": body.get("max_completion_tokens", body.get("max_tokens"))},
                                  "max_tokens", True, DEFAULTS["max_tokens"]),
           "seed": body.get("seed"), "stream": True, "stop": [], "include_usage": False}
    if req["seed"] is not None and (isinstance(req["seed"], bool) or not isinstance(req["seed"], int)):
        raise BadRequest(f"seed must be an integer, got {_show(req['seed'])}")
    return {**req, **(_openai_options(body) if openai else {})}


# %% [markdown]
# A battery of bad requests, each refused with a message that says what to fix:

# %%
good = {"messages": [{"role": "user", "content": "Hi"}]}
bad_requests = {
    "not an object": [1, 2],
    "no messages": {"temperature": 0.5},
    "empty messages": {"messages": []},
    "unknown role": {"messages": [{"role": "tool", "content": "Hi"}]},
    "system (nanochat's API)": {"messages": [{"role": "system", "content": "Hi"}, {"role": "user", "content": "Hi"}]},
    "content not text": {"messages": [{"role": "user", "content": 42}]},
    "empty content": {"messages": [{"role": "user", "content": ""}]},
    "200k characters": {"messages": [{"role": "user", "content": "x" * 200_000}]},
    "40k in all": {"messages": [{"role": r, "content": "x" * 8000} for r in ["user", "assistant"] * 2 + ["user"]]},
    "ends with the assistant": {"messages": [{"role": "user", "content": "Hi"},
                                             {"role": "assistant", "content": "Yo"}]},
    "temperature 3": {**good, "temperature": 3},
    "temperature 'hot'": {**good, "temperature": "hot"},
    "temperature NaN": {**good, "temperature": float("nan")},
    "top_k 0": {**good, "top_k": 0},
    "top_k 1.5": {**good, "top_k": 1.5},
    "max_tokens true": {**good, "max_tokens": True},
    "max_tokens 5000": {**good, "max_tokens": 5000},
}
rows = []
for name, body in bad_requests.items():
    try:
        check_request(body)
        raise AssertionError(f"{name} was accepted")
    except BadRequest as e:
        rows.append(f"| {name} | {e.status} | {str(e)[:90]} |")
print("| request | status | message |\n|---|---|---|\n" + "\n".join(rows))
req = check_request({"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
                                  {"role": "user", "content": "there"}], "max_completion_tokens": 7}, openai=True)
test_eq(req["messages"], [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi\n\nthere"}])
back = check_request({"messages": [{"role": "user", "content": "12*7?"}, {"role": "assistant", "content":
                      "<|python_start|>12*7<|python_end|><|output_start|>84<|output_end|>It is 84."},
                                   {"role": "user", "content": "Thanks"}]})
test_eq(back["messages"][1]["content"], [{"type": "python", "text": "12*7"}, {"type": "python_output", "text": "84"},
                                         {"type": "text", "text": "It is 84."}])  # tool markers become parts again
test_eq((req["max_tokens"], req["temperature"], req["top_k"]), (7, 0.8, 50))


# %% [markdown]
# ## Workers and the pool
#
# A model replica can serve one request at a time; nanochat puts one on each GPU and hands them out through an
# `asyncio.Queue`: a request waits for a free worker, streams, and puts it back. On a CPU there is one device, and
# `--workers N` starts N workers that share its one copy of the weights (inference only reads them); they overlap one
# request's Python work with another's matrix products, but they share the same cores.
#
# The queue is created when the server starts, inside its event loop, so one pool can be served more than once (a
# notebook restarting its server, a test suite).

# %%
#| export
@dataclass(eq=False)
class Worker:
    "One model replica, serving one request at a time; counts what it served."
    id: int
    device: str
    engine: Engine
    requests: int = 0
    tokens: int = 0


class WorkerPool:
    "Model workers behind an asyncio queue: a request takes a free one and gives it back when its generation ends."

    def __init__(self, workers, meta=None, seed=None):
        self.workers, self.meta, self.queue, self.created = list(workers), meta or {}, None, int(time.time())
        self.seeds = random.Random(seed)  # each request without a seed gets the next one: replayable with `seed`

    def start(self):
        "A fresh queue holding every worker, in the running event loop (called when the server starts)."
        self.queue = asyncio.Queue()
        for worker in self.workers:
            self.queue.put_nowait(worker)

    async def acquire(self):
        return await self.queue.get()

    def release(self, worker):
        self.queue.put_nowait(worker)

    @property
    def available(self):
        return len(self.workers) if self.queue is None else self.queue.qsize()

    @property
    def tokenizer(self):
        return self.workers[0].engine.tokenizer

    @property
    def model_id(self):
        "The name clients see: the run's folder and the stage, e.g. speedrun-sft."
        return f"{Path(self.meta.get('source', 'nanochat-nb')).name}-{self.meta.get('stage', 'model')}"


# %%
#| export
def load_pool(path, stage=None, step=None, workers=None, device=None, seed=None):
    "A WorkerPool for a run or checkpoint directory: one worker per GPU when there are several, else `workers` (1)."
    if device is None and torch.cuda.is_available():
        devices = [f"cuda:{i}" for i in range(torch.cuda.device_count())]
    else:
        devices = [str(get_device(device))]
    n = len(devices) if workers is None else workers
    if not isinstance(n, int) or isinstance(n, bool) or n < 1:
        raise ValueError(f"workers must be an integer >= 1, got {workers!r}")
    on = [devices[i % len(devices)] for i in range(n)]
    loaded = {d: load_for_inference(path, stage, step, d) for d in dict.fromkeys(on)}  # one copy per device
    pool = [Worker(i, d, Engine(*loaded[d][:2])) for i, d in enumerate(on)]
    return WorkerPool(pool, loaded[on[0]][2], seed)


# %%
pool = load_pool(run_dir, workers=2, seed=0)
print(pool.model_id, [(w.id, w.device) for w in pool.workers], pool.available)
assert pool.workers[0].engine.model is pool.workers[1].engine.model  # one copy of the weights on the CPU


# %% [markdown]
# ## Generating in a thread, streaming in the event loop
#
# The server is one asyncio event loop, and it must never stop answering (`/health`, other clients, a disconnect),
# so the model cannot run in it. Each reply runs in a thread of its own on the worker it took, and hands its tokens
# to the loop through an `asyncio.Queue` with `call_soon_threadsafe`. Three rules keep the pool whole:
#
# - the *thread* gives the worker back, in a `finally`, when generation has really ended (done, failed or stopped),
#   so two replies never share a worker;
# - when the consumer goes away (the client left, a stop string was hit, anything raised), the generator's `finally`
#   sets a stop flag that the thread checks at every token, so the worker is back within a token, not after
#   `max_tokens`;
# - a failure in the thread travels through the queue and is raised in the loop, where the stream can report it.

# %%
#| export
async def generate_tokens(pool, prompt, req, result):
    "Yield (worker, new tokens) of one reply, made in a thread on a pooled worker; `result` gets finish_reason, count."
    loop, stop, tokens = asyncio.get_running_loop(), threading.Event(), asyncio.Queue()
    worker = await pool.acquire()
    seed = req["seed"] if req["seed"] is not None else pool.seeds.randrange(2 ** 31)
    def emit(item):
        try:
            loop.call_soon_threadsafe(tokens.put_nowait, item)
        except RuntimeError:  # the loop has closed: the server is gone
            pass
    def work():
        engine, last = worker.engine, ("end", "length")
        steps = engine.generate(prompt, max_tokens=req["max_tokens"], temperature=req["temperature"],
                                top_k=req["top_k"], seed=seed)
        try:
            for column, _ in steps:
                if stop.is_set() or column[0] in (engine.end, engine.bos):
                    last = ("end", "cancelled" if stop.is_set() else "stop")
                    break
                worker.tokens += 1
                emit(("token", column[0]))
        except Exception as e:
            last = ("error", e)
        finally:
            steps.close()
            try:  # back to the pool before the last word: a reply that ended by itself has freed its worker by then
                loop.call_soon_threadsafe(pool.release, worker)
            except RuntimeError:
                pass
            emit(last)
    worker.requests += 1
    threading.Thread(target=work, daemon=True, name=f"generate-worker-{worker.id}").start()
    try:
        while True:
            items = [await tokens.get()]
            while not tokens.empty():  # whatever else is ready goes out with it: one write, not one per token
                items.append(tokens.get_nowait())
            batch = [value for kind, value in items if kind == "token"]
            if batch:
                result["completion_tokens"] = result.get("completion_tokens", 0) + len(batch)
                yield worker, batch
            kind, value = items[-1]  # "end" and "error" are always the thread's last word
            if kind == "error":
                raise value
            if kind == "end":
                result["finish_reason"] = value
                return
    finally:
        stop.set()


# %% [markdown]
# Text goes out through chapter 08's `TextStream`, so a character is never sent in halves. For the OpenAI protocol
# there is one more step: `stop` strings. The reply must end *before* the first stop string, and a stop string can
# arrive split across pieces, so `StopStrings` holds back a tail as long as the longest stop string, less one.

# %%
#| export
class StopStrings:
    "Cut streamed text at the first of some stop strings, holding back a tail that may be the start of one."

    def __init__(self, stops):
        self.stops, self.held = list(stops), ""
        self.keep = max(map(len, self.stops), default=1) - 1

    def feed(self, delta):
        "Add text; return (text safe to send, whether a stop string was reached)."
        self.held += delta
        cuts = [i for i in (self.held.find(s) for s in self.stops) if i >= 0]
        if cuts:
            out, self.held = self.held[:min(cuts)], ""
            return out, True
        cut = max(len(self.held) - self.keep, 0)
        out, self.held = self.held[:cut], self.held[cut:]
        return out, False

    def flush(self):
        "At the end: the tail that was held back."
        out, self.held = self.held, ""
        return out


async def reply_text(pool, prompt, req, result):
    "A reply's text in pieces: whole characters, cut before the first stop string (finish_reason 'stop' then)."
    text, stops = TextStream(pool.tokenizer), StopStrings(req["stop"])
    async with aclosing(generate_tokens(pool, prompt, req, result)) as tokens:
        async for _, batch in tokens:
            piece, hit = stops.feed("".join(map(text.feed, batch)))
            if piece:
                yield piece
            if hit:
                result["finish_reason"] = "stop"
                return
    piece, hit = stops.feed(text.flush())
    if tail := piece + ("" if hit else stops.flush()):
        yield tail


# %%
s = StopStrings(["\n\n", "END"])
pieces = [s.feed(p) for p in ["Hello", " E", "N", "D more"]]
print(pieces)
test_eq("".join(p for p, _ in pieces), "Hello ")  # everything before "END", nothing after
test_eq([hit for _, hit in pieces], [False, False, False, True])
s = StopStrings([])
test_eq(s.feed("abc"), ("abc", False))


# %% [markdown]
# ## Noticing that the client left
#
# Whether Starlette's own streaming response notices a client leaving depends on the ASGI version the server
# announces: below 2.4 it listens for the disconnect; from 2.4 on it waits for a write to fail, and a write to a
# closed connection need not fail (uvicorn's h11 server drops it silently), so the reply would run to `max_tokens`
# for nobody, holding a worker all that time. Nor does it close the generator it stops; that is left to the garbage
# collector. So our responses watch the connection themselves: one task streams, another waits for the ASGI
# `http.disconnect` message; whichever ends first cancels the other, and the cancellation runs
# every `finally` above, down to the stop flag of the generating thread. A non-streaming answer (OpenAI's, below)
# is watched the same way.

# %%
#| export
async def _client_gone(receive):
    "Return when the ASGI server reports that the client disconnected."
    while (await receive())["type"] != "http.disconnect":
        pass


async def _first_of(main, receive):
    "Await coroutine `main` unless the client leaves first (then cancel it); returns its task."
    tasks = [asyncio.ensure_future(main), asyncio.ensure_future(_client_gone(receive))]
    try:
        await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)  # let every finally run
    return tasks[0]


class EventStream(StreamingResponse):
    "Server-sent events that stop the moment the client hangs up (not at the next write); the generator is closed."
    media_type = "text/event-stream"

    async def __call__(self, scope, receive, send):
        self.headers["cache-control"] = "no-cache"
        try:
            task = await _first_of(self.stream_response(send), receive)
        finally:
            await self.body_iterator.aclose()
        if not task.cancelled() and task.exception() and not isinstance(task.exception(), OSError):
            raise task.exception()


def sse(data):
    "One server-sent event carrying `data` as JSON."
    return f"data: {json.dumps(data, ensure_ascii=False)}\n\n"


# %% [markdown]
# ## nanochat's endpoint
#
# `POST /chat/completions` streams only: `data: {"token": "<new text>", "gpu": <worker id>}` for each piece of text,
# then `data: {"done": true}`. A failure during generation arrives as `data: {"error": "..."}` before the end, since
# the HTTP status (200) was sent with the first byte.

# %%
#| export
async def nanochat_events(pool, prompt, req):
    'nanochat\'s stream: data: {"token": text, "gpu": worker id} per piece, then data: {"done": true}.'
    text, result = TextStream(pool.tokenizer), {}
    try:
        async with aclosing(generate_tokens(pool, prompt, req, result)) as tokens:
            async for worker, batch in tokens:
                deltas = [delta for delta in map(text.feed, batch) if delta]
                if deltas:
                    yield "".join(sse({"token": delta, "gpu": worker.id}) for delta in deltas)
    except Exception as e:
        yield sse({"error": f"generation failed: {type(e).__name__}: {e}"})
    yield sse({"done": True})


async def read_json(request):
    "The request's JSON body, or BadRequest: 413 past MAX_BODY_BYTES, 400 when it is not JSON."
    body = b""
    async for chunk in request.stream():
        body += chunk
        if len(body) > MAX_BODY_BYTES:
            raise BadRequest(f"the body is over {MAX_BODY_BYTES:,} bytes; send a shorter conversation", 413)
    try:
        return json.loads(body)
    except (ValueError, RecursionError) as e:
        raise BadRequest(f"the body is not valid JSON ({str(e)[:80]})")


def build_prompt(pool, req):
    "(prompt ids, max_tokens cut to the room left) for a checked request; BadRequest when the model cannot take it."
    try:
        prompt = chat_prompt(pool.tokenizer, req["messages"])
        return prompt, context_room(pool.workers[0].engine.model, prompt, req["max_tokens"])
    except ValueError as e:
        raise BadRequest(str(e)) from None


# %%
#| export
async def chat_completions(request: Request):
    "nanochat's streaming endpoint: POST {messages, temperature?, top_k?, max_tokens?} -> server-sent events."
    pool = request.app.state.pool
    try:
        req = check_request(await read_json(request))
        prompt, req["max_tokens"] = build_prompt(pool, req)
    except BadRequest as e:
        return JSONResponse({"detail": str(e)}, e.status)
    return EventStream(nanochat_events(pool, prompt, req))


async def health(request: Request):
    "nanochat's /health: ready, how many workers, how many free."
    pool = request.app.state.pool
    return {"status": "ok", "ready": bool(pool.workers), "num_gpus": len(pool.workers),
            "available_workers": pool.available, "model": pool.model_id}


async def stats(request: Request):
    "nanochat's /stats: the workers, free and busy, with what each has served."
    pool = request.app.state.pool
    return {"total_workers": len(pool.workers), "available_workers": pool.available,
            "busy_workers": len(pool.workers) - pool.available,
            "workers": [{"gpu_id": w.id, "device": w.device, "requests": w.requests, "tokens": w.tokens}
                        for w in pool.workers]}


# %% [markdown]
# ## The OpenAI protocol
#
# OpenAI's chat-completions API is the lingua franca of LLM tools, so the same server speaks it under `/v1`:
#
# - `GET /v1/models` lists one model, named after the run and stage;
# - `POST /v1/chat/completions` without `stream` answers with one `chat.completion` object: the message, a
#   `finish_reason` (`stop` or `length`) and `usage` (prompt, completion and total tokens);
# - with `"stream": true` it sends `chat.completion.chunk` events: a first chunk with the role, then one per piece of
#   text in `choices[0].delta.content`, a last one with the `finish_reason`, the usage when
#   `stream_options.include_usage` asks for it, and `data: [DONE]`.
#
# Errors use OpenAI's shape, `{"error": {"message", "type", "param", "code"}}`, which the `openai` package turns
# into a `BadRequestError` carrying our message.

# %%
#| export
def _head(pool, kind):
    "The fields every completion object and chunk starts with."
    return {"id": f"chatcmpl-{uuid.uuid4().hex}", "object": kind, "created": int(time.time()), "model": pool.model_id,
            "system_fingerprint": None}


def _usage(prompt, result):
    n = result.get("completion_tokens", 0)
    return {"prompt_tokens": len(prompt), "completion_tokens": n, "total_tokens": len(prompt) + n}


def _openai_error(message, status, kind="invalid_request_error"):
    return JSONResponse({"error": {"message": message, "type": kind, "param": None, "code": None}}, status)


async def openai_events(pool, prompt, req):
    "OpenAI's chunk stream: the role, content deltas, the finish reason, usage if asked, then [DONE]."
    head, result = _head(pool, "chat.completion.chunk"), {}
    def chunk(delta, finish=None):
        return sse({**head, "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}]})
    yield chunk({"role": "assistant", "content": ""})
    try:
        async for piece in reply_text(pool, prompt, req, result):
            yield chunk({"content": piece})
    except Exception as e:
        yield sse({"error": {"message": f"generation failed: {type(e).__name__}: {e}", "type": "server_error"}})
    else:
        yield chunk({}, result["finish_reason"])
        if req["include_usage"]:
            yield sse({**head, "choices": [], "usage": _usage(prompt, result)})
    yield "data: [DONE]\n\n"


async def openai_completion(pool, prompt, req):
    "OpenAI's chat.completion object for one reply, generated whole."
    result = {}
    text = "".join([piece async for piece in reply_text(pool, prompt, req, result)])
    return {**_head(pool, "chat.completion"), "usage": _usage(prompt, result),
            "choices": [{"index": 0, "message": {"role": "assistant", "content": text, "refusal": None},
                         "logprobs": None, "finish_reason": result["finish_reason"]}]}


# %%
#| export
async def openai_chat(request: Request):
    "OpenAI's POST /v1/chat/completions, streaming or not."
    pool = request.app.state.pool
    try:
        req = check_request(await read_json(request), openai=True)
        prompt, req["max_tokens"] = build_prompt(pool, req)
    except BadRequest as e:
        return _openai_error(str(e), e.status)
    if req["stream"]:
        return EventStream(openai_events(pool, prompt, req))
    task = await _first_of(openai_completion(pool, prompt, req), request.receive)
    if task.cancelled():  # the client left; nobody reads this
        return JSONResponse({}, 499)
    if task.exception():
        e = task.exception()
        return _openai_error(f"generation failed: {type(e).__name__}: {e}", 500, "server_error")
    return JSONResponse(task.result())


async def openai_models(request: Request):
    "OpenAI's GET /v1/models: the one model this server holds."
    pool = request.app.state.pool
    return {"object": "list", "data": [{"id": pool.model_id, "object": "model", "created": pool.created,
                                        "owned_by": "nanochat-nb"}]}


# %% [markdown]
# ## The chat page
#
# One HTML file, no framework and no build step, like nanochat's: plain text in bubbles (text from the model is
# never parsed as HTML), streamed over `fetch` and read with a stream reader. What it does:
#
# - **Enter** sends (Shift+Enter for a new line); the answer streams in; **Stop** (or Escape) ends it;
# - **click one of your messages** to edit it: it returns to the input box, and it and everything after it leave the
#   conversation; press Enter to send the new version;
# - **click an answer** to regenerate it;
# - **New conversation** (or Ctrl+Shift+N) starts over;
# - slash commands, as nanochat's: `/temperature [v]`, `/topk [v]`, `/max_tokens [v]`, `/clear`, `/help`;
# - tool calls and their results, which arrive as text between their markers, get boxes of their own.

# %%
#| export
PAGE_STYLE = """
* { box-sizing: border-box; }
body { margin: 0; height: 100vh; display: flex; flex-direction: column; font: 15px/1.45 system-ui, sans-serif;
       background: #fafafa; color: #222; }
header { display: flex; align-items: center; gap: 12px; padding: 10px 16px; border-bottom: 1px solid #ddd;
         background: #fff; }
header b { font-size: 17px; } #model { color: #777; font-size: 13px; flex: 1; }
#chat { flex: 1; overflow-y: auto; padding: 16px; max-width: 860px; width: 100%; margin: 0 auto; }
.msg { padding: 8px 12px; margin: 8px 0; border-radius: 10px; white-space: pre-wrap; word-wrap: break-word;
       cursor: pointer; }
.msg.user { background: #dbeafe; margin-left: 20%; }
.msg.assistant { background: #fff; border: 1px solid #e3e3e3; margin-right: 20%; }
.msg.streaming::after { content: "\\258D"; color: #888; }
.tool-call, .tool-result { font-family: ui-monospace, monospace; font-size: 13px; padding: 1px 5px;
                           border-radius: 4px; }
.tool-call { background: #e3f2e1; border: 1px solid #9c9; } .tool-call::before { content: "calculator: "; color: #575; }
.tool-result { background: #fdeede; border: 1px solid #d99; } .tool-result::before { content: "= "; color: #955; }
footer { display: flex; gap: 8px; padding: 12px 16px; border-top: 1px solid #ddd; background: #fff; }
#input { flex: 1; resize: none; font: inherit; padding: 8px; border: 1px solid #ccc; border-radius: 8px; }
button { font: inherit; padding: 6px 14px; border: 1px solid #bbb; border-radius: 8px; background: #fff;
         cursor: pointer; }
#status { padding: 0 16px 8px; color: #666; font-size: 13px; min-height: 1.5em; background: #fff; }
#status.error { color: #b00; }
"""

PAGE_BODY = """
<header><b>nanochat-nb</b><span id="model"></span>
<button id="new" title="Ctrl+Shift+N">New conversation</button></header>
<main id="chat"></main>
<footer><textarea id="input" rows="2" placeholder="Message (Enter sends, Shift+Enter new line, /help)"></textarea>
<button id="send">Send</button><button id="stop" hidden>Stop</button></footer>
<div id="status"></div>
"""

# %%
#| export
PAGE_SCRIPT = r"""
const $ = (id) => document.getElementById(id);
const chat = $('chat'), input = $('input'), status = $('status');
const settings = {temperature: 0.8, top_k: 50, max_tokens: 512};
let messages = [], controller = null;

const MARKER = /<\|(python_start|python_end|output_start|output_end)\|>/g;
function renderParts(el, text) {  // plain text, with tool calls and results in spans of their own
  el.replaceChildren();
  let kind = 'text', last = 0;
  const add = (s) => {
    if (!s && kind === 'text') return;
    const span = document.createElement('span'); span.className = kind; span.textContent = s; el.append(span);
  };
  for (const m of text.matchAll(MARKER)) {
    add(text.slice(last, m.index));
    kind = {python_start: 'tool-call', output_start: 'tool-result'}[m[1]] || 'text';
    last = m.index + m[0].length;
  }
  add(text.slice(last));
}
function bubble(msg, i) {
  const div = document.createElement('div');
  div.className = 'msg ' + msg.role;
  if (msg.role === 'assistant') renderParts(div, msg.content); else div.textContent = msg.content;
  div.title = msg.role === 'user' ? 'Click to edit' : 'Click to regenerate';
  div.onclick = () => { if (!controller) (msg.role === 'user' ? edit : regenerate)(i); };
  return div;
}
function render() { chat.replaceChildren(...messages.map(bubble)); chat.scrollTop = chat.scrollHeight; }
function note(text, error = false) { status.textContent = text; status.className = error ? 'error' : ''; }
function setBusy(busy) {
  document.body.dataset.busy = busy ? '1' : '0'; $('send').hidden = busy; $('stop').hidden = !busy;
}

async function generate() {
  const msg = {role: 'assistant', content: ''};
  messages.push(msg); render();
  const div = chat.lastElementChild; div.classList.add('streaming');
  controller = new AbortController(); setBusy(true); note('');
  try {
    const res = await fetch('chat/completions', {method: 'POST', headers: {'Content-Type': 'application/json'},
      body: JSON.stringify({messages: messages.slice(0, -1), ...settings}), signal: controller.signal});
    if (!res.ok) throw new Error((await res.json().catch(() => ({}))).detail || `HTTP ${res.status}`);
    const reader = res.body.getReader(), decoder = new TextDecoder();
    let buffer = '';
    for (;;) {
      const {value, done} = await reader.read();
      if (done) break;
      buffer += decoder.decode(value, {stream: true});
      const events = buffer.split('\n\n'); buffer = events.pop();
      for (const event of events) {
        if (!event.startsWith('data: ')) continue;
        const data = JSON.parse(event.slice(6));
        if (data.error) throw new Error(data.error);
        if (data.token) msg.content += data.token;
      }
      renderParts(div, msg.content); chat.scrollTop = chat.scrollHeight;
    }
  } catch (e) {
    if (e.name !== 'AbortError') note(e.message, true);
  } finally {
    div.classList.remove('streaming'); controller = null; setBusy(false);
    if (!msg.content) { messages.pop(); render(); }
    input.focus();
  }
}
function send() {
  const text = input.value.trim();
  if (!text || controller) return;
  input.value = '';
  if (text.startsWith('/')) return command(text);
  messages.push({role: 'user', content: text});
  generate();
}
function edit(i) {
  input.value = messages[i].content; messages = messages.slice(0, i); render(); input.focus();
  note('Editing: change your message and press Enter.');
}
function regenerate(i) { messages = messages.slice(0, i); render(); generate(); }
function newConversation() {
  if (controller) controller.abort();
  messages = []; render(); note('New conversation.'); input.focus();
}
function command(text) {
  const [name, value] = text.split(/\s+/);
  const ranges = {'/temperature': ['temperature', 0, 2, parseFloat], '/topk': ['top_k', 1, 200, parseInt],
                  '/max_tokens': ['max_tokens', 1, 4096, parseInt]};
  if (name === '/clear') return newConversation();
  if (name in ranges) {
    const [key, lo, hi, parse] = ranges[name];
    if (value !== undefined) {
      const v = parse(value);
      if (!(v >= lo && v <= hi)) return note(`${name} takes a value from ${lo} to ${hi}`, true);
      settings[key] = v;
    }
    return note(`${key} = ${settings[key]}`);
  }
  note((name === '/help' ? '' : `Unknown command ${name}. `) + 'Commands: /temperature [0-2], /topk [1-200], ' +
       '/max_tokens [1-4096], /clear, /help. Click a message of yours to edit it, an answer to regenerate it.');
}
input.addEventListener('keydown', (e) => { if (e.key === 'Enter' && !e.shiftKey) { e.preventDefault(); send(); } });
document.addEventListener('keydown', (e) => {
  if (e.ctrlKey && e.shiftKey && e.key.toLowerCase() === 'n') { e.preventDefault(); newConversation(); }
  if (e.key === 'Escape' && controller) controller.abort();
});
$('send').onclick = send; $('new').onclick = newConversation;
$('stop').onclick = () => controller && controller.abort();
fetch('health').then((r) => r.json())
  .then((h) => { $('model').textContent = `${h.model} · ${h.num_gpus} worker(s)`; });
setBusy(false); input.focus();
"""


def chat_page():
    "The chat page: one HTML file, vanilla JS."
    return (f'<!doctype html><html lang="en"><head><meta charset="utf-8"><title>nanochat-nb</title>'
            f'<meta name="viewport" content="width=device-width, initial-scale=1"><style>{PAGE_STYLE}</style></head>'
            f"<body>{PAGE_BODY}"
            f"<script>{PAGE_SCRIPT}</script></body></html>")


# %% [markdown]
# ## The app
#
# All routes read the pool from the app's state, so one function builds the whole server. CORS is open to every
# origin, as nanochat's is: a page served from elsewhere (an OpenWebUI, a local HTML file) may call the API.

# %%
#| export
async def page(request: Request):
    return HTMLResponse(chat_page())


def create_app(pool):
    "The FastAPI app over a WorkerPool: the chat page, nanochat's endpoints and the OpenAI-compatible ones."
    @asynccontextmanager
    async def lifespan(app):
        pool.start()
        yield
    app = FastAPI(title="nanochat-nb", lifespan=lifespan)
    app.add_middleware(CORSMiddleware, allow_origins=["*"], allow_methods=["*"], allow_headers=["*"])
    app.state.pool = pool
    for path, handler, method in [("/", page, "GET"), ("/health", health, "GET"), ("/stats", stats, "GET"),
                                  ("/chat/completions", chat_completions, "POST"),
                                  ("/v1/models", openai_models, "GET"), ("/v1/chat/completions", openai_chat, "POST")]:
        app.add_api_route(path, handler, methods=[method])
    return app


# %% [markdown]
# `nanochat-nb serve` loads the pool and runs uvicorn; `ServerThread` runs the same app in a background thread, for
# this notebook and for the tests, on a free port when `port=0`.

# %%
#| export
def serve(path, stage=None, step=None, host="127.0.0.1", port=8000, workers=None, device=None, seed=None):
    "Load the workers and serve the chat page and both APIs until interrupted: what `nanochat-nb serve` runs."
    if not isinstance(port, int) or not 0 <= port <= 65535:
        raise ValueError(f"port must be an integer from 0 to 65535 (0: any free port), got {port!r}")
    pool = load_pool(path, stage, step, workers, device, seed)
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:  # here, not in uvicorn: a busy port is one clear error, and port 0 says which port it got
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        raise ValueError(f"cannot listen on {host}:{port}: {e.strerror}; fix: pick another --port (0: any free "
                         "port), or a --host that is an address of this machine") from None
    url = f"http://{host}:{sock.getsockname()[1]}"
    print(f"nanochat-nb serve: {pool.model_id} (step {pool.meta.get('step')}) on {len(pool.workers)} worker(s): "
          f"{', '.join(w.device for w in pool.workers)}\nchat page: {url}/   OpenAI API: {url}/v1", flush=True)
    uvicorn.Server(uvicorn.Config(create_app(pool), log_level="warning")).run(sockets=[sock])


class ServerThread:
    "Run an app under uvicorn in a background thread: `with ServerThread(app) as url: ...` (port 0: a free one)."

    def __init__(self, app, host="127.0.0.1", port=0):
        config = uvicorn.Config(app, host=host, port=port, log_level="warning", timeout_graceful_shutdown=5)
        self.server, self.url = uvicorn.Server(config), None
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def start(self, timeout=30):
        "Start serving; returns the base URL once the server accepts connections."
        self.thread.start()
        deadline = time.monotonic() + timeout
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the server did not start (is the port free?)")
            time.sleep(0.02)
        host, port = self.server.servers[0].sockets[0].getsockname()[:2]
        self.url = f"http://{host}:{port}"
        return self.url

    def stop(self):
        "Shut down and wait for the thread."
        self.server.should_exit = True
        self.thread.join(15)

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()


# %% [markdown]
# ## Talking to it
#
# We start the server on a free port of this machine, with the two-worker pool from above, and talk to it the way
# clients do: over HTTP.

# %%
server = ServerThread(create_app(pool))
url = server.start()
def get(path):
    return json.loads(urllib.request.urlopen(url + path, timeout=60).read())
def post(path, body):
    request = urllib.request.Request(url + path, json.dumps(body).encode(), {"Content-Type": "application/json"})
    return urllib.request.urlopen(request, timeout=120)
print(url, get("/health"))
print(get("/stats"))

# %% [markdown]
# nanochat's stream, raw: one event per piece of text, the worker that made it, and the end.

# %%
with post("/chat/completions", {"messages": [{"role": "user", "content": "Hello!"}], "max_tokens": 12}) as r:
    raw = r.read().decode()
print(raw)
events = [json.loads(line[6:]) for line in raw.splitlines() if line.startswith("data: ")]
assert events[-1] == {"done": True} and all(set(e) == {"token", "gpu"} for e in events[:-1])

# %% [markdown]
# A bad request gets a 4xx and the message from the checks, before any model work:

# %%
for body in [{"messages": [{"role": "user", "content": "Hi"}], "temperature": 5}, "not json"]:
    data = json.dumps(body).encode() if isinstance(body, dict) else body.encode()
    try:
        urllib.request.urlopen(urllib.request.Request(url + "/chat/completions", data), timeout=30)
    except urllib.error.HTTPError as e:
        print(e.code, e.read().decode())
        assert e.code == 400

# %% [markdown]
# Any OpenAI client works by pointing its base URL at `/v1`. Here is the official `openai` package, without and with
# streaming; with the same `seed`, both give the same reply:

# %%
from openai import OpenAI

client = OpenAI(base_url=url + "/v1", api_key="none needed", max_retries=0)
print([m.id for m in client.models.list()])
question = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Name a Python builtin."}]
reply = client.chat.completions.create(model=pool.model_id, messages=question, max_tokens=16, seed=3)
print(repr(reply.choices[0].message.content), reply.choices[0].finish_reason, reply.usage)
chunks = client.chat.completions.create(model=pool.model_id, messages=question, max_tokens=16, seed=3, stream=True,
                                        stream_options={"include_usage": True})
streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
test_eq(streamed, reply.choices[0].message.content)

# %% [markdown]
# A client that leaves mid-answer: we ask for as many tokens as the model can take, read two events and hang up.
# The worker is back in the pool at once, having made a handful of tokens, not hundreds:

# %%
before = sum(w.tokens for w in pool.workers)
r = post("/chat/completions", {"messages": [{"role": "user", "content": "Go on forever."}], "max_tokens": 4096,
                               "temperature": 0.0})
r.readline(), r.readline(), r.readline()
r.close()
t0 = time.perf_counter()
while get("/stats")["available_workers"] < len(pool.workers) and time.perf_counter() - t0 < 10:
    time.sleep(0.01)
made = sum(w.tokens for w in pool.workers) - before
print(f"workers free again {time.perf_counter() - t0:.3f} s after the hang-up; the reply made {made} tokens")
assert get("/stats")["available_workers"] == len(pool.workers) and made < 200


# %% [markdown]
# How fast is it through the whole stack (HTTP, the queue, the thread, the engine)? Time to the first token and
# tokens per second, per request, one request at a time:

# %%
def timed_request(max_tokens=64, seed=0):
    "(seconds to the first token event, tokens, seconds in all) of one streamed request."
    before, t0, first = sum(w.tokens for w in pool.workers), time.perf_counter(), None
    body = {"messages": [{"role": "user", "content": "Write a Python function."}], "max_tokens": max_tokens,
            "seed": seed}
    with post("/chat/completions", body) as r:
        for line in r:
            if first is None and line.startswith(b'data: {"token"'):
                first = time.perf_counter() - t0
    return first, sum(w.tokens for w in pool.workers) - before, time.perf_counter() - t0

runs = [timed_request(seed=s) for s in range(3)]
print("| time to first token | tokens | tokens/s |\n|---|---|---|")
for first, n, total in runs:
    print(f"| {first * 1e3:.0f} ms | {n} | {n / total:.0f} |")


# %% [markdown]
# And the page itself, in a headless Chromium (where one is installed: the tests drive it the same way). To show how
# tool calls look, we put an earlier exchange with a calculator call into the page's history first; the base model
# does not make tool calls.

# %%
#| fig-alt: "A screenshot of the chat page in headless Chromium after one exchange: the user's message and the model's streamed reply."
def screenshot(url):
    "A PNG of the chat page after one exchange, taken by headless Chromium through Playwright."
    from playwright.sync_api import sync_playwright
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=shutil.which("chromium"), args=[
            "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking"])
        tab = browser.new_page(viewport={"width": 860, "height": 520})
        tab.goto(url)
        tab.evaluate("""messages.push({role: 'user', content: 'What is 12 times 7?'}, {role: 'assistant',
            content: '<|python_start|>12*7<|python_end|><|output_start|>84<|output_end|> It is 84.'}); render();""")
        tab.fill("#input", "/max_tokens 40")  # a slash command: shorter answers
        tab.press("#input", "Enter")
        tab.fill("#input", "Thanks! Now write a function.")
        tab.press("#input", "Enter")
        tab.wait_for_function("document.querySelectorAll('.msg').length === 4 && document.body.dataset.busy === '0'")
        png = tab.screenshot()
        browser.close()
    return png

if shutil.which("chromium"):
    from concurrent.futures import ThreadPoolExecutor
    with ThreadPoolExecutor(1) as ex:  # Playwright's sync API wants a thread without an event loop (Jupyter has one)
        display(Image(ex.submit(screenshot, url).result()))

# %%
server.stop()

# %% [markdown]
# ## At scale
#
# On an 8×H100 box, `nanochat-nb serve --run-dir runs/d20 --stage sft --host 0.0.0.0` starts one worker per GPU,
# each with its own copy of the d20 weights (about 1 GB in bf16), and requests spread over them as they arrive: eight
# conversations stream at once, each at a few hundred tokens per second. nanochat's server works the same way. Past
# that, the next step is batching: one worker decoding many conversations in one forward pass (continuous batching,
# as vLLM does), which the engine's `num_samples` rows hint at but this server does not do. Put a reverse proxy with
# TLS and authentication in front before opening the port to the internet: this server has no accounts.
#
# ## Summary
#
# - Every request is checked against nanochat's limits first; refusals are 4xx with a message, never a 500.
# - A `WorkerPool` hands out model workers through an `asyncio.Queue`; generation runs in a thread, and the thread
#   gives its worker back when it ends, however it ends.
# - The response watches the connection, so a client that leaves stops its generation within a token.
# - `/chat/completions`, `/health` and `/stats` are nanochat's; `/v1/chat/completions` and `/v1/models` are OpenAI's,
#   so any OpenAI client can talk to a model trained here; `/` is the chat page.
#
# ## Exercises
#
# 1. Add an API key: refuse requests without `Authorization: Bearer <key>` with a 401, and check that the `openai`
#    package, given the key, still works.
# 2. Send 16 requests at once to a server with 1, 2 and 4 CPU workers. How do total throughput and the time to the
#    first token change, and why?
# 3. Add `logprobs` to the OpenAI endpoint: the engine would have to hand back each sampled token's log-probability.
