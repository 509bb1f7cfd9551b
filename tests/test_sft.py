"""SFT through the command line on a tiny run, after a tiny midtraining: checkpoint, metrics, the eval line, exact
resume after SIGKILL, two gloo processes equal to one process with two micro-steps; the seed of its own shuffle and
nanochat's SFT datasets from a local folder."""
import json

import pytest
import torch

from conftest import make_tiny_run
from nanochat_nb.pretrain import MetricsLog
from test_midtrain import TINY, cli, copy_run, ok, run_and_kill, weights
from test_tasks import ARC_SCHEMA, _arc_row, _write, hub  # noqa: F401  (hub: a fixture)

SFT = [*TINY, "--init-lr-frac", 0.5]  # SFT's own schedule (linear to 0), a rate that moves a tiny model


@pytest.fixture(scope="module")
def mid_run(tmp_path_factory):
    run = make_tiny_run(tmp_path_factory.mktemp("sft_base"))
    ok(cli(run, *TINY, "--eval-problems", 0))
    return run


def test_sft_writes_checkpoint_metrics_eval_and_resumes_exactly(mid_run, tmp_path):
    ref = copy_run(mid_run, tmp_path, "ref")
    args = [*SFT, "--num-iterations", 10, "--save-every", 2]
    out = ok(cli(ref, *args, stage="sft"))
    assert "from mid step 4" in out.stdout
    train = [r for r in MetricsLog.read(ref / "metrics" / "sft.jsonl") if "loss" in r]
    assert len(train) == 10
    lrms = [r["lr_mult"] for r in train]
    assert lrms[0] == 1.0 and all(a > b for a, b in zip(lrms, lrms[1:]))  # linear to 0 over the run
    evals = [json.loads(l) for l in (ref / "metrics" / "eval.jsonl").read_text().splitlines()]
    assert [e["stage"] for e in evals if e["task"] == "arithmetic" and e["metric"] == "accuracy"] == ["sft"]

    killed = copy_run(mid_run, tmp_path, "killed")
    assert 2 <= run_and_kill(killed, args, "sft", "sft") < 10
    ok(cli(killed, *args, "--resume", stage="sft"))
    assert [r["loss"] for r in MetricsLog.read(killed / "metrics" / "sft.jsonl") if "loss" in r] == \
        [r["loss"] for r in train]
    w_ref, w_res = weights(ref, 10, "sft"), weights(killed, 10, "sft")
    for k in w_ref:
        assert torch.equal(w_ref[k], w_res[k]), k


def test_sft_two_processes_equal_one(mid_run, tmp_path):
    one, two = copy_run(mid_run, tmp_path, "one"), copy_run(mid_run, tmp_path, "two")
    args = [*SFT, "--eval-problems", 0, "--num-iterations", 3]
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


@pytest.mark.filterwarnings("ignore:SmolTalk. stop=10000 is past")
def test_sft_shuffles_its_own_way_and_reads_nanochats_datasets_from_a_folder(hub, tmp_path, monkeypatch):
    import datasets
    from nanochat_nb.midtrain import PRESETS as MID_PRESETS, make_chat_config, mid_data
    from nanochat_nb.sft import PRESETS, sft_data
    from nanochat_nb.tokenizer import Tokenizer
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf_cache")
    tok = Tokenizer.load(make_tiny_run(tmp_path / "run") / "tokenizer")
    sizes = dict(arithmetic=50, spelling=0, simple_spelling=0, identity=0, docstrings=0, device_batch_size=1)
    mid_first = mid_data(tok, make_chat_config(MID_PRESETS, **sizes), 256, "train")[0](0, 1)[0][0][0]
    sft_first = sft_data(tok, make_chat_config(PRESETS, **sizes), 256, "train")[0](0, 1)[0][0][0]
    assert mid_first[:60].tolist() != sft_first[:60].tolist()  # SFT does not replay midtraining's order

    _write(hub / "allenai/ai2_arc", "ARC-Challenge/train-00000-of-00001.parquet", [_arc_row(300)], ARC_SCHEMA)
    config = make_chat_config(PRESETS, **sizes | dict(arithmetic=2, device_batch_size=2), data_root=str(hub))
    next_batches, n = sft_data(tok, config, 256, "train")
    assert n == 2 + 3 + 1 + 1 + 3  # arithmetic, ARC-Easy and ARC-Challenge train, GSM8K train, SmolTalk
    text = tok.decode([t for x, y in next_batches(0, n // 2)[0] for t in x.flatten().tolist()])
    assert "Question 300?" in text and "What is 2+2?" in text and "hello 1" in text
    next_test, n_test = sft_data(tok, config, 256, "test")
    test_text = tok.decode([t for x, y in next_test(0, n_test // 2)[0] for t in x.flatten().tolist()])
    assert "hello 3" in test_text and "What is 2+2?" not in test_text  # validation: SmolTalk's test split
