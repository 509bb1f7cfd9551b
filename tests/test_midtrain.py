"""Midtraining through the command line on a tiny run: checkpoint, metrics, the eval line, exact resume after SIGKILL,
two gloo processes equal to one process with two micro-steps; the loop's API for RL; the mixture (docstring questions
from the corpus, nanochat's hub datasets from a local folder)."""
import json, os, signal, subprocess, sys, time

import pytest
import torch

from conftest import make_tiny_run
from test_tasks import hub  # noqa: F401  (a fixture: small hub repositories in their upstream layout)
from nanochat_nb.checkpoint import latest_step
from nanochat_nb.pretrain import MetricsLog

ENV = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", OMP_NUM_THREADS="1", PYTHONHASHSEED="0")
TINY = ["--sequence-len", 128, "--device-batch-size", 2, "--rows-per-step", 4, "--num-iterations", 4,
        "--eval-every", 2, "--eval-batches", 1, "--eval-problems", 4, "--eval-max-tokens", 8, "--arithmetic", 200,
        "--spelling", 20, "--simple-spelling", 20, "--identity", 10, "--docstrings", 0]


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


def run_and_kill(run, args, stage="midtrain", stage_dir="mid"):
    "Start a stage, SIGKILL it as soon as its step-2 checkpoint is committed; the latest step on disk after the kill."
    p = subprocess.Popen([sys.executable, "-m", "nanochat_nb.cli", stage, "--run-dir", str(run), *map(str, args)],
                         env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    meta, deadline = run / "checkpoints" / stage_dir / "meta_000002.json", time.monotonic() + 300
    while not meta.exists() and p.poll() is None and time.monotonic() < deadline:
        time.sleep(0.002)
    p.send_signal(signal.SIGKILL)
    assert p.wait() == -signal.SIGKILL, "the stage ended before it could be killed"
    return latest_step(run / "checkpoints" / stage_dir)


def test_midtrain_writes_checkpoint_metrics_eval_and_resumes_exactly(base_run, tmp_path):
    ref = copy_run(base_run, tmp_path, "ref")
    args = [*TINY, "--num-iterations", 10, "--save-every", 2, "--warmdown-ratio", 0.5]
    ok(cli(ref, *args))
    records = MetricsLog.read(ref / "metrics" / "mid.jsonl")
    train = [r for r in records if "loss" in r]
    assert len(train) == 10 and train[-1]["loss"] < train[0]["loss"]
    lrms = [r["lr_mult"] for r in train]
    assert all(a >= b for a, b in zip(lrms, lrms[1:])) and lrms[-1] < lrms[0]  # the schedule falls (v1's bug: rose)
    assert [r["step"] for r in records if "val_loss" in r] == [0, 2, 4, 6, 8, 10]
    evals = [json.loads(l) for l in (ref / "metrics" / "eval.jsonl").read_text().splitlines()]
    acc = [e for e in evals if e["task"] == "arithmetic" and e["metric"] == "accuracy"]
    assert len(acc) == 1 and acc[0]["stage"] == "mid" and acc[0]["n"] == 4 and acc[0]["step"] == 10

    # killed with SIGKILL after its step-2 checkpoint, resumed: the same losses and bit-identical weights
    killed = copy_run(base_run, tmp_path, "killed")
    assert 2 <= run_and_kill(killed, args) < 10
    ok(cli(killed, *args, "--resume"))
    assert [r["loss"] for r in MetricsLog.read(killed / "metrics" / "mid.jsonl") if "loss" in r] == \
        [r["loss"] for r in train]
    w_ref, w_res = weights(ref, 10), weights(killed, 10)
    for k in w_ref:
        assert torch.equal(w_ref[k], w_res[k]), k

    # a meta without its data position is refused in one line naming the file
    meta = killed / "checkpoints" / "mid" / "meta_000010.json"
    meta.write_text(json.dumps({k: v for k, v in json.loads(meta.read_text()).items() if k != "cursor"}))
    r = cli(killed, *args, "--num-iterations", 12, "--resume")
    assert r.returncode != 0 and "meta_000010.json" in r.stderr and "cursor" in r.stderr and "Traceback" not in r.stderr


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


def test_the_loop_takes_weighted_batches_its_own_evaluation_and_no_validation(base_run, tmp_path):
    "The API RL builds on: make_data gets the model, (x, y, w) micro-batches, evaluate(model, step), no val batches."
    from nanochat_nb.midtrain import PRESETS, make_chat_config, mid_data, train_chat_stage
    settings = dict(sequence_len=64, device_batch_size=2, num_iterations=2, eval_every=1, eval_problems=0,
                    arithmetic=20, spelling=0, simple_spelling=0, identity=0)
    plain = train_chat_stage(copy_run(base_run, tmp_path, "plain"), "mid", make_chat_config(PRESETS, **settings),
                             mid_data, log=lambda *a: None)
    seen, calls = [], []

    def make_data(tokenizer, config, T, split, model):
        seen.append((split, model))
        inner, epoch = mid_data(tokenizer, config, T, split)

        def next_batches(cursor, n):
            out, cursor = inner(cursor, n)
            return [(x, y, torch.full(y.shape, -1.0)) for x, y in out], cursor  # weight -1: the loss negated
        return next_batches, epoch

    run = copy_run(base_run, tmp_path, "weighted")
    config = make_chat_config(PRESETS, **settings, eval_batches=0)
    summary = train_chat_stage(run, "rl", config, make_data, log=lambda *a: None,
                               evaluate=lambda model, step: calls.append(step) or {"pass@1": step / 10})
    assert [s for s, _ in seen] == ["train"] and isinstance(seen[0][1], torch.nn.Module)  # no "test" split asked
    assert calls == [0, 1, 2] and summary["val_loss"] is None
    records = MetricsLog.read(run / "metrics" / "rl.jsonl")
    assert [r.get("pass@1") for r in records] == [0.0, 0.1, 0.2] and not any("val_loss" in r for r in records)
    ref = [r["loss"] for r in MetricsLog.read(run.parent / "plain" / "metrics" / "mid.jsonl") if "loss" in r]
    assert records[0]["loss"] == pytest.approx(-ref[0], rel=1e-5)  # same weights, same batch, weight -1
    assert plain["val_loss"] is not None and (run / "checkpoints" / "rl" / "model_000002.pt").exists()


def test_docstring_questions_come_from_the_corpus_with_disjoint_splits():
    from nanochat_nb.midtrain import DocstringQA, default_mixture
    train, test = DocstringQA("train"), DocstringQA("test")
    assert len(train) > 500 and len(test) > 50
    assert not {e[1] for e in train.entries} & {e[1] for e in test.entries}
    assert DocstringQA("train", size=10)[7] == train[7]  # deterministic
    names = {e[1]: e for e in train.entries + test.entries}
    kind, name, sentence = names["urlsafe_b64encode"]  # base64's docstring, word for word
    assert kind == "function" and sentence == "Encode bytes using the URL- and filesystem-safe Base64 alphabet."
    conv = (train if name in {e[1] for e in train.entries} else test)[
        [e[1] for e in (train if name in {e[1] for e in train.entries} else test).entries].index(name)]
    assert "`urlsafe_b64encode`" in conv["messages"][0]["content"] and conv["messages"][1]["content"] == sentence
    mix = default_mixture("train", arithmetic=5, spelling=0, simple_spelling=0, identity=0, docstrings=7)
    assert len(mix) == 12 and sum(type(mix.tasks[mix.source(i)[0]]) is DocstringQA for i in range(12)) == 7


@pytest.mark.filterwarnings("ignore:MMLU. stop=5200 is past")
def test_hub_datasets_join_the_mixture_from_a_local_folder(hub, tmp_path, monkeypatch):
    "With --data-root (hub-format parquet files on disk, offline), nanochat's mid mixture joins the synthetic one."
    import datasets
    from nanochat_nb.midtrain import PRESETS, Renderer, make_chat_config, mid_data
    from nanochat_nb.tokenizer import Tokenizer
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf_cache")
    config = make_chat_config(PRESETS, arithmetic=3, spelling=0, simple_spelling=0, identity=0, docstrings=0,
                              data_root=str(hub), device_batch_size=2)
    tok = Tokenizer.load(make_tiny_run(tmp_path / "run") / "tokenizer")
    texts = {}
    for split in ("train", "test"):
        next_batches, n = mid_data(tok, config, 256, split)
        batches, cursor = next_batches(0, 4)
        texts[split] = tok.decode([t for x, y in batches for t in x.flatten().tolist()])
        assert n == {"train": 3 + 3 + 4 + 1, "test": 3 + 1 + 6 + 2}[split] and cursor > 0  # smoltalk, mmlu, gsm8k
    assert "hello 0" in texts["train"] and "Aux question" in texts["train"] and "What is 2+2?" in texts["train"]
    assert "hello 3" in texts["test"] and "MMLU question" in texts["test"] and "Weng earns" in texts["test"]
    with pytest.raises(FileNotFoundError, match="laid out like the hub"):
        mid_data(tok, make_chat_config(PRESETS, data_root=str(tmp_path)), 256, "train")
