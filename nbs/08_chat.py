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
# # Chat
# > A conversation with the model, token by token: in the notebook, in a terminal, and (next chapter) in a browser or
# > any OpenAI client.

# %% [markdown]
# The product is a ChatGPT clone, so whoever trained the model must be able to talk to it. The engine (chapter 07)
# continues a list of token ids; a chat needs more than that: a history of turns that the tokenizer renders into the
# chat format, replies that appear as they are generated rather than all at once, text decoded without ever showing
# half a character, tool calls and their results kept apart from the prose, and the small moves of every chat app:
# regenerate an answer, edit an earlier question, start over, stop a reply that rambles.
#
# This chapter builds all of that once, in a plain class, `Conversation`, and puts two thin views on it: the terminal
# loop behind `nanochat-nb chat`, and an ipywidgets chat for the notebook. The web server and its OpenAI-compatible
# API (chapter 08b) reuse the same pieces.
#
# *Pipeline:* the tokenizer's chat rendering (01) and the engine with its loader (07) come before; the web server
# (08b) and the chat-tuned stages (mid 11, SFT 12, RL 13), which this chapter's surfaces load by name, come after.

# %%
#| default_exp chat

# %%
#| export
import html, random, re, sys, threading, time
from pathlib import Path

import ipywidgets as W
from fastcore.basics import patch

from nanochat_nb.checkpoint import STAGES, checkpoint_dir, latest_step
from nanochat_nb.engine import Engine, _check_sampling, demo_run, load_for_inference

# %%
#| hide
import io

from fastcore.test import test_eq, test_fail
from IPython.display import HTML, display

from nanochat_nb.engine import ScriptedModel

# %% [markdown]
# ## A model to talk to
#
# As in chapter 07: point `run_dir` at a finished run (`"../runs/speedrun"` after `make speedrun`) to chat with its
# latest stage, or leave it at `None` to train a tiny base model here in about twenty seconds. A base model has never
# seen a conversation, so its answers are Python-flavoured babble; the chat-tuned stages of chapters 11 to 13 load
# through the same `load_for_inference` and answer properly. Everything in this chapter works the same with either.

# %%
run_dir = None  # a run directory with a checkpoint; None trains a tiny model here (chapter 07's `demo_run`)

# %%
if run_dir is None:
    run_dir = demo_run()
model, tokenizer, meta = load_for_inference(run_dir)
engine = Engine(model, tokenizer)
print(f"{meta['stage']} step {meta['step']}: {model.num_params():,} parameters, {tokenizer}")


# %% [markdown]
# ## Streaming text without broken characters
#
# A reply should appear token by token. But a token is a run of *bytes*, and a character outside ASCII (an accent,
# an emoji) is several bytes that BPE may split across tokens. Decoding the tokens so far then ends in half a
# character, which UTF-8 decoding shows as the replacement character U+FFFD (`�`). nanochat's answer, which we take:
# decode everything so far, and while the text ends in U+FFFD show nothing new; the next token completes the
# character and the whole of it appears at once.

# %%
#| export
class TextStream:
    "Decode tokens as they arrive; text is held back while it ends in U+FFFD (a character cut in half)."

    def __init__(self, tokenizer):
        self.tokenizer, self.ids, self.text = tokenizer, [], ""

    def feed(self, token):
        "Add one token id; return the new text that is safe to show ('' while a character is incomplete)."
        self.ids.append(token)
        text = self.tokenizer.decode(self.ids)
        if text.endswith("\ufffd"):
            return ""
        delta, self.text = text[len(self.text):], text
        return delta

    def flush(self):
        "At the end: whatever was held back (a character that never completed shows as U+FFFD)."
        text = self.tokenizer.decode(self.ids)
        delta, self.text = text[len(self.text):], text
        return delta


# %% [markdown]
# An emoji is four bytes, and a small vocabulary like ours has no merge for it, so it arrives as four tokens (and `é`
# as two). Shown naively, token by token, it flashes replacement characters; through `TextStream` each character
# appears once, whole:

# %%
ids = tokenizer.encode("Hi 🙂 café")
naive = [tokenizer.decode(ids[:i + 1]) for i in range(len(ids))]
stream = TextStream(tokenizer)
deltas = [stream.feed(t) for t in ids]
print("naive :", naive)
print("stream:", deltas)
test_eq("".join(deltas) + stream.flush(), "Hi 🙂 café")
assert not any("\ufffd" in d for d in deltas)

# %% [markdown]
# ## Parts: text, tool calls and their results
#
# A reply is not one string. When the model calls its calculator, the stream holds `<|python_start|>`, the
# expression, `<|python_end|>`, then the engine's forced `<|output_start|>`, the result, `<|output_end|>`. The
# tokenizer (chapter 01) already renders assistant turns as a list of **parts**, `{"type": "text" | "python" |
# "python_output", "text": ...}`, and a chat should keep them that way: a view can then show a tool call and its
# result distinctly, and the history renders back into exactly the tokens the model produced.
#
# `ReplyDecoder` builds those parts as tokens stream in: a tool marker closes the current part and opens the next;
# other tokens go through a `TextStream` of the current part. Each call returns the events a view needs, `(kind,
# new_text)`, where an opening marker gives `(kind, "")` so that the view can open a box before any text arrives.

# %%
#| export
TOOL_MARKERS = {"python": ("<|python_start|>", "<|python_end|>"),
                "python_output": ("<|output_start|>", "<|output_end|>")}


class ReplyDecoder:
    "Split a streamed reply into parts (text, python, python_output), each decoded without broken characters."

    def __init__(self, tokenizer):
        self.tokenizer, self.parts, self.stream = tokenizer, [], None
        self.opens = {tokenizer.encode_special(start): kind for kind, (start, _) in TOOL_MARKERS.items()}
        self.closes = {tokenizer.encode_special(end) for _, end in TOOL_MARKERS.values()}

    def _open(self, kind):
        self.parts.append({"type": kind, "text": ""})
        self.stream = TextStream(self.tokenizer)

    def _add(self, delta):
        self.parts[-1]["text"] += delta
        return [(self.parts[-1]["type"], delta)] if delta else []

    def feed(self, token):
        "Add one token id; return the events it makes: (kind of part, text to show)."
        if token in self.opens or token in self.closes:
            events = self.flush()
            if token in self.opens:
                self._open(self.opens[token])
                events.append((self.parts[-1]["type"], ""))
            return events
        if self.stream is None:
            self._open("text")
        return self._add(self.stream.feed(token))

    def flush(self):
        "Close the current part, showing whatever it held back; returns its events."
        events = self._add(self.stream.flush()) if self.stream is not None else []
        self.stream = None
        return events


# %% [markdown]
# A client that only speaks strings (a web page, an OpenAI client) needs the parts as one string. We write the tool
# parts between their special tokens' names, as nanochat's web UI shows them, and parse that back when the string
# returns in a later request. Only assistant turns are parsed: a *user* typing `<|python_start|>` gets plain text,
# never a special token.

# %%
#| export
def parts_to_text(parts):
    "One string for an assistant turn's parts: tool calls and results between their special-token names."
    if isinstance(parts, str):
        return parts
    return "".join(p["text"] if p["type"] == "text" else TOOL_MARKERS[p["type"]][0] + p["text"]
                   + TOOL_MARKERS[p["type"]][1] for p in parts)


def parts_from_text(text):
    "The parts of an assistant turn written as one string by `parts_to_text` (its inverse)."
    marks = {m: (kind, m == pair[0]) for kind, pair in TOOL_MARKERS.items() for m in pair}
    parts, kind = [], "text"
    for piece in re.split("(" + "|".join(map(re.escape, marks)) + ")", text):
        if piece in marks:
            part_kind, opening = marks[piece]
            kind = part_kind if opening else "text"
            if opening:
                parts.append({"type": kind, "text": ""})
        elif piece:
            if kind == "text" and (not parts or parts[-1]["type"] != "text"):
                parts.append({"type": "text", "text": ""})
            parts[-1]["text"] += piece
    return parts


# %% [markdown]
# Here is a reply with a tool call, as the engine would stream it: prose, the call, the forced result, more prose.
# The decoder turns it into four parts, and the tokenizer renders those parts back into exactly the streamed tokens:

# %%
sp = tokenizer.encode_special
reply = (tokenizer.encode("Let me compute. ")
         + [sp("<|python_start|>"), *tokenizer.encode("12*7"), sp("<|python_end|>")]
         + [sp("<|output_start|>"), *tokenizer.encode("84"), sp("<|output_end|>")] + tokenizer.encode(" It is 84 €."))
decoder = ReplyDecoder(tokenizer)
events = [e for t in reply for e in decoder.feed(t)] + decoder.flush()
print(events)
print(parts_to_text(decoder.parts))
test_eq([p["type"] for p in decoder.parts], ["text", "python", "python_output", "text"])
test_eq(parts_from_text(parts_to_text(decoder.parts)), decoder.parts)
rendered, _ = tokenizer.render_conversation({"messages": [{"role": "user", "content": "12 times 7?"},
                                                          {"role": "assistant", "content": decoder.parts}]})
test_eq(rendered[-len(reply) - 1:-1], reply)  # between <|assistant_start|> and <|assistant_end|>


# %% [markdown]
# ## The prompt, and how much room is left
#
# The prompt for the next reply is the whole history rendered by the tokenizer, then `<|assistant_start|>`: the
# model's cue to speak. (The tokenizer's `render_for_completion` does the same but cuts the rendering at 2,048 tokens,
# the training length; a chat must never silently drop the end of its own history.) A system message, if there is one,
# is merged into the first user turn, as nanochat's tokenizer does.
#
# The engine refuses to run past the model's rotary table, so before generating we cut `max_tokens` to the room left
# and, when there is none, say so in a way the user can act on.

# %%
#| export
def chat_prompt(tokenizer, messages):
    "Prompt ids for the assistant's next turn: the whole history rendered (never cut), then <|assistant_start|>."
    ids, _ = tokenizer.render_conversation({"messages": messages}, max_tokens=sys.maxsize)
    return ids + [tokenizer.encode_special("<|assistant_start|>")]


def context_room(model, prompt, max_tokens):
    "`max_tokens` cut to the positions the model has left after `prompt`; ValueError when none are left."
    limit = getattr(model, "rotary_seq_len", model.config.sequence_len)
    if len(prompt) >= limit:
        raise ValueError(f"the conversation is {len(prompt)} tokens and the model reads at most {limit}; "
                         "fix: clear it, or edit an earlier message to drop what follows")
    return min(max_tokens, limit - len(prompt))


# %%
messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello!"}]
prompt = chat_prompt(tokenizer, messages)
print(tokenizer.decode(prompt))
test_eq(prompt[-1], sp("<|assistant_start|>"))
test_eq(context_room(model, prompt, 256), 256)
test_fail(lambda: context_room(model, [0] * model.rotary_seq_len, 10), contains="fix: clear it")


# %% [markdown]
# ## The conversation
#
# `Conversation` is the whole chat, with no display at all. The history is a list of messages, the tokenizer's own
# format, with assistant turns as parts. `send(text)` adds the user's message and returns a generator of events that
# streams the reply; the reply joins the history as soon as it starts, so a view that redraws the history while it
# streams shows the reply growing. `regenerate()` replaces the last reply, `edit(i, text)` rewrites message `i` and
# drops everything after it (the branch-and-retry of every chat app), `clear()` starts over, and `stop()` (from another
# thread: a button, a disconnected client) ends the reply at the next token.
#
# Each reply gets its own random seed, drawn from the conversation's generator, so a regenerated answer differs and a
# conversation created with `seed=0` replays exactly. `finish_reason` says why the last reply ended: `stop` (the model
# wrote `<|assistant_end|>`), `length` (`max_tokens` was reached), `stopped` or `error`. Either way the history
# renders with a closing `<|assistant_end|>`, as nanochat's CLI appends one when a reply hits the length limit.

# %%
#| export
class Conversation:
    "A chat with a model: the history as messages, replies streamed through the Engine, tool calls kept as parts."

    def __init__(self, engine, temperature=0.6, top_k=50, max_tokens=256, seed=None):
        self.engine, self.temperature, self.top_k, self.max_tokens = engine, temperature, top_k, max_tokens
        self.rng, self.messages, self.finish_reason, self._stop = random.Random(seed), [], None, threading.Event()

    @property
    def tokenizer(self):
        return self.engine.tokenizer

    def tokens(self):
        "The history as the model reads it: ids of the rendered conversation ([<|bos|>] when empty)."
        if not self.messages:
            return [self.tokenizer.bos_id]
        return self.tokenizer.render_conversation({"messages": self.messages}, max_tokens=sys.maxsize)[0]

    def stream(self):
        "Generate the reply to the history: a generator of (kind, text) events; the reply joins the history at once."
        if not self.messages or self.messages[-1]["role"] != "user":
            raise ValueError("there is nothing to answer: the last message must be the user's; fix: send() one")
        prompt = chat_prompt(self.tokenizer, self.messages)
        max_tokens = context_room(self.engine.model, prompt, self.max_tokens)
        _check_sampling(prompt, 1, max_tokens, self.temperature, self.top_k, self.engine.model.config.vocab_size)
        self._stop.clear()
        return self._generate(prompt, max_tokens, self.rng.randrange(2 ** 31))

    def _generate(self, prompt, max_tokens, seed):
        decoder, self.finish_reason = ReplyDecoder(self.tokenizer), None
        self.messages.append({"role": "assistant", "content": decoder.parts})
        steps = self.engine.generate(prompt, max_tokens=max_tokens, temperature=self.temperature, top_k=self.top_k,
                                     seed=seed)
        try:
            for column, _ in steps:
                if self._stop.is_set() or column[0] in (self.engine.end, self.engine.bos):
                    self.finish_reason = "stopped" if self._stop.is_set() else "stop"
                    break
                yield from decoder.feed(column[0])
            yield from decoder.flush()
            self.finish_reason = self.finish_reason or "length"
        except Exception:
            self.finish_reason = "error"
            raise
        finally:
            steps.close()
            self.finish_reason = self.finish_reason or "stopped"  # the caller walked away mid-reply



# %% [markdown]
# The moves of a chat app, each a few lines on top of `stream`:

# %%
#| export
@patch
def send(self: Conversation, text):
    "Add the user's message and stream the reply; on bad input the history is left as it was."
    if not isinstance(text, str) or not text.strip():
        raise ValueError("the message is empty; fix: type something to send")
    if self.messages and self.messages[-1]["role"] == "user":
        raise ValueError("the last message has no reply yet; fix: stream() it, edit it or regenerate()")
    self.messages.append({"role": "user", "content": text})
    try:
        return self.stream()
    except ValueError:
        self.messages.pop()
        raise


@patch
def truncate(self: Conversation, index):
    "Drop message `index` and everything after it; returns the dropped messages."
    if not isinstance(index, int) or not 0 <= index < len(self.messages):
        raise ValueError(f"no message {index!r}: the conversation has {len(self.messages)} messages")
    dropped, self.messages = self.messages[index:], self.messages[:index]
    return dropped


@patch
def edit(self: Conversation, index, text):
    "Rewrite user message `index`, drop everything after it, and stream a new reply."
    if not (isinstance(index, int) and 0 <= index < len(self.messages)) or self.messages[index]["role"] != "user":
        raise ValueError(f"message {index!r} is not a user message; fix: pass the index of one of your messages")
    dropped = self.truncate(index)
    try:
        return self.send(text)
    except ValueError:
        self.messages += dropped
        raise


@patch
def regenerate(self: Conversation):
    "Drop the last reply (if any) and stream a new one to the same question."
    if self.messages and self.messages[-1]["role"] == "assistant":
        self.messages.pop()
    return self.stream()


@patch
def clear(self: Conversation):
    "Forget the whole history."
    self.messages = []


@patch
def stop(self: Conversation):
    "Ask the reply in flight to end at its next token (safe to call from another thread)."
    self._stop.set()


@patch
def ask(self: Conversation, text):
    "Send `text`, wait for the whole reply and return it as one string (tool parts between their markers)."
    for _ in self.send(text):
        pass
    return parts_to_text(self.messages[-1]["content"])


# %% [markdown]
# A short conversation with the tiny model: a question, the reply streamed as events, a regenerated answer, an edit
# that replaces the question. With a seeded conversation every step replays exactly.

# %%
chat = Conversation(engine, max_tokens=24, seed=0)
events = list(chat.send("What is a list?"))
print(events[:8])
first = parts_to_text(chat.messages[-1]["content"])
test_eq("".join(delta for _, delta in events), first)
print("reply      :", repr(first), chat.finish_reason)
second = "".join(delta for _, delta in chat.regenerate())
print("regenerated:", repr(second))
assert second != first and len(chat.messages) == 2
edited = "".join(delta for _, delta in chat.edit(0, "What is a dict?"))
print("edited     :", repr(edited))
test_eq([m["role"] for m in chat.messages], ["user", "assistant"])
test_eq(chat.messages[0]["content"], "What is a dict?")
test_eq(Conversation(engine, max_tokens=24, seed=0).ask("What is a list?"), first)  # same seed, same reply

# %% [markdown]
# When a reply hits `max_tokens` it ends with `finish_reason == "length"`, and the history still renders with a
# closing `<|assistant_end|>`, so the next turn starts cleanly. `stop()` ends a reply at its next token; here the loop
# that reads the reply calls it, in an app it is a button or a server, from another thread:

# %%
chat = Conversation(engine, max_tokens=3, seed=1)
chat.ask("Tell me everything.")
test_eq(chat.finish_reason, "length")
test_eq(chat.tokens()[-1], sp("<|assistant_end|>"))
chat = Conversation(engine, temperature=0.0, max_tokens=200, seed=1)
n = 0
for kind, delta in chat.send("Go on and on."):
    n += 1
    if n == 5:
        chat.stop()
test_eq(chat.finish_reason, "stopped")
assert n <= 6, n
chat.max_tokens = 16
print(repr(chat.ask("And then?")), chat.finish_reason)
test_fail(lambda: chat.send("   "), contains="empty")


# %% [markdown]
# ## In the terminal
#
# `nanochat-nb chat` is nanochat's `chat_cli`: type a message, watch the reply stream in; `clear` starts over, `quit`
# or `exit` (or Ctrl-D) leaves, Ctrl-C stops a reply that goes on too long. With `-p "question"` it answers once and
# exits, which makes it scriptable. Its defaults are nanochat's: temperature 0.6, top-k 50, 256 new tokens.
#
# A terminal has no boxes, so a tool call is written inline as `[calculator: 12*7 = 84]`.

# %%
#| export
def write_reply(events, write):
    "Write a reply's events as they come; a tool call and its result show as [calculator: expr = result]."
    open_kind = None
    for kind, delta in events:
        if kind != "text" and delta == "":  # a tool part opens
            write("[calculator: " if kind == "python" else " = " if open_kind == "python" else "[= ")
            open_kind = kind
            continue
        if kind == "text" and open_kind:
            write("]")
            open_kind = None
        write(delta)
    if open_kind:
        write("]")


# %%
#| export
def chat_loop(conversation, prompt=None, read=input, out=None):
    "nanochat's chat CLI: one-shot with `prompt`, else interactive (clear, quit/exit); replies stream as they come."
    out = out or sys.stdout
    def write(s):
        out.write(s)
        out.flush()
    if prompt is not None:
        write_reply(conversation.send(prompt), write)
        write("\n")
        return
    write("Chat with the model: 'clear' starts over, 'quit' or 'exit' (or Ctrl-D) leaves, Ctrl-C stops a reply.\n")
    while True:
        try:
            text = read("\nUser: ")
        except (EOFError, KeyboardInterrupt):
            write("\n")
            return
        command = text.strip().lower()
        if command in ("quit", "exit"):
            return
        if command == "clear":
            conversation.clear()
            write("Conversation cleared.\n")
        elif command:
            write("\nAssistant: ")
            try:
                write_reply(conversation.send(text), write)
            except KeyboardInterrupt:
                write(" [stopped]")
            except ValueError as e:
                write(f"error: {e}")
            write("\n")


# %% [markdown]
# The loop takes its input and output as arguments, so we can run it here on scripted input (the tests drive the real
# command through a pseudo-terminal):

# %%
inputs = iter(["Hello!", "clear", "Write some code.", "quit"])
out = io.StringIO()
def read(prompt_text):
    line = next(inputs)
    out.write(prompt_text + line + "\n")
    return line
chat_loop(Conversation(engine, max_tokens=16, seed=0), read=read, out=out)
print(out.getvalue())
assert out.getvalue().count("Assistant: ") == 2 and "Conversation cleared." in out.getvalue()

# %%
out = io.StringIO()
write_reply([("text", "So: "), ("python", ""), ("python", "12*7"), ("python_output", ""), ("python_output", "84"),
             ("text", " it is 84.")], out.write)
test_eq(out.getvalue(), "So: [calculator: 12*7 = 84] it is 84.")


# %%
#| export
def chat_cli(path, stage=None, step=None, prompt=None, temperature=0.6, top_k=50, max_tokens=256, device=None,
             seed=None):
    "Load a model and chat with it in the terminal: what `nanochat-nb chat` runs."
    _check_sampling([0], 1, max_tokens, temperature, top_k, 1)  # bad settings fail before the model loads
    model, tokenizer, meta = load_for_inference(path, stage, step, device)
    if prompt is None:
        print(f"nanochat-nb chat: {meta['stage']} model, step {meta['step']}, from {meta['source']}")
    chat_loop(Conversation(Engine(model, tokenizer), temperature, top_k, max_tokens, seed), prompt)


# %% [markdown]
# ## In the notebook: a chat widget
#
# The widget is a view and nothing more: a transcript, an input box, buttons (send, stop, regenerate, edit, clear),
# sliders for temperature, top-k and max tokens, and a selector for the run's trained stages (base, mid, sft, rl), all
# wired to a `Conversation`. The transcript is HTML drawn from the history: your turns on one side, the model's on the
# other, a tool call and its result each in a box of its own.

# %%
#| export
_BUBBLE = "padding:6px 10px;margin:4px 0;border-radius:8px;white-space:pre-wrap;"
_ROLE_STYLE = {"user": "background:#e8f0fe;margin-left:15%;", "assistant": "background:#f3f3f3;margin-right:15%;",
               "system": "background:#fff8e1;font-style:italic;"}
_PART_STYLE = {"python": "background:#e3f2e1;border:1px solid #9c9;",
               "python_output": "background:#fdeede;border:1px solid #d99;"}
_PART_LABEL = {"python": "calculator", "python_output": "result"}


def _part_html(part):
    "One part of a turn as HTML: text as it is, a tool call or its result in a labelled box."
    text = html.escape(part["text"])
    if part["type"] == "text":
        return f'<span class="nc-text">{text}</span>'
    kind = "call" if part["type"] == "python" else "result"
    return (f'<code class="nc-tool-{kind}" style="padding:1px 4px;border-radius:4px;{_PART_STYLE[part["type"]]}">'
            f'{_PART_LABEL[part["type"]]}: {text}</code>')


def transcript_html(messages, streaming=False):
    "The transcript as HTML: user and assistant turns, tool calls and their results in boxes of their own."
    rows = []
    for i, m in enumerate(messages):
        parts = [{"type": "text", "text": m["content"]}] if isinstance(m["content"], str) else m["content"]
        body = "".join(map(_part_html, parts))
        cursor = "▍" if streaming and i == len(messages) - 1 and m["role"] == "assistant" else ""
        rows.append(f'<div class="nc-{m["role"]}" style="{_BUBBLE}{_ROLE_STYLE.get(m["role"], "")}">'
                    f'<b>{m["role"].capitalize()}:</b> {body}{cursor}</div>')
    empty = '<i style="color:#888">No messages yet.</i>'
    return f'<div class="nc-transcript" style="font-family:sans-serif;font-size:14px">{"".join(rows) or empty}</div>'


# %%
html_text = transcript_html([{"role": "user", "content": "12 times 7? <b>bold</b>"},
                             {"role": "assistant", "content": decoder.parts}])
assert 'class="nc-tool-call"' in html_text and "&lt;b&gt;" in html_text  # tool parts boxed, user text escaped
display(HTML(html_text))


# %% [markdown]
# A reply runs in a background thread, so the notebook stays responsive and the Stop button can reach it; the thread
# redraws the transcript at most every 50 ms while tokens stream in. `background=False` runs replies in the caller's
# thread instead (handy in a script), and `wait()` blocks until a reply has finished.

# %%
#| export
def trained_stages(run_dir):
    "The stages of a run that have a checkpoint, in pipeline order."
    return [s for s in STAGES if latest_step(checkpoint_dir(run_dir, s)) is not None]


class ChatWidget:
    "A chat in the notebook: a thin ipywidgets view over a Conversation, with sampling controls and a stage selector."

    def __init__(self, conversation, run_dir=None, stage=None, background=True):
        self.conversation, self.run_dir, self.background, self.thread = conversation, run_dir, background, None
        c, stages = conversation, (trained_stages(run_dir) if run_dir else [stage or "model"])
        self.transcript, self.status = W.HTML(transcript_html([])), W.HTML()
        self.input = W.Textarea(placeholder="Your message", layout=W.Layout(width="100%"))
        names = ("send", "stop", "regenerate", "edit", "clear")
        self.buttons = {n: W.Button(description=n.capitalize()) for n in names}
        self.temperature = W.FloatSlider(value=c.temperature, min=0, max=2, step=0.05, description="temperature")
        self.top_k = W.IntSlider(value=c.top_k or 200, min=1, max=200, description="top-k")
        self.max_tokens = W.IntSlider(value=c.max_tokens, min=1, max=4096, description="max tokens")
        self.stage = W.Dropdown(options=stages, value=stage or stages[-1], description="stage", disabled=not run_dir)
        for name, button in self.buttons.items():
            button.on_click(getattr(self, "on_" + name))
        self.stage.observe(self.on_stage, names="value")
        self.view = W.VBox([self.transcript, self.input, W.HBox(list(self.buttons.values())),
                            W.HBox([self.temperature, self.top_k]), W.HBox([self.max_tokens, self.stage]), self.status])

    @classmethod
    def from_run(cls, run_dir, stage=None, background=True, **kwargs):
        "A widget over a run's stage (default: the last trained), `kwargs` going to the Conversation."
        model, tokenizer, meta = load_for_inference(run_dir, stage)
        return cls(Conversation(Engine(model, tokenizer), **kwargs), run_dir, meta["stage"], background)

    def _repr_mimebundle_(self, **kwargs):
        return self.view._repr_mimebundle_(**kwargs)

    @property
    def busy(self):
        return self.thread is not None and self.thread.is_alive()

    def render(self, streaming=False):
        "Redraw the transcript from the conversation's history."
        self.transcript.value = transcript_html(self.conversation.messages, streaming)

    def wait(self, timeout=None):
        "Block until the reply in flight (if any) has finished."
        if self.thread is not None:
            self.thread.join(timeout)


# %% [markdown]
# Every button runs through `_run`: copy the sliders into the conversation, start the reply, and draw it.

# %%
#| export
@patch
def _run(self: ChatWidget, start):
    "Start a reply (`start()` returns its events) and draw it, in a thread unless `background=False`."
    if self.busy:
        self.status.value = "A reply is still streaming: stop it first."
        return
    c = self.conversation
    c.temperature, c.top_k, c.max_tokens = self.temperature.value, self.top_k.value, self.max_tokens.value
    try:
        events = start()
    except ValueError as e:
        self.status.value = f'<span style="color:#b00">{html.escape(str(e))}</span>'
        return
    before = len(c.tokens())  # the history up to the question: the reply joins it when the events start
    if self.background:
        self.thread = threading.Thread(target=self._draw, args=(events, before), daemon=True)
        self.thread.start()
    else:
        self._draw(events, before)


@patch
def _draw(self: ChatWidget, events, before):
    "Consume a reply's events, redrawing at most every 50 ms; then say how it ended and how fast it went."
    t0 = last = time.perf_counter()
    try:
        for _ in events:
            if time.perf_counter() - last > 0.05:
                self.render(streaming=True)
                last = time.perf_counter()
        n, dt = len(self.conversation.tokens()) - before - 2, time.perf_counter() - t0  # - assistant start and end
        self.status.value = f"{self.conversation.finish_reason}: {n} tokens in {dt:.2f} s ({n / dt:.0f} tokens/s)"
    except Exception as e:  # shown, not lost in a thread nobody watches
        self.status.value = f'<span style="color:#b00">{html.escape(f"{type(e).__name__}: {e}")}</span>'
    finally:
        self.render()


# %%
#| export
@patch
def on_send(self: ChatWidget, _=None):
    "Send the input box's text."
    text = self.input.value
    def start():
        events = self.conversation.send(text)
        self.input.value = ""
        return events
    self._run(start)


@patch
def on_regenerate(self: ChatWidget, _=None):
    "Replace the last reply with a new one."
    self._run(self.conversation.regenerate)


@patch
def on_stop(self: ChatWidget, _=None):
    "End the reply in flight at its next token."
    self.conversation.stop()


@patch
def on_edit(self: ChatWidget, _=None):
    "Put your last message back in the input box, dropping it and what follows: rewrite it, then send."
    users = [i for i, m in enumerate(self.conversation.messages) if m["role"] == "user"]
    if self.busy or not users:
        self.status.value = "Nothing to edit." if not users else "A reply is still streaming: stop it first."
        return
    self.input.value = self.conversation.truncate(users[-1])[0]["content"]
    self.render()


@patch
def on_clear(self: ChatWidget, _=None):
    "Stop any reply and forget the conversation."
    self.conversation.stop()
    self.wait()
    self.conversation.clear()
    self.render()
    self.status.value = "Conversation cleared."


@patch
def on_stage(self: ChatWidget, change):
    "Load the selected stage of the run; the conversation carries on with the new model."
    self.conversation.stop()
    self.wait()
    try:
        model, tokenizer, meta = load_for_inference(self.run_dir, change["new"])
    except Exception as e:
        self.status.value = f'<span style="color:#b00">{html.escape(str(e))}</span>'
        return
    self.conversation.engine = Engine(model, tokenizer)
    self.status.value = f"Loaded {meta['stage']} (step {meta['step']})."


# %% [markdown]
# Here is the widget on our model. In a live notebook you type and press the buttons; here we press them from code,
# exactly as the tests do, and show the transcript it drew (a static page, like this book, cannot run the widget).

# %%
w = ChatWidget.from_run(run_dir, max_tokens=40, seed=0)
w

# %%
for text in ["Hello! Who are you?", "Show me a function."]:
    w.input.value = text
    w.buttons["send"].click()
    w.wait()
w.buttons["regenerate"].click()
w.wait()
print(w.status.value)
display(HTML(w.transcript.value))
test_eq([m["role"] for m in w.conversation.messages], ["user", "assistant"] * 2)
assert w.transcript.value.count('class="nc-user"') == 2 and w.input.value == ""

# %% [markdown]
# The base model has never seen a tool, so to show a tool call in the widget we borrow chapter 07's scripted model,
# which "writes" a calculator call whatever it is asked. The engine runs the calculator and forces the result; the
# widget shows the call and the result in their own boxes:

# %%
out_ids = [sp("<|output_start|>"), *tokenizer.encode("84"), sp("<|output_end|>")]
script = ([sp("<|python_start|>"), *tokenizer.encode("12*7"), sp("<|python_end|>")]
          + tokenizer.encode("?") * len(out_ids) + tokenizer.encode(" So 12 times 7 is 84."))
scripted = Engine(ScriptedModel(script, model.config, sp("<|assistant_end|>")), tokenizer)
tool_widget = ChatWidget(Conversation(scripted), stage="scripted", background=False)
tool_widget.input.value = "What is 12 times 7?"
tool_widget.on_send()
display(HTML(tool_widget.transcript.value))
test_eq(tool_widget.conversation.messages[-1]["content"],
        [{"type": "python", "text": "12*7"}, {"type": "python_output", "text": "84"},
         {"type": "text", "text": " So 12 times 7 is 84."}])
assert '<code class="nc-tool-result"' in tool_widget.transcript.value

# %% [markdown]
# ## At scale
#
# On a GPU box the same `nanochat-nb chat --run-dir ... --stage sft` talks to a d20 model; replies then stream at a
# few hundred tokens per second at batch 1, far faster than anyone reads, so the 50 ms redraw of the widget and the
# terminal's flush per piece are what a user sees. The history is re-rendered and prefilled for every reply (nanochat
# does the same): simple, and a prefill of a few thousand tokens costs milliseconds on an H100. A chat app serving
# many users would keep each conversation's KV cache between turns instead; the web server of chapter 08b serves many
# users the simpler way, with one model worker per GPU.
#
# ## Summary
#
# - `TextStream` decodes tokens as they arrive and holds text back while it ends in half a character.
# - `ReplyDecoder` splits a reply into parts (text, tool call, tool result) as it streams; the parts render back into
#   the same tokens, and `parts_to_text`/`parts_from_text` carry them through plain strings.
# - `Conversation` keeps the history as messages and streams replies through the engine, with regenerate, edit,
#   clear and stop; a reply that hits the length limit still closes with `<|assistant_end|>`.
# - `chat_loop` is `nanochat-nb chat`, interactive or one-shot; `ChatWidget` is the notebook's chat, a thin view over
#   the conversation that tests can drive by pressing its buttons from code.
#
# ## Exercises
#
# 1. Add a `system` box to the widget: a first message that `chat_prompt` merges into the first user turn. How does
#    the tiny model's reply change?
# 2. `Conversation` re-reads the whole history at every reply. Keep the engine's KV cache between turns instead, and
#    time a 20-turn conversation both ways.
# 3. Show each token of the transcript shaded by the probability the model gave it (the engine would have to yield
#    the logits too).
