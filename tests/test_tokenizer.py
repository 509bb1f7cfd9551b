"""Tests for nanochat_nb.tokenizer: properties of encode/decode, trainer agreement, chat rendering, save/load."""
import copy
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from nanochat_nb.tokenizer import (SPECIAL_TOKENS, Tokenizer, bpe_encode_python, bpe_train_python, eval_report,
                                   evaluate_tokenizer, format_eval_table, rustbpe_train, stdlib_documents,
                                   train_tokenizer)


@pytest.fixture(scope="module")
def texts():
    "A small, fixed slice of the default corpus (fast to train on)."
    return [doc[:2_000] for doc in stdlib_documents(max_docs=200)]


@pytest.fixture(scope="module")
def tok(texts):
    return Tokenizer.train(texts, vocab_size=1024)


def test_stdlib_documents_deterministic():
    first = list(stdlib_documents(max_docs=20))
    assert len(first) == 20 and all(isinstance(d, str) and d for d in first)
    assert list(stdlib_documents(max_docs=20)) == first
    assert list(stdlib_documents(max_docs=5)) == first[:5]


@pytest.mark.parametrize("vocab_size", [256, 300, 700])
def test_python_and_rustbpe_learn_the_same_merges(texts, vocab_size):
    sample = texts[:25]
    assert bpe_train_python(sample, vocab_size) == rustbpe_train(sample, vocab_size)


def test_tie_break_matches_rustbpe():
    # every pair below occurs equally often, so only the tie-break decides the order of merges
    sample = ["zy xw vu ts " * 5, "ba dc fe hg " * 5]
    ranks = bpe_train_python(sample, 270)
    assert ranks == rustbpe_train(sample, 270)
    merges = sorted((r, t) for t, r in ranks.items() if r >= 256)
    assert merges[0][1] == b" d"  # (32, 100) is the smallest of the most frequent pairs


def test_pure_python_encoder_matches_tiktoken(tok, texts):
    ranks = {tok.enc.decode_single_token_bytes(i): i for i in range(tok.vocab_size - len(SPECIAL_TOKENS))}
    for text in texts[:5] + ["héllo wörld 한국어 🙂 12345\n\n  x"]:
        assert bpe_encode_python(text, ranks) == tok.encode(text)


@settings(max_examples=300, deadline=None)
@given(st.text())
def test_roundtrip_any_text(tok, s):
    assert tok.decode(tok.encode(s)) == s


@settings(max_examples=100, deadline=None)
@given(st.text(alphabet=st.sampled_from(list(" \t\n\r\x0b\x0c\u00a0\u3000") + list("0123456789٣") + list("aZ é한🙂"))))
def test_roundtrip_whitespace_and_digits(tok, s):
    assert tok.decode(tok.encode(s)) == s


@settings(max_examples=50, deadline=None)
@given(st.lists(st.text(max_size=50), max_size=8))
def test_batch_encode_matches_single(tok, batch):
    assert tok.encode(batch, prepend="<|bos|>", num_threads=2) == [tok.encode(s, prepend=tok.bos_id) for s in batch]


no_specials = st.text(max_size=40).filter(lambda s: "<|" not in s and "|>" not in s)


@settings(max_examples=100, deadline=None)
@given(no_specials, st.sampled_from(SPECIAL_TOKENS), no_specials)
def test_special_looking_text_is_ordinary_unless_allowed(tok, before, name, after):
    text = before + name + after
    special_ids = {tok.encode_special(n) for n in SPECIAL_TOKENS}
    ordinary = tok.encode(text)
    assert not special_ids & set(ordinary)
    assert tok.decode(ordinary) == text
    expected = tok.encode(before) + [tok.encode_special(name)] + tok.encode(after)
    assert tok.encode(text, allowed_special=True) == expected
    assert tok.encode(text, allowed_special={name}) == expected
    other = next(n for n in SPECIAL_TOKENS if n != name)
    assert tok.encode(text, allowed_special={other}) == ordinary


def test_special_token_ids_follow_the_merges(tok):
    assert tok.vocab_size == 1024
    assert [tok.encode_special(n) for n in tok.special_tokens] == list(range(1024 - 9, 1024))
    assert tok.bos_id == 1024 - 9
    assert tok.special_tokens == SPECIAL_TOKENS


def test_bad_inputs_name_the_problem(tok):
    with pytest.raises(ValueError, match="<\\|bos\\|>"):
        tok.encode_special("<|eos|>")
    with pytest.raises(ValueError, match="prepend/append"):
        tok.encode("x", prepend=10**9)
    with pytest.raises(ValueError, match="unknown names"):
        tok.encode("x", allowed_special={"<|eos|>"})
    with pytest.raises(TypeError, match="str or a list of str"):
        tok.encode(123)
    with pytest.raises(ValueError, match=">= 265"):
        Tokenizer.train(["some text"], vocab_size=264)
    with pytest.raises(ValueError, match="more text"):
        Tokenizer.train(["tiny text"], vocab_size=1000)


def test_token_bytes(tok, texts):
    tb = tok.token_bytes
    assert tb.dtype == torch.int32 and tb.shape == (tok.vocab_size,)
    assert tb[-9:].tolist() == [0] * 9 and int(tb[:-9].min()) >= 1
    for text in texts[:5]:  # ASCII-only source: every token is whole characters
        if text.isascii():
            assert int(tb[tok.encode(text)].sum()) == len(text.encode("utf-8"))
    assert tok.token_bytes[0xE9] == 3  # a lone continuation byte decodes to U+FFFD (3 bytes)


# ---- chat rendering ----

def conversation_with_tool():
    return {"messages": [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "What is 6 times 7?"},
        {"role": "assistant", "content": [
            {"type": "text", "text": "Computing."},
            {"type": "python", "text": "6 * 7"},
            {"type": "python_output", "text": "42"},
            {"type": "text", "text": "It is 42."}]},
        {"role": "user", "content": "Thanks"},
        {"role": "assistant", "content": "Welcome!"},
    ]}


def test_render_conversation_exact_ids_and_mask(tok):
    s, e = tok.encode_special, tok.encode
    expected = [  # (ids, mask value) in order, built by hand from the rules
        ([s("<|bos|>")], 0),
        ([s("<|user_start|>")] + e("Be brief.\n\nWhat is 6 times 7?") + [s("<|user_end|>")], 0),
        ([s("<|assistant_start|>")], 0),
        (e("Computing."), 1),
        ([s("<|python_start|>")] + e("6 * 7") + [s("<|python_end|>")], 1),
        ([s("<|output_start|>")] + e("42") + [s("<|output_end|>")], 0),
        (e("It is 42."), 1),
        ([s("<|assistant_end|>")], 1),
        ([s("<|user_start|>")] + e("Thanks") + [s("<|user_end|>")], 0),
        ([s("<|assistant_start|>")], 0),
        (e("Welcome!") + [s("<|assistant_end|>")], 1),
    ]
    ids, mask = tok.render_conversation(conversation_with_tool())
    assert ids == [i for chunk, _ in expected for i in chunk]
    assert mask == [m for chunk, m in expected for _ in chunk]
    positions = [i for i, m in enumerate(mask) if m]
    assert tok.decode([ids[i] for i in positions]) == (
        "Computing.<|python_start|>6 * 7<|python_end|>It is 42.<|assistant_end|>Welcome!<|assistant_end|>")
    assert ids.count(tok.bos_id) == 1 and mask[0] == 0


def test_render_conversation_truncates(tok):
    ids, mask = tok.render_conversation(conversation_with_tool())
    assert tok.render_conversation(conversation_with_tool(), max_tokens=7) == (ids[:7], mask[:7])


def test_render_does_not_mutate(tok):
    conv = conversation_with_tool()
    before = copy.deepcopy(conv)
    tok.render_conversation(conv)
    tok.render_for_completion(conv)
    assert conv == before


@pytest.mark.parametrize("conversation, match", [
    ({}, "messages"),
    ("hello", "messages"),
    ({"messages": []}, "no messages"),
    ({"messages": [{"role": "assistant", "content": "hi"}]}, "'user' was expected"),
    ({"messages": [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]}, "alternate"),
    ({"messages": [{"role": "tool", "content": "a"}]}, "unknown role"),
    ({"messages": [{"role": "user", "content": "a"}, {"role": "system", "content": "b"}]}, "only the first"),
    ({"messages": [{"role": "system", "content": "a"}]}, "followed by a user"),
    ({"messages": [{"role": "user", "content": ["a"]}]}, "str content"),
    ({"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": 3}]}, "list-of-parts"),
    ({"messages": [{"role": "user", "content": "a"},
                   {"role": "assistant", "content": [{"type": "image", "text": "x"}]}]}, "bad part"),
    ({"messages": [{"role": "user", "content": "a"},
                   {"role": "assistant", "content": [{"type": "text", "text": 5}]}]}, "bad part"),
    ({"messages": [{"role": "user"}]}, "'role' and 'content'"),
])
def test_malformed_conversations_raise(tok, conversation, match):
    with pytest.raises(ValueError, match=match):
        tok.render_conversation(conversation)


def test_render_for_completion(tok):
    conv = conversation_with_tool()
    ids, _ = tok.render_conversation(conv)
    prompt = tok.render_for_completion(conv)
    assert prompt[-1] == tok.encode_special("<|assistant_start|>")
    assert prompt == ids[:len(prompt)]
    assert tok.decode(ids[len(prompt):]) == "Welcome!<|assistant_end|>"
    with pytest.raises(ValueError, match="ends with an assistant"):
        tok.render_for_completion({"messages": conv["messages"][:2]})


# ---- persistence and the pipeline stage ----

def test_save_load_roundtrip(tok, texts, tmp_path):
    directory = tok.save(tmp_path / "tokenizer")
    # no temp files left, and no pickle: text, JSON and a tensor file
    assert sorted(p.name for p in directory.iterdir()) == ["token_bytes.pt", "tokenizer.json", "tokenizer.tiktoken"]
    loaded = Tokenizer.load(directory)
    assert loaded.vocab_size == tok.vocab_size and loaded.bos_id == tok.bos_id
    for text in texts[:20] + ["<|bos|> 한국어 🙂"]:
        assert loaded.encode(text) == tok.encode(text)
        assert loaded.encode(text, allowed_special=True) == tok.encode(text, allowed_special=True)
    assert torch.equal(loaded.token_bytes, tok.token_bytes)
    assert torch.equal(Tokenizer(loaded.enc).token_bytes, tok.token_bytes)  # recomputed, not only reloaded


def test_load_missing_says_how_to_train(tmp_path):
    for missing in (tmp_path / "nope" / "tokenizer", tmp_path):
        with pytest.raises(FileNotFoundError, match="nanochat-nb tokenizer train --run-dir"):
            Tokenizer.load(missing)
    with pytest.raises(FileNotFoundError, match="nanochat-nb tokenizer train"):
        eval_report(tmp_path / "empty_run")


def test_train_tokenizer_stage(texts, tmp_path):
    stats = train_tokenizer(tmp_path, vocab_size=300, max_chars=50_000, doc_cap=1_000, texts=texts)
    cropped, total = [], 0  # the crop rule, spelled out: doc_cap per document, max_chars in all
    for doc in texts:
        take = doc[:min(1_000, 50_000 - total)]
        if take:
            cropped.append(take)
            total += len(take)
        if total >= 50_000:
            break
    assert stats["num_chars"] == total == 50_000 and stats["num_docs"] == len(cropped)
    assert stats["vocab_size"] == 300 and stats["seconds"] > 0 and stats["chars_per_second"] > 0
    loaded = Tokenizer.load(tmp_path / "tokenizer")
    assert loaded.vocab_size == 300
    assert loaded.encode(texts[-1]) == Tokenizer.train(cropped, 300).encode(texts[-1])  # trained on exactly that


def test_evaluate_and_format(tok, tmp_path):
    other = Tokenizer.train(["hello world " * 50 + "abcdefghij " * 30], vocab_size=280)
    samples = {"code": "def f(x):\n    return x + 1\n", "prose": "The cat sat on the mat."}
    rows = evaluate_tokenizer(tok, baselines={"small": other}, texts=samples)
    assert [r["text"] for r in rows] == ["code", "prose"]
    for r, text in zip(rows, samples.values()):
        assert r["bytes"] == len(text.encode())
        assert r["tokens"] == {"ours": len(tok.encode(text)), "small": len(other.encode(text))}
        assert r["ratio"]["ours"] == pytest.approx(r["bytes"] / r["tokens"]["ours"])
    table = format_eval_table(rows)
    assert "| Text Type | Bytes | small Tokens | small Ratio | Ours Tokens | Ours Ratio | Relative Diff % |" in table
    r = rows[0]
    diff = 100 * (r["tokens"]["small"] - r["tokens"]["ours"]) / r["tokens"]["small"]
    assert f"| code | {r['bytes']} | {r['tokens']['small']} |" in table and f"{diff:+.1f}%" in table
    plain = format_eval_table(evaluate_tokenizer(tok, baselines={}, texts=samples))
    assert plain.splitlines()[0] == "| Text Type | Bytes | Ours Tokens | Ours Ratio |" and len(plain.splitlines()) == 4


def test_eval_report(tok, tmp_path):
    tok.save(tmp_path / "tokenizer")
    report = eval_report(tmp_path)
    for name in ("news", "korean", "python", "math", "science", "stdlib-val"):
        assert f"| {name} |" in report
    assert "vocab_size=1024" in report
