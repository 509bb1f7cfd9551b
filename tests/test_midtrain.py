"""Midtraining through the command line on a tiny run: checkpoint, metrics, the eval line, exact resume, and two gloo
processes equal to one process with two micro-steps."""
import json, os, subprocess, sys

import pytest
import torch

from conftest import make_tiny_run
from nanochat_nb.pretrain import MetricsLog

ENV = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", OMP_NUM_THREADS="1", PYTHONHASHSEED="0")
TINY = ["--sequence-len", 128, "--device-batch-size", 2, "--rows-per-step", 4, "--num-iterations", 4,
        "--eval-every", 2, "--eval-batches", 1, "--warmdown-ratio", 0.5, "--eval-problems", 4, "--eval-max-tokens", 8, "--arithmetic", 200,
        "--spelling", 20, "--simple-spelling", 20, "--identity", 10]


def cli(run, *args, stage="midtrain", nproc=None):
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"] \
        if nproc else [sys.executable]
    r = subprocess.run([*launcher, "-m", "nanochat_nb.cli", stage, "--run-dir", str(run), *map(str, args)], env=ENV,
                       capture_output=True, text=True, timeout=600)
    return r


def ok(r):
    assert r.returncode == 0, f"{r.stdout[-3000:]}\n{r.stderr[-3000:]}"
    return r


@pytest.fixture(scope="module")
def base_run(tmp_path_factory):
    return make_tiny_run(tmp_path_factory.mktemp("mid_base"))


def copy_run(base_run, tmp_path, name):
    import shutil
    return shutil.copytree(base_run, tmp_path / name)


def weights(run, step, stage="mid"):
    return torch.load(run / "checkpoints" / stage / f"model_{step:06d}.pt", map_location="cpu")


def test_midtrain_writes_checkpoint_metrics_eval_and_resumes_exactly(base_run, tmp_path):
    ref = copy_run(base_run, tmp_path, "ref")
    ok(cli(ref, *TINY))
    records = MetricsLog.read(ref / "metrics" / "mid.jsonl")
    train = [r for r in records if "loss" in r]
    assert len(train) == 4 and train[-1]["loss"] < train[0]["loss"]
    lrms = [r["lr_mult"] for r in train]
    assert all(a >= b for a, b in zip(lrms, lrms[1:])) and lrms[-1] < lrms[0]  # the schedule falls (v1's bug: rose)
    assert [r["step"] for r in records if "val_loss" in r] == [0, 2, 4]
    evals = [json.loads(l) for l in (ref / "metrics" / "eval.jsonl").read_text().splitlines()]
    acc = [e for e in evals if e["task"] == "arithmetic" and e["metric"] == "accuracy"]
    assert len(acc) == 1 and acc[0]["stage"] == "mid" and acc[0]["n"] == 4 and acc[0]["step"] == 4

    # a run whose step-4 checkpoint never committed (its meta is written last) resumes from step 2 and ends on the
    # same losses and weights as the run that went straight through
    killed = copy_run(base_run, tmp_path, "killed")
    ok(cli(killed, *TINY, "--save-every", 2, "--keep-checkpoints", -1))
    (killed / "checkpoints" / "mid" / "meta_000004.json").unlink()  # as if killed between steps 2 and 4
    ok(cli(killed, *TINY, "--save-every", 2, "--resume"))
    assert [r["loss"] for r in MetricsLog.read(killed / "metrics" / "mid.jsonl") if "loss" in r] == \
        [r["loss"] for r in train]
    w_ref, w_res = weights(ref, 4), weights(killed, 4)
    for k in w_ref:
        assert torch.equal(w_ref[k], w_res[k]), k

    # a meta without its data position is refused in one line naming the file
    meta = killed / "checkpoints" / "mid" / "meta_000004.json"
    meta.write_text(json.dumps({k: v for k, v in json.loads(meta.read_text()).items() if k != "cursor"}))
    r = cli(killed, *TINY, "--num-iterations", 6, "--resume")
    assert r.returncode != 0 and "meta_000004.json" in r.stderr and "cursor" in r.stderr and "Traceback" not in r.stderr


def test_two_processes_equal_one(base_run, tmp_path):
    one, two = copy_run(base_run, tmp_path, "one"), copy_run(base_run, tmp_path, "two")
    args = [*TINY, "--eval-problems", 0, "--num-iterations", 3]
    ok(cli(one, *args))
    out = ok(cli(two, *args, nproc=2))
    assert "2 rank(s)" in out.stdout
    l1 = [r["loss"] for r in MetricsLog.read(one / "metrics" / "mid.jsonl") if "loss" in r]
    l2 = [r["loss"] for r in MetricsLog.read(two / "metrics" / "mid.jsonl") if "loss" in r]
    assert len(l1) == 3 and l1 == pytest.approx(l2, rel=1e-5)
    w1, w2 = weights(one, 3), weights(two, 3)
    for k in w1:
        torch.testing.assert_close(w1[k], w2[k], rtol=0, atol=1e-5, msg=k)


def test_bad_settings_and_missing_base_are_one_line_errors(tmp_path):
    r = cli(tmp_path, "--matrix-lr", -1.0)
    assert r.returncode != 0 and "--matrix-lr" in r.stderr and "Traceback" not in r.stderr
    r = cli(tmp_path / "empty", "--preset", "micro")
    assert r.returncode != 0 and "Traceback" not in r.stderr
