"""Shards, the folder reader, prepare_data and the DataLoader (exact resume, best-fit rows, rank striding)."""
import itertools
import json
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from hypothesis import given, settings, strategies as st, HealthCheck

from nanochat_nb.data import (BestFitBuffer, DataLoader, best_fit_rows, describe_shards, iter_folder_documents,
                              list_shards, prepare_data, rank_documents, shard_name, write_shards)


class ByteTokenizer:
    "A stand-in tokenizer: one token per UTF-8 byte (ids 1..256), BOS = 0, so rows decode back to exact text."
    bos_id, vocab_size = 0, 257

    def encode(self, text, prepend=None, num_threads=4):
        if isinstance(text, str):
            return ([prepend] if prepend is not None else []) + [b + 1 for b in text.encode()]
        return [self.encode(t, prepend) for t in text]

    def decode(self, ids):
        return bytes(i - 1 for i in ids if i > 0).decode(errors="replace")


TOK = ByteTokenizer()


def corpus(n, seed=0):
    "n ASCII documents of varied length (1..120 chars), each tagged with its number so it is unique."
    import random
    rng = random.Random(seed)
    return [f"<{i}>" + "".join(rng.choice("abcdefgh \n") for _ in range(rng.randint(0, 116))) for i in range(n)]


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    "Five shards: four train ones of 3-4 row groups (8 docs each) and a validation shard."
    d = tmp_path_factory.mktemp("shards")
    docs = corpus(270)
    paths = write_shards(docs[:250], d, chars_per_shard=1500, docs_per_row_group=8, seed=None)
    paths += write_shards(docs[250:], d, chars_per_shard=10**9, docs_per_row_group=8, seed=None, start_index=len(paths))
    assert len(paths) >= 4
    return d, docs


# ---------------------------------------------------------------- shards

def test_write_shards_format(tmp_path):
    docs = [f"document {i:04d}" for i in range(100)]  # 13 chars each
    paths = write_shards(docs, tmp_path, chars_per_shard=200, docs_per_row_group=5, seed=None)
    # 200 chars are reached at 16 docs; the next multiple of 5 is 20
    assert [p.name for p in paths] == [shard_name(i) for i in range(5)]
    for p in paths:
        pf = pq.ParquetFile(p)
        assert pf.schema_arrow.names == ["text"] and pf.metadata.num_rows == 20
        assert [pf.metadata.row_group(i).num_rows for i in range(pf.num_row_groups)] == [5, 5, 5, 5]
        assert pf.metadata.row_group(0).column(0).compression == "ZSTD"
    assert list(itertools.chain(*(pq.read_table(p).column("text").to_pylist() for p in paths))) == docs
    assert sorted(os.listdir(tmp_path)) == [p.name for p in paths]  # no temp files left


def test_write_shards_last_shard_short_and_seeded_shuffle(tmp_path):
    docs = [f"d{i}" for i in range(23)]
    paths = write_shards(docs, tmp_path / "a", chars_per_shard=10**9, docs_per_row_group=10, seed=1)
    md = pq.read_metadata(paths[0])
    assert len(paths) == 1 and md.num_rows == 23 and md.num_row_groups == 3
    shuffled = pq.read_table(paths[0]).column("text").to_pylist()
    assert sorted(shuffled) == sorted(docs) and shuffled != docs
    again = write_shards(docs, tmp_path / "b", chars_per_shard=10**9, docs_per_row_group=10, seed=1)
    assert pq.read_table(again[0]).column("text").to_pylist() == shuffled


# ---------------------------------------------------------------- folders and prepare_data

def test_iter_folder_documents_every_type(tmp_path):
    (tmp_path / "sub").mkdir()
    (tmp_path / "b.txt").write_text("text file")
    (tmp_path / "sub" / "a.md").write_text("markdown file")
    (tmp_path / "c.py").write_text("x = 1\n")
    (tmp_path / "empty.txt").write_text("  \n")
    (tmp_path / "ignored.csv").write_text("not,read")
    (tmp_path / "d.jsonl").write_text('{"text": "j1"}\n\n{"text": "j2", "meta": 1}\n')
    pq.write_table(pa.table({"text": ["p1", "p2"], "id": [1, 2]}), tmp_path / "e.parquet")
    (tmp_path / ".hidden").mkdir()
    (tmp_path / ".hidden" / "x.txt").write_text("hidden")
    expected = ["text file", "x = 1\n", "j1", "j2", "p1", "p2", "markdown file"]
    assert list(iter_folder_documents(tmp_path)) == expected
    assert list(iter_folder_documents(tmp_path)) == expected  # deterministic


@pytest.mark.parametrize("content,needle", [('{"text": "ok"}\n{"text": 3}\n', "bad.jsonl:2"),
                                            ('{"text": "ok"}\n\n{oops\n', "bad.jsonl:3: not valid JSON"),
                                            ('["text"]\n', "bad.jsonl:1")])
def test_iter_folder_documents_bad_jsonl(tmp_path, content, needle):
    (tmp_path / "bad.jsonl").write_text(content)
    with pytest.raises(ValueError, match=needle):
        list(iter_folder_documents(tmp_path))


def test_iter_folder_documents_clear_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        list(iter_folder_documents(tmp_path / "missing"))
    (tmp_path / "notes.csv").write_text("a,b")
    with pytest.raises(ValueError, match="no .txt/.md/.py/.jsonl/.parquet files"):
        list(iter_folder_documents(tmp_path))
    pq.write_table(pa.table({"body": ["x"]}), tmp_path / "x.parquet")
    with pytest.raises(ValueError, match='x.parquet: no "text" column'):
        list(iter_folder_documents(tmp_path))


def test_prepare_data_from_folder_is_idempotent(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    docs = corpus(300)
    (src / "docs.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    run = tmp_path / "run"
    stats = prepare_data(run, source=src, chars_per_shard=3000, docs_per_row_group=8, val_docs=20)
    shards = list_shards(run / "data")
    assert stats["num_shards"] == len(shards) >= 4 and stats["train_shards"] == len(shards) - 1
    assert (stats["num_docs"], stats["train_docs"], stats["val_docs"]) == (300, 280, 20)
    assert stats["num_chars"] == sum(map(len, docs))
    written = [t for p in shards for t in pq.read_table(p).column("text").to_pylist()]
    assert sorted(written) == sorted(docs) and written != docs  # shuffled, nothing lost
    val_md = pq.read_metadata(list_shards(run / "data", "val")[0])
    assert val_md.num_rows == 20 and val_md.num_row_groups >= 8  # so that 8 ranks all get validation data
    # a second run with bigger shards replaces the set: no stale shard remains to pose as "val"
    stats2 = prepare_data(run, source=src, chars_per_shard=10**6, docs_per_row_group=8, val_docs=20)
    assert stats2["num_shards"] == 2 and len(list_shards(run / "data")) == 2
    assert sorted(os.listdir(run)) == ["data"]
    assert [r["split"] for r in describe_shards(run / "data")] == ["train", "val"]


def test_prepare_data_default_corpus(tmp_path):
    stats = prepare_data(tmp_path, max_docs=200, chars_per_shard=500_000)
    assert stats["source"] == "python stdlib" and stats["num_docs"] == 200 and stats["val_docs"] == 10
    assert stats["train_shards"] >= 2


def test_prepare_data_too_small(tmp_path):
    (tmp_path / "one.txt").write_text("only one document")
    with pytest.raises(ValueError, match="at least one train and one validation"):
        prepare_data(tmp_path / "run", source=tmp_path)


def test_list_shards_errors(tmp_path):
    for d in (tmp_path / "missing", tmp_path):
        with pytest.raises(FileNotFoundError, match="nanochat-nb data prepare.*data download"):
            list_shards(d)
    write_shards(["a"], tmp_path, seed=None)
    with pytest.raises(ValueError, match="single shard"):
        list_shards(tmp_path, "train")
    with pytest.raises(ValueError, match="split must be"):
        list_shards(tmp_path, "test")


# ---------------------------------------------------------------- rank striding

def test_ranks_read_disjoint_row_groups(shards):
    d, _ = shards
    paths = list_shards(d, "train")
    total = sum(pq.read_metadata(p).num_rows for p in paths)
    groups = {}
    for rank in range(2):
        keys = [k for k, _ in itertools.islice(rank_documents(paths, rank, 2), total)]
        groups[rank] = {(s, rg) for e, s, rg, _ in keys if e == 1}
        assert all(rg % 2 == rank for _, rg in groups[rank])
    assert not groups[0] & groups[1]
    assert len(groups[0] | groups[1]) == sum(pq.read_metadata(p).num_row_groups for p in paths)


# ---------------------------------------------------------------- best-fit packing

def test_best_fit_buffer_matches_the_plain_packer():
    import random
    rng = random.Random(1)
    for _ in range(30):
        docs = [[0] + [7] * rng.randrange(0, 40) for _ in range(rng.randrange(50, 200))]
        row_len = rng.randrange(2, 50)
        buf = BestFitBuffer()
        for i, doc in enumerate(docs):
            buf.add(i, doc)
        n_rows = 20
        assert [buf.fill_row(row_len) for _ in range(n_rows)] == best_fit_rows(docs, n_rows, row_len)


def test_best_fit_rows_start_with_bos_and_hold_only_document_text(shards):
    d, docs = shards
    loader = DataLoader(TOK, d, 4, 50, buffer_docs=16)
    for _ in range(30):
        inputs, targets, _ = next(loader)
        rows = torch.cat([inputs, targets[:, -1:]], dim=1)
        assert (rows[:, 0] == TOK.bos_id).all()
        for row in rows.tolist():
            pieces = _split_at_bos(row)
            # every piece is a document's start (no padding, no mid-document text); all but the last are whole docs
            for i, piece in enumerate(pieces):
                text = TOK.decode(piece)
                matches = [doc for doc in docs if doc.startswith(text)]
                assert matches, text
                if i < len(pieces) - 1:
                    assert text in docs


def _split_at_bos(row):
    pieces = []
    for t in row:
        if t == TOK.bos_id:
            pieces.append([])
        else:
            pieces[-1].append(t)
    return pieces


def test_stream_is_the_documents_end_to_end(shards):
    d, _ = shards
    B, T = 3, 40
    loader = DataLoader(TOK, d, B, T, packing="stream")
    flat = list(itertools.chain(*(TOK.encode(t, prepend=TOK.bos_id)
                                  for _, t in itertools.islice(rank_documents(list_shards(d, "train")), 400))))
    for step in range(150):  # 150 * 120 tokens run past one epoch of the train shards (about 16K tokens)
        inputs, targets, _ = next(loader)
        start = step * B * T
        assert inputs.flatten().tolist() == flat[start:start + B * T]
        assert targets.flatten().tolist() == flat[start + 1:start + B * T + 1]


# ---------------------------------------------------------------- exact resume

def make_loader(d, packing, rank=0, world_size=1, B=2, T=48, buffer_docs=12, split="train", **kw):
    return DataLoader(TOK, d, B, T, split=split, rank=rank, world_size=world_size, packing=packing,
                      buffer_docs=buffer_docs, **kw)


def assert_resumes(straight, k, **kw):
    "A loader rebuilt (via JSON) from the state after batch k yields exactly straight[k+1:]."
    resumed = make_loader(state=json.loads(json.dumps(straight[k][2])), tokenizer_batch_size=3, **kw)
    for x, y, s in straight[k + 1:]:
        x2, y2, s2 = next(resumed)
        assert torch.equal(x, x2) and torch.equal(y, y2) and s == s2


def straight_run(n, **kw):
    loader = make_loader(tokenizer_batch_size=5, **kw)  # a different batch size from the resumed one's
    return [next(loader) for _ in range(n)]


@pytest.mark.parametrize("packing", ["bestfit", "stream"])
@pytest.mark.parametrize("rank,world_size", [(0, 1), (0, 2), (1, 2)])
def test_exact_resume_across_epochs(shards, packing, rank, world_size):
    d, _ = shards
    kw = dict(d=d, packing=packing, rank=rank, world_size=world_size, B=4, T=64)
    straight = straight_run(80, **kw)
    epochs = [s["epoch"] for _, _, s in straight]
    assert epochs[-1] >= 2  # the run crosses at least one epoch boundary
    boundary = epochs.index(2)
    for k in (0, 3, boundary - 1, boundary, boundary + 1, 78):
        assert_resumes(straight[:k + 12], k, **kw)


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(packing=st.sampled_from(["bestfit", "stream"]), world_size=st.integers(1, 3), data=st.data())
def test_exact_resume_property(shards, packing, world_size, data):
    d, _ = shards
    rank = data.draw(st.integers(0, world_size - 1))
    B, T = data.draw(st.integers(1, 3)), data.draw(st.integers(1, 90))
    n = data.draw(st.integers(2, 25))
    k = data.draw(st.integers(0, n - 2))
    buffer_docs = data.draw(st.integers(1, 40))
    kw = dict(d=d, packing=packing, rank=rank, world_size=world_size, B=B, T=T, buffer_docs=buffer_docs)
    assert_resumes(straight_run(n, **kw), k, **kw)


def test_val_split_loops_and_resumes(shards):
    d, _ = shards
    kw = dict(d=d, packing="bestfit", split="val")
    straight = straight_run(40, **kw)
    assert straight[-1][2]["epoch"] >= 2 and straight[-1][2]["split"] == "val"
    assert_resumes(straight, 20, **kw)


def test_state_is_small_and_checked(shards):
    d, _ = shards
    loader = DataLoader(TOK, d, 2, 64, buffer_docs=30)
    for _ in range(5):
        _, _, state = next(loader)
    assert state == loader.state_dict() and state["epoch"] == 1
    buffered = sum(len(ds) for *_, ds in state["buffer"])
    assert buffered == 29  # topped up to exactly buffer_docs before each pick, and the last pick took one
    assert len(json.dumps(state)) < 600
    with pytest.raises(ValueError, match="world_size"):
        DataLoader(TOK, d, 2, 64, world_size=2, state=state)
    with pytest.raises(ValueError, match="packing"):
        DataLoader(TOK, d, 2, 64, packing="stream", state=state)
    with pytest.raises(ValueError, match="packing must be"):
        DataLoader(TOK, d, 2, 64, packing="padded")


def test_too_many_ranks_is_a_clear_error(shards):
    d, _ = shards
    with pytest.raises(ValueError, match="gets no row groups"):
        next(DataLoader(TOK, d, 1, 8, rank=9, world_size=10))


def test_real_tokenizer_resume(tmp_path):
    from nanochat_nb.tokenizer import Tokenizer, stdlib_documents
    tok = Tokenizer.train(stdlib_documents(max_docs=60), vocab_size=512)
    prepare_data(tmp_path, max_docs=120, chars_per_shard=300_000, docs_per_row_group=8)
    for packing in ("bestfit", "stream"):
        make = lambda **kw: DataLoader(tok, tmp_path / "data", 2, 64, packing=packing, buffer_docs=20, **kw)
        straight = [next(loader) for loader in [make()] for _ in range(8)]
        resumed = make(state=json.loads(json.dumps(straight[3][2])))
        for x, y, s in straight[4:]:
            x2, y2, s2 = next(resumed)
            assert torch.equal(x, x2) and torch.equal(y, y2) and s == s2
            assert x.dtype == torch.long and x.shape == (2, 64)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("packing", ["bestfit", "stream"])
def test_cuda_batches_match_cpu(shards, packing):
    d, _ = shards
    cpu, gpu = make_loader(d, packing), make_loader(d, packing, device="cuda")
    for _ in range(5):
        (x, y, s), (x2, y2, s2) = next(cpu), next(gpu)
        assert x2.is_cuda and y2.is_cuda and s == s2
        assert torch.equal(x, x2.cpu()) and torch.equal(y, y2.cpu())
