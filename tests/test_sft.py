"""SFT through the command line on a tiny run, after a tiny midtraining: checkpoint, metrics, the eval line, exact
resume, and two gloo processes equal to one process with two micro-steps."""
import json

import pytest
import torch

from conftest import make_tiny_run
from nanochat_nb.pretrain import MetricsLog
from test_midtrain import TINY, cli, copy_run, ok, weights

SFT = [*TINY[:TINY.index("--warmdown-ratio")], *TINY[TINY.index("--warmdown-ratio") + 2:]]  # SFT's own schedule


@pytest.fixture(scope="module")
def mid_run(tmp_path_factory):
    run = make_tiny_run(tmp_path_factory.mktemp("sft_base"))
    ok(cli(run, *TINY, "--eval-problems", 0))
    return run


def test_sft_writes_checkpoint_metrics_eval_and_resumes_exactly(mid_run, tmp_path):
    ref = copy_run(mid_run, tmp_path, "ref")
    out = ok(cli(ref, *SFT, "--init-lr-frac", 0.5, stage="sft"))
    assert "from mid step 4" in out.stdout
    train = [r for r in MetricsLog.read(ref / "metrics" / "sft.jsonl") if "loss" in r]
    assert len(train) == 4
    lrms = [r["lr_mult"] for r in train]
    assert lrms[0] == 1.0 and all(a > b for a, b in zip(lrms, lrms[1:]))  # linear to 0 over the run
    evals = [json.loads(l) for l in (ref / "metrics" / "eval.jsonl").read_text().splitlines()]
    assert [e["stage"] for e in evals if e["task"] == "arithmetic" and e["metric"] == "accuracy"] == ["sft"]

    killed = copy_run(mid_run, tmp_path, "killed")
    ok(cli(killed, *SFT, "--init-lr-frac", 0.5, "--save-every", 2, "--keep-checkpoints", -1, stage="sft"))
    (killed / "checkpoints" / "sft" / "meta_000004.json").unlink()  # as if killed between steps 2 and 4
    ok(cli(killed, *SFT, "--init-lr-frac", 0.5, "--save-every", 2, "--resume", stage="sft"))
    assert [r["loss"] for r in MetricsLog.read(killed / "metrics" / "sft.jsonl") if "loss" in r] == \
        [r["loss"] for r in train]
    w_ref, w_res = weights(ref, 4, "sft"), weights(killed, 4, "sft")
    for k in w_ref:
        assert torch.equal(w_ref[k], w_res[k]), k


def test_sft_two_processes_equal_one(mid_run, tmp_path):
    one, two = copy_run(mid_run, tmp_path, "one"), copy_run(mid_run, tmp_path, "two")
    args = [*SFT, "--eval-problems", 0, "--num-iterations", 3, "--init-lr-frac", 0.5]
    ok(cli(one, *args, stage="sft"))
    ok(cli(two, *args, stage="sft", nproc=2))
    l1 = [r["loss"] for r in MetricsLog.read(one / "metrics" / "sft.jsonl") if "loss" in r]
    l2 = [r["loss"] for r in MetricsLog.read(two / "metrics" / "sft.jsonl") if "loss" in r]
    assert len(l1) == 3 and l1 == pytest.approx(l2, rel=1e-5)
    w1, w2 = weights(one, 3, "sft"), weights(two, 3, "sft")
    for k in w1:
        torch.testing.assert_close(w1[k], w2[k], rtol=0, atol=1e-5, msg=k)


def test_sft_without_a_mid_checkpoint_is_one_line(tmp_path):
    run = make_tiny_run(tmp_path / "run")
    r = cli(run, *SFT, stage="sft")
    assert r.returncode != 0 and "Traceback" not in r.stderr and "mid" in r.stderr
