"""Pretraining as a system: torchrun on gloo, exact resume after SIGKILL, the command line end to end.

Every run here is a real `nanochat-nb pretrain` process on a tiny model, on shards of the default corpus.
"""
import os, shutil, signal, subprocess, sys, time
from pathlib import Path

import pytest
import torch

from nanochat_nb.data import prepare_data
from nanochat_nb.pretrain import MetricsLog
from nanochat_nb.tokenizer import train_tokenizer

# one thread per process: a 1-process run and a 2-process run then do identical arithmetic per micro-batch
ENV = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", OMP_NUM_THREADS="1", PYTHONHASHSEED="0")


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    "A run directory with a small tokenizer and a few shards of standard-library sources."
    run = tmp_path_factory.mktemp("prepared")
    train_tokenizer(run, vocab_size=512, max_chars=2_000_000)
    prepare_data(run, max_docs=300, chars_per_shard=400_000, docs_per_row_group=16)
    return run


def fresh_run(prepared, tmp_path, name):
    "A copy of the prepared run directory, so that each run has its own checkpoints and metrics."
    run = tmp_path / name
    shutil.copytree(prepared, run)
    return run


def pretrain_cmd(run, *args, nproc=None):
    "The command line of a pretraining run, under torchrun when `nproc` is given."
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"] \
        if nproc else [sys.executable]
    return [*launcher, "-m", "nanochat_nb.cli", "pretrain", "--run-dir", str(run), *map(str, args)]


def run_ok(cmd):
    r = subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, f"{' '.join(cmd)}\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}"
    return r


def final_weights(run, step):
    return torch.load(run / "checkpoints" / "base" / f"model_{step:06d}.pt", map_location="cpu")


def losses(run):
    return [r["loss"] for r in MetricsLog.read(run / "metrics" / "pretrain.jsonl") if "loss" in r]


TINY = ["--depth", 2, "--sequence-len", 64, "--device-batch-size", 4, "--num-iterations", 6, "--eval-every", 3,
        "--eval-tokens", 1024, "--sample-every", -1, "--data-world-size", 2, "--grad-clip", 1.0]


def test_two_processes_equal_one_process_with_accumulation(prepared, tmp_path):
    # the same global batch of 512 tokens per step: 2 ranks x 1 micro-step, or 1 process x 2 micro-steps
    # reading as the same two data ranks. Gradient clipping is on, on the rank-averaged gradient.
    one, two = fresh_run(prepared, tmp_path, "one"), fresh_run(prepared, tmp_path, "two")
    run_ok(pretrain_cmd(one, *TINY, "--total-batch-size", 512))
    out = run_ok(pretrain_cmd(two, *TINY, "--total-batch-size", 512, nproc=2))
    assert "2 rank(s)" in out.stdout
    l1, l2 = losses(one), losses(two)
    assert len(l1) == len(l2) == 6
    # tolerance: 1e-5 relative on losses and 1e-5 absolute on weights (fp32; the only differences allowed are the
    # order of floating-point sums across the all-reduce)
    assert l1 == pytest.approx(l2, rel=1e-5)
    w1, w2 = final_weights(one, 6), final_weights(two, 6)
    assert w1.keys() == w2.keys()
    for k in w1:
        torch.testing.assert_close(w1[k], w2[k], rtol=0, atol=1e-5, msg=k)
    # and training moved the weights away from their initialisation (the zero-initialised projections)
    assert w1["lm_head.weight"].abs().sum() > 0


KILL = ["--depth", 4, "--sequence-len", 128, "--device-batch-size", 8, "--num-iterations", 24, "--save-every", 8,
        "--eval-every", 8, "--eval-tokens", 2048, "--sample-every", -1]


def test_sigkill_then_resume_matches_uninterrupted(prepared, tmp_path):
    ref, killed = fresh_run(prepared, tmp_path, "ref"), fresh_run(prepared, tmp_path, "killed")
    run_ok(pretrain_cmd(ref, *KILL))

    proc = subprocess.Popen(pretrain_cmd(killed, *KILL), env=ENV, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    meta8 = killed / "checkpoints" / "base" / "meta_000008.json"
    deadline = time.time() + 300
    while not meta8.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.01)
    assert proc.poll() is None, f"the run ended before it could be killed:\n{proc.stderr.read()[-2000:]}"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    assert not (killed / "checkpoints" / "base" / "meta_000024.json").exists()

    run_ok(pretrain_cmd(killed, *KILL, "--resume"))
    # exact: same code, same data positions, same optimizer state, one thread, fp32 on CPU
    assert losses(killed) == losses(ref)
    w_ref, w_res = final_weights(ref, 24), final_weights(killed, 24)
    for k in w_ref:
        assert torch.equal(w_ref[k], w_res[k]), k


def test_resume_with_other_depth_is_refused(prepared, tmp_path):
    run = fresh_run(prepared, tmp_path, "mismatch")
    run_ok(pretrain_cmd(run, "--depth", 2, "--sequence-len", 64, "--device-batch-size", 2, "--num-iterations", 2,
                        "--eval-tokens", 256, "--sample-every", -1))
    r = subprocess.run(pretrain_cmd(run, "--depth", 3, "--sequence-len", 64, "--device-batch-size", 2,
                                    "--num-iterations", 4, "--resume"), env=ENV, capture_output=True, text=True)
    assert r.returncode != 0 and "--depth" in r.stderr


def test_resume_from_a_truncated_checkpoint_names_the_file(prepared, tmp_path):
    run = fresh_run(prepared, tmp_path, "truncated")
    run_ok(pretrain_cmd(run, "--depth", 2, "--sequence-len", 64, "--device-batch-size", 2, "--num-iterations", 2,
                        "--eval-tokens", 256, "--sample-every", -1))
    model_file = run / "checkpoints" / "base" / "model_000002.pt"
    model_file.write_bytes(model_file.read_bytes()[:1000])
    r = subprocess.run(pretrain_cmd(run, "--depth", 2, "--sequence-len", 64, "--device-batch-size", 2,
                                    "--num-iterations", 4, "--resume"), env=ENV, capture_output=True, text=True)
    assert r.returncode != 0 and "model_000002.pt" in r.stderr and "Traceback" not in r.stderr


def test_bad_batch_arithmetic_is_explained(prepared, tmp_path):
    r = subprocess.run(pretrain_cmd(prepared, "--depth", 2, "--sequence-len", 64, "--device-batch-size", 3,
                                    "--total-batch-size", 1000), env=ENV, capture_output=True, text=True)
    assert r.returncode != 0 and "multiple of 192" in r.stderr
