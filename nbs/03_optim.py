# ---
# jupyter:
#   jupytext:
#     cell_metadata_filter: tags,-all
#     formats: ipynb,py:percent
#     text_representation:
#       extension: .py
#       format_name: percent
#       format_version: '1.3'
#       jupytext_version: 1.19.6
#   kernelspec:
#     display_name: python3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # The optimizer: Muon, AdamW and the schedule
# > Muon for the matrices, AdamW for the embeddings, the schedules, and sharded versions that do DDP's job.

# %% [markdown]
# Chapter 02 built the GPT; this chapter decides how its weights move. nanochat trains with **two optimizers at
# once**: every matrix inside the transformer blocks is updated by **Muon**, which replaces each update by
# the nearest orthogonal matrix, while the token embedding `wte` and the output layer `lm_head` are updated by
# **AdamW**. On top sit a learning-rate schedule (constant, then a linear warmdown over the last 20% of the run), a
# warm-up of Muon's momentum, and the arithmetic that turns "20 tokens per parameter" into a number of steps and a
# number of gradient-accumulation micro-steps.
#
# At the end of the chapter you will have `setup_optimizers(model)`, which returns `[adamw, muon]` routed exactly as
# nanochat routes them, the two schedules, and `DistMuon`/`DistAdamW`: sharded versions that do the work of DDP
# inside `step()`, so that 8 GPUs each keep only an eighth of the optimizer state. The pretraining loop (chapter 06)
# imports all of it.

# %%
#| default_exp optim

# %%
#| export
import math
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from fastcore.basics import patch
from torch import Tensor, nn
from torch.optim.adamw import adamw as adamw_update  # the functional AdamW step, on any list of tensors

# %%
import tempfile

import matplotlib.pyplot as plt
import pandas as pd
from fastcore.test import test_close, test_eq, test_fail
from IPython.display import display

from nanochat_nb.common import AT_SCALE
from nanochat_nb.model import GPTConfig, build_model

# the chapter's models are tiny: on a small, busy CPU one thread beats two (restored at the end of the chapter)
_saved_threads = torch.get_num_threads()
torch.set_num_threads(1)

# %% [markdown]
# A tiny GPT to try things on: two layers of width 128 over a 256-token vocabulary (chapter 02 builds it). A fresh
# GPT has `lm_head` and every `c_proj` at zero, so its first gradients vanish below `lm_head`; ten plain AdamW steps
# on random tokens wake it up, and one more backward pass gives us real gradients to look at.

# %%
torch.manual_seed(0)
config = GPTConfig(sequence_len=64, vocab_size=256, n_layer=2, n_head=2, n_kv_head=2, n_embd=128)
model = build_model(config, "cpu")
warmup = torch.optim.AdamW(model.parameters(), lr=3e-3)
for step in range(11):
    model.zero_grad(set_to_none=True)
    idx = torch.randint(0, config.vocab_size, (4, config.sequence_len))
    targets = torch.randint(0, config.vocab_size, (4, config.sequence_len))
    loss = model(idx, targets)
    loss.backward()
    if step < 10:  # the 11th backward only provides the gradients we look at
        warmup.step()
grad = model.transformer.h[0].mlp.c_fc.weight.grad.clone()
print(f"{model.num_params():,} parameters, loss {loss.item():.3f}; c_fc gradient of layer 0: {tuple(grad.shape)}")


# %% [markdown]
# ## Orthogonalising an update with Newton–Schulz
#
# Write a gradient matrix through its singular value decomposition, $G = U S V^\top$. Gradients of transformer
# matrices are strongly *anisotropic*: a few singular directions carry most of the norm, so a plain SGD or Adam step
# mostly pushes the weights along those few directions. Muon's idea is to take the step $U V^\top$ instead: the same
# singular vectors, but every singular value set to one, so that rare directions move as much as common ones. (It is
# the steepest-descent step when the size of an update is measured by its spectral norm.)
#
# An SVD per matrix per step would be slow on a GPU. Instead, Muon applies an odd polynomial to $G$ a few times:
# with $X_0 = G / \lVert G \rVert_F$ (so every singular value is at most 1),
#
# $$X_{k+1} = a X_k + b (X_k X_k^\top) X_k + c (X_k X_k^\top)^2 X_k,$$
#
# which leaves $U$ and $V$ alone and maps each singular value through $\sigma \mapsto a\sigma + b\sigma^3 + c\sigma^5$.
# The coefficients $(a, b, c) = (3.4445, -4.7750, 2.0315)$ make the slope at zero large (3.4445), so small singular
# values grow fast; the price is that after five rounds they land in a band around 1 (roughly 0.7 to 1.2) rather
# than exactly on it, which training does not mind. Only matrix products are involved, so it runs in **bf16** on the
# tensor cores. A tall matrix is transposed first so that $X X^\top$ is the smaller of the two Gram matrices.

# %%
#| export
def zeropower_via_newtonschulz5(G: Tensor, steps: int = 5) -> Tensor:
    "Approximately orthogonalise `G` (set its singular values to ~1) with a quintic Newton-Schulz iteration in bf16."
    if G.ndim < 2:
        raise ValueError(f"Newton-Schulz needs a matrix (or a batch of matrices); got shape {tuple(G.shape)}")
    a, b, c = 3.4445, -4.7750, 2.0315
    X = G.bfloat16()
    tall = G.size(-2) > G.size(-1)
    if tall:
        X = X.mT  # iterate on the wide side: X @ X.mT is then the smaller Gram matrix
    # Frobenius norm >= spectral norm, so this puts every singular value in [0, 1]; clamp guards an all-zero update
    X = X / X.norm(dim=(-2, -1), keepdim=True).clamp_min(1e-7)
    lead = X.shape[:-2]
    if X.ndim > 3:
        X = X.flatten(0, -3)  # baddbmm takes exactly one batch dimension
    fma = torch.addmm if X.ndim == 2 else torch.baddbmm  # b*A + c*A@A in one fused call, as torch.optim.Muon does
    for _ in range(steps):
        A = X @ X.mT
        B = fma(A, A, A, beta=b, alpha=c)
        X = fma(X, B, X, beta=a)
    X = X.reshape(*lead, *X.shape[-2:])
    return X.mT if tall else X


# %% [markdown]
# Here is what it does to the real gradient above, and why five steps suffice. Left: the singular values of the
# normalised gradient span two orders of magnitude; after Newton–Schulz they all sit near 1. Right: the scalar
# map $\sigma \mapsto a\sigma + b\sigma^3 + c\sigma^5$ applied 1 to 5 times: after five, anything above about
# $2 \cdot 10^{-3}$ (relative to the Frobenius norm) ends up in the band.

# %%
#| fig-alt: "Left: singular values of a gradient spread over decades, and near 1 after Newton-Schulz. Right: the quintic map iterated one to five times."
O = zeropower_via_newtonschulz5(grad)
s_before = torch.linalg.svdvals(grad / grad.norm())
s_after = torch.linalg.svdvals(O.float())

fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 3.8))
ax1.semilogy(s_before, label="G / ‖G‖_F")
ax1.semilogy(s_after, label="after Newton–Schulz (5 steps)")
ax1.set(xlabel="index of singular value", ylabel="singular value", title=f"c_fc gradient {tuple(grad.shape)}")
ax1.legend()
sigma = torch.logspace(-4, 0, 400, dtype=torch.float64)
y = sigma.clone()
for k in range(1, 6):
    y = 3.4445 * y - 4.7750 * y**3 + 2.0315 * y**5
    ax2.semilogx(sigma, y, label=f"{k} step{'s' if k > 1 else ''}")
ax2.axhspan(0.7, 1.2, color="grey", alpha=0.15)
ax2.set(xlabel="input singular value σ", ylabel="output", title="the quintic, iterated")
ax2.legend()
plt.tight_layout()
plt.show()
print(f"before: {s_before.min():.2e} .. {s_before.max():.2e}   after: {s_after.min():.3f} .. {s_after.max():.3f}")
assert 0.5 < s_after.min() and s_after.max() < 1.3
in_band = y[sigma >= 2e-3]
assert ((0.68 < in_band) & (in_band < 1.21)).all()

# %% [markdown]
# Two more properties we rely on: a tall matrix gives the transpose of what its transpose gives, and a batch of
# matrices is orthogonalised matrix by matrix, bit for bit.

# %%
assert torch.equal(zeropower_via_newtonschulz5(grad.T), zeropower_via_newtonschulz5(grad).T)
batch = torch.randn(3, 64, 96)
O_batch = zeropower_via_newtonschulz5(batch)
for i in range(3):
    assert torch.equal(O_batch[i], zeropower_via_newtonschulz5(batch[i]))


# %% [markdown]
# ## Muon
#
# Muon is SGD with momentum whose step goes through Newton–Schulz. Per matrix, with momentum $\beta$:
#
# 1. **Momentum:** $m \leftarrow \beta m + (1-\beta) g$.
# 2. **Nesterov:** look one step ahead, $u = (1-\beta) g + \beta m$.
# 3. **Orthogonalise:** $O = \mathrm{NS}_5(u)$.
# 4. **Step:** $p \leftarrow p - \mathrm{lr} \cdot \sqrt{\max(1, \text{rows}/\text{cols})} \cdot O$.
#
# Why the shape factor: an orthogonalised $r \times c$ matrix has all singular values 1, so its RMS entry is
# $\sqrt{\min(r,c)/(rc)}$. The factor $\sqrt{\max(1, r/c)}$ lifts tall matrices (more outputs than inputs, like the
# MLP's `c_fc`, stored as 4C × C) so that every update changes the *outputs* of its layer by a similar amount.
# nanochat uses lr 0.02, momentum 0.95 (warmed up from 0.85, below) and no weight decay.
#
# The per-matrix update is a function of its own, because the distributed version below reuses it.

# %%
#| export
def muon_update(grad: Tensor, momentum_buffer: Tensor, momentum: float = 0.95, nesterov: bool = True,
                ns_steps: int = 5) -> Tensor:
    "Muon's direction for one matrix: momentum (updated in place), Nesterov look-ahead, Newton-Schulz."
    momentum_buffer.lerp_(grad, 1 - momentum)  # m <- beta*m + (1-beta)*g
    direction = grad.lerp(momentum_buffer, momentum) if nesterov else momentum_buffer  # (1-beta)*g + beta*m
    return zeropower_via_newtonschulz5(direction, ns_steps)


# %%
#| export
class Muon(torch.optim.Optimizer):
    "MomentUm Orthogonalized by Newton-Schulz, for 2-D weights; single process."
    def __init__(self, params, lr: float = 0.02, momentum: float = 0.95, nesterov: bool = True, ns_steps: int = 5):
        super().__init__(params, dict(lr=lr, momentum=momentum, nesterov=nesterov, ns_steps=ns_steps))
        for group in self.param_groups:
            for p in group["params"]:
                if p.ndim != 2:
                    raise ValueError(f"Muon updates matrices, but got a parameter of shape {tuple(p.shape)}; "
                                     "give vectors, scalars and embeddings to AdamW instead")

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if "momentum_buffer" not in state:
                    state["momentum_buffer"] = torch.zeros_like(p.grad)
                update = muon_update(p.grad, state["momentum_buffer"], group["momentum"], group["nesterov"],
                                     group["ns_steps"])
                p.add_(update, alpha=-group["lr"] * math.sqrt(max(1, p.size(-2) / p.size(-1))))
        return loss


# %% [markdown]
# **Against `torch.optim.Muon`.** PyTorch ships a Muon too (since 2.9). Its defaults differ from nanochat's: lr
# 1e-3, weight decay 0.1, and an `adjust_lr_fn` option for the shape factor. With `weight_decay=0` and
# `adjust_lr_fn="original"` (also what `None` means) it uses the same factor $\sqrt{\max(1, r/c)}$, the same
# Nesterov momentum, the same coefficients and the same bf16 arithmetic, so the two agree **bit for bit**. One
# detail: it normalises by $\max(\lVert X\rVert_F, 10^{-7})$ where nanochat adds $10^{-7}$; in bf16 the two only
# differ for an update whose norm is below about $10^{-5}$, and we use the clamp.

# %%
def run_muon(make_opt, steps=4, seed=0):
    "Train two matrices (one tall, one wide) on random gradients; return the weights after `steps` steps."
    g = torch.Generator().manual_seed(seed)
    params = [nn.Parameter(torch.randn(96, 64, generator=g)), nn.Parameter(torch.randn(64, 256, generator=g))]
    opt = make_opt(params)
    for it in range(steps):
        for p in params:
            p.grad = torch.randn(p.shape, generator=g)
        opt.param_groups[0]["momentum"] = 0.85 + 0.025 * it  # change it between steps, as the schedule will
        opt.step()
    return [p.detach().clone() for p in params]

ours = run_muon(lambda ps: Muon(ps, lr=0.02))
theirs = run_muon(lambda ps: torch.optim.Muon(ps, lr=0.02, weight_decay=0.0, adjust_lr_fn="original"))
for a, b in zip(ours, theirs):
    assert torch.equal(a, b)
print("Muon == torch.optim.Muon(weight_decay=0, adjust_lr_fn='original'): bit for bit")


# %% [markdown]
# The other option, `adjust_lr_fn="match_rms_adamw"` (from Moonshot's "Muon is Scalable"), scales by
# $0.2\sqrt{\max(r, c)}$ instead, chosen so that the update has the RMS of a typical AdamW update (0.2) and can reuse
# AdamW's learning rate. The *direction* is the same; only the step length differs, by the ratio
# $0.2\sqrt{\max(r,c)} / \sqrt{\max(1, r/c)}$, which simplifies to $0.2\sqrt{c}$ for every shape ($c$ = columns =
# fan-in). For a $96 \times 64$ matrix: $0.2\sqrt{96} \approx 1.96$ against our $\sqrt{1.5} \approx 1.22$, ratio 1.6;
# for a $64 \times 256$ one: $0.2 \cdot 16 = 3.2$ against 1, ratio 3.2. So `torch.optim.Muon` with
# `match_rms_adamw` reproduces nanochat if each matrix gets lr $= 0.02 / (0.2\sqrt{\text{fan-in}})$: 0.0028 for
# d20's $1280$-wide inputs, 0.0014 for the MLP's `c_proj` (fan-in 5120). Dividing its step by the ratio gives ours
# back, to float rounding (lr × ratio is rounded once more).

# %%
def first_step(make_opt):
    "The change in each weight after one step from the same start."
    before = run_muon(lambda ps: torch.optim.SGD(ps, lr=0.0), steps=1)
    return [after - b for after, b in zip(run_muon(make_opt, steps=1), before)]

ours = first_step(lambda ps: Muon(ps, lr=0.02))
moonshot = first_step(lambda ps: torch.optim.Muon(ps, lr=0.02, weight_decay=0.0, adjust_lr_fn="match_rms_adamw"))
for d_ours, d_moon in zip(ours, moonshot):
    r, c = d_ours.shape
    ratio = 0.2 * math.sqrt(max(r, c)) / math.sqrt(max(1, r / c))
    test_close(ratio, 0.2 * math.sqrt(c))
    test_close(d_moon / ratio, d_ours, eps=1e-6)
    print(f"{r}x{c}: Moonshot step / ours = {(d_moon.norm() / d_ours.norm()).item():.4f} (expected {ratio:.4f})")
test_close([0.02 / (0.2 * math.sqrt(fan_in)) for fan_in in (1280, 5120)], [0.0028, 0.0014], eps=1e-4)


# %% [markdown]
# ## Which parameter goes where
#
# Muon only makes sense for matrices that map one hidden space to another. The embedding `wte` is a lookup table
# (each step touches only the rows of the tokens in the batch), and `lm_head` maps into the vocabulary, whose
# rows are per-token classifiers; both stay with AdamW (betas 0.8/0.95, eps 1e-10, no weight decay). Their learning
# rates are scaled by $(n_{embd}/768)^{-1/2}$: they were tuned at width 768, and a wider model takes smaller AdamW
# steps. `setup_optimizers` applies the routing, refuses a parameter that fits neither rule, and stores each group's
# starting lr as `initial_lr` so the schedule can rescale it every step. When `torch.distributed` is running with
# more than one process it returns the sharded `DistAdamW`/`DistMuon` defined at the end of this chapter.

# %%
#| export
def setup_optimizers(model: nn.Module, unembedding_lr: float = 0.004, embedding_lr: float = 0.2,
                     matrix_lr: float = 0.02, weight_decay: float = 0.0, adam_betas=(0.8, 0.95),
                     distributed: bool | None = None) -> list:
    "Route block matrices to Muon and `wte`/`lm_head` to AdamW, as nanochat does; returns `[adamw, muon]`."
    matrix_params = list(model.transformer.h.parameters())
    embedding_params = list(model.transformer.wte.parameters())
    lm_head_params = list(model.lm_head.parameters())
    routed = matrix_params + embedding_params + lm_head_params
    if len({id(p) for p in routed}) != len(routed):
        raise ValueError("a parameter is shared between wte, lm_head and the blocks (tied weights?); "
                         "nanochat unties wte and lm_head: give each its own tensor")
    stray = [n for n, p in model.named_parameters() if all(p is not q for q in routed)]
    if stray:
        raise ValueError(f"parameters {stray} are neither in transformer.h (Muon) nor wte/lm_head (AdamW); "
                         "extend setup_optimizers with a group for them")
    n_embd = model.transformer.wte.weight.size(1)
    scale = (n_embd / 768) ** -0.5  # AdamW lrs were tuned at width 768
    adam_groups = [dict(params=lm_head_params, lr=unembedding_lr * scale),
                   dict(params=embedding_params, lr=embedding_lr * scale)]
    # the fused kernel is several times faster than the foreach path on CPU (and the usual choice on CUDA); both
    # paths use it, so one process and several compute the very same AdamW arithmetic
    fused = all(p.device.type in ("cpu", "cuda") for p in embedding_params + lm_head_params) or None
    adamw_kwargs = dict(betas=adam_betas, eps=1e-10, weight_decay=weight_decay, fused=fused)
    if distributed is None:
        distributed = dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
    if distributed:
        adamw = DistAdamW(adam_groups, **adamw_kwargs)
        muon = DistMuon(matrix_params, lr=matrix_lr, momentum=0.95)
    else:
        adamw = torch.optim.AdamW(adam_groups, **adamw_kwargs)
        muon = Muon(matrix_params, lr=matrix_lr, momentum=0.95)
    for opt in (adamw, muon):
        for group in opt.param_groups:
            group["initial_lr"] = group["lr"]
    return [adamw, muon]


# %% [markdown]
# The routing of our tiny model, one row per parameter:

# %%
def routing_table(model, optimizers):
    "Rows of (parameter name, shape, optimizer, lr)."
    owner = {id(p): (type(opt).__name__, group["lr"])
             for opt in optimizers for group in opt.param_groups for p in group["params"]}
    return [(n, tuple(p.shape), *owner[id(p)]) for n, p in model.named_parameters()]

adamw, muon = setup_optimizers(model)
rows = routing_table(model, [adamw, muon])
display(pd.DataFrame(rows, columns=["parameter", "shape", "optimizer", "lr"]).style.format({"lr": "{:.5f}"}))
assert type(adamw) is torch.optim.AdamW and type(muon) is Muon
n_routed = sum(len(g["params"]) for opt in (adamw, muon) for g in opt.param_groups)
test_eq(n_routed, len(list(model.parameters())))  # each parameter in exactly one group
assert all(opt_name == "Muon" for name, _, opt_name, _ in rows if name.startswith("transformer.h."))

# %% [markdown]
# At nanochat's d20 (width 1280) the scale is $(1280/768)^{-1/2} = 0.7746$:
#
# | parameters | optimizer | lr at d20 |
# |---|---|---|
# | every matrix in `transformer.h` (q, k, v, attention `c_proj`, `c_fc`, MLP `c_proj`) | Muon | 0.02 |
# | `transformer.wte` | AdamW | 0.2 × 0.7746 = 0.1549 |
# | `lm_head` | AdamW | 0.004 × 0.7746 = 0.0031 |

# %%
test_close((1280 / 768) ** -0.5, 0.7746, eps=1e-4)


# %% [markdown]
# Gradient clipping is *not* the optimizers' job: the training loop clips before calling `step()`. Note the order
# when the distributed optimizers are in use: they average gradients across ranks inside `step()`, so a norm taken
# before it sees only each rank's local gradient. nanochat clips that local gradient. Our loop (chapter 06) does not:
# when clipping is on and there are several ranks, it first all-reduces the gradients (AVG), so the norm it clips is
# the norm of the averaged gradient and a two-process run matches a one-process run on the same batch. The price is
# one extra all-reduce of every gradient per step, on top of the optimizers' reduce-scatter and all-gather;
# `--grad-clip 0` skips it.
#
# ## Schedules
#
# Two numbers change during a run, both set on the param groups before each `step()`:
#
# - **The learning rate** of every group is `initial_lr × lr_multiplier(it)`. nanochat's base training holds the
#   multiplier at 1 (no warm-up) and then lowers it linearly to `final_lr_frac` (0) over the last 20% of the steps:
#   inside that window it is $(N - it)/W$ for $N$ iterations and a window of $W$. Muon tolerates a large lr from
#   step 0, hence no warm-up; the warmdown is where the loss drops the most.
# - **Muon's momentum** rises linearly from 0.85 to 0.95 over the first 300 steps: with little history early on, a
#   shorter memory follows the quickly changing gradients better.

# %%
#| export
def lr_multiplier(it: int, num_iterations: int, warmup_ratio: float = 0.0, warmdown_ratio: float = 0.2,
                  final_lr_frac: float = 0.0) -> float:
    "Multiplier on each group's `initial_lr` at step `it`: linear warm-up, constant, linear warmdown."
    if num_iterations <= 0:
        raise ValueError(f"num_iterations must be positive, got {num_iterations}")
    warmup_iters = round(warmup_ratio * num_iterations)
    warmdown_iters = round(warmdown_ratio * num_iterations)
    if it < warmup_iters:
        return (it + 1) / warmup_iters
    if it <= num_iterations - warmdown_iters:
        return 1.0
    progress = max(0.0, (num_iterations - it) / warmdown_iters)  # 1 at the window's start, 0 at the last step
    return progress + (1 - progress) * final_lr_frac


# %%
#| export
def muon_momentum(it: int, warmup_steps: int = 300, start: float = 0.85, end: float = 0.95) -> float:
    "Muon's momentum at step `it`: linear from `start` to `end` over `warmup_steps`, then constant."
    frac = min(it / warmup_steps, 1.0) if warmup_steps > 0 else 1.0
    return (1 - frac) * start + frac * end


# %% [markdown]
# Across nanochat's d20 run (21,400 steps, derived below):

# %%
#| fig-alt: "Left: the learning-rate multiplier, flat then falling linearly to zero over the last 20%. Right: Muon momentum rising from 0.85 to 0.95 over 300 steps."
N = 21_400
steps = torch.arange(N + 1).tolist()
fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 3.2))
ax1.plot(steps, [lr_multiplier(it, N) for it in steps])
ax1.set(xlabel="step", ylabel="lr multiplier", title="learning rate: constant, then warmdown over the last 20%")
ax2.plot(steps[:1000], [muon_momentum(it) for it in steps[:1000]])
ax2.set(xlabel="step (first 1,000)", ylabel="momentum", title="Muon momentum: 0.85 → 0.95 over 300 steps")
plt.tight_layout()
plt.show()

test_eq(lr_multiplier(0, N), 1.0)
test_eq(lr_multiplier(N - 4280, N), 1.0)  # the window is round(0.2 * 21,400) = 4,280 steps
test_close(lr_multiplier(N - 2140, N), 0.5)
test_eq(lr_multiplier(N, N), 0.0)
test_close(lr_multiplier(N, N, final_lr_frac=0.1), 0.1)
test_eq([lr_multiplier(it, 100, warmup_ratio=0.05) for it in range(5)], [0.2, 0.4, 0.6, 0.8, 1.0])
test_close([muon_momentum(it) for it in (0, 150, 300, 10_000)], [0.85, 0.90, 0.95, 0.95])

# %% [markdown]
# ## Muon against AdamW
#
# Is Muon worth it? The tiny GPT above has a 256-token vocabulary, so it can read raw bytes: we train it on the source
# of a standard-library module, once with nanochat's routing (`setup_optimizers`: Muon for the blocks) and once with
# AdamW for everything, at three learning rates so that AdamW gets a fair chance. Same initial weights, same batches,
# same schedule (`lr_multiplier`). The numbers are small-model numbers: the point is the shape of the curves.

# %%
import inspect
import json as _json

corpus = torch.tensor(list(inspect.getsource(_json.decoder).encode() * 4), dtype=torch.long)


def byte_batches(steps, B=8, T=64, seed=0):
    "`steps` random (inputs, targets) windows of the byte corpus, the same for every run."
    g = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, len(corpus) - T - 1, (steps, B), generator=g)
    return [(corpus[s[:, None] + torch.arange(T)], corpus[s[:, None] + torch.arange(1, T + 1)]) for s in starts]


def train_curve(make_optimizers, steps=80):
    "Train a fresh tiny GPT (seed 0) and return its loss at every step."
    torch.manual_seed(0)
    m = build_model(config, "cpu")
    opts, losses = make_optimizers(m), []
    for group in (g for o in opts for g in o.param_groups):
        group.setdefault("initial_lr", group["lr"])
    for it, (x, y) in enumerate(byte_batches(steps)):
        loss = m(x, y)
        loss.backward()
        for o in opts:
            for group in o.param_groups:
                group["lr"] = group["initial_lr"] * lr_multiplier(it, steps)
            o.step()
        m.zero_grad(set_to_none=True)
        losses.append(loss.item())
    return losses


curves = {"Muon + AdamW (nanochat)": train_curve(setup_optimizers)}
for lr in (1e-3, 3e-3, 1e-2):
    curves[f"AdamW only, lr {lr:g}"] = train_curve(
        lambda m: [torch.optim.AdamW(m.parameters(), lr=lr, betas=(0.8, 0.95), eps=1e-10, weight_decay=0.0)])

# %%
#| fig-alt: "Training loss against step for the tiny GPT on bytes: Muon with AdamW against AdamW alone at three learning rates."
fig, ax = plt.subplots(figsize=(6.5, 3.4))
for name, losses in curves.items():
    ax.plot(losses, label=name)
ax.set_xlabel("step"), ax.set_ylabel("training loss (nats per byte)")
ax.set_title("Tiny GPT on bytes: Muon against AdamW")
ax.legend()
plt.show()
final = {name: sum(losses[-10:]) / 10 for name, losses in curves.items()}
print({name: round(v, 3) for name, v in final.items()})
adamw_final = {k: v for k, v in final.items() if k.startswith("AdamW")}
assert final["Muon + AdamW (nanochat)"] < min(adamw_final.values())
test_eq(min(adamw_final, key=adamw_final.get), "AdamW only, lr 0.003")  # AdamW's best lr lies inside the range tried


# %% [markdown]
# On this run Muon's curve falls faster and ends lower than AdamW's at any of the three learning rates (the numbers
# printed above are the mean of the last ten steps). AdamW does best at the middle one, 3e-3, so its best learning
# rate lies inside the range we tried rather than beyond it: the comparison is not won by starving AdamW. Orthogonalised updates move every direction of a weight matrix
# at the same pace, instead of letting a few large singular directions dominate, and that is what nanochat's speedrun
# buys with it: fewer steps for the same loss.

# %% [markdown]
# ## How long, and in how many pieces
#
# nanochat trains for **20 tokens per parameter** (the Chinchilla ratio; every parameter counts, embeddings too),
# in batches of `total_batch_size` = 524,288 = 2¹⁹ tokens. The number of steps is the floor of their quotient. One
# optimizer step may need several forward/backward passes: each GPU sees `device_batch_size` rows of
# `sequence_len` tokens, and when all GPUs together see fewer tokens than the batch, gradients are accumulated over
# `grad_accum_steps` micro-steps (each micro-loss divided by that count) before stepping.

# %%
#| export
def training_horizon(num_params: int, target_param_data_ratio: float = 20,
                     total_batch_size: int = 524288) -> int:
    "Number of optimizer steps that show the model `target_param_data_ratio` tokens per parameter."
    if num_params <= 0 or total_batch_size <= 0:
        raise ValueError(f"num_params ({num_params}) and total_batch_size ({total_batch_size}) must be positive")
    return int(target_param_data_ratio * num_params) // total_batch_size


# %%
#| export
def grad_accum_steps(total_batch_size: int, device_batch_size: int, sequence_len: int, world_size: int = 1) -> int:
    "Micro-steps per optimizer step so that all ranks together see `total_batch_size` tokens."
    per_pass = device_batch_size * sequence_len * world_size  # tokens in one forward/backward over all ranks
    if per_pass <= 0 or total_batch_size <= 0:
        raise ValueError(f"total_batch_size ({total_batch_size}), device_batch_size ({device_batch_size}), "
                         f"sequence_len ({sequence_len}) and world_size ({world_size}) must all be positive")
    if total_batch_size % per_pass:
        rows = total_batch_size // (sequence_len * world_size)  # rows per rank if there were no accumulation
        fix = f"set total_batch_size to a multiple of {per_pass:,} (e.g. {max(1, round(total_batch_size / per_pass)) * per_pass:,})"
        if total_batch_size % (sequence_len * world_size) == 0:
            fix += f", or choose a device_batch_size that divides {rows}"
        raise ValueError(f"total_batch_size={total_batch_size:,} is not a multiple of device_batch_size × "
                         f"sequence_len × world_size = {device_batch_size} × {sequence_len} × {world_size} = "
                         f"{per_pass:,}: {fix}")
    return total_batch_size // per_pass


# %% [markdown]
# nanochat's d20 has 560,988,160 parameters (chapter 02), so 11.2B tokens and **21,400 steps**. With
# `device_batch_size` 32 at sequence length 2,048, eight GPUs cover 2¹⁹ tokens in one pass; one GPU needs 8
# micro-steps (same result, 8× the time); at `device_batch_size` 16 on eight GPUs it is 2.

# %%
d20_params = 560_988_160
test_eq(training_horizon(d20_params), 21_400)
test_eq(20 * d20_params, 11_219_763_200)
test_eq(grad_accum_steps(524_288, 32, 2048, world_size=8), 1)
test_eq(grad_accum_steps(524_288, 32, 2048, world_size=1), 8)
test_eq(grad_accum_steps(524_288, 16, 2048, world_size=8), 2)
try:
    grad_accum_steps(500_000, 32, 2048, world_size=8)
except ValueError as e:
    print(e)
test_fail(lambda: grad_accum_steps(524_288, 24, 2048, world_size=8), contains="divides 32")


# %% [markdown]
# ## Sharded optimizers for several GPUs
#
# On 8 GPUs the usual recipe wraps the model in DDP, which all-reduces every gradient after `backward()` and then
# lets each GPU run the *same* optimizer step on the *same* full state: eight identical copies of Muon's momentum
# and AdamW's two moments, and eight identical Newton–Schulz computations. nanochat skips DDP and gives the
# optimizers the job instead, ZeRO-2 style: each GPU updates only its share of the parameters and keeps only its
# share of the state, and the new weights are broadcast afterwards. Communication is the same volume as an
# all-reduce (a reduce-scatter plus an all-gather *is* how an all-reduce is built), but the optimizer work and
# memory are divided by the number of GPUs.
#
# First, the process group. `torchrun` starts one process per GPU and tells each one who it is through the
# environment variables `RANK`, `WORLD_SIZE` and `LOCAL_RANK`; without them we are a single process.

# %%
#| export
@dataclass
class DistInfo:
    "Who this process is in a (possibly one-process) training job."
    is_ddp: bool
    rank: int
    local_rank: int
    world_size: int
    device: torch.device


# %%
#| export
def init_distributed(device_type: str | None = None) -> DistInfo:
    "Join the process group torchrun describes (nccl on CUDA, gloo on CPU); a single process without torchrun."
    if device_type is None:
        mps = getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available()
        device_type = "cuda" if torch.cuda.is_available() else "mps" if mps else "cpu"
    if not all(k in os.environ for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK")):
        return DistInfo(False, 0, 0, 1, torch.device(device_type))
    rank, local_rank, world_size = (int(os.environ[k]) for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE"))
    if device_type == "cuda":
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)  # one GPU per process, picked by its rank on this node
        backend = "nccl"
    elif device_type == "cpu":
        device, backend = torch.device("cpu"), "gloo"
    else:
        raise ValueError(f"torchrun with device {device_type!r}: several processes need cuda (nccl) or cpu (gloo); "
                         "run a single process instead")
    if not dist.is_initialized():
        dist.init_process_group(backend=backend, device_id=device if backend == "nccl" else None)
    return DistInfo(True, rank, local_rank, world_size, device)


def cleanup_distributed():
    "Leave the process group, if we joined one."
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


# %% [markdown]
# Without torchrun's variables we get a one-process job on this machine's device:

# %%
info = init_distributed()
print(info)
test_eq((info.is_ddp, info.rank, info.world_size), (False, 0, 1))

# %% [markdown]
# ### DistMuon
#
# Muon needs whole matrices (Newton–Schulz mixes every entry), so it shards *parameters*, not slices of them.
# Parameters are grouped by shape and walked in chunks of `world_size`; within a chunk, rank $r$ **owns** parameter
# $r$ (block-cyclic). With 2 ranks and a group of five same-shape matrices:
#
# ```
#              chunk 0              chunk 1              chunk 2
# params       W0      W1           W2      W3           W4      (zeros)
# owner        rank 0  rank 1       rank 0  rank 1       rank 0  rank 1
#
# 1. reduce-scatter (AVG):  rank 0 gets mean(grad W0), rank 1 mean(grad W1), ...  (rank 1 gets zeros in chunk 2)
# 2. each owner: momentum, Nesterov, Newton-Schulz, update its own matrix
# 3. all-gather: every rank receives the owners' new W0..W4 (the padding is dropped)
# ```
#
# A chunk's gradients are concatenated along dim 0 into one buffer, which both gloo and NCCL accept, and a short
# last chunk is padded with zeros so that every rank takes part in every collective. All reduce-scatters are
# launched before any update is computed, so communication overlaps the Newton–Schulz arithmetic. The same three
# phases as a picture, for one chunk of two matrices on two ranks:

# %%
#| fig-alt: "Three panels for two ranks: each rank holds gradients of W0 and W1; after reduce-scatter rank 0 holds the mean gradient of W0 and rank 1 that of W1; each updates its own matrix; after all-gather both ranks hold the new W0 and W1."
fig, axes = plt.subplots(1, 3, figsize=(11, 2.6))
phases = [("1. before: every rank has\nits own gradient of W0 and W1", [["g0", "g1"], ["g0", "g1"]], "0.85"),
          ("2. after reduce-scatter (AVG):\nrank r owns mean(grad Wr), updates Wr", [["ḡ0 → W0'", ""], ["", "ḡ1 → W1'"]], "#f6d8b8"),
          ("3. after all-gather: every\nrank has the new W0' and W1'", [["W0'", "W1'"], ["W0'", "W1'"]], "#cfe6c8")]
for ax, (title, cells, colour) in zip(axes, phases):
    for r, row in enumerate(cells):
        for j, label in enumerate(row):
            ax.add_patch(plt.Rectangle((j * 1.1, 1.2 - r * 1.2), 1, 0.9, facecolor=colour if label else "white",
                                       edgecolor="k"))
            ax.text(j * 1.1 + 0.5, 1.65 - r * 1.2, label, ha="center", va="center", fontsize=10)
        ax.text(-0.15, 1.65 - r * 1.2, f"rank {r}", ha="right", va="center", fontsize=9)
    ax.set_xlim(-0.9, 2.3), ax.set_ylim(-0.1, 2.2), ax.axis("off"), ax.set_title(title, fontsize=9)
fig.suptitle("DistMuon on one chunk: each rank runs Newton–Schulz on half the matrices", y=1.16)
plt.show()

# %% [markdown]
# Two collectives do the work, each on one flat tensor. torch 2.13 renamed them (same arguments; the old names now
# warn), so we take whichever this torch has:

# %%
#| export
_reduce_scatter = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor
_all_gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor


# %% [markdown]
# The optimizer itself only groups the matrices by shape and runs three phases. The phases come next, one cell each.

# %%
#| export
class DistMuon(torch.optim.Optimizer):
    "Muon sharded across ranks: reduce-scatter grads to block-cyclic owners, update, all-gather the weights."
    def __init__(self, params, lr: float = 0.02, momentum: float = 0.95, nesterov: bool = True, ns_steps: int = 5):
        params = list(params)
        for p in params:
            if p.ndim != 2:
                raise ValueError(f"DistMuon updates matrices, but got a parameter of shape {tuple(p.shape)}; "
                                 "give it to DistAdamW instead")
        # one group per shape, in an order every rank agrees on, so that collectives line up across ranks
        shapes = sorted({tuple(p.shape) for p in params})
        groups = [dict(params=[p for p in params if tuple(p.shape) == s]) for s in shapes]
        super().__init__(groups, dict(lr=lr, momentum=momentum, nesterov=nesterov, ns_steps=ns_steps))

    @torch.no_grad()
    def step(self, closure=None):
        "One Muon step: average each gradient onto its owner, update the owned matrices, share the new weights."
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        world_size = dist.get_world_size()
        gathers = [self._update_and_gather(*c) for c in self._scatter_grads()]
        for chunk, gathered, work in gathers:  # phase 3: every rank copies in every new matrix
            work.wait()
            for p, new in zip(chunk, gathered.chunk(world_size)):
                p.copy_(new)
        return loss


# %% [markdown]
# Phase 1 cuts each shape group into chunks of `world_size` matrices and starts one reduce-scatter per chunk: rank
# *r* receives the averaged gradient of the chunk's *r*-th matrix. Nothing waits yet, so the collectives overlap.

# %%
#| export
@patch
def _scatter_grads(self: DistMuon):
    "Start a reduce-scatter (AVG) per chunk of world_size matrices; return (group, chunk, owned grad, work)."
    world_size = dist.get_world_size()
    chunks = []
    for group in self.param_groups:
        params = group["params"]
        for start in range(0, len(params), world_size):
            chunk = params[start:start + world_size]
            grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in chunk]
            grads += [torch.zeros_like(chunk[0])] * (world_size - len(chunk))  # pad a short last chunk
            owned_grad = torch.empty_like(chunk[0])
            work = _reduce_scatter(owned_grad, torch.cat(grads), op=dist.ReduceOp.AVG, async_op=True)
            chunks.append((group, chunk, owned_grad, work))
    return chunks


# %% [markdown]
# Phase 2, per chunk: wait for its gradient, run Muon on the one matrix this rank owns (with momentum state kept
# only here), and start the all-gather that sends the new matrix to every rank. A rank with no matrix in a short
# last chunk contributes zeros.

# %%
#| export
@patch
def _update_and_gather(self: DistMuon, group, chunk, owned_grad, work):
    "Wait for the chunk's gradient, update the matrix this rank owns, start the all-gather of the new weights."
    rank, world_size = dist.get_rank(), dist.get_world_size()
    work.wait()
    if rank < len(chunk):  # this rank owns chunk[rank]
        p = chunk[rank]
        state = self.state[p]
        if "momentum_buffer" not in state:
            state["momentum_buffer"] = torch.zeros_like(owned_grad)
        update = muon_update(owned_grad, state["momentum_buffer"], group["momentum"], group["nesterov"],
                             group["ns_steps"])
        p.add_(update, alpha=-group["lr"] * math.sqrt(max(1, p.size(-2) / p.size(-1))))
        mine = p.contiguous()
    else:
        mine = torch.zeros_like(chunk[0])
    gathered = torch.empty((world_size * chunk[0].size(0), *chunk[0].shape[1:]),
                           dtype=chunk[0].dtype, device=chunk[0].device)
    return chunk, gathered, _all_gather(gathered, mine, async_op=True)


# %% [markdown]
# ### DistAdamW
#
# AdamW is elementwise, so it can shard *inside* a tensor: along dim 0, rank $r$ of $R$ owns rows
# $[r\,n/R, (r+1)\,n/R)$. A reduce-scatter (AVG) hands each rank the averaged gradient of its rows, the rank runs
# AdamW on those rows with its slice of the two moments, and `all_gather_into_tensor` rebuilds the full tensor on
# every rank. Dim 0 must divide by the world size; nanochat pads the vocabulary to a multiple of 64 partly for this.
# The update itself is torch's own functional `adamw`, called on the slice with the same `fused` choice as the
# single-process path: AdamW's `eps` of 1e-10 turns even a last-bit difference in a tiny gradient into a full-size
# step, so "the same formula" is not enough; the two paths must run the same kernel to agree bit for bit.

# %%
#| export
class DistAdamW(torch.optim.Optimizer):
    "AdamW with gradients and state sharded along dim 0: reduce-scatter, update own rows, all-gather."
    def __init__(self, param_groups, lr: float = 1e-3, betas=(0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 0.01, fused: bool | None = None):
        super().__init__(param_groups, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay))
        self.fused = fused
        world_size = dist.get_world_size()
        for group in self.param_groups:
            for p in group["params"]:
                if p.ndim == 0 or p.size(0) % world_size:
                    raise ValueError(f"DistAdamW shards dim 0 across {world_size} ranks, but a parameter has shape "
                                     f"{tuple(p.shape)}: pad dim 0 to a multiple of {world_size} (e.g. the vocab "
                                     "to a multiple of 64) or use a world size that divides it")

    @torch.no_grad()
    def step(self, closure=None):
        "One AdamW step: reduce-scatter every gradient, update this rank's rows, all-gather the tensors."
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        world_size = dist.get_world_size()
        pending = []
        for group in self.param_groups:
            for p in group["params"]:
                grad = p.grad if p.grad is not None else torch.zeros_like(p)
                grad_slice = torch.empty_like(p[: p.size(0) // world_size])
                work = _reduce_scatter(grad_slice, grad.contiguous(), op=dist.ReduceOp.AVG, async_op=True)
                pending.append((group, p, grad_slice, work))
        gathers = []
        for group, p, grad_slice, work in pending:
            work.wait()
            gathers.append(_all_gather(p, self._update_rows(group, p, grad_slice), async_op=True))
        for work in gathers:
            work.wait()
        return loss


# %% [markdown]
# The update of one rank's rows: a view into the parameter, so updating the slice updates the tensor that the
# all-gather then reads from; the two moments exist only for these rows.

# %%
#| export
@patch
def _update_rows(self: DistAdamW, group, p, grad_slice):
    "AdamW (torch's functional step) on this rank's rows of `p`; returns the updated slice, a view of `p`."
    rows = p.size(0) // dist.get_world_size()
    rank = dist.get_rank()
    p_slice = p[rank * rows:(rank + 1) * rows]
    (beta1, beta2), state = group["betas"], self.state[p]
    if not state:
        state["step"] = torch.zeros((), dtype=torch.float32, device=p.device)
        state["exp_avg"] = torch.zeros_like(p_slice)
        state["exp_avg_sq"] = torch.zeros_like(p_slice)
    # torch's AdamW on our rows (it advances the step count itself)
    adamw_update([p_slice], [grad_slice], [state["exp_avg"]], [state["exp_avg_sq"]], [], [state["step"]],
                 fused=self.fused, amsgrad=False, beta1=beta1, beta2=beta2, lr=group["lr"],
                 weight_decay=group["weight_decay"], eps=group["eps"], maximize=False)
    return p_slice


# %% [markdown]
# **Do they agree with the single-process optimizers?** A real check needs several processes:
# `tests/test_optim.py` starts two gloo ranks with `torchrun`, trains a small GPT for several steps with
# `DistMuon` + `DistAdamW`, each rank on half of every batch, and compares the weights with one process running
# `Muon` + `AdamW` on the whole batch (as two accumulated halves). Here, in the notebook, we can at least run the
# same code paths in a one-rank gloo group, where they must reproduce `Muon` and the fused `AdamW` exactly.

# %%
def train_tiny(make_optimizers, steps=3):
    "A few steps of the tiny GPT on fixed random batches; returns its final weights."
    torch.manual_seed(0)
    m = build_model(config, "cpu")
    optimizers = make_optimizers(m)
    g = torch.Generator().manual_seed(1)
    for it in range(steps):
        x = torch.randint(0, config.vocab_size, (2, config.sequence_len), generator=g)
        y = torch.randint(0, config.vocab_size, (2, config.sequence_len), generator=g)
        m(x, y).backward()
        for opt in optimizers:
            opt.step()
        m.zero_grad(set_to_none=True)
    return {k: v.detach().clone() for k, v in m.state_dict().items()}

def plain(m):
    adamw, muon = setup_optimizers(m)
    groups = [dict(params=g["params"], lr=g["lr"]) for g in adamw.param_groups]  # same groups and lrs
    return [torch.optim.AdamW(groups, betas=(0.8, 0.95), eps=1e-10, weight_decay=0.0, fused=True), muon]

store = tempfile.NamedTemporaryFile(delete=False).name  # a file store: no port to pick
dist.init_process_group("gloo", init_method=f"file://{store}", rank=0, world_size=1)
try:
    sharded_run = train_tiny(lambda m: setup_optimizers(m, distributed=True))
finally:
    cleanup_distributed()
plain_run = train_tiny(plain)
for k in plain_run:
    assert torch.equal(sharded_run[k], plain_run[k]), k
print(f"DistMuon + DistAdamW (1 rank) == Muon + AdamW on all {len(plain_run)} tensors")


# %% [markdown]
# The two-process check, for reference (it takes a few seconds of start-up per process):
#
# ```
# python -m pytest -q tests/test_optim.py -k distributed
# ```
#
# ## At scale
#
# On nanochat's d20 run (8×H100, 21,400 steps; base training takes about 3 h, the numbers of chapter 00's table):
#
# - **Settings** are the defaults here: Muon lr 0.02 for all block matrices, AdamW lrs 0.2 × 0.7746 (`wte`) and
#   0.004 × 0.7746 (`lm_head`), betas (0.8, 0.95), no weight decay, momentum 0.85 → 0.95 over 300 steps, warmdown
#   over the last 4,280 steps, gradient clipping at 1.0 in the loop. `device_batch_size` 32 × 2,048 × 8 GPUs = 2¹⁹
#   tokens, so `grad_accum_steps` is 1; a single GPU runs the same schedule with 8 micro-steps in about 8× the time.
# - **Memory**: AdamW keeps two moments per embedding weight, in the weight's dtype: bf16 for `wte`, fp32 for
#   `lm_head` (2 × 65,536 × 1,280 × (2 + 4) bytes = 1.0 GB), and Muon one fp32 momentum per block weight
#   (12 × 20 × 1,280² × 4 bytes = 1.6 GB). Sharded over 8 ranks that is about 0.32 GB per GPU instead of 2.6 GB
#   (computed below, and the same number chapter 05 gives for one optimizer file); checkpoints therefore store one
#   optimizer file per rank.
# - **Work**: each GPU runs Newton–Schulz on 1/8 of the 120 block matrices (5 steps of three bf16 matmuls each):
#   about 1.6 TFLOP per GPU per step (computed below), under 1% of the ≈229 TFLOP of its forward and backward.
#   Without sharding every GPU would do all 12.6 TFLOP.
# - **Communication**: one reduce-scatter and one all-gather of every weight per step, the volume of one DDP
#   all-reduce, started asynchronously so Newton–Schulz on one chunk overlaps the transfers of the next. With
#   clipping on, chapter 06's loop adds one all-reduce of the gradients before `step()` (see above), so a step moves
#   about twice DDP's volume; nanochat, which clips the local gradient, moves once.

# %%
def ns_flops(rows, cols, steps=5):
    "FLOPs of Newton-Schulz on one rows x cols matrix: per step X@X.T, A@A and B@X on the wide orientation."
    m, n = min(rows, cols), max(rows, cols)
    return steps * (2 * m * m * n + 2 * m * m * m + 2 * m * m * n)

d, n_layer, world_size = 1280, 20, 8
ns_total = n_layer * (4 * ns_flops(d, d) + 2 * ns_flops(4 * d, d))  # q, k, v, c_proj; c_fc, mlp c_proj
fwd_bwd = 3.49e9 * 524_288 / world_size  # FLOPs/token (chapter 02) x tokens per GPU per step
emb, blocks = 65_536 * d, 12 * n_layer * d**2
optim_gb = (2 * emb * (2 + 4) + 4 * blocks) / 1e9  # Adam moments of wte (bf16) and lm_head (fp32); Muon momentum
print(f"optimizer state: {optim_gb:.2f} GB, {optim_gb / world_size:.2f} GB per GPU")
test_eq(f"{optim_gb / world_size:.2f} GB", AT_SCALE["optimizer state per GPU"][0])  # chapter 00's table
print(f"Newton-Schulz: {ns_total / 1e12:.1f} TFLOP per step, {ns_total / world_size / 1e12:.2f} per GPU; "
      f"forward+backward {fwd_bwd / 1e12:.0f} TFLOP per GPU ({ns_total / world_size / fwd_bwd:.2%})")
assert ns_total / world_size < 0.01 * fwd_bwd

# %% [markdown]
# ## Summary
#
# - `zeropower_via_newtonschulz5` pushes every singular value of an update towards 1 with five bf16 quintic steps.
# - `Muon` = Nesterov momentum → Newton–Schulz → step scaled by $\sqrt{\max(1, r/c)}$; it equals
#   `torch.optim.Muon(weight_decay=0, adjust_lr_fn="original")` bit for bit.
# - `setup_optimizers` routes block matrices to Muon and `wte`/`lm_head` to AdamW with width-scaled lrs, and stores
#   `initial_lr`; `lr_multiplier` and `muon_momentum` are the schedules the training loop applies each step.
# - `training_horizon` and `grad_accum_steps` turn 20 tokens per parameter into 21,400 steps for d20 and check that
#   the batch divides.
# - `DistMuon` and `DistAdamW` do DDP's gradient averaging inside `step()` and shard the optimizer state.
#
# ## Exercises
#
# 1. Replace Newton–Schulz by an exact SVD ($U V^\top$) in `muon_update` and train the tiny model for 200 steps
#    with each. Is the loss different? How much slower is the SVD on your CPU?
# 2. Change the coefficients to the "plain" cubic Newton–Schulz $(1.5, -0.5, 0)$ and redraw the right-hand figure.
#    How many steps does it need to lift a singular value of $10^{-2}$ to 0.7?
# 3. Give `wte` and `lm_head` to Muon as well (in `setup_optimizers`, put every 2-D parameter in the Muon group and
#    leave AdamW none) and compare the loss after 100 steps with the nanochat routing.

# %%
#| hide
torch.set_num_threads(_saved_threads)
