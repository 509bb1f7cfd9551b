"""Issue 10, "trust" and "tracebacks instead of answers" for the tokenizer's files.

The tokenizer is stored as text (tiktoken's mergeable-ranks format) plus JSON, which cannot run code when loaded. A
pickled `tokenizer.pkl` (nanochat's format, and this project's before) loads only when asked, and then only as a
tiktoken Encoding. Damaged files, and files that do not belong together, get one line naming the file.
"""
import os, pickle, shutil

import tiktoken.load
import torch

from nanochat_nb.tokenizer import Tokenizer, stdlib_documents

from test_robust_common import cli, cli_batch, copy_run, fresh, ok, one_line_error  # noqa: F401 (fixture)


def test_the_saved_tokenizer_is_text_that_tiktoken_reads(fresh, monkeypatch):
    directory = fresh / "tokenizer"
    assert sorted(p.name for p in directory.iterdir()) == ["token_bytes.pt", "tokenizer.json", "tokenizer.tiktoken"]
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", "")  # tiktoken's own reader, without its cache
    tokenizer = Tokenizer.load(directory)
    ranks = tiktoken.load.load_tiktoken_bpe(str(directory / "tokenizer.tiktoken"))
    assert ranks == {tokenizer.enc.decode_single_token_bytes(i): i for i in range(tokenizer.vocab_size - 9)}


class Exploit:
    "A pickle that runs a shell command when it is loaded."
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_a_pickled_tokenizer_loads_only_when_asked_and_never_runs_code(fresh, tmp_path):
    tokenizer = Tokenizer.load(fresh / "tokenizer")
    old = tmp_path / "old_run"  # a run directory of an earlier version: tokenizer.pkl and token_bytes.pt
    (old / "tokenizer").mkdir(parents=True)
    (old / "tokenizer" / "tokenizer.pkl").write_bytes(pickle.dumps(tokenizer.enc))
    shutil.copy(fresh / "tokenizer" / "token_bytes.pt", old / "tokenizer")
    evil = copy_run(old, tmp_path, "evil_run")
    marker = tmp_path / "the_exploit_ran"
    (evil / "tokenizer" / "tokenizer.pkl").write_bytes(pickle.dumps(Exploit(marker)))
    eval_old, pretrain_old, convert_evil = cli_batch(["tokenizer", "eval", "--run-dir", old],
                                                     ["pretrain", "--run-dir", old],
                                                     ["tokenizer", "convert", "--run-dir", evil])
    for r in (eval_old, pretrain_old):  # not loaded unasked; the line says how to convert it
        one_line_error(r, "tokenizer.pkl is a pickle", f"nanochat-nb tokenizer convert --run-dir {old}")
    # asked, a pickle may still build a tiktoken Encoding and nothing else
    one_line_error(convert_evil, "tokenizer.pkl cannot be loaded as a tokenizer", "posix.system")
    assert not marker.exists()
    # the trusted one converts once, and then loads as what it was
    r = ok(cli("tokenizer", "convert", "--run-dir", old))
    assert f"fingerprint {tokenizer.fingerprint}" in r.stdout
    assert Tokenizer.load(old / "tokenizer").fingerprint == tokenizer.fingerprint
    assert "| python |" in ok(cli("tokenizer", "eval", "--run-dir", old)).stdout


def test_damaged_or_mismatched_tokenizer_files_name_the_file(fresh, tmp_path):
    other = Tokenizer.train([d[:3000] for d in stdlib_documents(max_docs=40)], vocab_size=300)
    other_bytes = tmp_path / "other_token_bytes.pt"
    torch.save(other.token_bytes, other_bytes)
    pkl = pickle.dumps(Tokenizer.load(fresh / "tokenizer").enc)

    def lines(path, keep):
        path.write_bytes(b"\n".join(path.read_bytes().splitlines()[:keep]) + b"\n")

    def garble(path):
        data = path.read_bytes().splitlines()
        data[300] = b"@@@@ 300"
        path.write_bytes(b"\n".join(data))

    def old_pair(d):  # tokenizer.pkl with the token_bytes.pt of another tokenizer (an IndexError, once)
        for name in ("tokenizer.tiktoken", "tokenizer.json"):
            (d / name).unlink()
        (d / "tokenizer.pkl").write_bytes(pkl)
        shutil.copy(other_bytes, d / "token_bytes.pt")

    cases = {  # (damage to run_dir/tokenizer, the command, what the line must say)
        "a garbled ranks line": (lambda d: garble(d / "tokenizer.tiktoken"), "eval", "tokenizer.tiktoken:301"),
        "ranks cut short": (lambda d: lines(d / "tokenizer.tiktoken", 100), "eval", "lacks the 256 single-byte"),
        "ranks of another tokenizer": (lambda d: lines(d / "tokenizer.tiktoken", 400), "eval",
                                       "tokenizer.tiktoken does not belong with"),
        "json damaged": (lambda d: (d / "tokenizer.json").write_text('{"pattern": '), "eval",
                         "tokenizer.json is not valid JSON"),
        "json missing": (lambda d: (d / "tokenizer.json").unlink(), "eval", "tokenizer.json is missing"),
        "token_bytes of another tokenizer": (lambda d: shutil.copy(other_bytes, d / "token_bytes.pt"), "eval",
                                             "token_bytes.pt does not belong with the tokenizer"),
        "token_bytes damaged": (lambda d: (d / "token_bytes.pt").write_bytes(b"PK\x03\x04 not a zip"), "eval",
                                "token_bytes.pt cannot be loaded"),
        "an old pair that does not belong": (old_pair, "convert", "token_bytes.pt does not belong"),
        "a pickle cut short": (lambda d: (old_pair(d), (d / "tokenizer.pkl").write_bytes(pkl[:len(pkl) // 2])),
                               "convert", "tokenizer.pkl cannot be loaded as a tokenizer"),
    }
    argvs = []
    for i, (damage, command, _) in enumerate(cases.values()):
        run = copy_run(fresh, tmp_path, f"run{i}")
        damage(run / "tokenizer")
        argvs.append(["tokenizer", command, "--run-dir", run])
    for (name, (_, _, needle)), r in zip(cases.items(), cli_batch(*argvs)):
        print(f"{name}: {one_line_error(r, needle, 'fix:')}")
