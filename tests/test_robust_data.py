"""Issue 10, "memory that grows with one document" and "nonsense accepted" in `data prepare --source`.

The memory test reproduces the report (one 52 MB document, then `pretrain`: the loader reached 23.5 GB and was
killed) with a guard: the child is killed if it passes MEMORY_CAP, and its peak resident memory (ru_maxrss, from
wait4) must stay under MEMORY_LIMIT. Before the fix a 1 MB document already took a tiny run to 2.2 GB.
"""
import random
import shutil

import pyarrow.parquet as pq

from nanochat_nb.data import list_shards, shards_fingerprint, write_shards

from test_robust_common import (TINY, cli, cli_cmd, fresh, ok, one_line_error, run_measuring_rss,  # noqa: F401
                                snapshot)

MEMORY_LIMIT = 1.5e9  # a tiny run on small documents peaks at about 0.45 GB; the unbounded loader went to 23.5 GB
MEMORY_CAP = 4e9      # the guard: a regression is killed here instead of taking the machine down


def big_document(n_mb, seed=0):
    "About n_mb MB of numbered lines of word salad, ~90 characters each (a log file, say)."
    rng = random.Random(seed)
    words = ["alpha", "beta", "gamma", "delta", "token", "model", "data", "step", "loss", "rank", "shard", "cache"]
    lines = [" ".join(rng.choices(words, k=14)) for _ in range(1000)]
    return "\n".join(f"{i:07d} {lines[i % 1000]}" for i in range(n_mb * 12_000))


def pretrain_rss(run, *flags):
    code, rss, stderr = run_measuring_rss(cli_cmd("pretrain", "--run-dir", run, *TINY, "--num-iterations", 3,
                                                  "--overwrite", *flags), MEMORY_CAP)
    assert code == 0, stderr[-3000:]
    return rss


def test_one_huge_document_keeps_memory_bounded(fresh, tmp_path):
    text = big_document(52)
    assert len(text) > 52_000_000
    # the report's case: a folder holding one 52 MB document; data prepare cuts it into pieces at line ends
    source = tmp_path / "one_big_file"
    source.mkdir()
    (source / "server.log.txt").write_text(text)
    r = ok(cli("data", "prepare", "--source", source, "--run-dir", fresh))
    assert "split_docs: 1" in r.stdout
    docs = [t for p in list_shards(fresh / "data") for t in pq.read_table(p).column("text").to_pylist()]
    assert len(docs) > 52 and max(map(len, docs)) <= 1_000_000
    assert "".join(sorted(docs, key=lambda d: int(d[:7]))) == text  # cut at line ends: nothing lost or repeated
    rss = {"prepared, stream": pretrain_rss(fresh, "--packing", "stream")}
    # shards from elsewhere may still hold the whole document: a train shard of that one document alone (so that
    # filling the buffer reads it over and over, as in the report), and a small validation shard
    for p in list_shards(fresh / "data"):
        p.unlink()
    write_shards([text], fresh / "data", seed=None)
    write_shards([f"validation document {i}. " * 40 for i in range(16)], fresh / "data", docs_per_row_group=2,
                 seed=None, start_index=1)
    rss["unsplit, stream"] = pretrain_rss(fresh, "--packing", "stream")
    rss["unsplit, best fit"] = pretrain_rss(fresh, "--packing", "bestfit")
    print({k: f"{v / 1e6:.0f} MB" for k, v in rss.items()})
    assert max(rss.values()) < MEMORY_LIMIT, rss


def test_files_that_are_not_text_are_skipped_and_counted(fresh, tmp_path):
    source = tmp_path / "mixed"
    source.mkdir()
    good = [f"Document {i}: some real text about topic {i}.\n" * 20 for i in range(40)]
    for i, doc in enumerate(good):
        (source / f"doc{i:02d}.md").write_text(doc)
    (source / "photo.txt").write_bytes(bytes(range(256)) * 40)                       # binary, with NUL bytes
    (source / "legacy.py").write_bytes("# caf\xe9 cr\xe8me\nx = 1\n".encode("latin-1"))  # not UTF-8
    (source / "dump.jsonl").write_bytes(b'{"text": "ok"}\n{"text": "\xff\xfe"}\n')   # undecodable bytes
    r = ok(cli("data", "prepare", "--source", source, "--run-dir", fresh))
    assert "skipped_files: 3" in r.stdout and "photo.txt (NUL bytes" in r.stdout and "num_docs: 40" in r.stdout
    packed = [t for p in list_shards(fresh / "data") for t in pq.read_table(p).column("text").to_pylist()]
    assert sorted(packed) == sorted(good)  # the good text, all of it, and no garbage
    # a folder of nothing but such files: refused, and the good shards stay (they used to be replaced by garbage)
    before = shards_fingerprint(fresh / "data")
    junk = tmp_path / "junk"
    junk.mkdir()
    for name in ("a.txt", "b.txt", "c.md"):
        shutil.copy(source / "photo.txt", junk / name)
    one_line_error(cli("data", "prepare", "--source", junk, "--run-dir", fresh), "got 0 documents",
                   "3 files skipped as not text")
    assert shards_fingerprint(fresh / "data") == before
