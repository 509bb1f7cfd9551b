"""Checkpoints: round trips, incomplete steps, crashes in the middle of a save (raised and SIGKILL), clear errors."""
import io
import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import asdict

import pytest
import torch
import torch.nn.functional as F

from nanochat_nb import checkpoint as ck
from nanochat_nb.checkpoint import (CheckpointError, checkpoint_dir, latest_step, load_checkpoint, load_model,
                                    prune_checkpoints, save_checkpoint)
from nanochat_nb.model import GPTConfig, build_model

CONFIG = GPTConfig(sequence_len=16, vocab_size=128, n_layer=2, n_head=2, n_kv_head=2, n_embd=32)
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}


def trained(seed=0, steps=1):
    "A tiny GPT and an AdamW that has taken `steps` steps (so it has state to save)."
    torch.manual_seed(seed)
    model = build_model(CONFIG, "cpu")
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    idx = torch.randint(0, CONFIG.vocab_size, (2, CONFIG.sequence_len))
    for _ in range(steps):
        F.cross_entropy(model(idx).flatten(0, 1).float(), idx.flatten()).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return model, opt, idx


def meta_for(**extra):
    return {"model_config": asdict(CONFIG), **extra}


def assert_states_equal(a, b):
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def save_step1(d, tag=1.0):
    "A small complete step 1, returned as (model_state, optimizer_state) for later comparison."
    state = {"w": torch.full((8,), tag)}
    optim = {"optimizers": [{"state": {0: {"m": torch.full((8,), -tag)}}, "param_groups": [{"lr": 0.1, "params": [0]}]}]}
    save_checkpoint(d, 1, state, optim, meta_for(val_bpb=tag))
    return state, optim


# --- round trips -------------------------------------------------------------------------------------------------

def test_round_trip_model_optimizer_per_rank_and_meta(tmp_path):
    run_dir = tmp_path / "run"
    d = checkpoint_dir(run_dir, "base")
    model, opt0, idx = trained(seed=0, steps=1)
    _, opt1, _ = trained(seed=1, steps=2)  # rank 1 holds a different shard
    meta = meta_for(val_bpb=1.25, dataloader_state_dict={"shard": 3, "row_group": 7},
                    loop_state={"min_val_bpb": 1.2, "smooth_train_loss": 3.5, "total_training_time": 12.0},
                    user_config={"depth": 2})
    save_checkpoint(d, 5, None, {"optimizers": [opt1.state_dict()]}, None, rank=1)
    save_checkpoint(d, 5, model.state_dict(), {"optimizers": [opt0.state_dict()]}, meta, rank=0)
    assert sorted(p.name for p in d.iterdir()) == ["meta_000005.json", "model_000005.pt",
                                                   "optim_000005_rank0.pt", "optim_000005_rank1.pt"]

    model_state, optim_state, meta_back = load_checkpoint(d, load_optimizer=True, rank=1)
    assert_states_equal(model_state, model.state_dict())
    assert meta_back == {"step": 5, **meta}
    assert json.loads((d / "meta_000005.json").read_text())["step"] == 5
    for rank, opt in [(0, opt0), (1, opt1)]:
        shard = load_checkpoint(d, 5, load_optimizer=True, rank=rank)[1]["optimizers"][0]
        want = opt.state_dict()
        assert shard["param_groups"] == want["param_groups"]
        for i, s in want["state"].items():
            for name in ("exp_avg", "exp_avg_sq", "step"):
                assert torch.equal(shard["state"][i][name], s[name]), (rank, i, name)
    # a fresh optimizer that loads the shard continues exactly like the saved one
    opt_new = torch.optim.AdamW(model.parameters(), lr=1e-2)
    opt_new.load_state_dict(load_checkpoint(d, load_optimizer=True)[1]["optimizers"][0])
    assert opt_new.state_dict()["state"][0]["step"] == opt0.state_dict()["state"][0]["step"]

    model2, meta2 = load_model(run_dir, "base")
    model.eval(), model2.eval()
    with torch.no_grad():
        assert torch.equal(model(idx), model2(idx))
    assert meta2["step"] == 5
    assert load_checkpoint(d)[1] is None  # the optimizer only when asked


def test_compile_prefix_is_stripped(tmp_path):
    model, _, _ = trained()
    compiled_like = {"_orig_mod." + k: v for k, v in model.state_dict().items()}
    save_checkpoint(tmp_path, 1, compiled_like, None, meta_for())
    assert_states_equal(torch.load(tmp_path / "model_000001.pt"), model.state_dict())


def test_bf16_is_cast_to_fp32_on_cpu(tmp_path):
    save_checkpoint(tmp_path, 1, {"wte": torch.ones(4, dtype=torch.bfloat16), "n": torch.arange(3)}, None, meta_for())
    state = load_checkpoint(tmp_path)[0]
    assert state["wte"].dtype == torch.float32 and state["n"].dtype == torch.int64


def test_saving_a_step_again_replaces_it(tmp_path):
    save_step1(tmp_path, 1.0)
    save_step1(tmp_path, 2.0)
    state, _, meta = load_checkpoint(tmp_path)
    assert state["w"][0] == 2.0 and meta["val_bpb"] == 2.0


# --- which steps are complete ------------------------------------------------------------------------------------

def test_latest_step_ignores_incomplete_checkpoints(tmp_path):
    assert latest_step(tmp_path / "missing") is None
    assert latest_step(tmp_path) is None
    save_step1(tmp_path)
    save_checkpoint(tmp_path, 3, {"w": torch.zeros(1)}, None, meta_for())
    for name in ["model_000009.pt",                 # model without meta: the save died before its commit
                 "meta_000008.json",                # meta without model
                 "optim_000010_rank0.pt",           # only a shard
                 ".model_000011.pt.123.tmp", ".meta_000011.json.123.tmp", "model_000012.pt.tmp",  # stray temps
                 "model_000013.pt.bak", "meta_000013.json.bak", "notes.txt"]:
        (tmp_path / name).write_bytes(b"x")
    assert latest_step(tmp_path) == 3
    assert load_checkpoint(tmp_path)[2]["step"] == 3
    (tmp_path / "meta_000003.json").unlink()  # uncommit step 3: step 1 is the latest again
    assert latest_step(tmp_path) == 1


def test_prune_keeps_newest_and_removes_temps(tmp_path):
    for step in (1, 2, 3):
        save_checkpoint(tmp_path, step, {"w": torch.zeros(1)}, {"s": step}, meta_for())
    (tmp_path / ".model_000004.pt.77.tmp").write_bytes(b"half")
    assert prune_checkpoints(tmp_path, keep=2) == [1]
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "meta_000002.json", "meta_000003.json", "model_000002.pt", "model_000003.pt",
        "optim_000002_rank0.pt", "optim_000003_rank0.pt"]
    with pytest.raises(ValueError, match="keep=0"):
        prune_checkpoints(tmp_path, keep=0)


# --- crashes in the middle of a save -----------------------------------------------------------------------------

def assert_step1_intact(d, state1, optim1):
    assert latest_step(d) == 1
    state, optim, meta = load_checkpoint(d, load_optimizer=True)
    assert_states_equal(state, state1)
    assert torch.equal(optim["optimizers"][0]["state"][0]["m"], optim1["optimizers"][0]["state"][0]["m"])
    assert meta["step"] == 1 and meta["val_bpb"] == 1.0
    assert not (d / "meta_000002.json").exists()


@pytest.mark.parametrize("fail_on", ["optim", "model", "meta"])
def test_exception_mid_write_leaves_previous_checkpoint(tmp_path, monkeypatch, fail_on):
    state1, optim1 = save_step1(tmp_path)
    real_save, real_replace = torch.save, os.replace

    def half_save(obj, f):  # writes half the bytes of the file it was asked for, then fails like a full disk
        if fail_on in getattr(f, "name", ""):
            buf = io.BytesIO()
            real_save(obj, buf)
            f.write(buf.getvalue()[: len(buf.getvalue()) // 2])
            raise OSError(28, "No space left on device (injected)")
        return real_save(obj, f)

    def failing_replace(src, dst):  # the meta is not written by torch.save: fail its rename instead
        if fail_on == "meta" and "meta_" in str(dst):
            raise OSError(28, "No space left on device (injected)")
        return real_replace(src, dst)

    monkeypatch.setattr(torch, "save", half_save)
    monkeypatch.setattr(ck.os, "replace", failing_replace)
    with pytest.raises(OSError, match="injected"):
        save_checkpoint(tmp_path, 2, {"w": torch.full((8,), 2.0)}, {"s": 2}, meta_for(val_bpb=2.0))
    monkeypatch.undo()
    assert_step1_intact(tmp_path, state1, optim1)
    assert not list(tmp_path.glob(".*.tmp")), "the failed write must remove its temp file"
    for p in tmp_path.glob("*000002*"):  # whatever of step 2 carries a final name was written whole
        torch.load(p) if p.suffix == ".pt" else json.loads(p.read_text())


CHILD = """
import sys, torch
from nanochat_nb.checkpoint import save_checkpoint
d, n = sys.argv[1], int(sys.argv[2])
meta = {"model_config": {}, "val_bpb": 1.0}
save_checkpoint(d, 1, {"w": torch.full((8,), 1.0)}, {"optimizers": [{"state": {0: {"m": torch.full((8,), -1.0)}}}]}, meta)
print("saved 1", flush=True)
big = {f"h.{i}.weight": torch.full((1024, 1024), float(i)) for i in range(n)}  # n x 4 MB
save_checkpoint(d, 2, big, None, {**meta, "val_bpb": 2.0})
print("saved 2", flush=True)
"""


def test_sigkill_mid_write_leaves_previous_checkpoint(tmp_path):
    "A real crash: a child process is SIGKILLed while the temp file of a large model file is still growing."
    for attempt, n in enumerate([64, 128, 256]):  # a bigger file if the write finished before we could kill it
        d = tmp_path / f"try{attempt}"
        child = subprocess.Popen([sys.executable, "-c", CHILD, str(d), str(n)], stdout=subprocess.PIPE, text=True,
                                 env=ENV)
        try:
            assert child.stdout.readline().strip() == "saved 1"
            tmp = d / f".model_000002.pt.{child.pid}.tmp"
            sizes, deadline = [], time.monotonic() + 60
            while child.poll() is None and time.monotonic() < deadline:
                size = tmp.stat().st_size if tmp.exists() else 0
                if size and sizes and size > sizes[-1]:  # it exists and is growing: the write is under way
                    os.kill(child.pid, signal.SIGKILL)
                    break
                if size:
                    sizes.append(size)
                time.sleep(0.001)
            child.wait(timeout=30)
        finally:
            if child.poll() is None:
                child.kill()
                child.wait()
        if child.returncode == -signal.SIGKILL:
            break
    assert child.returncode == -signal.SIGKILL, "could not catch the child in the middle of its write"
    assert tmp.exists() and tmp.stat().st_size > 0, "killed before the rename: its temp file stays behind"
    assert not (d / "model_000002.pt").exists(), "a half-written file must never carry a final name"
    state1 = {"w": torch.full((8,), 1.0)}
    assert_step1_intact(d, state1, {"optimizers": [{"state": {0: {"m": torch.full((8,), -1.0)}}}]})
    prune_checkpoints(d, keep=1)  # sweeps the stray temp file
    assert not tmp.exists()


# --- errors ------------------------------------------------------------------------------------------------------

def test_truncated_or_corrupt_files_name_the_file(tmp_path):
    save_checkpoint(tmp_path, 1, trained()[0].state_dict(), {"s": torch.ones(100)}, meta_for())
    model_path, optim_path, meta_path = (tmp_path / n for n in
                                         ("model_000001.pt", "optim_000001_rank0.pt", "meta_000001.json"))
    data = model_path.read_bytes()
    model_path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=r"model_000001\.pt cannot be loaded.*truncated or corrupt"):
        load_checkpoint(tmp_path)
    model_path.write_bytes(data)
    optim_path.write_bytes(optim_path.read_bytes()[:50])
    load_checkpoint(tmp_path)  # fine without the optimizer
    with pytest.raises(CheckpointError, match=r"optim_000001_rank0\.pt cannot be loaded"):
        load_checkpoint(tmp_path, load_optimizer=True)
    meta_path.write_text('{"step": 1, "model_con')
    with pytest.raises(CheckpointError, match=r"meta_000001\.json is not valid JSON"):
        load_checkpoint(tmp_path)


def test_missing_things_name_the_file_and_fix(tmp_path):
    with pytest.raises(CheckpointError, match="no checkpoint directory .*train this stage first"):
        load_checkpoint(tmp_path / "nope")
    with pytest.raises(CheckpointError, match="holds no complete checkpoint"):
        load_checkpoint(tmp_path)
    save_step1(tmp_path)
    with pytest.raises(CheckpointError, match=r"meta_000004\.json does not exist.*complete steps \[1\]"):
        load_checkpoint(tmp_path, step=4)
    with pytest.raises(CheckpointError, match=r"optim_000001_rank2\.pt does not exist.*rank 2"):
        load_checkpoint(tmp_path, load_optimizer=True, rank=2)
    with pytest.raises(CheckpointError, match="no checkpoint directory"):
        load_model(tmp_path, "mid")


def test_config_mismatch_names_keys_and_shapes(tmp_path):
    model, _, _ = trained()
    wider = {**asdict(CONFIG), "n_embd": 64, "n_layer": 3}
    save_checkpoint(checkpoint_dir(tmp_path, "sft"), 2, model.state_dict(), None, {"model_config": wider})
    with pytest.raises(CheckpointError) as e:
        load_model(tmp_path, "sft")
    msg = str(e.value)
    assert "model_000002.pt" in msg and "missing keys" in msg and "shape mismatch" in msg
    assert "(128, 32) vs (128, 64)" in msg  # lm_head: checkpoint shape vs model shape
    bad_keys = {"model_config": {**asdict(CONFIG), "n_embed": 32}}
    save_checkpoint(checkpoint_dir(tmp_path, "rl"), 1, model.state_dict(), None, bad_keys)
    with pytest.raises(CheckpointError, match=r"meta_000001\.json: model_config cannot build a GPTConfig"):
        load_model(tmp_path, "rl")


def test_vocab_mismatch_is_refused(tmp_path):
    model, _, _ = trained()
    save_checkpoint(checkpoint_dir(tmp_path), 1, model.state_dict(), None, meta_for())

    class Tok:
        vocab_size = CONFIG.vocab_size + 1
    with pytest.raises(CheckpointError, match=rf"vocab_size {CONFIG.vocab_size} but the tokenizer has "
                                              rf"{CONFIG.vocab_size + 1}"):
        load_model(tmp_path, tokenizer=Tok())
    Tok.vocab_size = CONFIG.vocab_size
    load_model(tmp_path, tokenizer=Tok())


def test_vocab_checked_against_the_runs_own_tokenizer(tmp_path):
    from nanochat_nb.tokenizer import Tokenizer
    text = " ".join(f"def f{i % 50}(x): return x + {i % 7}" for i in range(3000))
    tok = Tokenizer.train(text, vocab_size=300)
    config = GPTConfig(**{**asdict(CONFIG), "vocab_size": tok.vocab_size})
    save_checkpoint(checkpoint_dir(tmp_path), 1, build_model(config, "cpu").state_dict(), None,
                    {"model_config": asdict(config)})
    tok.save(tmp_path / "tokenizer")
    load_model(tmp_path)  # run_dir/tokenizer fits
    Tokenizer.train(text, vocab_size=290).save(tmp_path / "tokenizer")
    with pytest.raises(CheckpointError, match=r"vocab_size 300 but the tokenizer has 290.*tokenizer\)"):
        load_model(tmp_path)


def test_unknown_stage():
    with pytest.raises(ValueError, match="unknown stage 'pretrain'.*base, mid, sft, rl"):
        checkpoint_dir("run", "pretrain")
    with pytest.raises(ValueError, match="unknown stage"):
        load_model("run", "chat")


def test_bad_meta_fails_before_anything_is_written(tmp_path):
    d = tmp_path / "ckpt"
    with pytest.raises(CheckpointError, match=r"meta\['val_bpb'\].*JSON.*nothing was written"):
        save_checkpoint(d, 1, {"w": torch.ones(1)}, {"s": 1}, meta_for(val_bpb=torch.tensor(1.0)))
    with pytest.raises(CheckpointError, match=r"meta\['user_config'\]"):
        save_checkpoint(d, 1, {"w": torch.ones(1)}, {"s": 1}, meta_for(user_config={"out": tmp_path}))
    with pytest.raises(CheckpointError, match="no 'model_config'"):
        save_checkpoint(d, 1, {"w": torch.ones(1)}, {"s": 1}, {"val_bpb": 1.0})
    # a non-zero rank with a bad meta fails too, so that no rank is left waiting at the barrier
    with pytest.raises(CheckpointError):
        save_checkpoint(d, 1, None, {"s": 1}, meta_for(x={1, 2}), rank=1)
    assert not d.exists() or not list(d.iterdir())


# --- several processes -------------------------------------------------------------------------------------------

DIST_CHILD = """
import sys, torch, torch.distributed as dist
from nanochat_nb.checkpoint import save_checkpoint, load_checkpoint, latest_step
d, rank = sys.argv[1], int(sys.argv[2])
dist.init_process_group("gloo", init_method="tcp://127.0.0.1:" + sys.argv[3], rank=rank, world_size=2)
model_state = {"w": torch.arange(4.0)} if rank == 0 else None
save_checkpoint(d, 7, model_state, {"shard": torch.full((3,), float(rank))}, {"model_config": {}} if rank == 0 else None,
                rank=rank, barrier=dist.barrier)
dist.barrier()  # the loop's next step: every rank sees the committed step and its own shard
assert latest_step(d) == 7
assert torch.equal(load_checkpoint(d, load_optimizer=True, rank=rank)[1]["shard"], torch.full((3,), float(rank)))
dist.destroy_process_group()
"""


def test_two_ranks_with_a_real_barrier(tmp_path):
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = str(s.getsockname()[1])
    procs = [subprocess.Popen([sys.executable, "-c", DIST_CHILD, str(tmp_path), str(r), port], env=ENV)
             for r in (0, 1)]
    assert [p.wait(timeout=120) for p in procs] == [0, 0]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["meta_000007.json", "model_000007.pt",
                                                          "optim_000007_rank0.pt", "optim_000007_rank1.pt"]
