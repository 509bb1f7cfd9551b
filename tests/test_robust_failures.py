"""Issue 10, "a crash that blocks recovery" and "tracebacks instead of answers": full disks, torn metrics, malformed and
damaged files, and a loss that turns into NaN. Each gets one line naming the file and the fix, and what was saved
before stays loadable.

What is simulated, and how: a full disk during a checkpoint save is a real ENOSPC from the kernel (the save's temp
file is made a link to /dev/full, which refuses every write); a full disk during tokenizer training and data
preparation is a per-process file-size limit (RLIMIT_FSIZE, so writes fail with EFBIG, "File too large"). Neither
needs root or a special mount. A torn metrics line is written by hand, as a crash in the middle of an append leaves
it; damaged and malformed files are real files, edited the way a bad copy or another program would leave them.
"""
import json, os, shutil, subprocess, sys
from pathlib import Path

import pytest
import torch

from nanochat_nb.checkpoint import checkpoint_dir, latest_step, load_checkpoint
from nanochat_nb.data import list_shards, shards_fingerprint
from nanochat_nb.tokenizer import Tokenizer

from test_robust_common import (ENV, TINY, cli, cli_batch, copy_run, fresh, limit_file_size, metric_steps,  # noqa
                                ok, one_line_error, snapshot, trained)

DISK_FULL_AT = r"""
import os, sys
from nanochat_nb.cli import main
# the temp file of this process's save of that file becomes a link to /dev/full: every write to it gets ENOSPC
ckpt_dir, name, argv = sys.argv[1], sys.argv[2], sys.argv[3:]
os.symlink("/dev/full", os.path.join(ckpt_dir, f".{name}.{os.getpid()}.tmp"))
main(argv)
"""


@pytest.mark.skipif(not Path("/dev/full").exists(), reason="needs Linux's /dev/full")
def test_disk_full_during_a_checkpoint_save(trained):
    ckpt = checkpoint_dir(trained)
    args = ["pretrain", "--run-dir", trained, *TINY, "--num-iterations", 6, "--resume"]
    r = subprocess.run([sys.executable, "-c", DISK_FULL_AT, ckpt, "model_000006.pt", *map(str, args)], env=ENV,
                       capture_output=True, text=True, timeout=300)
    # it used to be "RuntimeError: [enforce fail at inline_container.cc:672]", never saying that the disk was full
    one_line_error(r, "saving step 6 failed", "No space left on device", "model_000006.pt",
                   "step 4 is still the latest complete checkpoint")
    assert latest_step(ckpt) == 4 and not list(ckpt.glob(".*.tmp"))
    load_checkpoint(ckpt, load_optimizer=True)  # the previous checkpoint is whole
    ok(cli(*args))  # space again: the resume goes on from step 4
    assert latest_step(ckpt) == 6 and metric_steps(trained) == list(range(7))


def test_disk_full_while_training_a_tokenizer_or_preparing_data(fresh, tmp_path):
    tokenizer_before = Tokenizer.load(fresh / "tokenizer").fingerprint
    data_before = shards_fingerprint(fresh / "data")
    source = tmp_path / "texts"
    source.mkdir()
    for i in range(30):
        (source / f"{i}.txt").write_text(f"document {i} " * 300)
    tok, data = cli_batch(["tokenizer", "train", "--vocab-size", 512, "--max-chars", 200_000, "--run-dir", fresh],
                          ["data", "prepare", "--source", source, "--run-dir", fresh],
                          preexec_fn=limit_file_size(2048))  # files may not grow past 2 KB in this child
    one_line_error(tok, "the disk is full", "File too large", "tokenizer.tiktoken")
    one_line_error(data, "the disk is full", "File too large", "shard_00000.parquet")
    # what was there before is untouched and whole
    assert Tokenizer.load(fresh / "tokenizer").fingerprint == tokenizer_before
    assert shards_fingerprint(fresh / "data") == data_before
    assert not list((fresh / "tokenizer").glob("*.tmp")) and not list((fresh / "data").glob("*.tmp"))


def test_a_torn_metrics_line_is_trimmed_and_said(trained):
    metrics = trained / "metrics" / "pretrain.jsonl"
    with open(metrics, "a") as f:
        f.write('{"step": 5, "loss": 3.1, "smooth_lo')  # a crash (or a full disk) in the middle of an append
    # it used to be: error: Expecting ',' delimiter: line 1 column 212 (no file, no fix), at every --resume
    r = ok(cli("pretrain", "--run-dir", trained, *TINY, "--num-iterations", 6, "--resume"))
    assert "pretrain.jsonl: dropped a torn last line" in r.stdout
    assert metric_steps(trained) == list(range(7))


def _edit_json(path, fn):
    data = json.loads(path.read_text())
    path.write_text(json.dumps(fn(data)))


def _edit_torch(path, fn):
    torch.save(fn(torch.load(path, weights_only=True)), path)


MALFORMED = {  # name: (how the files are damaged, what the one-line error must say)
    "meta without loop_state": (lambda ck, m: _edit_json(ck / "meta_000004.json", lambda d: d.pop("loop_state") and d),
                                ["meta_000004.json has no valid 'loop_state'"]),
    "meta without model_config": (lambda ck, m: _edit_json(ck / "meta_000004.json",
                                                           lambda d: d.pop("model_config") and d),
                                  ["meta_000004.json has no valid 'model_config'"]),
    "meta is a list": (lambda ck, m: (ck / "meta_000004.json").write_text("[1, 2]"),
                       ["meta_000004.json holds a JSON list"]),
    "dataloader state garbage": (lambda ck, m: _edit_json(ck / "meta_000004.json",
                                                          lambda d: {**d, "dataloader_state": [{"turn": "x"}]}),
                                 ["meta_000004.json: its dataloader_state does not fit"]),
    "optimizer file without optimizers": (lambda ck, m: _edit_torch(ck / "optim_000004_rank0.pt", lambda o: {}),
                                          ["optim_000004_rank0.pt has no valid 'optimizers'"]),
    "optimizer states of another model": (lambda ck, m: _edit_torch(ck / "optim_000004_rank0.pt",
                                                                    lambda o: {"optimizers": o["optimizers"][::-1]}),
                                          ["optim_000004_rank0.pt does not fit this run's optimizers"]),
    "model file holds a tensor": (lambda ck, m: torch.save(torch.ones(3), ck / "model_000004.pt"),
                                  ["model_000004.pt holds a Tensor"]),
    "metrics line without step": (lambda ck, m: m.write_text('{"step": 0}\n{"loss": 2.0}\n'),
                                  ["pretrain.jsonl:2 is a record without an integer 'step'", "delete that line"]),
    "metrics line broken in the middle": (lambda ck, m: m.write_text('{"step": 0}\n{"step": 1, "lo\n{"step": 2}\n'),
                                          ["pretrain.jsonl:2 is not a JSON record", "delete that line"]),
}


def test_malformed_checkpoints_and_metrics_name_the_file(trained, tmp_path):
    runs = []
    for i, (damage, _) in enumerate(MALFORMED.values()):
        run = copy_run(trained, tmp_path, f"run{i}")
        damage(checkpoint_dir(run), run / "metrics" / "pretrain.jsonl")
        runs.append(run)
    results = cli_batch(*[["pretrain", "--run-dir", run, *TINY, "--num-iterations", 6, "--resume"] for run in runs])
    for (name, (_, needles)), r, run in zip(MALFORMED.items(), results, runs):
        one_line_error(r, *needles)  # it used to be KeyError: 'loop_state', 'optimizers', ... without a file
        assert latest_step(checkpoint_dir(run)) == 4, name  # nothing new was saved


def test_a_nan_loss_stops_training_before_anything_is_saved(trained):
    # a checkpoint whose weights hold a NaN, as the diverged runs of earlier versions saved them (with exit code 0)
    model_file = checkpoint_dir(trained) / "model_000004.pt"
    _edit_torch(model_file, lambda state: {k: v.fill_(float("nan")) if k == "lm_head.weight" else v
                                           for k, v in state.items()})
    before = snapshot(checkpoint_dir(trained))
    r = cli("pretrain", "--run-dir", trained, *TINY, "--num-iterations", 8, "--save-every", 1, "--resume")
    one_line_error(r, "step 4: the loss is nan", "training stopped before saving it", "lower the learning rates")
    assert snapshot(checkpoint_dir(trained)) == before  # no NaN checkpoint saved over (or next to) the others
    assert metric_steps(trained) == [0, 1, 2, 3]


def test_a_damaged_shard_is_named(fresh):
    shard = list_shards(fresh / "data", "train")[0]
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])  # a copy that stopped half-way
    one_line_error(cli("pretrain", "--run-dir", fresh, *TINY, "--num-iterations", 2),
                   f"{shard} is not a readable parquet shard", "data prepare")
