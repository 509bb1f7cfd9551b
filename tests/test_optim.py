"""Tests of chapter 03 (nanochat_nb.optim): schedules, horizon, routing, Newton-Schulz, and the sharded optimizers.

The distributed test starts two gloo ranks with torchrun; run as a script, this file is the worker they execute.
"""
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from nanochat_nb.optim import (DistAdamW, Muon, cleanup_distributed, grad_accum_steps, init_distributed,
                               lr_multiplier, muon_momentum, setup_optimizers, training_horizon,
                               zeropower_via_newtonschulz5)

# Tolerance of the 2-rank vs 1-process comparison: none, the weights must agree bit for bit (fp32). It can be exact
# because (1) the gradients agree exactly: each rank's micro-batch is computed as in the single process (same shapes,
# one thread), and AVG of the two halves equals two accumulated half-losses since dividing by 2 is exact; (2) Muon's
# bf16 Newton-Schulz gets the same input on the owner rank as in the single process; (3) DistAdamW runs torch's
# own (fused) AdamW kernel on its rows, the kernel that setup_optimizers gives the single process. With different
# AdamW arithmetic, a 1-ulp difference after step 1 grows to ~1e-3 after 6 steps: Adam's first step is +-lr for any
# nonzero gradient element, and bf16 rounding in Newton-Schulz turns ulps into bf16-sized steps.
ATOL = 0.0

# A tiny GPT: 3 layers so that the MLP matrices form odd-sized shape groups (DistMuon pads the last chunk),
# n_kv_head < n_head so that k/v are a shape group of their own, a vocab of 64 (divides 2 for DistAdamW).
TINY = dict(sequence_len=16, vocab_size=64, n_layer=3, n_head=2, n_kv_head=1, n_embd=64)
GLOBAL_BATCH, STEPS = 4, 6


def tiny_model():
    from nanochat_nb.model import GPTConfig, build_model
    torch.manual_seed(0)
    return build_model(GPTConfig(**TINY), "cpu")


# ---------------------------------------------------------------- worker (run by torchrun, or directly for 1 process)
def worker(out_dir: Path):
    info = init_distributed(device_type="cpu")
    model = tiny_model()
    optimizers = setup_optimizers(model)
    result = dict(world_size=info.world_size, optimizers=[type(o).__name__ for o in optimizers])
    adamw, muon = optimizers
    g = torch.Generator().manual_seed(1)
    losses = []
    for it in range(STEPS):
        idx = torch.randint(0, TINY["vocab_size"], (GLOBAL_BATCH, TINY["sequence_len"]), generator=g)
        targets = torch.randint(0, TINY["vocab_size"], (GLOBAL_BATCH, TINY["sequence_len"]), generator=g)
        # exercise the schedules as the training loop will: lr warmdown over the second half, momentum warm-up
        lrm = lr_multiplier(it, STEPS, warmdown_ratio=0.5)
        for opt in optimizers:
            for group in opt.param_groups:
                group["lr"] = group["initial_lr"] * lrm
        for group in muon.param_groups:
            group["momentum"] = muon_momentum(it, warmup_steps=STEPS)
        halves = list(zip(idx.chunk(2), targets.chunk(2)))
        if info.world_size == 1:  # the whole global batch as two accumulated micro-steps
            for x, y in halves:
                loss = model(x, y) / 2
                loss.backward()
        else:  # rank r takes half r; DistMuon/DistAdamW average the gradients inside step()
            x, y = halves[info.rank]
            loss = model(x, y)
            loss.backward()
        losses.append(loss.item())
        for opt in optimizers:
            opt.step()
        model.zero_grad(set_to_none=True)
    if info.world_size > 1:
        try:
            DistAdamW([nn.Parameter(torch.zeros(3, 4))])
        except ValueError as e:
            result["odd_dim0_error"] = str(e)
    torch.save(model.state_dict(), out_dir / f"state_w{info.world_size}_r{info.rank}.pt")
    (out_dir / f"result_w{info.world_size}_r{info.rank}.json").write_text(json.dumps(result))
    cleanup_distributed()


def _child_env():
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1")
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    return env


def test_distributed_matches_single_process(tmp_path):
    "2 gloo ranks with DistMuon+DistAdamW on halves of each batch == 1 process with Muon+AdamW on whole batches."
    run = dict(env=_child_env(), capture_output=True, text=True, timeout=300)
    one = subprocess.run([sys.executable, __file__, str(tmp_path)], **run)
    assert one.returncode == 0, one.stderr[-3000:]
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                          __file__, str(tmp_path)], **run)
    assert two.returncode == 0, two.stderr[-3000:]

    single = json.loads((tmp_path / "result_w1_r0.json").read_text())
    assert single["optimizers"] == ["AdamW", "Muon"]
    for r in (0, 1):
        res = json.loads((tmp_path / f"result_w2_r{r}.json").read_text())
        assert res["optimizers"] == ["DistAdamW", "DistMuon"]
        assert "(3, 4)" in res["odd_dim0_error"] and "multiple of 2" in res["odd_dim0_error"]

    ref = torch.load(tmp_path / "state_w1_r0.pt")
    r0, r1 = (torch.load(tmp_path / f"state_w2_r{r}.pt") for r in (0, 1))
    start = tiny_model().state_dict()
    for k in ref:
        torch.testing.assert_close(r0[k], r1[k], rtol=0, atol=0, msg=f"ranks disagree on {k}")  # replicas identical
        torch.testing.assert_close(r0[k], ref[k], rtol=0, atol=ATOL, msg=f"2 ranks vs 1 process differ on {k}")
    # and training did move every weight, so the comparison above is not between two untouched models
    moved = [k for k in ref if not torch.equal(ref[k], start[k])]
    assert len(moved) == len([k for k, v in start.items() if v.is_floating_point()]), moved


# ---------------------------------------------------------------- Newton-Schulz
def _with_spectrum(rows, cols, smin, seed):
    "A random rows x cols matrix whose singular values are spread log-uniformly in [smin, 1]."
    g = torch.Generator().manual_seed(seed)
    k = min(rows, cols)
    U, _ = torch.linalg.qr(torch.randn(rows, k, generator=g))
    V, _ = torch.linalg.qr(torch.randn(cols, k, generator=g))
    s = torch.logspace(math.log10(smin), 0, k)
    return U @ torch.diag(s) @ V.T


@settings(max_examples=15, deadline=None)
@given(rows=st.integers(4, 96), cols=st.integers(4, 96), seed=st.integers(0, 10_000))
def test_newton_schulz_near_orthogonal(rows, cols, seed):
    G = _with_spectrum(rows, cols, smin=1e-2, seed=seed) * 37.0  # the scale must not matter
    O = zeropower_via_newtonschulz5(G)
    assert O.dtype == torch.bfloat16 and O.shape == G.shape
    s = torch.linalg.svdvals(O.float())
    # five quintic steps land every singular value in a band around 1, not on 1 (the point of these coefficients)
    assert 0.6 < s.min() and s.max() < 1.25, (s.min(), s.max())
    # and the singular vectors are kept: O is close to U V^T of G
    U, _, Vh = torch.linalg.svd(G, full_matrices=False)
    assert torch.linalg.norm(O.float() - U @ Vh) / math.sqrt(min(rows, cols)) < 0.35


def test_newton_schulz_batched_and_errors():
    G = torch.randn(2, 3, 40, 24)
    O = zeropower_via_newtonschulz5(G)
    assert O.shape == G.shape
    assert torch.equal(O[1, 2], zeropower_via_newtonschulz5(G[1, 2]))
    assert torch.equal(zeropower_via_newtonschulz5(torch.zeros(8, 8)), torch.zeros(8, 8, dtype=torch.bfloat16))
    with pytest.raises(ValueError, match="matrix"):
        zeropower_via_newtonschulz5(torch.randn(5))


def test_muon_matches_torch_muon_and_rejects_vectors():
    def run(make):
        torch.manual_seed(0)
        ps = [nn.Parameter(torch.randn(48, 16)), nn.Parameter(torch.randn(16, 48))]
        opt = make(ps)
        for it in range(3):
            for p in ps:
                p.grad = torch.randn_like(p)
            opt.step()
        return ps
    for a, b in zip(run(lambda ps: Muon(ps, lr=0.05, momentum=0.9)),
                    run(lambda ps: torch.optim.Muon(ps, lr=0.05, momentum=0.9, weight_decay=0.0))):
        assert torch.equal(a, b)
    with pytest.raises(ValueError, match="AdamW"):
        Muon([nn.Parameter(torch.zeros(4))])


# ---------------------------------------------------------------- routing
@pytest.mark.parametrize("depth", [2, 3])
def test_routing_every_parameter_exactly_once(depth):
    from nanochat_nb.model import GPTConfig, build_model
    model = build_model(GPTConfig.from_depth(depth, vocab_size=128, sequence_len=32), "cpu")
    adamw, muon = setup_optimizers(model)
    assert type(adamw) is torch.optim.AdamW and type(muon) is Muon
    seen = [p for opt in (adamw, muon) for g in opt.param_groups for p in g["params"]]
    assert len(seen) == len({id(p) for p in seen}) == len(list(model.parameters()))
    in_blocks = {id(p) for p in model.transformer.h.parameters()}
    assert {id(p) for g in muon.param_groups for p in g["params"]} == in_blocks
    n_embd = model.transformer.wte.weight.size(1)
    lm_head_group, wte_group = adamw.param_groups
    assert lm_head_group["params"][0] is model.lm_head.weight
    assert math.isclose(lm_head_group["lr"], 0.004 * (n_embd / 768) ** -0.5)
    assert math.isclose(wte_group["lr"], 0.2 * (n_embd / 768) ** -0.5)
    assert all(g["initial_lr"] == g["lr"] for opt in (adamw, muon) for g in opt.param_groups)
    assert adamw.defaults["eps"] == 1e-10 and adamw.defaults["betas"] == (0.8, 0.95)
    assert adamw.defaults["fused"]  # the fast path on CPU and CUDA


def test_routing_refuses_stray_parameters():
    from nanochat_nb.model import GPTConfig, build_model
    model = build_model(GPTConfig.from_depth(2, vocab_size=128, sequence_len=32), "cpu")
    model.register_parameter("gain", nn.Parameter(torch.ones(1)))
    with pytest.raises(ValueError, match="gain"):
        setup_optimizers(model)


# ---------------------------------------------------------------- schedules, horizon, batch arithmetic
def test_lr_multiplier():
    N = 1000
    values = [lr_multiplier(it, N) for it in range(N + 1)]
    assert values[: N - 200 + 1] == [1.0] * (N - 200 + 1)  # constant up to the warmdown window (20%)
    assert all(a > b for a, b in zip(values[N - 200:], values[N - 199:]))  # then strictly decreasing
    assert values[-1] == 0.0 and math.isclose(values[N - 100], 0.5)
    assert math.isclose(lr_multiplier(N, N, final_lr_frac=0.25), 0.25)
    assert [lr_multiplier(it, N, warmup_ratio=0.004) for it in range(5)] == [0.25, 0.5, 0.75, 1.0, 1.0]
    with pytest.raises(ValueError):
        lr_multiplier(0, 0)


def test_muon_momentum():
    assert muon_momentum(0) == 0.85 and muon_momentum(300) == 0.95 and muon_momentum(5000) == 0.95
    assert math.isclose(muon_momentum(75), 0.875)
    assert muon_momentum(10, warmup_steps=0) == 0.95


@pytest.mark.parametrize("num_params,iters", [(36_700_160, 1_400), (560_988_160, 21_400), (1_081_999_360, 41_275),
                                              (1_879_048_192, 71_680)])
def test_training_horizon_matches_nanochat_table(num_params, iters):
    assert training_horizon(num_params) == iters


def test_grad_accum_steps():
    assert grad_accum_steps(524_288, 32, 2048, 8) == 1
    assert grad_accum_steps(524_288, 32, 2048) == 8
    assert grad_accum_steps(524_288, 16, 2048, 8) == 2
    with pytest.raises(ValueError, match=r"8 × 512 × 3 = 12,288") as e:
        grad_accum_steps(32_768, 8, 512, 3)
    assert "multiple of 12,288" in str(e.value)
    with pytest.raises(ValueError, match="divides 32"):
        grad_accum_steps(524_288, 24, 2048, 8)
    with pytest.raises(ValueError, match="positive"):
        grad_accum_steps(524_288, 0, 2048)


def test_init_distributed_single_process(monkeypatch):
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(k, raising=False)
    info = init_distributed(device_type="cpu")
    assert (info.is_ddp, info.rank, info.local_rank, info.world_size, info.device) == (False, 0, 0, 1,
                                                                                     torch.device("cpu"))


if __name__ == "__main__":
    worker(Path(sys.argv[1]))
