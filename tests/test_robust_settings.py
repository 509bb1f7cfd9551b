"""Issue 10, "nonsense accepted" and "tracebacks instead of answers" for settings, devices and run directories.

Every bad setting gets one line naming the flag, the value and what is allowed, before any file is touched: the
run directory below holds an earlier run, and it must come out of every refused command byte for byte the same.
"""
import os
from pathlib import Path

import pytest
import torch

from test_robust_common import TINY, cli, cli_batch, one_line_error, snapshot, trained  # noqa: F401 (fixture)

BAD_SETTINGS = [  # (flags, what the error line must say)
    (["--num-iterations", 0], "--num-iterations 0"),             # used to start a 25,600-step run
    (["--matrix-lr", "nan"], "--matrix-lr nan"),                  # used to train to NaN and save it, exit 0
    (["--embedding-lr", -0.1], "--embedding-lr -0.1"),
    (["--unembedding-lr", "3e38"], "[0, 1000]"),                  # used to overflow inside the optimizer
    (["--warmdown-ratio", 1.5], "--warmdown-ratio 1.5"),
    (["--warmup-ratio", 0.7, "--warmdown-ratio", 0.5], "add up to 1 or less"),
    (["--final-lr-frac", 2], "--final-lr-frac 2.0"),
    (["--eval-tokens", 0], "--eval-tokens 0"),
    (["--eval-every", 0], "--eval-every 0"),
    (["--grad-clip", "inf"], "--grad-clip inf"),
    (["--total-batch-size", 0], "--total-batch-size 0"),
    (["--keep-checkpoints", 0], "--keep-checkpoints 0"),
    (["--packing", "tight"], "'bestfit', 'stream'"),
    (["--device", "tpu"], "--device 'tpu'"),
    # a device this machine lacks: no CUDA at all, or an index past the last GPU
    (["--device", "cuda:99" if torch.cuda.is_available() else "cuda"], "CUDA device(s)"),
    (["--resume", "--overwrite"], "contradict"),
]


def test_bad_settings_get_one_line_and_touch_nothing(trained):
    before = snapshot(trained)
    results = cli_batch(*[["pretrain", "--run-dir", trained, *TINY, *flags] for flags, _ in BAD_SETTINGS])
    for (flags, needle), r in zip(BAD_SETTINGS, results):
        line = one_line_error(r, needle)
        assert "not allowed" in line or "fix:" in line, line
    assert snapshot(trained) == before  # not even the metrics file was emptied


def test_bad_run_dirs_fail_before_any_work(tmp_path):
    a_file = tmp_path / "notes.txt"
    a_file.write_text("a file, not a folder")
    commands = [["tokenizer", "train", "--vocab-size", 512, "--max-chars", 200_000],
                ["data", "prepare"], ["pretrain", *TINY]]
    argvs = [[*c, "--run-dir", a_file] for c in commands] + [[*c, "--run-dir", a_file / "run"] for c in commands]
    argvs.append(["pretrain", "--run-dir", ""])
    results = cli_batch(*argvs)
    for r in results[:3]:  # the file is named, and it is found at once (it used to surface after tokenizer training)
        one_line_error(r, "is a file, not a folder", str(a_file))
    for r in results[3:6]:  # a path through a file: the system's refusal, in words
        one_line_error(r, "cannot write to --run-dir", "a file stands where a folder is needed")
    assert results[6].returncode == 2 and "empty --run-dir" in results[6].stderr  # argparse's own one-line error
    assert a_file.read_text() == "a file, not a folder"
    assert not (Path.cwd() / "tokenizer").exists() and not (Path.cwd() / "checkpoints").exists()


def _unwritable_dir():
    "A path where creating a folder really fails, even for root (chmod does not stop root): None if there is none."
    for candidate in ("/sys/nanochat-nb-test-run", "/proc/nanochat-nb-test-run"):
        try:
            os.makedirs(candidate)
        except OSError:
            return candidate
        os.rmdir(candidate)
    return None


@pytest.mark.skipif(_unwritable_dir() is None, reason="no folder here refuses writes to root")
def test_a_run_dir_the_system_refuses():
    # /sys and /proc refuse new folders even to root: the nearest we get to a read-only disk without mounting one
    for r in cli_batch(["tokenizer", "train", "--vocab-size", 512, "--run-dir", _unwritable_dir()],
                       ["pretrain", "--run-dir", _unwritable_dir(), *TINY]):
        one_line_error(r, "cannot write to --run-dir", _unwritable_dir())
