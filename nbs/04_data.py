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
# # Data
# > Text in parquet shards on disk, and a loader that streams them as `(B, T)` batches of tokens: packed best-fit,
# > split across ranks, and resumable exactly.

# %%
#| default_exp data

# %% [markdown]
# Pretraining eats text at a steady rate: on an 8×H100 box nanochat's d20 swallows half a million tokens every step
# for 21,400 steps. That text has to sit on disk in a form that is cheap to store, cheap to read in pieces, and easy
# to split among eight processes; and it has to reach the model as rectangles of token ids without the GPU waiting.
# This chapter builds both halves. On disk: **shards**, parquet files with one `text` column, cut into row groups that
# ranks can read independently. In memory: a **loader** that reads its rank's row groups, tokenises on the fly,
# packs documents into rows of `T + 1` tokens, and can stop and pick up again at exactly the batch it would have
# produced next.
#
# By the end we have `prepare_data` (our offline corpus as shards), `download_shards` (FineWeb-edu, for the real run),
# and `DataLoader`, and we have checked that a resumed loader yields the very same batches as one that never stopped.
#
# *Pipeline:* the tokenizer (chapter 01) turns text into ids; the pretraining loop (chapter 06) pulls batches from
# here and stores the loader's state in its checkpoints (chapter 05).

# %%
#| export
import bisect
import hashlib
import itertools
import json
import os
import random
import shutil
import time
import urllib.request
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import torch

from fastcore.basics import patch

from nanochat_nb.common import atomic_write
from nanochat_nb.tokenizer import stdlib_documents

# %%
import functools
import http.server
import tempfile
import threading

import matplotlib.pyplot as plt
import numpy as np
from fastcore.test import test_eq, test_fail
from IPython.display import Markdown, display

from nanochat_nb.tokenizer import Tokenizer


def md_table(rows):
    "Show a list of dicts as a markdown table."
    keys = list(rows[0])
    lines = ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    lines += ["| " + " | ".join(f"{r[k]:,}" if isinstance(r[k], int) else str(r[k]) for k in keys) + " |" for r in rows]
    display(Markdown("\n".join(lines)))


# %% [markdown]
# Everything this chapter writes goes into one temporary directory, `scratch`, removed at the end.

# %%
scratch = Path(tempfile.mkdtemp(prefix="nanochat_nb_data_"))

# %% [markdown]
# ## Shards
#
# nanochat's pretraining text is FineWeb-edu, repackaged by Karpathy as 1,823 parquet files named `shard_00000.parquet`
# … `shard_01822.parquet`, each about 250M characters (≈100 MB compressed). The last one is the validation split.
# We keep the same names and format, so the loader cannot tell our small offline corpus from the real one.

# %%
#| export
FINEWEB_BASE_URL = "https://huggingface.co/datasets/karpathy/fineweb-edu-100b-shuffle/resolve/main"
FINEWEB_NUM_SHARDS = 1823  # shard_00000 ... shard_01822; the last one is the validation split


# %%
#| export
def shard_name(index):
    "File name of shard `index`, e.g. `shard_00007.parquet`."
    return f"shard_{index:05d}.parquet"


# %%
test_eq(shard_name(7), "shard_00007.parquet")
f"{FINEWEB_BASE_URL}/{shard_name(FINEWEB_NUM_SHARDS - 1)}"


# %% [markdown]
# A shard is a table with one string column, `text`, one row per document. Parquet stores it in **row groups**, and a
# row group is the unit a reader can fetch on its own: rank 3 of 8 reads row groups 3, 11, 19, … and never touches
# the rest. nanochat's rules, which we copy: 1,024 documents per row group, zstd compression at level 3, and a shard
# closes once it holds at least `chars_per_shard` characters *and* a whole number of row groups, so every row group
# except the very last one of the corpus is full. Each shard is written with `atomic_write` (chapter 00), so a crash
# never leaves a half shard under a real name.

# %%
#| export
def _write_shard(path, docs, docs_per_row_group):
    "Write one shard atomically (`atomic_write`: temp file, fsync, rename) once it is complete."
    table = pa.table({"text": pa.array(docs, type=pa.string())})
    atomic_write(path, lambda f: pq.write_table(table, f, row_group_size=docs_per_row_group, compression="zstd",
                                                compression_level=3, use_dictionary=False, write_statistics=False))
    return path


# %%
#| export
def write_shards(docs, out_dir, chars_per_shard=250_000_000, docs_per_row_group=1024, seed=42, start_index=0):
    "Write `docs` as parquet shards of >= `chars_per_shard` chars, in row groups of `docs_per_row_group` docs."
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if seed is not None:  # shuffling needs the whole list in memory; seed=None streams an already shuffled corpus
        docs = list(docs)
        random.Random(seed).shuffle(docs)
    paths, shard, chars = [], [], 0
    for doc in docs:
        shard.append(doc)
        chars += len(doc)
        # close only on a row-group boundary, so that every row group but the corpus's last one is full
        if chars >= chars_per_shard and len(shard) % docs_per_row_group == 0:
            paths.append(_write_shard(out_dir / shard_name(start_index + len(paths)), shard, docs_per_row_group))
            shard, chars = [], 0
    if shard:
        paths.append(_write_shard(out_dir / shard_name(start_index + len(paths)), shard, docs_per_row_group))
    return paths


# %% [markdown]
# A toy corpus makes the rule visible: 100 documents of 10 characters, shards of at least 300 characters, row groups
# of 8. A shard reaches 300 characters at 30 documents, but 30 is not a multiple of 8, so it closes at 32.

# %%
toy = [f"doc {i:05d}." for i in range(100)]
toy_paths = write_shards(toy, scratch / "toy", chars_per_shard=300, docs_per_row_group=8, seed=None)
toy_meta = [pq.read_metadata(p) for p in toy_paths]
test_eq([p.name for p in toy_paths], [shard_name(i) for i in range(4)])
test_eq([m.num_rows for m in toy_meta], [32, 32, 32, 4])
test_eq([m.row_group(0).num_rows for m in toy_meta], [8, 8, 8, 4])
test_eq(pq.read_table(toy_paths[1]).column("text").to_pylist()[0], "doc 00032.")
assert not list((scratch / "toy").glob("*.tmp"))
[(p.name, m.num_rows, m.num_row_groups) for p, m in zip(toy_paths, toy_meta)]

# %% [markdown]
# ## Where documents come from
#
# Our default corpus is already on every machine that runs this book: the `.py` files of Python's standard library
# (`stdlib_documents` from the tokenizer chapter), one document per file. Anyone with text of their own can point
# `prepare_data` at a folder instead. `iter_folder_documents` reads it in a fixed order (sorted paths, so two runs
# give the same shards): `.txt`, `.md` and `.py` files whole, `.jsonl` files one `"text"` field per line, and
# `.parquet` files by their `text` column. Hidden files and folders (`.git`) are skipped. A malformed line stops
# the run with the file and line number, because silently dropping text is how a corpus quietly shrinks. A file
# that is not text at all (NUL bytes, or bytes that are not UTF-8: an image renamed `.txt`, a Latin-1 file) is
# skipped, never packed as garbage, and listed in `skipped` so that the summary can count it.

# %%
#| export
_TEXT_SUFFIXES = {".txt", ".md", ".py"}


def _read_text(path):
    "The text of a file, or None with the reason when it is not UTF-8 text."
    data = path.read_bytes()
    if b"\x00" in data:
        return None, "NUL bytes: not text"
    try:
        return data.decode("utf-8"), None
    except UnicodeDecodeError as e:
        return None, f"not UTF-8 (byte {e.start})"



def _folder_files(folder):
    "The document files under `folder`, sorted, hidden files and folders left out; a clear error if there are none."
    if not folder.is_dir():
        raise FileNotFoundError(f"source folder {folder} {'is a file' if folder.exists() else 'does not exist'} "
                                f"(fix: pass a folder of .txt/.md/.py/.jsonl/.parquet files)")
    files = sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix in _TEXT_SUFFIXES | {".jsonl", ".parquet"}
                   and not any(part.startswith(".") for part in p.relative_to(folder).parts))
    if not files:
        raise ValueError(f"no .txt/.md/.py/.jsonl/.parquet files under {folder} "
                         f"(fix: point --source at a folder of documents)")
    return files


# %% [markdown]
# The two structured formats get a reader each: a JSON-lines file gives one document per non-empty line, and a
# parquet file one per non-empty row of its `text` column. Both stop at the first malformed line or file.

# %%
#| export
def _jsonl_documents(path, text):
    "The `text` field of each non-empty line of a .jsonl file; a malformed line is an error naming file and line."
    for lineno, line in enumerate(text.split("\n"), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}:{lineno}: not valid JSON ({e.msg}); each line must be an object "
                             f'like {{"text": "..."}}') from None
        if not isinstance(row, dict) or not isinstance(row.get("text"), str):
            raise ValueError(f'{path}:{lineno}: expected an object with a string "text" field')
        yield row["text"]


def _parquet_documents(path):
    "The non-empty rows of a parquet file's `text` column."
    try:
        pf = pq.ParquetFile(path)
    except (OSError, pa.ArrowException) as e:
        raise ValueError(f"{path}: not a readable parquet file ({e}); fix: repair or remove it") from None
    if "text" not in pf.schema_arrow.names:
        raise ValueError(f'{path}: no "text" column (it has {pf.schema_arrow.names})')
    for batch in pf.iter_batches(columns=["text"]):
        yield from (t for t in batch.column(0).to_pylist() if t)


# %% [markdown]
# `iter_folder_documents` walks the files and hands each to its reader; what is not text is recorded in `skipped`.

# %%
#| export
def iter_folder_documents(folder, skipped=None):
    "Documents under `folder` in path order: .txt/.md/.py files whole, .jsonl `text` per line, .parquet `text` rows."
    folder, skipped = Path(folder), [] if skipped is None else skipped
    for path in _folder_files(folder):
        if path.suffix == ".parquet":
            yield from _parquet_documents(path)
            continue
        text, why = _read_text(path)
        if why:
            skipped.append(f"{path} ({why})")
        elif path.suffix == ".jsonl":
            yield from _jsonl_documents(path, text)
        elif text.strip():
            yield text


# %%
src = scratch / "my_corpus"
(src / "notes").mkdir(parents=True)
(src / "a.txt").write_text("A plain text file.")
(src / "notes" / "b.md").write_text("# A markdown file")
(src / "notes" / "c.py").write_text("print('a python file')")
(src / "d.jsonl").write_text('{"text": "first jsonl line"}\n\n{"text": "second jsonl line", "id": 2}\n')
pq.write_table(pa.table({"text": ["parquet row 0", "parquet row 1"]}), src / "e.parquet")
(src / ".git").mkdir()
(src / ".git" / "HEAD.txt").write_text("hidden: skipped")
(src / "logo.txt").write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00")       # an image with a .txt name
(src / "latin1.md").write_bytes("caf\xe9".encode("latin-1"))      # not UTF-8
skipped = []
test_eq(list(iter_folder_documents(src, skipped)), ["A plain text file.", "first jsonl line", "second jsonl line",
                                                    "parquet row 0", "parquet row 1", "# A markdown file",
                                                    "print('a python file')"])
print(*skipped, sep="\n")
test_eq(len(skipped), 2)
(src / "f.jsonl").write_text('{"text": "fine"}\n{"txt": "oops"}\n')
test_fail(lambda: list(iter_folder_documents(src)), contains="f.jsonl:2")
(src / "f.jsonl").unlink()
test_fail(lambda: list(iter_folder_documents(scratch / "empty")), contains="does not exist")

# %% [markdown]
# ## Preparing the default corpus
#
# `prepare_data` turns a corpus into shards under `run_dir/data`. It shuffles the documents with a fixed seed
# first: the stdlib in path order would put `zipfile` and `zoneinfo` in the validation shard, and validation loss on
# one corner of the library says little about the rest. After the shuffle, the last `val_fraction` of documents go
# into one final shard, the validation split, and the rest into train shards. The defaults are scaled down from
# FineWeb's (4M characters per shard, 32 documents per row group) so that the stdlib gives several train shards of
# several row groups each: enough for two ranks to both have work. The validation shard gets smaller row groups
# (at least 8 of them), so that even 8 ranks each evaluate on a slice. New shards are written to a scratch folder
# and swapped in at the end, so running it twice leaves exactly one clean set.
#
# One more rule keeps memory in check downstream: a document longer than `MAX_DOC_CHARS` (a million characters, more
# than any file of the standard library) is cut into pieces at line ends. A 50 MB log file then becomes fifty
# ordinary documents instead of one that every later stage has to hold whole.

# %%
#| export
MAX_DOC_CHARS = 1_000_000


def split_document(text, max_chars=MAX_DOC_CHARS):
    "Cut `text` into pieces of at most `max_chars` characters, at a line end in the second half of each piece if any."
    pieces, start = [], 0
    while len(text) - start > max_chars:
        cut = text.rfind("\n", start + max_chars // 2, start + max_chars) + 1 or start + max_chars
        pieces.append(text[start:cut])
        start = cut
    return pieces + [text[start:]]


# %%
test_eq(split_document("ab\ncd\nef", 4), ["ab\n", "cd\n", "ef"])
test_eq(split_document("abcdefghij", 4), ["abcd", "efgh", "ij"])
test_eq(split_document("short"), ["short"])


# %%
#| export
def prepare_data(run_dir, source=None, chars_per_shard=4_000_000, docs_per_row_group=32, val_fraction=0.05,
                 val_docs=None, max_docs=None, seed=42, max_doc_chars=MAX_DOC_CHARS):
    "Shuffle a corpus (default: the Python stdlib; or a folder) into train shards plus a last, validation shard."
    data_dir, tmp_dir = Path(run_dir) / "data", Path(run_dir) / "data.tmp"
    data_dir.mkdir(parents=True, exist_ok=True)  # a run_dir that is a file fails here, before the corpus is read
    skipped = []
    docs = stdlib_documents(max_docs) if source is None else \
        itertools.islice(iter_folder_documents(source, skipped), max_docs)
    docs = [split_document(doc, max_doc_chars) for doc in docs]
    n_split, docs = sum(len(d) > 1 for d in docs), [piece for d in docs for piece in d]
    # a fixed shuffle makes the validation shard (the tail) a fair sample rather than the last files by name
    random.Random(seed).shuffle(docs)
    n_val = val_docs if val_docs is not None else max(1, round(val_fraction * len(docs)))
    if not 0 < n_val < len(docs):
        raise ValueError(f"need at least one train and one validation document: got {len(docs)} documents "
                         f"and {n_val} for validation ({len(skipped)} files skipped as not text) (fix: a bigger "
                         "corpus, or change val_docs/val_fraction)")
    train, val = docs[:-n_val], docs[-n_val:]
    shutil.rmtree(tmp_dir, ignore_errors=True)
    paths = write_shards(train, tmp_dir, chars_per_shard, docs_per_row_group, seed=None)
    # smaller row groups in the small validation shard, so that up to 8 ranks all get a share of it
    val_rows = max(1, min(docs_per_row_group, len(val) // 8))
    paths += write_shards(val, tmp_dir, float("inf"), val_rows, seed=None, start_index=len(paths))
    # swap in the new set only once it is complete, and drop old shards so no stale one stays behind as "val"
    for old in data_dir.glob("shard_*.parquet"):
        old.unlink()
    for p in paths:
        os.replace(p, data_dir / p.name)
    shutil.rmtree(tmp_dir)
    return {"data_dir": str(data_dir), "source": str(source) if source else "python stdlib",
            "num_shards": len(paths), "train_shards": len(paths) - 1, "num_docs": len(docs),
            "train_docs": len(train), "val_docs": len(val), "num_chars": sum(map(len, docs)),
            "row_groups": sum(pq.read_metadata(data_dir / p.name).num_row_groups for p in paths),
            "split_docs": n_split, "skipped_files": len(skipped),
            **({"skipped": "; ".join(skipped[:3]) + (f" and {len(skipped) - 3} more" if len(skipped) > 3 else "")}
               if skipped else {})}


# %%
run_dir = scratch / "run"
t0 = time.time()
stats = prepare_data(run_dir)
print(f"{time.time() - t0:.1f}s", stats)
assert stats["train_shards"] >= 3 and stats["train_docs"] + stats["val_docs"] == stats["num_docs"]
test_eq(prepare_data(run_dir), stats)  # idempotent: the same shards again, nothing left over
assert not (run_dir / "data.tmp").exists()


# %% [markdown]
# Two small helpers read the shards back. `list_shards` is what every consumer calls; its error says which command
# makes the data. `describe_shards` reads only the parquet footers, so it is instant even on 24 GB of FineWeb; its
# `text_MB` is the uncompressed size of the text, so `text_MB / MB` is what zstd saves (source code compresses well).

# %%
#| export
def list_shards(data_dir, split=None):
    "Shard paths in `data_dir`, sorted; split 'train' is all but the last shard, 'val' is the last one."
    data_dir = Path(data_dir)
    paths = sorted(data_dir.glob("shard_*.parquet")) if data_dir.is_dir() else []
    if not paths:
        raise FileNotFoundError(f"no shard_*.parquet files in {data_dir} (fix: run `nanochat-nb data prepare` for the "
                                f"offline corpus, or `nanochat-nb data download --shards N` for FineWeb-edu)")
    if split is None:
        return paths
    if split not in ("train", "val"):
        raise ValueError(f"split must be 'train' or 'val', got {split!r}")
    if len(paths) < 2:
        raise ValueError(f"{data_dir} holds a single shard; need at least two (train shards, then the validation one)")
    return paths[:-1] if split == "train" else paths[-1:]


# %%
#| export
def shard_metadata(path):
    "The parquet footer of a shard; a damaged or truncated file gets a clear error that names it."
    try:
        return pq.read_metadata(path)
    except (OSError, pa.ArrowException) as e:
        raise ValueError(f"{path} is not a readable parquet shard ({str(e)[:120]}): it is damaged or truncated; "
                         "fix: run `nanochat-nb data prepare` (or `data download`) again") from None


def describe_shards(data_dir):
    "One row per shard, from the parquet footers: name, split, row groups, docs, MB of text, MB on disk."
    paths = list_shards(data_dir)
    rows = []
    for i, p in enumerate(paths):
        md = shard_metadata(p)
        text_bytes = sum(md.row_group(r).column(0).total_uncompressed_size for r in range(md.num_row_groups))
        rows.append({"shard": p.name, "split": "val" if i == len(paths) - 1 else "train",
                     "row_groups": md.num_row_groups, "docs": md.num_rows,
                     "text_MB": round(text_bytes / 1e6, 2), "MB": round(p.stat().st_size / 1e6, 2)})
    return rows


# %%
data_dir = run_dir / "data"
md_table(describe_shards(data_dir))
test_eq(list_shards(data_dir, "val"), list_shards(data_dir)[-1:])
test_eq(len(list_shards(data_dir, "train")), stats["train_shards"])
test_fail(lambda: list_shards(scratch / "nothing_here"), contains="nanochat-nb data prepare")


# %% [markdown]
# A checkpoint should remember which corpus it was trained on, so that resuming after `data prepare` ran on other
# text is caught rather than carried on silently. `shards_fingerprint` hashes every byte of a small shard (ours are
# about 1 MB). Hashing all of 24 GB of FineWeb at every start would take a minute, so a shard bigger than 4 MB is
# hashed by its size, its parquet footer (row counts, offsets and sizes of every column chunk) and its first and
# last megabyte of compressed text. Preparing the same corpus again writes the same bytes, so the fingerprint stays
# the same.

# %%
#| export
def _shard_digest(path, whole_below=4 << 20, edge=1 << 20):
    "The bytes that identify a shard: all of a small one; size, footer and first and last MB of a big one."
    size = path.stat().st_size
    with open(path, "rb") as f:
        if size <= whole_below:
            return f.read()
        head = f.read(edge)
        f.seek(size - 8)
        tail = f.read(8)
        footer_len = int.from_bytes(tail[:4], "little") if tail[4:] == b"PAR1" else 0
        f.seek(max(0, size - 8 - max(footer_len, edge)))
        return str(size).encode() + head + f.read()


def shards_fingerprint(data_dir):
    "A short hash of the shards in `data_dir` (names and contents, sampled when big): which corpus a run trains on."
    h = hashlib.sha256()
    for path in list_shards(data_dir):
        h.update(f"{path.name}\n".encode() + _shard_digest(path))
    return h.hexdigest()[:16]


# %%
fingerprint = shards_fingerprint(data_dir)
prepare_data(run_dir)
test_eq(shards_fingerprint(data_dir), fingerprint)  # the same corpus again: the same fingerprint
print(fingerprint)


# %% [markdown]
# ## Each rank reads its own row groups
#
# With `W` processes training together, each must see different text. nanochat splits at the row-group level: rank
# `r` reads row groups `r, r + W, r + 2W, …` of every shard, in order, and starts over (a new epoch) at the end.
# We name every document by its position `(epoch, shard, row_group, doc)`. Those four numbers are all a loader
# needs to find a document again, which is what will make exact resuming cheap.

# %%
#| export
def read_row_group(path, row_group):
    "The texts of one row group of a shard; a damaged file gets a clear error that names it."
    try:
        return pq.ParquetFile(path).read_row_group(row_group, columns=["text"]).column("text").to_pylist()
    except (OSError, pa.ArrowException, KeyError) as e:
        raise ValueError(f"{path}, row group {row_group}, cannot be read ({str(e)[:120]}): the shard is damaged; "
                         "fix: run `nanochat-nb data prepare` (or `data download`) again") from None


def rank_documents(paths, rank=0, world_size=1, start=None):
    "Yield ((epoch, shard, row_group, doc), text) for `rank`: row groups rank, rank+W, ... of each shard, forever."
    if not 0 <= rank < world_size:
        raise ValueError(f"rank must be in 0..{world_size - 1}, got {rank}")
    num_row_groups = [shard_metadata(p).num_row_groups for p in paths]
    if not any(n > rank for n in num_row_groups):
        raise ValueError(f"rank {rank} of {world_size} gets no row groups (the largest shard has "
                         f"{max(num_row_groups)}); fix: fewer ranks, or shards with a smaller docs_per_row_group")
    epoch, s0, r0, d0 = start or (1, 0, rank, 0)
    if r0 % world_size != rank:
        raise ValueError(f"start row group {r0} does not belong to rank {rank} of {world_size}")
    last = None, None  # the row group read last: a small corpus read again every epoch is not decoded again
    while True:
        for s in range(s0, len(paths)):
            for rg in range(r0 if s == s0 else rank, num_row_groups[s], world_size):
                if last[0] != (s, rg):
                    last = (s, rg), read_row_group(paths[s], rg)
                texts = last[1]
                for d in range(d0 if (s, rg) == (s0, r0) else 0, len(texts)):
                    yield (epoch, s, rg, d), texts[d]
        epoch, s0, r0, d0 = epoch + 1, 0, rank, 0


# %%
train_paths = list_shards(data_dir, "train")
n_train_docs = sum(pq.read_metadata(p).num_rows for p in train_paths)
seen = {}
for rank in range(2):
    keys = [key for key, _ in itertools.islice(rank_documents(train_paths, rank, 2), n_train_docs)]
    seen[rank] = {(s, rg) for e, s, rg, d in keys if e == 1}
md_table([{"shard": p.name, **{f"rank {r} of 2 reads row groups": sorted(rg for s2, rg in seen[r] if s2 == s)
                               for r in range(2)}} for s, p in enumerate(train_paths)])
assert not seen[0] & seen[1]  # disjoint: no document is trained on twice per epoch
test_eq(len(seen[0] | seen[1]), sum(pq.read_metadata(p).num_row_groups for p in train_paths))  # and none is missed
test_fail(lambda: next(rank_documents(train_paths[:1], rank=63, world_size=64)), contains="gets no row groups")

# %% [markdown]
# ## Tokenising on the fly
#
# The loader tokenises documents as it reads them, 128 at a time, with BOS prepended to each one. BOS marks a
# document's start: it tells the model "new text begins here" and gives every token something to attend to. We train
# a small tokenizer on part of the corpus here; the real pipeline loads the one from the tokenizer stage.

# %%
tokenizer = Tokenizer.train(stdlib_documents(max_docs=300), vocab_size=4096)
texts = [text for _, text in itertools.islice(rank_documents(train_paths), 3)]
ids = tokenizer.encode(texts, prepend=tokenizer.bos_id, num_threads=4)
assert all(doc[0] == tokenizer.bos_id for doc in ids)
test_eq(tokenizer.decode(ids[0][1:]), texts[0])
[len(doc) for doc in ids]


# %% [markdown]
# ## Packing documents into rows
#
# The model wants a rectangle of `B` rows of `T` tokens, and the targets are the inputs shifted by one, so each row
# needs `T + 1` tokens. Documents come in every length. There are two classic ways to fit them in.
#
# **The stream** (nanochat's original loader): concatenate all documents into one long run of tokens and cut it
# every `B·T` tokens. Nothing is wasted, but rows start in the middle of documents, and a token near the start of a
# row attends to the tail of some unrelated file with the beginning of its own one out of view.
#
# **Best fit** (nanochat's newer default): every row starts at a BOS. Keep a buffer of tokenised documents; fill the
# row with the *longest* document that still fits, again and again; when none fits, take the *shortest* one and crop
# it to fill the row exactly. No padding, every token trained on is seen with its document's start in view; the price
# is the cropped tails. Here is the plain version, a linear scan over the buffer for every pick:

# %%
#| export
def best_fit_rows(docs, n_rows, row_len):
    "The plain best-fit packer: fill each row with the longest doc that fits; when none fits, crop the shortest."
    docs, rows = list(docs), []
    for _ in range(n_rows):
        row = []
        while len(row) < row_len:
            space = row_len - len(row)
            fits = [i for i, d in enumerate(docs) if len(d) <= space]
            if fits:
                row += docs.pop(max(fits, key=lambda i: len(docs[i])))  # max() keeps the first of equal lengths
            else:
                row += docs.pop(min(range(len(docs)), key=lambda i: len(docs[i])))[:space]
        rows.append(row)
    return rows


# %%
demo = [[0] + [i] * (n - 1) for i, n in enumerate([7, 3, 5, 2, 9, 4, 4], start=1)]
for row in best_fit_rows(demo, 3, 8):
    print(row)


# %% [markdown]
# Row one takes the 7-token document; one slot is left and no document is that short, so the shortest (2 tokens) is
# cropped to its BOS. Row two takes 5 then 3, row three the two 4s. The 9-token document waits in the buffer: it
# fits no row whole, and will be cropped once it is the shortest thing left.
#
# The linear scan costs `O(buffer)` per pick, and a 1,000-document buffer is scanned several times per row. Keeping
# the buffer sorted by `(length, arrival)` turns each pick into two binary searches: the longest document with length
# at most `space`, and among equal lengths the oldest, exactly the one the scan picks.

# %%
#| export
class BestFitBuffer:
    "Tokenised docs waiting to be packed, sorted by length so that a best-fit pick is O(log n), not O(n)."

    def __init__(self):
        self.by_len = []  # sorted (length, arrival): ties go to the oldest doc, as in the linear scan
        self.docs = {}  # arrival -> (key, ids); a dict keeps arrival order, which the resume state relies on
        self.arrivals = 0
        self.cropped = 0  # tokens thrown away by crops, for the statistics

    def __len__(self):
        return len(self.docs)

    def add(self, key, ids, length=None):
        "Buffer the ids of the document at `key`; `length` is its full length when `ids` holds only its start."
        bisect.insort(self.by_len, (len(ids) if length is None else length, self.arrivals))
        self.docs[self.arrivals] = (key, ids)
        self.arrivals += 1

    def _pop(self, i):
        length, arrival = self.by_len.pop(i)
        return length, self.docs.pop(arrival)[1]

    def fill_row(self, row_len, refill=lambda: None):
        "Pack one row of exactly `row_len` tokens; `refill()` runs before every pick to top the buffer up."
        row = []
        while len(row) < row_len:
            refill()
            space = row_len - len(row)
            i = bisect.bisect_right(self.by_len, (space, float("inf"))) - 1  # the longest doc with length <= space
            if i >= 0:
                row += self._pop(bisect.bisect_left(self.by_len, (self.by_len[i][0], -1)))[1]  # oldest of that length
            else:
                length, ids = self._pop(0)  # nothing fits: crop the shortest doc to fill the row exactly
                self.cropped += length - space
                row += ids[:space]
        return row

    def keys(self):
        "Positions of the buffered docs, in arrival order."
        return [key for key, _ in self.docs.values()]


# %%
rng = random.Random(0)
for trial in range(20):
    docs = [[0] + [rng.randrange(1, 99)] * rng.randrange(0, 60) for _ in range(300)]
    buf = BestFitBuffer()
    for i, d in enumerate(docs):
        buf.add(i, d)
    test_eq([buf.fill_row(33) for _ in range(40)], best_fit_rows(docs, 40, 33))

# %% [markdown]
# ## The loader
#
# `DataLoader` puts the pieces together: `rank_documents` → tokenise in batches → pack (best fit, or the stream)
# → tensors of shape `(B, T)` on the device. On CUDA the batch goes through pinned host memory with a non-blocking
# copy, so the transfer overlaps with the GPU's work on the previous step. Both splits loop forever: training takes as
# many batches as it needs, and evaluation takes a fixed number of batches (it must stop on its own).
#
# **Exact resume.** nanochat's loader saves `(shard, row_group)` and on resume skips to the next row group: cheap,
# but a few documents are skipped. Ours yields, after a restart, *exactly* the batch it would have produced next. The
# trick is to save positions, never tokens: for the stream, the position of the first unconsumed document and how
# many of its tokens are used; for best fit, the position of the next document to read plus the positions of all
# buffered documents in arrival order. Resuming re-reads and re-tokenises those few row groups, which is cheap and
# deterministic. Tokenising is kept out of the state on purpose: the 128-document batches are a look-ahead cache,
# and the buffer is topped up to exactly `buffer_docs` one document at a time, so the batches do not depend on
# `tokenizer_batch_size` either.
#
# **Bounded memory.** What the loader holds must not grow with the size of one document, nor with how often a small
# corpus repeats to fill the buffer (one 50 MB document, read again every epoch, once took a loader to 23 GB). Three
# caps see to it. A document is cut to `max_doc_chars` characters before it is tokenised; for best fit the cut is
# tighter, at `(T + 1)` times the longest token's bytes, because no row can use more of a document than its first
# `T + 1` tokens. Best fit keeps only those `T + 1` ids of each buffered document, plus the number of tokens that
# were tokenised (the packing needs it to find the shortest document; for a document cut short it counts the part
# kept). And the look-ahead takes 128 documents or 4M characters, whichever comes first.

# %%
#| export
TOKENIZE_BATCH_CHARS = 4_000_000  # the look-ahead tokenises at most this many characters at a time (or 128 docs)


def _encode_docs(tokenizer, texts, max_chars, keep=None):
    "[(ids, length)] of documents cut to `max_chars` characters, BOS first; only the first `keep` ids are kept."
    rows = tokenizer.encode([text[:max_chars] for text in texts], prepend=tokenizer.bos_id, num_threads=4)
    return [(ids[:keep] if keep else ids, len(ids)) for ids in rows]


class _Tokenised:
    "A rank's documents from `start` on, tokenised in batches, BOS first: a look-ahead cache, not part of the state."

    def __init__(self, tokenizer, paths, rank, world_size, start, batch_size, max_chars=MAX_DOC_CHARS, keep=None):
        self.tokenizer, self.batch_size, self.max_chars, self.keep = tokenizer, batch_size, max_chars, keep
        self.docs = rank_documents(paths, rank, world_size, start)
        self.queue = deque()

    def _fill(self):
        keys, texts, chars = [], [], 0
        for key, text in self.docs:
            keys.append(key)
            texts.append(text[:self.max_chars])
            chars += len(texts[-1])
            if len(keys) == self.batch_size or chars >= TOKENIZE_BATCH_CHARS:
                break
        encoded = _encode_docs(self.tokenizer, texts, self.max_chars, self.keep)
        self.queue.extend((key, ids, n) for key, (ids, n) in zip(keys, encoded))

    def peek(self):
        "Position of the next document."
        if not self.queue:
            self._fill()
        return self.queue[0][0]

    def __next__(self):
        if not self.queue:
            self._fill()
        return self.queue.popleft()


# %%
#| export
def _read_docs(paths, keys):
    "Texts of the documents at `keys` = (epoch, shard, row_group, doc), reading each row group once."
    groups = {}
    for _, s, rg, _ in keys:
        if (s, rg) not in groups:
            groups[s, rg] = read_row_group(paths[s], rg)
    return [groups[s, rg][d] for _, s, rg, d in keys]


def _pack_keys(keys):
    "[(e, s, rg, d), ...] in reading order -> [[e, s, rg, [d, ...]], ...]: compact and JSON-friendly."
    out = []
    for e, s, rg, d in keys:
        if out and out[-1][:3] == [e, s, rg]:
            out[-1][3].append(d)
        else:
            out.append([e, s, rg, [d]])
    return out


# %%
#| export
class DataLoader:
    "Stream (inputs, targets, state) batches of B rows of T tokens from parquet shards; resumes exactly from `state`."

    def __init__(self, tokenizer, data_dir, B, T, split="train", rank=0, world_size=1, device="cpu", packing="bestfit",
                 buffer_docs=1000, state=None, tokenizer_batch_size=128, max_doc_chars=MAX_DOC_CHARS):
        if packing not in ("bestfit", "stream"):
            raise ValueError(f"packing must be 'bestfit' or 'stream', got {packing!r}")
        if min(B, T, buffer_docs, tokenizer_batch_size) < 1:
            raise ValueError(f"B, T, buffer_docs and tokenizer_batch_size must be >= 1, got {B}, {T}, {buffer_docs}, "
                             f"{tokenizer_batch_size}")
        self.tokenizer, self.B, self.T, self.device = tokenizer, B, T, torch.device(device)
        self.paths, self.packing, self.buffer_docs = list_shards(data_dir, split), packing, buffer_docs
        self.header = {"version": 1, "packing": packing, "split": split, "rank": rank, "world_size": world_size}
        # best fit uses at most T + 1 tokens of a document, and no token covers more characters than it has bytes
        longest = int(tokenizer.token_bytes.max()) if packing == "bestfit" and hasattr(tokenizer, "token_bytes") else 0
        self.max_chars = min(max_doc_chars, (T + 1) * longest) if longest else max_doc_chars
        self.keep, self.tokenizer_batch_size = (T + 1 if packing == "bestfit" else None), tokenizer_batch_size
        self.source = _Tokenised(tokenizer, self.paths, rank, world_size, state and tuple(state["next"]),
                                 tokenizer_batch_size, self.max_chars, self.keep)
        self.pending, self.offset = deque(), 0  # stream: docs not yet used up, and how many tokens of the first are
        self.buffer = BestFitBuffer()
        if state:
            self._restore(state)

    def __iter__(self):
        return self


# %% [markdown]
# Each packing needs one way to take tokens. Best fit tops its buffer up to `buffer_docs` documents before every
# pick. The stream takes the next `n` tokens from the documents laid end to end, and moves on only `n - 1`: the last
# target of one batch is the first input of the next.

# %%
#| export
@patch
def _refill(self: DataLoader):
    "Top the best-fit buffer up to `buffer_docs` documents."
    while len(self.buffer) < self.buffer_docs:
        self.buffer.add(*next(self.source))


@patch
def _stream_tokens(self: DataLoader, n):
    "The next n tokens of the flat stream; the stream then moves on n - 1 (the last target is the next input)."
    tokens, i = [], 0
    while len(tokens) < n:
        if i == len(self.pending):
            self.pending.append(next(self.source))
        start = self.offset if i == 0 else 0
        tokens += self.pending[i][1][start:start + n - len(tokens)]  # only what the batch needs
        i += 1
    used = self.offset + n - 1
    while self.pending and used >= len(self.pending[0][1]):
        used -= len(self.pending.popleft()[1])
    self.offset = used
    return tokens[:n]


# %% [markdown]
# The state is what the section's introduction promised: positions, never tokens. For the stream, the document the
# next batch starts in and how far into it; for best fit, the next document to read and the buffered ones.

# %%
#| export
@patch
def state_dict(self: DataLoader):
    "Where the next batch starts: a small JSON-serialisable dict of document positions, never tokens."
    if self.packing == "stream":
        nxt = self.pending[0][0] if self.pending else self.source.peek()
        return {**self.header, "epoch": nxt[0], "next": list(nxt), "offset": self.offset}
    nxt = self.source.peek()
    return {**self.header, "epoch": nxt[0], "next": list(nxt), "buffer": _pack_keys(self.buffer.keys())}


# %% [markdown]
# A batch: `B` rows of `T + 1` tokens, split into inputs and targets shifted by one, with the state after it.

# %%
#| export
@patch
def __next__(self: DataLoader):
    "The next (inputs, targets) of shape (B, T) on the device, and the state to resume after them."
    B, T = self.B, self.T
    if self.packing == "bestfit":
        rows = torch.tensor([self.buffer.fill_row(T + 1, self._refill) for _ in range(B)], dtype=torch.long)
        inputs, targets = rows[:, :-1].contiguous(), rows[:, 1:].contiguous()
    else:  # one flat run of B*T + 1 tokens: each row's targets reach one token past its inputs
        flat = torch.tensor(self._stream_tokens(B * T + 1), dtype=torch.long)
        inputs, targets = flat[:-1].view(B, T), flat[1:].view(B, T)
    if self.device.type == "cuda":  # pinned host memory lets the copy run alongside the GPU's work
        inputs = inputs.pin_memory().to(self.device, non_blocking=True)
        targets = targets.pin_memory().to(self.device, non_blocking=True)
    return inputs, targets, self.state_dict()


# %% [markdown]
# A batch from each packing, with the start of one row decoded. In best fit every row begins with BOS and the
# document in it begins at its first line; the stream's rows begin wherever the cut fell.

# %%
B, T = 4, 256
bestfit = DataLoader(tokenizer, data_dir, B, T, buffer_docs=200)
stream = DataLoader(tokenizer, data_dir, B, T, packing="stream")
inputs, targets, state = next(bestfit)
test_eq(inputs.shape, (B, T))
test_eq(inputs[:, 1:], targets[:, :-1])
assert (inputs[:, 0] == tokenizer.bos_id).all()
print("best fit, row 1:", repr(tokenizer.decode(inputs[1, :40].tolist())))
s_inputs, s_targets, _ = next(stream)
print("stream,   row 1:", repr(tokenizer.decode(s_inputs[1, :40].tolist())))
# the stream really is the documents laid end to end
docs_in_order = tokenizer.encode([t for _, t in itertools.islice(rank_documents(train_paths), 50)],
                                 prepend=tokenizer.bos_id)
test_eq(s_inputs.flatten().tolist(), list(itertools.chain(*docs_in_order))[:B * T])
print(f"state: {len(json.dumps(state))} bytes of JSON, epoch {state['epoch']}, next document at {state['next']}")
# bounded memory: the best-fit buffer holds at most T + 1 ids of each of its documents, however long they are
longest_kept = max(len(ids) for _, ids in bestfit.buffer.docs.values())
print(f"best fit buffers {len(bestfit.buffer)} documents, at most {longest_kept} ids each")
assert longest_kept <= T + 1


# %% [markdown]
# Resuming rebuilds what the state names. The constructor has already pointed the reader at `next`; `_restore`
# checks that the state belongs to this loader (same packing, split, rank and world size), then re-reads the
# partly used stream document, or re-reads and re-tokenises the buffered documents in their arrival order.

# %%
#| export
@patch
def _restore(self: DataLoader, state):
    "Rebuild the pending stream document or the best-fit buffer from a `state_dict()`."
    wrong = {k: (state.get(k), v) for k, v in self.header.items() if state.get(k) != v}
    if wrong:
        raise ValueError(f"state does not fit this loader, {{key: (state, loader)}}: {wrong}; "
                         f"resume with the same packing, split, rank and world_size")
    if self.packing == "stream" and state["offset"]:
        self.pending.append(next(self.source))
        self.offset = state["offset"]
    if self.packing == "bestfit":
        keys = [(e, s, rg, d) for e, s, rg, ds in state["buffer"] for d in ds]
        texts, n = _read_docs(self.paths, keys), self.tokenizer_batch_size
        for i in range(0, len(keys), n):
            encoded = _encode_docs(self.tokenizer, texts[i:i + n], self.max_chars, self.keep)
            for key, (ids, length) in zip(keys[i:i + n], encoded):
                self.buffer.add(key, ids, length)


# %% [markdown]
# And the promise of this section: stop after a few batches, rebuild a loader from the saved state (through JSON, as
# a checkpoint would), and the batches that follow are the ones the uninterrupted loader produces, token for token.

# %%
for packing in ("bestfit", "stream"):
    make = functools.partial(DataLoader, tokenizer, data_dir, 2, 128, packing=packing, buffer_docs=50)
    straight = [next(loader) for loader in [make()] for _ in range(12)]
    resumed = make(state=json.loads(json.dumps(straight[5][2])))
    for x, y, s in straight[6:]:
        x2, y2, s2 = next(resumed)
        assert torch.equal(x, x2) and torch.equal(y, y2) and s == s2
    print(f"{packing}: batches 7-12 after a resume from batch 6 match exactly")

# %% [markdown]
# ## What packing costs on our corpus
#
# How much best fit crops depends on how long documents are compared with `T`. Below, the length of every document in
# the corpus in tokens, and what three packings do to them as `T` grows: best fit (crops, never pads), one document
# per row (crops long documents *and* pads short ones: the simplest loader, and the most wasteful), and the stream
# (wastes nothing, but most rows start mid-document). The packing simulation runs `BestFitBuffer` on the lengths
# alone.

# %%
#| fig-alt: "Left: histogram of document lengths on a log scale. Right: percent of tokens cropped or padded by each packing against the row length T."
all_docs = [t for p in list_shards(data_dir) for t in pq.read_table(p).column("text").to_pylist()]
lengths = [len(d) for d in tokenizer.encode(all_docs, prepend=tokenizer.bos_id, num_threads=4)]


def packing_waste(lengths, T, buffer_docs=1000):
    "Fractions (cropped by best fit, cropped by one-doc-per-row, padded by one-doc-per-row) at rows of T+1 tokens."
    buf, it, rows = BestFitBuffer(), iter(lengths), 0
    def refill():
        while len(buf) < buffer_docs:
            buf.add(None, [0] * next(it))
    try:
        while True:
            buf.fill_row(T + 1, refill)
            rows += 1
    except StopIteration:  # the corpus ran out: count only finished rows
        pass
    bestfit = buf.cropped / (rows * (T + 1) + buf.cropped)
    crop = sum(max(0, n - T - 1) for n in lengths) / sum(lengths)
    pad = sum(max(0, T + 1 - n) for n in lengths) / (len(lengths) * (T + 1))
    return bestfit, crop, pad


Ts = [64, 128, 256, 512, 1024, 2048]
waste = np.array([packing_waste(lengths, T, buffer_docs=300) for T in Ts])
fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 3.8))
ax1.hist(lengths, bins=np.logspace(0, np.log10(max(lengths)), 50), color="tab:blue")
ax1.set(xscale="log", xlabel="document length (tokens, BOS included)", ylabel="documents",
        title=f"{len(lengths):,} documents, median {int(np.median(lengths)):,} tokens")
for T in (256, 2048):
    ax1.axvline(T, color="k", ls=":", lw=1)
    ax1.text(T, ax1.get_ylim()[1] * 0.9, f" T={T}", fontsize=8)
ax2.plot(Ts, 100 * waste[:, 0], "o-", label="best fit: cropped")
ax2.plot(Ts, 100 * waste[:, 1], "s--", label="one doc per row: cropped")
ax2.plot(Ts, 100 * waste[:, 2], "^--", label="one doc per row: padding")
ax2.plot(Ts, [0] * len(Ts), "k-", lw=1, label="stream: nothing lost")
ax2.set(xscale="log", xlabel="T", ylabel="% of tokens", title="what packing throws away", ylim=(-3, 100))
ax2.set_xticks(Ts, [str(T) for T in Ts])
ax2.legend(fontsize=8)
plt.tight_layout()
plt.show()
print("document length percentiles (10/50/90):", np.percentile(lengths, [10, 50, 90]).astype(int).tolist())
{T: f"best fit crops {100 * w[0]:.0f}%" for T, w in zip(Ts, waste)}


# %% [markdown]
# Source files are long: the median stdlib module is about as long as a whole row at `T = 2048`, and a tenth of
# them are several times longer. At small `T` best fit therefore keeps mostly the *beginnings* of files (imports,
# licence headers, docstrings) and throws most tokens away, while the stream uses everything. nanochat's own advice
# fits: best fit when there is plenty of data, the stream when data is scarce and documents are long. For CPU runs on
# this corpus the stream is the better choice; on FineWeb-edu (shorter documents, far more of them) best fit crops
# about 35% at `T = 2048` and is worth it.
#
# ## At scale
#
# - **Shards.** FineWeb-edu comes as 1,823 shards of 250M characters (≈100 MB compressed, 1,024 documents per row
#   group). At ≈4.8 characters per token a shard holds ≈52M tokens. The classic d20 run trains on 11.2B tokens
#   (20 × parameters), which is ≈54B characters or ≈216 shards; nanochat downloads 240 (≈24 GB) for headroom,
#   8 first so that tokenizer training can start, then the rest in the background. `download_data(run_dir, 240)`
#   does the same with 4 threads (see "Going further" below).
# - **Loader.** On 8 ranks each rank reads every 8th row group, `device_batch_size = 32` rows of `T = 2048`:
#   32 × 2,049 tokens per rank per step, 524,288 trained tokens per step over the 8 GPUs. Tokenising 128 documents at
#   a time with 4 threads keeps ahead of the GPU's step.
# - **Packing.** With best fit nanochat reports ≈35% of tokens cropped at `T = 2048`: to *train* on 11.2B tokens it
#   must *read* about 11.2 / 0.65 ≈ 17B, so ≈330 shards rather than 216 (computed). HEAD's data set (ClimbMix,
#   6,543 shards) is large enough not to care.
# - **Resume.** nanochat's state is `{pq_idx, rg_idx, epoch}`, and a resume jumps to the rank's next row group: the
#   rest of the current one (up to 1,024 documents per rank) and the buffered tokens are skipped, none repeated. Ours
#   stores the buffered documents' positions: at `buffer_docs = 1000` about 5 KB of JSON in the checkpoint's
#   metadata, for a resume that loses nothing. Resuming re-reads the row groups those documents came from, a few
#   MB each on FineWeb.
#
# ## Summary
#
# We wrote text into nanochat's shard format (parquet, one `text` column, row groups of whole documents, atomic
# writes), and prepared the stdlib as a shuffled corpus with a validation shard at the end. The loader reads each rank's row groups, tokenises with BOS,
# and packs rows by best fit or as a stream; its state is a handful of document positions from which it resumes
# exactly.
#
# **Exercises**
#
# 1. Split long stdlib files at blank lines into pieces of at most 2,000 characters before `write_shards`, and redraw
#    the packing figure. How much does best fit crop at `T = 512` now?
# 2. Run two loaders with `world_size=3` and check which shards' row groups each rank reads; what happens with
#    `world_size` larger than the number of row groups in a shard?
# 3. Make the stream loader resume *approximately*, as nanochat does (skip to the next row group), and count how many
#    documents a resume loses.

# %% [markdown]
# ## Going further: downloading FineWeb-edu
#
# For the real run the shards come from Hugging Face, about 100 MB each. A download of 240 of them will meet a
# flaky connection sooner or later, so each shard is fetched the careful way: streamed into a temp file beside its
# final name, checked (the byte count against `Content-Length`, then the parquet footer, which sits at the very end of the
# file, so a cut-off body cannot pass), and only then renamed to its real name: chapter 00's `atomic_write` does the
# temp file, the fsync and the rename, as for every other file of the book. A failure deletes the temp file and
# retries after `backoff ** attempt` seconds. Shards already complete on disk are skipped, so re-running the command
# after an error fetches only what is missing. We always fetch the validation shard (index 1822) on top of the
# requested train shards, so that `list_shards(..., "val")` means the same shard whatever `N` was.

# %%
#| export
def _stream_checked(url, f, timeout):
    "Stream `url` into the open file `f`, then check that the body is whole and ends in a parquet footer."
    with urllib.request.urlopen(url, timeout=timeout) as r:
        expected, got = r.headers.get("Content-Length"), 0
        while chunk := r.read(1 << 20):
            f.write(chunk)
            got += len(chunk)
    if expected is not None and got != int(expected):
        raise IOError(f"truncated body: got {got} of {expected} bytes")
    f.flush()
    pq.read_metadata(f.name)  # the footer is the last thing in the file: a cut-off download fails here


def _fetch(url, dest, timeout):
    "Download `url` to `dest` through `atomic_write`: `dest` only ever appears whole and checked."
    atomic_write(dest, lambda f: _stream_checked(url, f, timeout))


# %%
#| export
def download_shards(num_shards, data_dir, base_url=FINEWEB_BASE_URL, workers=4, max_attempts=5, timeout=30,
                    backoff=2.0, last_index=FINEWEB_NUM_SHARDS - 1, verbose=False):
    "Download shards 0..num_shards-1 plus the validation shard `last_index`, in parallel, with retries."
    if not 0 < num_shards <= last_index:
        raise ValueError(f"num_shards must be in 1..{last_index} (validation shard {last_index} comes on top), "
                         f"got {num_shards}")
    data_dir = Path(data_dir)
    data_dir.mkdir(parents=True, exist_ok=True)
    indices = list(range(num_shards)) + [last_index]

    def get(index):
        dest, error = data_dir / shard_name(index), None
        if dest.exists():
            try:
                pq.read_metadata(dest)
                return index, None  # complete: files only ever get their final name once checked
            except Exception:
                dest.unlink()  # not ours, or damaged later: fetch it again
        for attempt in range(1, max_attempts + 1):
            try:
                _fetch(f"{base_url.rstrip('/')}/{dest.name}", dest, timeout)
                if verbose:
                    print(f"{dest.name}: {dest.stat().st_size / 1e6:.1f} MB", flush=True)
                return index, None
            except Exception as e:
                error = f"{type(e).__name__}: {e}"
                if attempt < max_attempts:
                    time.sleep(backoff ** attempt)
        return index, error

    with ThreadPoolExecutor(workers) as pool:  # threads suffice: the work is waiting on the network
        failed = [(i, err) for i, err in pool.map(get, indices) if err]
    if failed:
        lines = "\n".join(f"  {shard_name(i)}: {err}" for i, err in failed)
        raise RuntimeError(f"{len(failed)} shard(s) failed after {max_attempts} attempts each "
                           f"(re-run to fetch only the missing ones):\n{lines}")
    return [data_dir / shard_name(i) for i in indices]


# %% [markdown]
# There is no network here, so we play Hugging Face ourselves: a local HTTP server hands out the shards we just
# wrote, with the last one renamed to index 1822. The tests in `tests/test_data.py` add servers that fail, time out
# and cut bodies short.

# %%
hf = scratch / "fake_hf"
hf.mkdir()
for i, p in enumerate(list_shards(data_dir, "train")[:2]):
    shutil.copy(p, hf / shard_name(i))
shutil.copy(list_shards(data_dir, "val")[0], hf / shard_name(FINEWEB_NUM_SHARDS - 1))
server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(
    type("Quiet", (http.server.SimpleHTTPRequestHandler,), {"log_message": lambda *a: None}), directory=str(hf)))
threading.Thread(target=server.serve_forever, daemon=True).start()
url = f"http://127.0.0.1:{server.server_address[1]}"
got = download_shards(2, scratch / "downloaded", base_url=url, backoff=0.01)
test_eq([p.name for p in got], ["shard_00000.parquet", "shard_00001.parquet", "shard_01822.parquet"])
assert all(p.read_bytes() == (hf / p.name).read_bytes() for p in got)
test_fail(lambda: download_shards(3, scratch / "downloaded", base_url=url, max_attempts=2, backoff=0.01),
          contains="shard_00002.parquet: HTTPError")
server.shutdown()


# %% [markdown]
# The command line's `nanochat-nb data download --shards N` calls this wrapper, which downloads into `run_dir/data`
# and reports what it did.

# %%
#| export
def download_data(run_dir, num_shards, **kwargs):
    "Download FineWeb-edu shards into `run_dir/data`; return printable stats (the CLI's `data download`)."
    data_dir = Path(run_dir) / "data"
    t0 = time.time()
    before = {p.name for p in data_dir.glob("shard_*.parquet")} if data_dir.is_dir() else set()
    paths = download_shards(num_shards, data_dir, **kwargs)
    return {"data_dir": str(data_dir), "train_shards": num_shards, "val_shard": paths[-1].name,
            "downloaded": sum(p.name not in before for p in paths), "skipped": sum(p.name in before for p in paths),
            "GB": round(sum(p.stat().st_size for p in paths) / 1e9, 3), "seconds": round(time.time() - t0, 1)}


# %%
#| hide
shutil.rmtree(scratch, ignore_errors=True)
