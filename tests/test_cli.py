"""The `nanochat-nb` console command: help on every subcommand, and the tokenizer stage end to end."""
import os, subprocess, sys

import pytest

ENV = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1")


def cli(*args, **kw):
    "Run `python -m nanochat_nb.cli ARGS` and return the completed process."
    return subprocess.run([sys.executable, "-m", "nanochat_nb.cli", *map(str, args)], env=ENV,
                          capture_output=True, text=True, timeout=300, **kw)


@pytest.mark.parametrize("argv", [[], ["tokenizer", "train"], ["tokenizer", "eval"], ["data", "prepare"],
                                  ["data", "download"], ["pretrain"]])
def test_help(argv):
    r = cli(*argv, "--help")
    assert r.returncode == 0, r.stderr
    assert "usage: nanochat-nb" in r.stdout
    if argv:
        assert "--run-dir" in r.stdout


def test_unknown_command_fails():
    r = cli("fly")
    assert r.returncode != 0 and "invalid choice" in r.stderr


def test_tokenizer_train_then_eval(tmp_path):
    run = tmp_path / "run"
    r = cli("tokenizer", "train", "--vocab-size", 1024, "--max-chars", 3_000_000, "--run-dir", run)
    assert r.returncode == 0, r.stderr
    for name in ("tokenizer.tiktoken", "tokenizer.json", "token_bytes.pt"):
        assert (run / "tokenizer" / name).exists()
    r = cli("tokenizer", "eval", "--run-dir", run)
    assert r.returncode == 0, r.stderr
    assert "Ours Ratio" in r.stdout and "| python |" in r.stdout and "| stdlib-val |" in r.stdout


def test_tokenizer_eval_without_training_says_how(tmp_path):
    r = cli("tokenizer", "eval", "--run-dir", tmp_path / "empty")
    assert r.returncode != 0
    assert "nanochat-nb tokenizer train" in r.stderr
