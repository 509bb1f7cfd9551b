"""Chat surfaces of chapter 08: the Conversation (stream, regenerate, edit, clear, stop, length limit, tool parts),
the notebook widget driven headless through its buttons, and `nanochat-nb chat` through a pseudo-terminal."""
import os, shutil, sys, threading, time

import pexpect
import pytest

from nanochat_nb.chat import (ChatWidget, Conversation, TextStream, chat_loop, chat_prompt,
                              parts_from_text, parts_to_text, transcript_html)
from nanochat_nb.engine import Engine, ScriptedModel, load_for_inference

ENV = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", NANOCHAT_NB_DEBUG="")


@pytest.fixture(scope="module")
def engine(tiny_run):
    model, tokenizer, _ = load_for_inference(tiny_run)
    return Engine(model, tokenizer)


def reply_of(events):
    return "".join(delta for _, delta in events)


def test_conversation_moves(engine):
    chat = Conversation(engine, max_tokens=8, seed=0)
    first = reply_of(chat.send("Hello"))
    assert [m["role"] for m in chat.messages] == ["user", "assistant"]
    assert parts_to_text(chat.messages[-1]["content"]) == first and chat.finish_reason in ("stop", "length")
    tokens = chat.tokens()
    assert tokens[0] == engine.bos and tokens[-1] == engine.end
    assert tokens[:len(chat_prompt(engine.tokenizer, chat.messages[:1]))] == chat_prompt(engine.tokenizer,
                                                                                           chat.messages[:1])
    assert Conversation(engine, max_tokens=8, seed=0).ask("Hello") == first  # a seeded conversation replays

    second = reply_of(chat.regenerate())
    assert second != first and len(chat.messages) == 2  # a new seed per reply: a new answer, in place

    reply_of(chat.send("And then?"))
    edited = reply_of(chat.edit(2, "Something else"))
    assert [m["content"] for m in chat.messages if m["role"] == "user"] == ["Hello", "Something else"]
    assert len(chat.messages) == 4 and parts_to_text(chat.messages[-1]["content"]) == edited
    with pytest.raises(ValueError, match="not a user message"):
        chat.edit(1, "x")
    with pytest.raises(ValueError, match="empty"):
        chat.send("  ")
    assert len(chat.messages) == 4  # refused input leaves the history alone
    chat.clear()
    assert chat.messages == [] and chat.tokens() == [engine.bos]
    with pytest.raises(ValueError, match="nothing to answer"):
        chat.stream()


def test_length_limit_closes_the_turn(engine):
    chat = Conversation(engine, temperature=0.0, max_tokens=3)
    chat.ask("Tell me a long story.")
    assert chat.finish_reason == "length"
    prompt = chat_prompt(engine.tokenizer, chat.messages[:1])
    assert len(chat.tokens()) == len(prompt) + 3 + 1 and chat.tokens()[-1] == engine.end


def test_stop_from_another_thread(engine):
    chat = Conversation(engine, temperature=0.0, max_tokens=2000)  # greedy: this model runs on to the limit
    events = chat.send("Go on forever.")
    threading.Timer(0.2, chat.stop).start()
    t0 = time.perf_counter()
    for _ in events:
        time.sleep(0.002)
    assert chat.finish_reason == "stopped" and time.perf_counter() - t0 < 3
    n = len(chat.tokens()) - len(chat_prompt(engine.tokenizer, chat.messages[:1])) - 1
    assert 0 < n < 500, n


def test_too_long_a_conversation_says_how_to_fix(engine):
    chat = Conversation(engine)
    with pytest.raises(ValueError, match="fix: clear it"):
        chat.send("x " * 3000)  # more tokens than the model's 2,560 positions
    assert chat.messages == []


def test_text_stream_never_splits_a_character(engine):
    tok = engine.tokenizer
    text = "naïve 🙂 ünïcödé ✓"
    stream = TextStream(tok)
    deltas = [stream.feed(t) for t in tok.encode(text)]
    assert "".join(deltas) + stream.flush() == text
    assert not any("\ufffd" in d for d in deltas)


def tool_script(tok, answer=" So it is 84."):
    "A scripted reply: a calculator call, filler where the engine forces the result, then text."
    sp = tok.encode_special
    forced = [sp("<|output_start|>"), *tok.encode("84"), sp("<|output_end|>")]
    return ([sp("<|python_start|>"), *tok.encode("12*7"), sp("<|python_end|>")] + tok.encode("?") * len(forced)
            + tok.encode(answer))


def test_tool_calls_are_parts(engine):
    tok = engine.tokenizer
    scripted = Engine(ScriptedModel(tool_script(tok), engine.model.config, tok.encode_special("<|assistant_end|>")),
                      tok)
    chat = Conversation(scripted)
    events = list(chat.send("What is 12 times 7?"))
    parts = chat.messages[-1]["content"]
    assert parts == [{"type": "python", "text": "12*7"}, {"type": "python_output", "text": "84"},
                     {"type": "text", "text": " So it is 84."}]
    assert ("python", "") in events and ("python_output", "") in events  # a view can open the boxes
    assert parts_from_text(parts_to_text(parts)) == parts
    page = transcript_html(chat.messages)
    assert '<code class="nc-tool-call"' in page and "calculator: 12*7</code>" in page
    assert '<code class="nc-tool-result"' in page and "result: 84</code>" in page
    typed = chat_prompt(tok, [{"role": "user", "content": "<|python_start|>1+1<|python_end|>"}])
    assert tok.encode_special("<|python_start|>") not in typed  # a user typing the markers gets text, not a tool


def test_widget_driven_headless(engine, tiny_run, tmp_path):
    run = shutil.copytree(tiny_run, tmp_path / "run")
    shutil.copytree(run / "checkpoints" / "base", run / "checkpoints" / "sft")  # a second stage to select
    w = ChatWidget.from_run(run, max_tokens=8, seed=0)
    assert list(w.stage.options) == ["base", "sft"] and w.stage.value == "sft"
    w.stage.value = "base"
    assert "Loaded base" in w.status.value

    w.input.value = "Hello <there>"
    w.buttons["send"].click()
    w.wait(30)
    assert [m["role"] for m in w.conversation.messages] == ["user", "assistant"] and w.input.value == ""
    assert "Hello &lt;there&gt;" in w.transcript.value and w.transcript.value.count('class="nc-assistant"') == 1
    assert "tokens/s" in w.status.value
    reply = parts_to_text(w.conversation.messages[-1]["content"])
    assert transcript_html(w.conversation.messages) == w.transcript.value

    w.temperature.value, w.top_k.value, w.max_tokens.value = 1.0, 5, 3
    w.buttons["regenerate"].click()
    w.wait(30)
    c = w.conversation
    assert (c.temperature, c.top_k, c.max_tokens) == (1.0, 5, 3)  # the sliders reach the conversation
    assert len(c.messages) == 2 and parts_to_text(c.messages[-1]["content"]) != reply
    assert c.finish_reason in ("stop", "length")

    w.buttons["edit"].click()
    assert w.input.value == "Hello <there>" and c.messages == []
    w.input.value = "Edited"
    w.buttons["send"].click()
    w.wait(30)
    assert c.messages[0]["content"] == "Edited" and len(c.messages) == 2

    w.temperature.value, w.max_tokens.value = 0.0, 2000  # greedy: runs on until stopped
    w.input.value = "Go on forever."
    w.buttons["send"].click()
    time.sleep(0.3)
    assert w.busy
    w.input.value = "Not now"
    w.buttons["send"].click()  # refused while a reply streams
    assert "still streaming" in w.status.value and w.input.value == "Not now"
    w.buttons["stop"].click()
    w.wait(10)
    assert not w.busy and c.finish_reason == "stopped" and "stopped" in w.status.value

    w.buttons["clear"].click()
    assert c.messages == [] and "No messages yet" in w.transcript.value


def test_chat_loop_streams_in_pieces(engine):
    writes, inputs = [], iter(["Hello", "clear", "", "Again", "exit"])
    class Out:
        def write(self, s):
            writes.append(s)
        def flush(self):
            pass
    chat_loop(Conversation(engine, max_tokens=12, seed=0), read=lambda prompt: next(inputs), out=Out())
    text = "".join(writes)
    assert text.count("Assistant: ") == 2 and "Conversation cleared." in text
    assert len(writes) > 6 + 10, writes  # 6 fixed writes; the replies arrived piece by piece, not whole


def spawn_chat(tiny_run, *args):
    return pexpect.spawn(sys.executable, ["-m", "nanochat_nb.cli", "chat", "--run-dir", str(tiny_run), *args],
                         env=ENV, encoding="utf-8", timeout=60)


def test_terminal_interactive(tiny_run):
    child = spawn_chat(tiny_run, "--max-tokens", "8")
    child.expect("base model, step 0")
    child.expect("User: ")
    child.sendline("Hello")
    child.expect("Assistant: ")
    child.expect("User: ")
    child.sendline("clear")
    child.expect("Conversation cleared.")
    child.expect("User: ")
    child.sendline("Again")
    child.expect("Assistant: ")
    child.expect("User: ")
    child.sendline("quit")
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0


def test_terminal_one_shot(tiny_run):
    child = spawn_chat(tiny_run, "-p", "Hello", "--max-tokens", "6", "--temperature", "0")
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0 and child.before.strip() and "User:" not in child.before


@pytest.mark.parametrize("args, message", [
    (["--run-dir", "/nonexistent/run"], "is not a directory"),
    (["--temperature", "-1"], "temperature must be"),
    (["--top-k", "0"], "top_k must be"),
    (["--step", "7"], "step 7 is not a complete checkpoint"),
    (["--stage", "sft"], "checkpoints/sft"),
])
def test_chat_cli_errors_are_one_line(tiny_run, args, message):
    from nanochat_nb.cli import main
    with pytest.raises(SystemExit) as e:  # main() turns the error into one line and exit status 1
        main(["chat", "--run-dir", str(tiny_run), "-p", "hi", *args])
    assert str(e.value).startswith("nanochat-nb chat: error:") and message in str(e.value)
    assert "\n" not in str(e.value)
