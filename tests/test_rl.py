"""RL (chapter 13): the masks, advantages and loss on hand-made batches, then `nanochat-nb rl` on a tiny run: its
files, a SIGKILL and `--resume`, and two gloo processes."""
import json, signal, subprocess, sys, time

import pytest
import torch

from conftest import make_tiny_run
from nanochat_nb.model import GPTConfig, build_model
from nanochat_nb.pretrain import MetricsLog
from nanochat_nb.midtrain import micro_loss
from nanochat_nb.rl import advantages, rl_rows
from test_midtrain import ENV, cli, copy_run, ok

TINY = ["--from-stage", "base", "--problems-per-step", 2, "--num-samples", 4, "--device-batch-size", 2,
        "--max-new-tokens", 12, "--passk-problems", 2, "--passk-samples", 2, "--eval-problems", 4,
        "--eval-max-tokens", 8, "--train-problems", 50]


def tiny_model(seed=0):
    torch.manual_seed(seed)
    model = build_model(GPTConfig.from_depth(1, vocab_size=64, sequence_len=32), "cpu")
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0, p.size(1) ** -0.5)
    return model


def test_rows_advantages_and_no_gradient_through_masked_tokens():
    rows, masks = [[9, 9, 5, 6, 7, 8], [9, 9, 8], [9, 9, 4, 4]], [[0, 0, 1, 0, 0, 1], [0, 0, 1], [0, 0, 1, 1]]
    advs = advantages([1.0, 0.0, 0.0])
    assert advs == pytest.approx([2 / 3, -1 / 3, -1 / 3])
    x, y, w = rl_rows(rows, masks, advs, pad_id=3)
    assert x.tolist() == [[9, 9, 5, 6, 7], [9, 9, 3, 3, 3], [9, 9, 4, 3, 3]]
    assert y.tolist() == [[-1, 5, -1, -1, 8], [-1, 8, -1, -1, -1], [-1, 4, 4, -1, -1]]
    a, b = 2 / 3, -1 / 3
    torch.testing.assert_close(w, torch.tensor([[0, a, 0, 0, a], [0, b, 0, 0, 0], [0, b, b, 0, 0]]))
    model = tiny_model()
    logits = model(x)  # the loss by hand: −Σ adv·log p(target) over the learned targets / their number
    logp = torch.log_softmax(logits, -1).gather(-1, y.clamp(min=0)[..., None]).squeeze(-1)
    want = -(logp * w).sum() / (y >= 0).sum()
    kept = []
    hook = model.transformer.h[-1].register_forward_hook(lambda m, i, out: kept.append(out) or out.retain_grad())
    loss = micro_loss(model, (x, y, w))
    hook.remove()
    assert loss.item() == pytest.approx(want.item(), rel=1e-5)
    loss.backward()
    g = kept[0].grad.abs().sum(-1)  # position t of the last block feeds only the prediction of target t
    assert (g[y < 0] == 0).all(), "a prompt, forced or padding position received gradient"
    assert (g[y >= 0] > 0).all()


def test_a_step_makes_the_better_sample_likelier():
    model = tiny_model(1)
    rows, masks = [[1, 2, 10, 11, 12], [1, 2, 20, 21, 22]], [[0, 0, 1, 1, 1]] * 2
    x, y, w = rl_rows(rows, masks, advantages([1.0, 0.0]), pad_id=0)
    logp = lambda: -model(x, y, loss_reduction="none").sum(-1).detach()
    before = logp()
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    micro_loss(model, (x, y, w)).backward()
    opt.step()
    after = logp()
    assert after[0] > before[0] and after[1] < before[1]  # the rewarded reply rises, the other falls
    # equal rewards: zero advantages, zero loss, zero gradient
    model.zero_grad()
    x, y, w = rl_rows(rows, masks, advantages([1.0, 1.0]), pad_id=0)
    micro_loss(model, (x, y, w)).backward()
    assert all(p.grad is None or not p.grad.any() for p in model.parameters())


@pytest.fixture(scope="module")
def base_run(tmp_path_factory):
    return make_tiny_run(tmp_path_factory.mktemp("rl_base"))


def steps(run):
    return [r["step"] for r in MetricsLog.read(run / "metrics" / "rl.jsonl") if "reward" in r]


def rl_evals(run):
    lines = [json.loads(l) for l in (run / "metrics" / "eval.jsonl").read_text().splitlines()]
    return [e for e in lines if e["stage"] == "rl" and e["task"] == "arithmetic" and e["metric"] == "accuracy"]


def test_cli_writes_metrics_and_eval_and_resumes_after_sigkill(base_run, tmp_path):
    run = copy_run(base_run, tmp_path, "run")
    args = ["-m", "nanochat_nb.cli", "rl", "--run-dir", str(run), *map(str, TINY), "--num-iterations", "8",
            "--save-every", "2", "--keep-checkpoints", "-1"]
    p = subprocess.Popen([sys.executable, *args], env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    ckpt = run / "checkpoints" / "rl"
    deadline = time.time() + 120
    while not (ckpt / "meta_000002.json").exists() and p.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    p.send_signal(signal.SIGKILL)
    p.wait()
    assert p.returncode == -signal.SIGKILL, "the run ended before it could be killed"
    assert not (ckpt / "meta_000008.json").exists() and not (run / "metrics" / "eval.jsonl").exists()
    out = ok(cli(run, *TINY, "--num-iterations", 8, "--save-every", 2, "--keep-checkpoints", -1, "--resume",
                 stage="rl"))
    assert "resumed from step" in out.stdout
    assert steps(run) == list(range(8))  # every step once: the killed tail was trimmed and redone
    records = MetricsLog.read(run / "metrics" / "rl.jsonl")
    assert all(0 <= r["reward"] <= 1 and 0 < r["lr_mult"] <= 1 for r in records if "reward" in r)
    assert {"pass@1", "pass@2"} <= set(records[-1]) and records[-1]["step"] == 8
    assert (ckpt / "meta_000008.json").exists()
    acc = rl_evals(run)
    assert len(acc) == 1 and acc[0]["n"] == 4 and acc[0]["step"] == 8


def test_two_gloo_processes(base_run, tmp_path):
    run = copy_run(base_run, tmp_path, "two")
    ok(cli(run, *TINY, "--num-iterations", 2, stage="rl", nproc=2))
    assert steps(run) == [0, 1] and len(rl_evals(run)) == 1
    meta = json.loads((run / "checkpoints" / "rl" / "meta_000002.json").read_text())
    assert meta["world_size"] == 2


def test_bad_settings_are_one_line(tmp_path):
    from nanochat_nb.cli import main
    for bad, flag in ((["--num-samples", "0"], "--num-samples"), (["--num-samples", "6", "--device-batch-size", "4"],
                                                                  "--device-batch-size")):
        with pytest.raises(SystemExit) as e:
            main(["rl", "--run-dir", str(tmp_path), *bad])
        assert flag in str(e.value.code) and "\n" not in str(e.value.code)
