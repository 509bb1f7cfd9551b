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
# # The GPT model
# > nanochat's transformer (RoPE, QK norm, ReLU², softcapped logits) with one forward for training, prefill and decode.

# %% [markdown]
# Chapter 01 turned text into token ids. This chapter builds the network that reads those ids and predicts the next
# one: nanochat's "classic" GPT, the model behind the $100 speedrun. It is a plain decoder-only transformer with a
# handful of modern choices (rotary positions, normalised queries and keys, a squared-ReLU MLP, logits squashed by a
# `tanh`), and it has no knobs beyond six integers.
#
# At the end you will have `GPTConfig`, `GPT`, `KVCache` and `build_model` in `nanochat_nb.model`. Chapter 03 (the
# optimizers) and chapter 06 (pretraining) train this model; the inference engine later drives the same `forward`
# through the KV cache to generate many samples at once.

# %%
#| default_exp model

# %%
#| export
import math
from dataclasses import dataclass, fields
from typing import Iterator

import torch
import torch.nn as nn
import torch.nn.functional as F
from fastcore.basics import patch

from nanochat_nb.common import get_device

# %%
import time

import matplotlib.pyplot as plt
from fastcore.test import test_close, test_eq, test_fail
from IPython.display import Markdown, display

from nanochat_nb.common import AT_SCALE, at_scale_table

# The chapter's models are tiny: on a busy 2-core machine a second thread costs more in synchronisation than it
# gains, so the examples run on one (restored at the end of the chapter).
_saved_threads = torch.get_num_threads()
torch.set_num_threads(1)


# %% [markdown]
# ## The shape of a model
#
# Six integers describe a nanochat GPT: the context length, the vocabulary size, and depth, width and heads of the
# transformer. `n_kv_head` allows grouped-query attention (fewer key/value heads than query heads); nanochat leaves
# it equal to `n_head`.
#
# nanochat turns all of them into a single dial, the **depth**: `n_layer = depth`, `n_embd = 64·depth`, and as many
# heads as it takes to make them about 128 channels wide. Even depths give heads of exactly 128; depth 3 gives two
# heads of 96; depth 5 would need three heads over 320 channels, which does not divide, so it is refused with a
# message that says how to fix it. Every field can be overridden.

# %%
#| export
@dataclass
class GPTConfig:
    "Shape of a nanochat GPT; `GPTConfig.from_depth(depth)` applies nanochat's depth rule."
    sequence_len: int = 2048
    vocab_size: int = 65536
    n_layer: int = 12
    n_head: int = 6
    n_kv_head: int = 6
    n_embd: int = 768

    def __post_init__(self):
        for f in fields(self):
            v = getattr(self, f.name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"GPTConfig.{f.name} must be a positive int, got {v!r}")
        if self.n_embd % self.n_head:
            raise ValueError(f"n_embd={self.n_embd} is not divisible by n_head={self.n_head}: choose n_head among "
                             f"the divisors of n_embd (with from_depth, an even depth always works)")
        if self.n_head % self.n_kv_head:
            raise ValueError(f"n_head={self.n_head} is not a multiple of n_kv_head={self.n_kv_head}: every key/value "
                             f"head must serve the same number of query heads")
        if self.head_dim % 2:
            raise ValueError(f"head_dim = n_embd/n_head = {self.head_dim} is odd: RoPE rotates pairs of channels, so "
                             f"choose n_head giving an even head_dim")

    @property
    def head_dim(self):
        "Channels per attention head."
        return self.n_embd // self.n_head

    @property
    def padded_vocab_size(self):
        "Rows of `wte` and `lm_head`: the vocabulary rounded up to a multiple of 64."
        return (self.vocab_size + 63) // 64 * 64


# %%
test_eq(GPTConfig().head_dim, 128)
test_eq(GPTConfig(vocab_size=1000).padded_vocab_size, 1024)
test_fail(lambda: GPTConfig(n_embd=768, n_head=5), contains="not divisible")
test_fail(lambda: GPTConfig(n_embd=96, n_head=32, n_kv_head=32), contains="odd")


# %% [markdown]
# The depth rule is a second constructor, added to the class with fastcore's `@patch` (as chapter 01 grows its
# `Tokenizer`): it fills in the fields a depth implies and leaves any field you name alone.

# %%
#| export
@patch(cls_method=True)
def from_depth(cls: GPTConfig, depth, **overrides):
    "nanochat's rule: n_layer=depth, n_embd=64·depth, heads of about 128 channels; any field can be overridden."
    if isinstance(depth, bool) or not isinstance(depth, int) or depth < 1:
        raise ValueError(f"depth must be a positive int, got {depth!r}")
    unknown = sorted(set(overrides) - {f.name for f in fields(cls)})
    if unknown:
        raise ValueError(f"unknown GPTConfig field(s) {unknown}; valid: {[f.name for f in fields(cls)]}")
    n_embd = overrides.pop("n_embd", 64 * depth)
    n_head = overrides.pop("n_head", max(1, math.ceil(n_embd / 128)))
    return cls(**{"n_layer": depth, "n_embd": n_embd, "n_head": n_head, "n_kv_head": n_head, **overrides})


# %%
for d in (3, 4, 20):
    c = GPTConfig.from_depth(d)
    print(f"d{d}: n_embd {c.n_embd}, {c.n_head} heads of {c.head_dim}")
test_eq((GPTConfig.from_depth(3).n_head, GPTConfig.from_depth(3).head_dim), (2, 96))
test_eq(GPTConfig.from_depth(20), GPTConfig(2048, 65536, 20, 10, 10, 1280))
test_fail(lambda: GPTConfig.from_depth(5), contains="not divisible")
test_fail(lambda: GPTConfig.from_depth(4, n_kv_head=3), contains="multiple of n_kv_head")
test_fail(lambda: GPTConfig.from_depth(4, n_heads=2), contains="unknown")

# %% [markdown]
# Where will it run? nanochat picks CUDA, then Apple's MPS, then the CPU. The rest of the book passes `device`
# through one function, `get_device` from the common module (chapter 00), re-exported here, so a machine with a GPU
# uses it without being told.

# %%
print(get_device(), get_device("cpu"))


# %% [markdown]
# ## Normalisation without parameters
#
# Every sub-layer reads a normalised copy of the residual stream (pre-norm), the embedding is normalised once on the
# way in and once more before the output head. nanochat's norm is RMSNorm **with no learnable gain**: divide each
# vector by its root-mean-square. One parameter tensor fewer per norm, and nothing for the optimizer to route.

# %%
#| export
def norm(x):
    "Parameter-free RMSNorm over the last dimension."
    return F.rms_norm(x, (x.size(-1),))


# %%
_x = torch.randn(2, 5, 64) * 7
test_close(norm(_x).pow(2).mean(-1), torch.ones(2, 5), eps=1e-4)


# %% [markdown]
# ## Positions by rotation (RoPE)
#
# Attention compares a query with keys by a dot product, which by itself knows nothing about order. Rotary
# embeddings give it order by **rotating** queries and keys: channel pair *i* of the vector at position *m* is
# turned by the angle *m·θᵢ*, with θᵢ = 10,000^(−2i/head_dim). Because both vectors are rotated, their dot product
# only sees the difference of the angles, so the score between positions *m* and *n* depends on *m − n*: relative
# position for free, no parameters, and it extends to positions never seen in training.
#
# nanochat pairs channel *i* with channel *i + head_dim/2* (the "half-split" layout) and computes the tables once,
# in fp32, then rounds them to bf16. We keep those bf16-rounded values in an fp32 tensor: the numbers are exactly
# nanochat's in fp32 and under bf16 autocast (where they are cast back to bf16 losslessly), and the fp32 path pays
# no cast per call.

# %%
#| export
def rotary_tables(seq_len, head_dim, base=10000, device=None):
    "RoPE cos and sin tables (seq_len, head_dim/2): fp32 angles rounded to bf16 as nanochat does, stored as fp32."
    inv_freq = base ** -(torch.arange(0, head_dim, 2, dtype=torch.float32, device=device) / head_dim)
    angles = torch.outer(torch.arange(seq_len, dtype=torch.float32, device=device), inv_freq)
    return angles.cos().bfloat16().float(), angles.sin().bfloat16().float()


# %%
#| export
def apply_rotary(x, cos, sin):
    "Rotate channel i with channel i + D/2 of `x` (B, T, H, D) by the angles of `cos`, `sin` (T, D/2)."
    d = x.size(-1) // 2
    x1, x2 = x[..., :d], x[..., d:]
    cos, sin = cos[:, None, :].to(x.dtype), sin[:, None, :].to(x.dtype)
    return torch.cat([x1 * cos + x2 * sin, x2 * cos - x1 * sin], dim=-1)


# %% [markdown]
# A rotation keeps lengths, and the score of a rotated pair only depends on how far apart they are: shifting both
# positions by the same amount leaves it unchanged (up to the bf16 rounding of the tables).

# %%
torch.manual_seed(0)
_cos, _sin = rotary_tables(256, 64)
_q, _k = F.normalize(torch.randn(2, 1, 1, 1, 64), dim=-1)  # unit vectors: the score is a cosine
def _score(m, n):
    "q at position m against k at position n."
    return (apply_rotary(_q, _cos[m:m + 1], _sin[m:m + 1]) * apply_rotary(_k, _cos[n:n + 1], _sin[n:n + 1])).sum()
test_close(apply_rotary(_q, _cos[77:78], _sin[77:78]).norm(), _q.norm(), eps=1e-2)
for shift in (1, 50, 150):
    test_close(_score(30, 10), _score(30 + shift, 10 + shift), eps=1e-2)

# %% [markdown]
# The left panel follows one channel pair of a vector as the position advances, for a fast, a middle and a slow
# frequency: the first pair spins by one radian per step, the slowest barely moves over these 40 positions. The right
# panel is the score of a query against copies of itself placed further and further back: near 1 up close, then
# oscillating and fading with distance. The many frequencies together let a head tell "one token ago" from "a
# paragraph ago".

# %%
#| fig-alt: "Left: three rotary pairs trace circles at different speeds over positions. Right: cosine between a query and rotated copies of itself falls with distance."
fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
_pos = torch.arange(0, 40)
_c, _s = rotary_tables(40, 64)
for i, color in [(0, "C0"), (8, "C1"), (24, "C2")]:
    ax1.plot(_c[_pos, i], _s[_pos, i], "o-", color=color, ms=3, lw=0.8, label=f"pair {i}: θ = {10000 ** (-2 * i / 64):.3g} rad/step")
ax1.set_aspect("equal"); ax1.set_title("one pair (cos, sin) over positions 0..39"); ax1.legend(fontsize=8, loc="lower left")
_c, _s = rotary_tables(1024, 64)
_u = torch.randn(1, 1, 1, 64)
_q0 = norm(apply_rotary(_u, _c[1023:], _s[1023:]))
_keys = norm(apply_rotary(_u.expand(1, 1024, 1, 64), _c, _s))
_scores = (_q0 * _keys).sum(-1).flatten().flip(0) / 64  # cosine similarity, index = distance back
ax2.plot(_scores); ax2.set_xlabel("distance m − n"); ax2.set_ylabel("cosine(q, k)")
ax2.set_title("same vector, rotated: score vs relative distance")
plt.tight_layout(); plt.show()


# %% [markdown]
# ## Attention, and the KV cache it writes to
#
# During training the model sees whole sequences, and causal attention lets position *t* look at positions ≤ *t*.
# When generating, running the whole prefix through the model again for every new token would waste almost all of
# the work; instead each layer keeps its keys and values in a **KV cache**, and a new token only computes its own.
#
# nanochat's cache is one tensor for all layers, `(n_layer, 2, B, n_kv_head, T, head_dim)`, allocated at the first
# insert with the dtype and device of the keys. Each layer writes its new keys/values at the current position and
# gets back everything so far; the position moves on only after the **last** layer has written, because all layers
# handle the same tokens. If a generation runs past the reserved length the time axis grows in steps of 1,024.
#
# `expand` serves the inference engine: prefill a prompt once at batch 1, then copy that cache into a cache with one
# row per sample, and decode all samples together.

# %%
#| export
class KVCache:
    "Keys and values of every layer for a batch of rows that share one position."

    def __init__(self, batch_size, num_kv_heads, seq_len, head_dim, num_layers):
        self.shape = (num_layers, 2, batch_size, num_kv_heads, seq_len, head_dim)
        self.kv = None  # allocated at the first insert, with the keys' dtype and device
        self.pos = 0

    def reset(self):
        "Forget the contents (the buffer is kept)."
        self.pos = 0

    def get_pos(self):
        "Number of positions already cached."
        return self.pos

    def insert_kv(self, layer_idx, k, v):
        "Write `k`, `v` (B, H, T, D) of layer `layer_idx` at the current position; return all keys and values so far."
        L, _, B, H, _, D = self.shape
        if (k.size(0), k.size(1), k.size(3)) != (B, H, D) or k.shape != v.shape:
            raise ValueError(f"this KVCache holds (B, H, D) = ({B}, {H}, {D}); got k {tuple(k.shape)}, "
                             f"v {tuple(v.shape)}: build it with the model's n_kv_head and head_dim")
        if self.kv is None:
            self.kv = torch.empty(self.shape, dtype=k.dtype, device=k.device)
        t0, t1 = self.pos, self.pos + k.size(2)
        if t1 > self.kv.size(4):  # grow the time axis to a multiple of 1024 with room to spare
            extra = list(self.kv.shape)
            extra[4] = (t1 + 1024 + 1023) // 1024 * 1024 - self.kv.size(4)
            self.kv = torch.cat([self.kv, self.kv.new_empty(extra)], dim=4)
            self.shape = tuple(self.kv.shape)
        self.kv[layer_idx, 0, :, :, t0:t1] = k
        self.kv[layer_idx, 1, :, :, t0:t1] = v
        if layer_idx == L - 1:  # every layer has seen these tokens: move on
            self.pos = t1
        return self.kv[layer_idx, 0, :, :, :t1], self.kv[layer_idx, 1, :, :, :t1]


# %%
_cache = KVCache(batch_size=1, num_kv_heads=2, seq_len=8, head_dim=4, num_layers=2)
for layer in range(2):
    _k, _v = _cache.insert_kv(layer, torch.randn(1, 2, 3, 4), torch.randn(1, 2, 3, 4))
    print(f"after layer {layer}: returned {tuple(_k.shape)}, position {_cache.get_pos()}")
test_fail(lambda: _cache.insert_kv(0, torch.randn(1, 3, 1, 4), torch.randn(1, 3, 1, 4)), contains="n_kv_head")


# %% [markdown]
# `expand` is the engine's: one prompt prefilled at batch 1, copied into as many rows as samples are wanted.

# %%
#| export
@patch
def expand(self: KVCache, num_rows, seq_len=None):
    "A new cache with `num_rows` copies of this batch-1 cache, with room for `seq_len` positions."
    L, _, B, H, T, D = self.shape
    if B != 1:
        raise ValueError(f"expand copies a batch-1 cache (one prefilled prompt); this one has {B} rows")
    out = KVCache(num_rows, H, max(seq_len or T, self.pos), D, L)
    if self.kv is not None:
        out.kv = self.kv.new_empty(out.shape)
        out.kv[:, :, :, :, :self.pos] = self.kv[:, :, :, :, :self.pos]  # broadcasts over the rows
    out.pos = self.pos
    return out


# %%
_big = _cache.expand(4, seq_len=16)
test_eq((_big.pos, _big.kv.shape), (3, (2, 2, 4, 2, 16, 4)))
test_eq(_big.kv[:, :, 3, :, :3], _cache.kv[:, :, 0, :, :3])


# %% [markdown]
# The attention layer. Queries, keys and values come from three bias-free linear maps; RoPE rotates queries and keys,
# then **QK norm** RMS-normalises each head's query and key, which keeps the attention logits in a sane range without
# tuning (nanochat applies it after the rotation). `F.scaled_dot_product_attention` (SDPA) does the rest; on a GPU
# it runs flash attention, on a CPU a fused flash-style kernel too.
#
# One forward serves three situations, told apart by the number of queries `Tq` and keys `Tk`:
#
# - `Tq == Tk`: training, or a prompt into an empty cache: ordinary causal attention;
# - `Tq == 1`: decoding one token: it may look at every key, no mask;
# - otherwise a chunk of several tokens on top of a cached prefix: each query sees the whole prefix and the chunk
#   up to itself, a causal mask shifted right by the prefix length.
#
# With `n_kv_head < n_head` (grouped-query attention) each key/value head serves `n_head / n_kv_head` query heads.
# SDPA's `enable_gqa` does that without materialising copies, and only when the heads differ, so the usual
# `n_kv_head == n_head` training path takes the plain kernel.

# %%
#| export
class CausalSelfAttention(nn.Module):
    "Multi-head causal attention with RoPE, QK norm, grouped key/value heads and an optional KV cache."

    def __init__(self, config, layer_idx):
        super().__init__()
        self.layer_idx, self.n_head, self.n_kv_head = layer_idx, config.n_head, config.n_kv_head
        self.head_dim = config.head_dim
        C = config.n_embd
        self.c_q = nn.Linear(C, self.n_head * self.head_dim, bias=False)
        self.c_k = nn.Linear(C, self.n_kv_head * self.head_dim, bias=False)
        self.c_v = nn.Linear(C, self.n_kv_head * self.head_dim, bias=False)
        self.c_proj = nn.Linear(C, C, bias=False)

    def forward(self, x, cos, sin, kv_cache=None):
        "Attend over `x` (B, T, C) and the cached prefix, if any; rotary angles `cos`, `sin` for these T positions."
        B, T, C = x.shape
        q = self.c_q(x).view(B, T, self.n_head, self.head_dim)
        k = self.c_k(x).view(B, T, self.n_kv_head, self.head_dim)
        v = self.c_v(x).view(B, T, self.n_kv_head, self.head_dim)
        q, k = norm(apply_rotary(q, cos, sin)), norm(apply_rotary(k, cos, sin))
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # (B, H, T, D)
        if kv_cache is not None:
            k, v = kv_cache.insert_kv(self.layer_idx, k, v)
        Tq, Tk = q.size(2), k.size(2)
        gqa = self.n_kv_head != self.n_head
        if Tq == Tk:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa)
        elif Tq == 1:
            y = F.scaled_dot_product_attention(q, k, v, enable_gqa=gqa)
        else:
            mask = torch.ones(Tq, Tk, dtype=torch.bool, device=q.device).tril(diagonal=Tk - Tq)
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=gqa)
        return self.c_proj(y.transpose(1, 2).reshape(B, T, C))


# %% [markdown]
# ## The MLP and the block
#
# The feed-forward layer widens to 4·`n_embd`, applies **ReLU²** (ReLU, then square; the Primer architecture search
# found it beats GELU, and modded-nanogpt and nanochat adopted it), and projects back. A block adds attention and
# MLP to the residual stream, each reading a normalised copy of it.

# %%
#| export
class MLP(nn.Module):
    "4x-wide feed-forward with ReLU², no biases."

    def __init__(self, config):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd, bias=False)
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd, bias=False)

    def forward(self, x):
        "c_proj(relu(c_fc(x))²)."
        return self.c_proj(F.relu(self.c_fc(x)).square())


# %%
#| export
class Block(nn.Module):
    "Pre-norm transformer block: x + attn(norm(x)), then x + mlp(norm(x))."

    def __init__(self, config, layer_idx):
        super().__init__()
        self.attn = CausalSelfAttention(config, layer_idx)
        self.mlp = MLP(config)

    def forward(self, x, cos, sin, kv_cache=None):
        "One block on the residual stream `x` (B, T, C)."
        x = x + self.attn(norm(x), cos, sin, kv_cache)
        return x + self.mlp(norm(x))


# %% [markdown]
# The block as a picture: the residual stream runs straight up, and each sub-layer reads a normalised copy of it and
# adds its output back.

# %%
#| fig-alt: "A transformer block: the residual stream x runs up the left; a branch goes through RMSNorm, attention with RoPE and QK norm, and is added back; a second branch goes through RMSNorm and the ReLU-squared MLP and is added back."
fig, ax = plt.subplots(figsize=(6, 4.2))
boxes = [(0.6, "RMSNorm", "#e8e8e8"), (1.3, "attention (RoPE, QK norm)", "#dbe8f6"), (2.4, "RMSNorm", "#e8e8e8"),
         (3.1, "MLP: c_fc → ReLU² → c_proj", "#f6e3cf")]
ax.annotate("", xy=(0, 4.2), xytext=(0, -0.2), arrowprops=dict(arrowstyle="->", lw=2))
ax.text(0, -0.45, "x (B, T, C)", ha="center"), ax.text(0, 4.35, "to the next block", ha="center")
for y, label, colour in boxes:
    ax.add_patch(plt.Rectangle((0.9, y - 0.25), 2.6, 0.5, facecolor=colour, edgecolor="k"))
    ax.text(2.2, y, label, ha="center", va="center", fontsize=9)
for y0, y1, y_add in [(0.6, 1.3, 1.9), (2.4, 3.1, 3.7)]:
    ax.annotate("", xy=(0.9, y0), xytext=(0, y0 - 0.35), arrowprops=dict(arrowstyle="->"))  # branch out
    ax.annotate("", xy=(2.2, y1 - 0.25), xytext=(2.2, y0 + 0.25), arrowprops=dict(arrowstyle="->"))
    ax.annotate("", xy=(0.12, y_add), xytext=(2.2, y1 + 0.25), arrowprops=dict(arrowstyle="->"))  # add back
    ax.text(0, y_add, "+", ha="center", va="center", fontsize=14, bbox=dict(boxstyle="circle", fc="white"))
ax.set_xlim(-1, 4), ax.set_ylim(-0.7, 4.6), ax.axis("off")
ax.set_title("One pre-norm block: x + attn(norm(x)), then x + mlp(norm(x))")
plt.show()


# %% [markdown]
# ## The output head: softcapped logits
#
# The last hidden state goes through `lm_head` (not tied to the embedding) to one logit per vocabulary entry. Two
# details. The matrix has `padded_vocab_size` rows, a multiple of 64 that matmul kernels like; the extra rows are
# sliced off, so they never receive probability or gradient (for nanochat's 65,536 there is nothing to pad). Then
# the logits, in fp32, are squashed by a **softcap**, 15·tanh(z/15): linear near zero, bounded by ±15, so no logit
# can run away early in training.
#
# The simple version materialises the whole (B, T, vocab) tensor and hands it to `F.cross_entropy` with
# `ignore_index=-1` (positions whose target is -1 do not count, which later stages use to mask prompts).

# %%
#| export
def softcap_logits(x, weight, vocab_size, softcap=15.0):
    "Logits of `x` under `weight` (padded vocab), sliced to `vocab_size`, in fp32, squashed into (-softcap, softcap)."
    logits = F.linear(x, weight)[..., :vocab_size].float()
    return softcap * torch.tanh(logits / softcap)


# %%
_z = torch.linspace(-60, 60, 7)[None]
print(softcap_logits(_z[..., None], torch.ones(64, 1), 1).flatten())


# %% [markdown]
# ## The GPT
#
# Everything together: embedding → norm → blocks → norm → head. Three more pieces live on the model.
#
# - **Initialisation** (nanochat classic): every linear layer normal with std (1/√fan_in)·min(1, √(fan_out/fan_in)),
#   the embedding N(0, 1), and the output projections of attention and MLP **and `lm_head` set to zero**. So a fresh
#   model is the identity on its residual stream and predicts the uniform distribution: its loss is exactly ln V.
# - **Meta-device construction**: `build_model` creates the model on the meta device (shapes only, no memory, no
#   random numbers), moves it to the target with `to_empty`, then runs `init_weights`, which also rebuilds the rotary
#   tables (buffers, not saved in checkpoints). A d32 model does not get initialised twice, on the wrong device. On
#   CUDA the embedding is stored in bf16, as in nanochat. `GPT(config)` on its own gives a ready model too.
# - **Sampling**: `generate` prefills the prompt through a KV cache and then samples one token per step; temperature
#   0 is argmax, `top_k` keeps only the k most likely, and a seeded generator makes it reproducible.
#
# The rotary table covers ten times `sequence_len`, enough for any generation the book does.

# %%
#| export
def sample_next_token(logits, rng, temperature=1.0, top_k=None):
    "Next ids (B, 1) from `logits` (B, V): argmax at temperature 0, else top-k then sampling with generator `rng`."
    if temperature == 0:
        return logits.argmax(dim=-1, keepdim=True)
    if top_k is not None:
        kth = torch.topk(logits, min(top_k, logits.size(-1)), dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = F.softmax(logits / temperature, dim=-1)
    return torch.multinomial(probs, 1, generator=rng)


# %%
#| export
class GPT(nn.Module):
    "nanochat's classic GPT: one forward for training, prefill and KV-cache decode."

    def __init__(self, config):
        super().__init__()
        self.config = config
        V, C = config.padded_vocab_size, config.n_embd
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(V, C),
            h=nn.ModuleList([Block(config, i) for i in range(config.n_layer)])))
        self.lm_head = nn.Linear(C, V, bias=False)
        self.softcap = 15.0
        self.fused_loss = True  # use SoftcapCrossEntropy when training eagerly on a CPU (Going further)
        self.rotary_seq_len = 10 * config.sequence_len
        half = config.head_dim // 2
        self.register_buffer("cos", torch.empty(self.rotary_seq_len, half), persistent=False)
        self.register_buffer("sin", torch.empty(self.rotary_seq_len, half), persistent=False)
        if not self.lm_head.weight.is_meta:
            self.init_weights()


# %% [markdown]
# On the meta device the model is only shapes, so we can look at it before any weight exists:

# %%
with torch.device("meta"):
    _skeleton = GPT(GPTConfig(sequence_len=64, vocab_size=1000, n_layer=2, n_head=4, n_kv_head=2, n_embd=64))
print({name: tuple(p.shape) for name, p in _skeleton.named_parameters() if ".h.1." not in name})


# %% [markdown]
# The initialisation, added to the class with `@patch`. Zeroing the two output projections of every block and
# `lm_head` is what makes a fresh model the identity on its residual stream with uniform predictions.

# %%
#| export
@patch
@torch.no_grad()
def init_weights(self: GPT):
    "nanochat's classic initialisation; also (re)builds the rotary tables."
    for m in self.modules():
        if isinstance(m, nn.Linear):
            fan_out, fan_in = m.weight.shape
            nn.init.normal_(m.weight, std=min(1.0, math.sqrt(fan_out / fan_in)) / math.sqrt(fan_in))
    nn.init.normal_(self.transformer.wte.weight, std=1.0)
    nn.init.zeros_(self.lm_head.weight)
    for block in self.transformer.h:
        nn.init.zeros_(block.attn.c_proj.weight)
        nn.init.zeros_(block.mlp.c_proj.weight)
    device = self.lm_head.weight.device
    self.cos, self.sin = rotary_tables(self.rotary_seq_len, self.config.head_dim, device=device)
    if device.type == "cuda":  # nanochat keeps the embedding in bf16 on GPU: half the memory
        self.transformer.wte.to(dtype=torch.bfloat16)


# %% [markdown]
# The loss of the final hidden states is the simple head followed by `F.cross_entropy`; targets of -1 are ignored.
# (A faster head for CPU training, with the same losses and gradients, is in "Going further" at the end of the
# chapter.)

# %%
#| export
@patch
def head_loss(self: GPT, x, targets, loss_reduction="mean"):
    "Cross-entropy of final hidden states `x` (B, T, C) against `targets` (B, T): logits materialised, -1 ignored."
    logits = softcap_logits(x, self.lm_head.weight, self.config.vocab_size, self.softcap)
    return F.cross_entropy(logits.reshape(-1, logits.size(-1)), targets.reshape(-1), ignore_index=-1,
                           reduction=loss_reduction)


# %% [markdown]
# The forward pass: embedding → norm → blocks → norm → head. With a KV cache the rotary angles continue from the
# cached position, so a decoded token is rotated as it would be in a full forward.

# %%
#| export
@patch
def forward(self: GPT, idx, targets=None, kv_cache=None, loss_reduction="mean"):
    "Logits (B, T, vocab_size) in fp32, or the loss if `targets` are given ((B, T) with loss_reduction='none')."
    B, T = idx.shape
    if loss_reduction not in ("mean", "sum", "none"):
        raise ValueError(f"loss_reduction must be 'mean', 'sum' or 'none', got {loss_reduction!r}")
    T0 = 0 if kv_cache is None else kv_cache.pos
    if T0 + T > self.rotary_seq_len:
        raise ValueError(f"position {T0 + T} is beyond the rotary table ({self.rotary_seq_len} = 10 x "
                         f"sequence_len): raise sequence_len in GPTConfig")
    cos, sin = self.cos[T0:T0 + T], self.sin[T0:T0 + T]  # positions continue after the cached prefix
    x = self.transformer.wte(idx)
    if not torch.is_autocast_enabled(idx.device.type):
        x = x.to(self.lm_head.weight.dtype)  # a bf16 embedding (CUDA) used without autocast
    x = norm(x)
    for block in self.transformer.h:
        x = block(x, cos, sin, kv_cache)
    x = norm(x)
    if targets is None:
        return softcap_logits(x, self.lm_head.weight, self.config.vocab_size, self.softcap)
    loss = self.head_loss(x, targets, loss_reduction)
    return loss.view(B, T) if loss_reduction == "none" else loss


# %% [markdown]
# Sampling: `generate` prefills the prompt through a KV cache, then feeds back one sampled token per step.

# %%
#| export
@patch
@torch.inference_mode()
def generate(self: GPT, tokens, max_tokens, temperature=1.0, top_k=None, seed=42) -> Iterator[int]:
    "Yield `max_tokens` sampled token ids that continue `tokens` (batch 1, through a KV cache)."
    if len(tokens) == 0:
        raise ValueError("generate needs at least one prompt token (e.g. <|bos|>)")
    if len(tokens) + max_tokens > self.rotary_seq_len:
        raise ValueError(f"prompt + max_tokens = {len(tokens) + max_tokens} is beyond the rotary table "
                         f"({self.rotary_seq_len}): generate fewer tokens")
    device, c = self.lm_head.weight.device, self.config
    rng = torch.Generator(device=device).manual_seed(seed)
    cache = KVCache(1, c.n_kv_head, len(tokens) + max_tokens, c.head_dim, c.n_layer)
    idx = torch.tensor([tokens], dtype=torch.long, device=device)
    for _ in range(max_tokens):
        logits = self.forward(idx, kv_cache=cache)[:, -1, :]
        idx = sample_next_token(logits, rng, temperature, top_k)
        yield idx.item()


# %%
#| export
def build_model(config, device="cpu"):
    "A GPT built on the meta device, materialised on `device` (None: autodetect) and initialised."
    device = get_device(device)
    with torch.device("meta"):
        model = GPT(config)
    model.to_empty(device=device)
    model.init_weights()
    return model


# %% [markdown]
# A fresh model: the zeroed projections and `lm_head` make its predictions uniform, so the loss is ln V, and the
# logits come back in fp32 with exactly `vocab_size` columns though `lm_head` has `padded_vocab_size` rows.

# %%
torch.manual_seed(0)
tiny = GPTConfig(sequence_len=64, vocab_size=1000, n_layer=2, n_head=4, n_kv_head=2, n_embd=64)
model = build_model(tiny)
_idx = torch.randint(0, 1000, (2, 16))
_logits = model(_idx)
test_eq((_logits.shape, _logits.dtype, model.lm_head.weight.shape[0]), ((2, 16, 1000), torch.float32, 1024))
test_close(model(_idx, _idx).item(), math.log(1000), eps=1e-5)
for _block in model.transformer.h:
    test_eq((_block.attn.c_proj.weight.abs().sum().item(), _block.mlp.c_proj.weight.abs().sum().item()), (0.0, 0.0))
test_eq(model(_idx, torch.full_like(_idx, -1), loss_reduction="none").shape, (2, 16))


# %% [markdown]
# ## Counting parameters and FLOPs
#
# On the meta device a model has shapes and no storage, so even d32 is built instantly. The count is 12·L·d²
# (4·d² for attention, 8·d² for the MLP) plus 2·V·d for the untied embedding and head. The FLOPs per token are
# nanochat's estimate for a training step: 6 per weight that multiplies (the embedding only looks rows up), plus
# the attention scores and mixing, 12·L·H·head_dim·T.

# %%
#| export
@patch
def num_params(self: GPT):
    "Number of parameters."
    return sum(p.numel() for p in self.parameters())


@patch
def estimate_flops(self: GPT):
    "nanochat's training FLOPs per token: 6 per non-embedding weight, plus attention over sequence_len."
    c = self.config
    dense = self.num_params() - self.transformer.wte.weight.numel()
    return 6 * dense + 12 * c.n_layer * c.n_head * c.head_dim * c.sequence_len


# %%
lines = ["| depth | n_embd | heads | params | without wte | FLOPs/token |", "|---|---|---|---|---|---|"]
for d in (4, 6, 8, 12, 16, 20, 26, 32):
    with torch.device("meta"):
        m = GPT(GPTConfig.from_depth(d))
    n, c = m.num_params(), m.config
    lines.append(f"| {d} | {c.n_embd} | {c.n_head} | {n:,} | {n - c.padded_vocab_size * c.n_embd:,} | "
                 f"{m.estimate_flops():.3e} |")
    if d == 20:
        test_eq(n, 560_988_160)
        test_eq(n, 12 * 20 * 1280**2 + 2 * 65536 * 1280)
        test_eq(f"{n:,}", AT_SCALE["parameters"][0])  # the number every chapter quotes (chapter 00)
display(Markdown("\n".join(lines)))

# %% [markdown]
# ## Causality
#
# A language model must never peek ahead: changing token *t* may change the logits at positions ≥ *t* only. (The
# fresh model's `lm_head` is zero, which would make every logit 0 and the test vacuous, so we give it random weights.)

# %%
torch.manual_seed(1)
with torch.no_grad():
    for p in model.parameters():
        if p.abs().sum() == 0:
            p.normal_(std=0.05)
_a = torch.randint(0, 1000, (1, 24))
_b = _a.clone()
_b[0, 10] = (_b[0, 10] + 1) % 1000
with torch.no_grad():
    _la, _lb = model(_a), model(_b)
test_eq(torch.equal(_la[:, :10], _lb[:, :10]), True)
assert not torch.allclose(_la[:, 10:], _lb[:, 10:])

# %% [markdown]
# ## The KV cache in action
#
# Prefill a prompt, then feed one token at a time through the cache: the logits must match a single full forward
# over the whole sequence (fp32, to 1e-5). Then the other two paths: a chunk of several tokens on top of a cached
# prefix, and a batch-1 prefill expanded to several rows that decode different continuations. `model` is the tiny
# GQA model from above (4 query heads sharing 2 key/value heads), run on a batch of 3 rows.
#
# What the cache saves, drawn: without it, step t recomputes keys and values for all t tokens; with it, each step
# computes them for the one new token and reads the rest from the cache.

# %%
#| fig-alt: "Two grids of decode steps by token position: without a cache every earlier position is recomputed at each step; with a cache only the new position is computed and earlier ones are read from the cache."
fig, axes = plt.subplots(1, 2, figsize=(10, 3))
prompt, steps_shown = 4, 5
for ax, cached in zip(axes, (False, True)):
    for step in range(steps_shown):
        n = prompt + step + 1  # tokens whose keys/values this step needs
        for pos in range(n):
            new = pos == n - 1 or (step == 0 and pos < prompt + 1)
            colour = "tab:orange" if (new or not cached) else "tab:blue"
            ax.add_patch(plt.Rectangle((pos, steps_shown - 1 - step), 0.9, 0.9, color=colour, alpha=0.8))
    ax.set_xlim(0, prompt + steps_shown), ax.set_ylim(0, steps_shown)
    ax.set_yticks([i + 0.45 for i in range(steps_shown)],
                  [f"decode {steps_shown - 1 - i}" if i < steps_shown - 1 else "prefill" for i in range(steps_shown)])
    ax.set_xlabel("token position"), ax.set_title("with a KV cache" if cached else "without a cache")
axes[1].legend(handles=[plt.Rectangle((0, 0), 1, 1, color="tab:orange"), plt.Rectangle((0, 0), 1, 1, color="tab:blue")],
               labels=["keys/values computed", "read from the cache"], fontsize=8, loc="upper left", bbox_to_anchor=(1, 1))
plt.tight_layout()
plt.show()

# %%
torch.manual_seed(2)
_idx = torch.randint(0, 1000, (3, 20))
c = model.config
with torch.no_grad():
    full = model(_idx)
    cache = KVCache(3, c.n_kv_head, 20, c.head_dim, c.n_layer)
    steps = [model(_idx[:, :8], kv_cache=cache)]                       # prefill 8
    steps += [model(_idx[:, t:t + 1], kv_cache=cache) for t in range(8, 14)]  # decode 6
    steps += [model(_idx[:, 14:20], kv_cache=cache)]                    # a chunk of 6 on a prefix of 14
print("max |cached - full| =", (torch.cat(steps, 1) - full).abs().max().item())
test_close(torch.cat(steps, 1), full, eps=1e-5)
test_eq(cache.get_pos(), 20)

# %%
with torch.no_grad():
    one = KVCache(1, c.n_kv_head, 12, c.head_dim, c.n_layer)
    model(_idx[:1, :12], kv_cache=one)                     # prefill once, batch 1
    many = one.expand(3, seq_len=20)                       # copy into 3 rows
    _next = _idx[:, 12:14].clone()
    _next[0, 0], _next[2, 1] = 5, 7                        # different continuations per row
    _dec = model(_next, kv_cache=many)
    _ref = model(torch.cat([_idx[:1, :12].expand(3, 12), _next], 1))[:, 12:]
test_close(_dec, _ref, eps=1e-5)

# %% [markdown]
# ## Watching a model attend
#
# A tiny model (2 layers, 2 heads, width 64) can learn a pattern-continuation task in a few seconds. Each sequence
# repeats a random block of 4 to 16 tokens until it is 32 long. The first block is unpredictable, so its targets are
# set to -1 and ignored; after that every token can be predicted, if the model finds where the current token
# appeared before and copies what came next. The block length varies from row to row, so "look back a fixed
# distance" does not work: the model has to match content. Plain `torch.optim.AdamW` is enough here (chapter 03
# brings nanochat's optimizers).

# %%
torch.manual_seed(0)
T_copy, copy_vocab = 32, 64
copy_model = build_model(GPTConfig(sequence_len=T_copy, vocab_size=copy_vocab, n_layer=2, n_head=2, n_kv_head=2,
                                   n_embd=64))
opt = torch.optim.AdamW(copy_model.parameters(), lr=3e-3, betas=(0.9, 0.95), weight_decay=0.0)

def repeat_batch(B, period=None):
    "B rows of a random block (period 4..16) repeated to T_copy + 1 tokens; inputs, and targets with the first block ignored."
    p = torch.randint(4, 17, (B, 1)) if period is None else torch.full((B, 1), period)
    pos = torch.arange(T_copy + 1)[None]
    seq = torch.randint(0, copy_vocab, (B, 16)).gather(1, pos % p)
    x, y = seq[:, :-1], seq[:, 1:].clone()
    y[pos[:, 1:] <= p] = -1  # targets still inside the first block cannot be known
    return x, y

t0, losses = time.time(), []
for step in range(500):
    x, y = repeat_batch(32)
    loss = copy_model(x, y)
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    losses.append(loss.item())
print(f"500 steps in {time.time() - t0:.1f} s, loss {losses[0]:.2f} -> {sum(losses[-20:]) / 20:.3f} (ln 64 = 4.16)")
assert sum(losses[-20:]) / 20 < 0.5

# %%
#| fig-alt: "Training loss of the copy model on a log scale, flat and then dropping suddenly."
plt.figure(figsize=(6, 2.5)); plt.plot(losses); plt.yscale("log")
plt.xlabel("step"); plt.ylabel("loss"); plt.title("the loss drops suddenly once the circuit forms"); plt.show()

# %% [markdown]
# It continues a pattern it has never seen (greedy `generate`, through the KV cache):

# %%
torch.manual_seed(3)
_block = torch.randint(0, copy_vocab, (9,)).tolist()
_prompt = _block + _block[:4]
_out = list(copy_model.generate(_prompt, max_tokens=10, temperature=0))
_want = (_block * 3)[len(_prompt):len(_prompt) + 10]
print("prompt:  ", _prompt, "\nmodel:   ", _out, "\nexpected:", _want)
assert sum(a == b for a, b in zip(_out, _want)) >= 8


# %% [markdown]
# SDPA never shows its attention weights, so we recompute them from each layer's input (captured with a hook) with
# the same projections, rotation and QK norm.

# %%
#| fig-alt: "Four attention maps on a repeated block of 7 tokens: layer 0 heads attend to the previous token, layer 1 heads to the token after an earlier copy."
def attention_maps(model, idx):
    "Attention weights (n_layer, B, n_head, T, T), recomputed from each layer's captured input."
    inputs = []
    hooks = [b.attn.register_forward_pre_hook(lambda mod, args: inputs.append(args[0])) for b in model.transformer.h]
    with torch.no_grad():
        model(idx)
    for h in hooks:
        h.remove()
    B, T = idx.shape
    cos, sin = model.cos[:T], model.sin[:T]
    causal = torch.ones(T, T, dtype=torch.bool).tril()
    maps = []
    for block, x in zip(model.transformer.h, inputs):
        a = block.attn
        q = norm(apply_rotary(a.c_q(x).view(B, T, a.n_head, a.head_dim), cos, sin)).transpose(1, 2)
        k = norm(apply_rotary(a.c_k(x).view(B, T, a.n_kv_head, a.head_dim), cos, sin)).transpose(1, 2)
        k = k.repeat_interleave(a.n_head // a.n_kv_head, dim=1)
        scores = (q @ k.transpose(-1, -2)) / math.sqrt(a.head_dim)
        maps.append(scores.masked_fill(~causal, float("-inf")).softmax(-1))
    return torch.stack(maps).detach()

x, _ = repeat_batch(1, period=7)
maps = attention_maps(copy_model, x)
fig, axes = plt.subplots(1, 4, figsize=(15, 3.9))
for ax, (layer, head) in zip(axes, [(0, 0), (0, 1), (1, 0), (1, 1)]):
    ax.imshow(maps[layer, 0, head], cmap="viridis")
    ax.set_title(f"layer {layer}, head {head}"); ax.set_xlabel("key position"); ax.set_ylabel("query position")
fig.suptitle("attention on a block of 7 tokens repeated", y=1.02); plt.tight_layout(); plt.show()

# %% [markdown]
# Layer 0's heads sit just below the diagonal: they look at the **previous** token. Layer 1's heads draw stripes 6,
# 13, 20 … positions back: to the tokens that *followed* earlier copies of the current token, which are exactly the
# ones to predict. The two together are the **induction head** circuit, found in every trained transformer. In
# numbers, over a fresh batch:

# %%
torch.manual_seed(1)
x, y = repeat_batch(64)
maps = attention_maps(copy_model, x)
B, T = x.shape
prev = torch.zeros(T, T, dtype=torch.bool)
prev[torch.arange(1, T), torch.arange(T - 1)] = True
match = torch.zeros(B, T, T, dtype=torch.bool)
match[:, :, 1:] = x[:, None, :-1] == x[:, :, None]  # key k follows an earlier copy of the query's token
match &= torch.ones(T, T, dtype=torch.bool).tril()
prev_mass = (maps[0] * prev).sum(-1)[..., 1:].mean().item()
induction_mass = (maps[1] * match[:, None]).sum(-1).transpose(0, 1)[:, y != -1].mean().item()
print(f"layer 0: {prev_mass:.0%} of attention on the previous token (1/t on average if uniform)")
print(f"layer 1: {induction_mass:.0%} of attention on tokens that followed an earlier copy")
assert prev_mass > 0.3 and induction_mass > 0.5


# %% [markdown]
# ## Precision and speed
#
# nanochat trains in bf16 autocast on GPUs and in fp32 on CPUs. Some CPUs have bf16 matrix units (Intel's AMX,
# recent ARM cores), others emulate bf16 and are slower in it than in fp32; the cell below times one matmul on
# yours. Where bf16 is faster, autocast is an option on the CPU too: wrap the forward in
# `torch.autocast("cpu", dtype=torch.bfloat16)`. Matmuls and attention then run in bf16 while the residual stream
# (and the norms applied to it) and the softcapped logits stay fp32. The loss moves by bf16's rounding, not more:

# %%
def matmul_seconds(dtype, n=512, trials=5):
    "Best-of-`trials` time of one n x n matmul in `dtype` on this CPU."
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    best = float("inf")
    for _ in range(trials):
        t0 = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - t0)
    return best

print(f"this CPU: a bf16 matmul takes {matmul_seconds(torch.bfloat16) / matmul_seconds(torch.float32):.2f}× "
      "the time of an fp32 one (below 1 means bf16 is faster here)")

# %%
with torch.no_grad():
    x, y = repeat_batch(8)
    fp32_loss = copy_model(x, y).item()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        bf16_loss = copy_model(x, y).item()
print(f"fp32 {fp32_loss:.5f}  bf16 autocast {bf16_loss:.5f}")
test_close(bf16_loss, fp32_loss, eps=0.05)

# %% [markdown]
# Measured once, on the shared 2-core CPU this book was written on (one with bf16 matrix units), with
# `bench/train_throughput.py`: a full training step (forward, backward, gradient clipping, chapter 03's Muon and
# AdamW) of a d4 model at vocabulary 8,192, sequence 512, batch 8, in tokens per second. The machine was shared, so
# treat them as ±10%, and run the script to get your own machine's numbers.
#
# | | nanochat's classic code | this chapter |
# |---|---|---|
# | fp32, eager | 2,140 | 3,040 |
# | fp32, `torch.compile` | 3,350 | 3,310 |
# | bf16 autocast, eager | | 4,750 |
# | bf16 autocast, `torch.compile` | | 5,190 |
#
# (With plain AdamW as the optimizer, nanochat's model against this one: 2,850 → 3,520 in fp32 and
# 4,210 → 5,630 in bf16, eager.) The eager gain is the fused output head ("Going further", at the end of the
# chapter); the rest is kept lean: no copies of key/value heads when `n_kv_head == n_head`, rotary tables built once, and nothing in the training path that forces
# a synchronisation or depends on data, so `torch.compile(model)` traces it as one graph. bf16 buys about 1.6×
# rather than the 2.5× of a bare matmul: attention's CPU kernel is no faster in bf16, and with the matmuls sped up,
# attention and the elementwise work take more than half of the step.
#
# `torch.compile` works for training (checked here on the CPU; it is how nanochat trains on GPUs). It costs 10 to 60
# seconds of compilation per shape on a small CPU, so this check only runs with `nbdev-test --flags slow` (the test
# suite runs a tiny version):

# %%
#| slow
compiled = torch.compile(copy_model)
x, y = repeat_batch(4)
with torch.no_grad():
    test_close(compiled(x), copy_model(x), eps=1e-4)
compiled(x, y).backward()
copy_model.zero_grad(set_to_none=True)
torch.compiler.reset()  # drop the compiled graphs

# %% [markdown]
# ## At scale
#
# The speedrun model is d20: 20 layers, width 1,280, 10 heads of 128, a 65,536-token vocabulary and 2,048-token
# context, 560,988,160 parameters (of which 83,886,080 in the embedding and as many in `lm_head`), 3.49e9
# training FLOPs per token. What changes on 8×H100:
#
# - **Precision**: weights and optimizer state in fp32, the forward in bf16 autocast with TF32 matmuls allowed; the
#   embedding itself stored in bf16. Logits are converted to fp32 before the softcap and the loss.
# - **Attention**: SDPA dispatches to flash attention; the causal (B, H, T, T) score matrix is never built.
# - **Memory**: each GPU runs `device_batch_size = 32` rows of 2,048 tokens, 65,536 tokens per micro-step, and the
#   fp32 logits alone are 65,536 × 65,536 × 4 bytes = 17.2 GB, and the softcap and cross-entropy keep more tensors
#   of that size for the backward pass: the output head, not the transformer, is what decides the batch size.
#   nanochat's speedrun script lowers `device_batch_size` to 16 for d26 and up on 80 GB cards.
# - **Speed**: compiled, in bf16. MFU is measured against the H100's 989 TFLOP/s bf16 dense peak (nanochat's
#   constant). Time, tokens and FLOPs are those of chapter 00's table: the 21,400 steps of d20 take about 3 h,
#   ≈3.9e19 FLOPs.
# - The fused CPU head ("Going further", below) is not used there: `torch.compile` fuses the simple one, and on a
#   GPU our Python loop over chunks would launch too many small kernels. The idea carries over, though: a chunked head never holds the full
#   logits, and GPU libraries (Liger Kernel's fused linear cross-entropy, for one) do exactly that in a kernel.

# %%
display(Markdown(at_scale_table(["parameters", "training FLOPs", "base training time", "logits of one micro-batch"])))
test_eq(f"{32 * 2048 * 65_536 * 4 / 1e9:.1f}", AT_SCALE["logits of one micro-batch"][0].split()[0])


# %% [markdown]
# ## Summary
#
# `GPTConfig.from_depth(d)` sizes a model from one dial; `GPT` is nanochat's classic transformer (RoPE with QK norm,
# parameter-free RMSNorm, ReLU² MLP, untied softcapped head, zero-initialised projections) built on the meta device
# by `build_model`. One `forward` trains (loss, mean or per token, ignoring -1 targets), prefills and decodes
# through `KVCache`, whose `expand` turns one prefilled prompt into many rows. We checked causality, cache against
# full forward, fused head against simple head, and watched a two-layer model discover an induction head.
#
# **Exercises**
#
# 1. Set `rotary_tables(..., base=100000)` (nanochat HEAD's choice) in the RoPE figure: how does the score against
#    distance change? Retrain the copy model with it.
# 2. Train the copy model with `n_layer=1`. Can a single layer learn to copy? Look at its attention map.
# 3. Build `GPTConfig.from_depth(4, n_kv_head=1)` (multi-query attention): how many parameters and how much KV cache
#    memory per token does it save against `n_kv_head=2`?

# %% [markdown]
# ## Going further: a fused output head for the CPU
#
# On a small model the output head takes a large share of a CPU's time. At depth 4 with an 8,192 vocabulary and
# 4,096 tokens per step, the logits are 33.5M floats (134 MB), and the simple head runs about ten passes over
# tensors of that size: the division, `tanh`, multiplication, log-softmax and their backwards, plus a zero-filled
# gradient. Each pass streams 134 MB through memory; together they took a third of a training step.
#
# `SoftcapCrossEntropy` computes the same loss and the same gradients in one go, a chunk of rows at a time, so the
# chunk stays in cache while it is capped, normalised and differentiated. By hand: with t = tanh(z/15) and
# c = 15·t, the loss of a row is logsumexp(c) − c[target], and
#
# $$\frac{\partial\,\mathrm{loss}}{\partial z} = \big(\mathrm{softmax}(c) - \mathrm{onehot}(\mathrm{target})\big)\,(1 - t^2).$$
#
# Because the softcap bounds every logit to ±15, the exponentials cannot overflow, and the usual subtract-the-max
# pass of a log-softmax is not needed. The forward pass writes this gradient for each row and keeps it instead of
# the logits; the backward pass is then just the two matmuls of the linear layer, scaled by the incoming gradient
# (the mean's 1/N, or one weight per row with `reduction="none"`). The model takes this path when it trains on a
# CPU in eager mode; `torch.compile` fuses the simple version by itself, and GPUs keep nanochat's path.

# %%
#| export
def _softcap_ce_rows(z, safe, valid, softcap):
    "Losses of the rows of fp32 logits `z` (n, V); overwrites `z` with d(loss)/d(z) (0 where `valid` is False)."
    t = z.div_(softcap).tanh_()
    c = t * softcap
    picked = c.gather(1, safe)
    e = c.exp_()  # |c| <= softcap: exp cannot overflow, no max to subtract
    total = e.sum(1, keepdim=True)
    p = e.mul_(valid[:, None] / total)  # softmax; ignored rows become 0
    p.scatter_add_(1, safe, -valid[:, None].to(p.dtype))  # minus one-hot
    torch.mul(p, t.square_().neg_().add_(1), out=t)  # times 1 - t²; lands in z's memory
    return (total.log() - picked).squeeze(1)


# %% [markdown]
# The autograd function runs that over chunks of rows, keeps the gradient instead of the logits, and in the backward
# pass only applies the linear layer's two matmuls to it:

# %%
#| export
class SoftcapCrossEntropy(torch.autograd.Function):
    "lm_head + softcap + cross-entropy, chunk of rows by chunk: keeps d(loss)/d(logits) instead of the logits."

    @staticmethod
    def forward(ctx, x, weight, targets, vocab_size, softcap, reduction, chunk):
        "Loss of hidden states `x` (N, C) against `targets` (N,), `chunk` rows at a time; saves the logits' gradient."
        N, dev = x.size(0), x.device.type
        dt = torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else x.dtype  # matmul dtype
        with torch.autocast(dev, enabled=False):
            xc, w = x.to(dt), weight[:vocab_size].to(dt)
            valid = targets != -1
            safe = torch.where(valid, targets, 0)[:, None]
            losses = torch.empty(N, dtype=torch.float32, device=x.device)
            dlogits = torch.empty(N, vocab_size, dtype=dt, device=x.device)
            for i in range(0, N, chunk):
                j = min(i + chunk, N)
                if dt == torch.float32:  # compute straight into the saved buffer, then work in place
                    z = torch.mm(xc[i:j], w.t(), out=dlogits[i:j])
                else:
                    z = (xc[i:j] @ w.t()).float()
                losses[i:j] = _softcap_ce_rows(z, safe[i:j], valid[i:j], softcap)
                if dt != torch.float32:
                    dlogits[i:j] = z
            losses = losses * valid
        n_valid = valid.sum()
        out = {"mean": lambda: losses.sum() / n_valid, "sum": losses.sum, "none": lambda: losses}[reduction]()
        ctx.save_for_backward(xc, w, dlogits, n_valid)
        ctx.reduction, ctx.weight_meta, ctx.x_dtype = reduction, (weight.shape, weight.dtype), x.dtype
        return out

    @staticmethod
    def backward(ctx, g):
        "Gradients of `x` and `weight`: the linear layer's two matmuls on the saved logits' gradient."
        xc, w, dlogits, n_valid = ctx.saved_tensors
        if ctx.reduction == "none":  # one weight per row: scale rows of the small tensors, never dlogits
            r = g.to(xc.dtype)[:, None]
            dx, dw_v = (dlogits @ w) * r, dlogits.t() @ (xc * r)
        else:
            r = (g / n_valid if ctx.reduction == "mean" else g).to(xc.dtype)
            dx, dw_v = (dlogits @ w) * r, (dlogits.t() @ xc) * r
        shape, dtype = ctx.weight_meta
        dw = torch.zeros(shape, dtype=dtype, device=dw_v.device)
        dw[: dw_v.size(0)] = dw_v  # the padding rows get no gradient
        return dx.to(ctx.x_dtype), dw, None, None, None, None, None


# %% [markdown]
# Both heads must agree, losses and gradients, for every reduction and with ignored targets (vocabulary 1,000, so
# `lm_head` has 24 padding rows):

# %%
torch.manual_seed(0)
_x = torch.randn(300, 32, requires_grad=True)
_w = (torch.randn(1024, 32) * 0.3).requires_grad_()
_y = torch.randint(0, 1000, (300,))
_y[::7] = -1
for reduction in ("mean", "sum", "none"):
    grads = []
    for fused in (False, True):
        if fused:
            loss = SoftcapCrossEntropy.apply(_x, _w, _y, 1000, 15.0, reduction, 64)
        else:
            loss = F.cross_entropy(softcap_logits(_x, _w, 1000), _y, ignore_index=-1, reduction=reduction)
        upstream = torch.linspace(0.5, 1.5, loss.numel()).view(loss.shape)
        grads.append((loss.detach(), *torch.autograd.grad((loss * upstream).sum(), (_x, _w))))
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
test_eq(grads[1][2][1000:].abs().sum().item(), 0.0)  # padding rows untouched


# %% [markdown]
# The model takes the fused path through a second version of `head_loss`, patched over the simple one: when it
# trains eagerly on a CPU (gradients on, not being compiled) and `fused_loss` is on; otherwise it falls back to the
# simple head. The two must give the same loss and the same gradients on a whole model:

# %%
#| export
@patch
def head_loss(self: GPT, x, targets, loss_reduction="mean"):
    "Cross-entropy of final hidden states `x` (B, T, C): SoftcapCrossEntropy when training eagerly on a CPU."
    V = self.config.vocab_size
    if not (self.fused_loss and x.device.type == "cpu" and torch.is_grad_enabled()
            and not torch.compiler.is_compiling()):
        logits = softcap_logits(x, self.lm_head.weight, V, self.softcap)
        return F.cross_entropy(logits.reshape(-1, V), targets.reshape(-1), ignore_index=-1, reduction=loss_reduction)
    chunk = max(64, 2**22 // V)  # rows per chunk: 16 MB of fp32 logits, they stay in L3 cache
    return SoftcapCrossEntropy.apply(x.reshape(-1, x.size(-1)), self.lm_head.weight, targets.reshape(-1), V,
                                     self.softcap, loss_reduction, chunk)


# %%
x, y = repeat_batch(16)
results = {}
for fused in (False, True):
    copy_model.fused_loss = fused
    loss = copy_model(x, y)
    results[fused] = (loss.detach(), *torch.autograd.grad(loss, list(copy_model.parameters())))
for a, b in zip(results[False], results[True]):
    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
print(f"simple head {results[False][0].item():.6f}, fused head {results[True][0].item():.6f}")

# %%
#| hide
torch.set_num_threads(_saved_threads)
