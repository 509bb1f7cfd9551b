"""Tests of nanochat_nb.model (chapter 02): shapes, init, causality, KV cache, GQA, fused loss head, compile."""
import math

import pytest
import torch
import torch.nn.functional as F

from nanochat_nb.model import GPT, GPTConfig, KVCache, build_model, rotary_tables


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    "Tiny models: one thread avoids OpenMP synchronisation overhead on a busy machine."
    saved = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(saved)


def random_model(seed=0, **kw):
    "A small model whose zero-initialised weights are made random, so every path carries signal."
    cfg = dict(sequence_len=64, vocab_size=200, n_layer=2, n_head=4, n_kv_head=4, n_embd=64) | kw
    torch.manual_seed(seed)
    model = build_model(GPTConfig(**cfg))
    with torch.no_grad():
        for p in model.parameters():
            if p.abs().sum() == 0:
                p.normal_(std=0.05)
    return model


# --- configuration ---------------------------------------------------------------------------------------------

def test_from_depth_shapes():
    c3 = GPTConfig.from_depth(3)
    assert (c3.n_layer, c3.n_embd, c3.n_head, c3.n_kv_head, c3.head_dim) == (3, 192, 2, 2, 96)
    for d in (2, 4, 6, 12, 20, 32):
        c = GPTConfig.from_depth(d)
        assert (c.n_embd, c.head_dim, c.n_head) == (64 * d, 128, d // 2)
    c = GPTConfig.from_depth(4, vocab_size=8192, sequence_len=512, n_kv_head=1)
    assert (c.vocab_size, c.sequence_len, c.n_kv_head, c.n_head) == (8192, 512, 1, 2)


@pytest.mark.parametrize("make, words", [
    (lambda: GPTConfig.from_depth(5), "not divisible"),
    (lambda: GPTConfig.from_depth(4, n_kv_head=3), "multiple of n_kv_head"),
    (lambda: GPTConfig(n_embd=96, n_head=32, n_kv_head=32), "odd"),
    (lambda: GPTConfig.from_depth(4, heads=2), "unknown"),
    (lambda: GPTConfig.from_depth(0), "depth"),
    (lambda: GPTConfig(vocab_size=0), "vocab_size"),
])
def test_bad_configs_are_refused(make, words):
    with pytest.raises(ValueError, match=words):
        make()


def test_param_counts_and_flops():
    for d, expected in [(4, 36_700_160), (12, 185_597_952), (20, 560_988_160), (32, 1_879_048_192)]:
        model = build_model(GPTConfig.from_depth(d), "meta")
        assert model.num_params() == expected == 12 * d * (64 * d) ** 2 + 2 * 65536 * 64 * d
    c = model.config
    assert model.estimate_flops() == (6 * (expected - 65536 * c.n_embd)
                                      + 12 * c.n_layer * c.n_head * c.head_dim * c.sequence_len)
    d20 = build_model(GPTConfig.from_depth(20), "meta")
    assert round(d20.estimate_flops() / 1e9, 2) == 3.49


# --- construction and init -------------------------------------------------------------------------------------

def test_vocab_padding_and_logits():
    model = build_model(GPTConfig(sequence_len=32, vocab_size=1000, n_layer=1, n_head=1, n_kv_head=1, n_embd=64))
    assert model.lm_head.weight.shape == (1024, 64) and model.transformer.wte.weight.shape == (1024, 64)
    logits = model(torch.randint(0, 1000, (2, 7)))
    assert logits.shape == (2, 7, 1000) and logits.dtype == torch.float32


def test_zero_init_and_uniform_start():
    torch.manual_seed(0)
    model = GPT(GPTConfig(sequence_len=32, vocab_size=300, n_layer=2, n_head=2, n_kv_head=2, n_embd=64))
    assert model.lm_head.weight.abs().sum() == 0
    for block in model.transformer.h:
        assert block.attn.c_proj.weight.abs().sum() == 0 and block.mlp.c_proj.weight.abs().sum() == 0
        w = block.attn.c_q.weight  # std (1/sqrt(fan_in)) * min(1, sqrt(fan_out/fan_in)) = 1/8 here
        assert 0.1 < w.std().item() < 0.15
        assert all(lin.bias is None for lin in (block.attn.c_q, block.attn.c_k, block.attn.c_v, block.mlp.c_fc))
    assert 0.9 < model.transformer.wte.weight.std().item() < 1.1
    idx = torch.randint(0, 300, (2, 16))
    assert abs(model(idx, idx).item() - math.log(300)) < 1e-5


def test_build_model_rebuilds_rotary_buffers():
    model = build_model(GPTConfig(sequence_len=16, vocab_size=64, n_layer=1, n_head=2, n_kv_head=2, n_embd=64))
    cos, sin = rotary_tables(160, 32)
    assert torch.equal(model.cos, cos) and torch.equal(model.sin, sin)
    assert "cos" not in model.state_dict()  # buffers are rebuilt, never checkpointed
    assert model.cos.dtype == torch.float32 and torch.equal(model.cos, model.cos.bfloat16().float())


# --- forward ---------------------------------------------------------------------------------------------------

def reference_logits(model, idx):
    "nanochat's classic forward written out with explicit loops over heads and no SDPA, from the model's weights."
    c = model.config
    B, T = idx.shape
    eps = torch.finfo(torch.float32).eps
    rms = lambda x: x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)
    half = c.head_dim // 2
    freq = 10000.0 ** (-torch.arange(half, dtype=torch.float32) * 2 / c.head_dim)
    ang = torch.arange(T, dtype=torch.float32)[:, None] * freq[None]
    cos, sin = ang.cos().bfloat16().float(), ang.sin().bfloat16().float()  # classic rounds the tables to bf16

    def rope(v):  # (T, head_dim): pair channel i with channel i + half, rotate by -angle
        a, b = v[:, :half], v[:, half:]
        return torch.cat([a * cos + b * sin, -a * sin + b * cos], 1)

    x = rms(model.transformer.wte.weight[idx])
    mask = torch.ones(T, T, dtype=torch.bool).tril()
    for block in model.transformer.h:
        at = block.attn
        h = rms(x)
        q, k, v = h @ at.c_q.weight.T, h @ at.c_k.weight.T, h @ at.c_v.weight.T
        out = torch.zeros(B, T, c.n_embd)
        for b in range(B):
            for i in range(c.n_head):
                j = i // (c.n_head // c.n_kv_head)  # the kv head this query head reads
                qi = rms(rope(q[b, :, i * c.head_dim:(i + 1) * c.head_dim]))
                kj = rms(rope(k[b, :, j * c.head_dim:(j + 1) * c.head_dim]))
                att = (qi @ kj.T / math.sqrt(c.head_dim)).masked_fill(~mask, float("-inf")).softmax(-1)
                out[b, :, i * c.head_dim:(i + 1) * c.head_dim] = att @ v[b, :, j * c.head_dim:(j + 1) * c.head_dim]
        x = x + out @ at.c_proj.weight.T
        x = x + torch.relu(rms(x) @ block.mlp.c_fc.weight.T).pow(2) @ block.mlp.c_proj.weight.T
    logits = (rms(x) @ model.lm_head.weight.T)[..., :c.vocab_size]
    return 15 * torch.tanh(logits / 15)


@pytest.mark.parametrize("n_kv_head, vocab_size", [(4, 200), (2, 200), (1, 1000)])
def test_forward_matches_reference(n_kv_head, vocab_size):
    model = random_model(n_kv_head=n_kv_head, vocab_size=vocab_size)
    with torch.no_grad():
        model.lm_head.weight.normal_(std=1.0)  # logits large enough that the softcap bends them
        idx = torch.randint(0, vocab_size, (2, 20))
        torch.testing.assert_close(model(idx), reference_logits(model, idx), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("t", [0, 5, 17, 31])
def test_causality(t):
    model = random_model()
    a = torch.randint(0, 200, (2, 32))
    b = a.clone()
    b[:, t] = (b[:, t] + 1) % 200
    with torch.no_grad():
        la, lb = model(a), model(b)
    assert torch.equal(la[:, :t], lb[:, :t])
    assert not torch.allclose(la[:, t], lb[:, t])


def test_loss_none_and_ignore_index():
    model = random_model()
    idx = torch.randint(0, 200, (3, 10))
    targets = torch.randint(0, 200, (3, 10))
    targets[0, :4] = -1
    targets[2, 9] = -1
    for grad in (False, True):  # eager CPU training takes the fused head, evaluation the simple one
        with torch.set_grad_enabled(grad):
            per_token = model(idx, targets, loss_reduction="none")
            mean = model(idx, targets)
        assert per_token.shape == (3, 10)
        assert (per_token[targets == -1] == 0).all() and (per_token[targets != -1] > 0).all()
        torch.testing.assert_close(mean, per_token.sum() / (targets != -1).sum())
        logits = model(idx).detach()
        ref = F.cross_entropy(logits.view(-1, 200), targets.view(-1), ignore_index=-1, reduction="none")
        torch.testing.assert_close(per_token.detach().view(-1), ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("reduction", ["mean", "none", "sum"])
@pytest.mark.parametrize("vocab_size", [200, 4000])  # padded and unpadded; several chunks at 4000
def test_fused_head_matches_simple(reduction, vocab_size):
    model = random_model(vocab_size=vocab_size)
    idx = torch.randint(0, vocab_size, (4, 40))
    targets = torch.randint(0, vocab_size, (4, 40))
    targets[1, ::3] = -1
    results = []
    for fused in (True, False):
        model.fused_loss = fused
        model.zero_grad(set_to_none=True)
        loss = model(idx, targets, loss_reduction=reduction)
        (loss * torch.linspace(0.5, 2.0, loss.numel()).view(loss.shape)).sum().backward()
        results.append([loss.detach()] + [p.grad.clone() for p in model.parameters()])
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
    assert results[0][-1][vocab_size:].abs().sum() == 0  # padded lm_head rows get no gradient


def test_fused_head_under_bf16_autocast():
    model = random_model(vocab_size=1000)
    idx, targets = torch.randint(0, 1000, (2, 48)), torch.randint(0, 1000, (2, 48))
    results = []
    for fused in (True, False):
        model.fused_loss = fused
        model.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = model(idx, targets)
        loss.backward()
        assert loss.dtype == torch.float32
        results.append([loss.detach()] + [p.grad.clone() for p in model.parameters()])
    for a, b in zip(*results):
        assert a.dtype == torch.float32
        torch.testing.assert_close(a, b, rtol=2e-2, atol=2e-3)


def test_gqa_equals_repeated_heads():
    gqa = random_model(n_head=4, n_kv_head=2)
    mha = random_model(n_head=4, n_kv_head=4)
    rep = 2
    with torch.no_grad():
        for bg, bm in zip(gqa.transformer.h, mha.transformer.h):
            for name in ("c_q", "c_proj"):
                getattr(bm.attn, name).weight.copy_(getattr(bg.attn, name).weight)
            for name in ("c_k", "c_v"):  # kv head j serves query heads j*rep .. j*rep + rep - 1
                w = getattr(bg.attn, name).weight.view(2, 16, 64)
                getattr(bm.attn, name).weight.copy_(w.repeat_interleave(rep, dim=0).reshape(64, 64))
            bm.mlp.load_state_dict(bg.mlp.state_dict())
        mha.transformer.wte.weight.copy_(gqa.transformer.wte.weight)
        mha.lm_head.weight.copy_(gqa.lm_head.weight)
        idx = torch.randint(0, 200, (2, 24))
        torch.testing.assert_close(gqa(idx), mha(idx), rtol=1e-5, atol=1e-5)


# --- KV cache --------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("n_head, n_kv_head, B", [(4, 4, 1), (4, 2, 3), (4, 1, 2)])
def test_kv_cache_matches_full_forward(n_head, n_kv_head, B):
    model = random_model(n_head=n_head, n_kv_head=n_kv_head)
    idx = torch.randint(0, 200, (B, 30))
    c = model.config
    with torch.no_grad():
        full = model(idx)
        cache = KVCache(B, n_kv_head, 30, c.head_dim, c.n_layer)
        parts = [model(idx[:, :9], kv_cache=cache)]                        # prefill
        parts += [model(idx[:, t:t + 1], kv_cache=cache) for t in range(9, 16)]  # decode
        parts += [model(idx[:, 16:23], kv_cache=cache)]                   # chunk on a non-empty cache
        parts += [model(idx[:, 23:24], kv_cache=cache), model(idx[:, 24:30], kv_cache=cache)]
    torch.testing.assert_close(torch.cat(parts, 1), full, rtol=1e-5, atol=1e-5)
    assert cache.get_pos() == 30


def test_kv_cache_grows_past_its_length():
    model = random_model()
    idx = torch.randint(0, 200, (1, 40))
    c = model.config
    with torch.no_grad():
        full = model(idx)
        cache = KVCache(1, c.n_kv_head, 8, c.head_dim, c.n_layer)
        parts = [model(idx[:, :6], kv_cache=cache)] + [model(idx[:, t:t + 1], kv_cache=cache) for t in range(6, 40)]
    torch.testing.assert_close(torch.cat(parts, 1), full, rtol=1e-5, atol=1e-5)
    assert cache.kv.size(4) == 2048  # at position 9 of 8: 9 + 1024 rounded up to a multiple of 1024, as nanochat


def test_kv_cache_expand_for_many_samples():
    model = random_model(n_kv_head=2)
    c = model.config
    prompt = torch.randint(0, 200, (1, 11))
    nxt = torch.randint(0, 200, (4, 3))
    with torch.no_grad():
        one = KVCache(1, c.n_kv_head, 11, c.head_dim, c.n_layer)
        model(prompt, kv_cache=one)
        many = one.expand(4, seq_len=20)
        assert (many.pos, many.kv.shape[2], many.kv.shape[4]) == (11, 4, 20)
        out = torch.cat([model(nxt[:, t:t + 1], kv_cache=many) for t in range(3)], 1)
        ref = model(torch.cat([prompt.expand(4, 11), nxt], 1))[:, 11:]
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="batch-1"):
        many.expand(2)


def test_kv_cache_rejects_wrong_shapes_and_positions():
    cache = KVCache(2, 2, 8, 16, 1)
    with pytest.raises(ValueError, match="n_kv_head"):
        cache.insert_kv(0, torch.zeros(2, 4, 1, 16), torch.zeros(2, 4, 1, 16))
    model = random_model()
    with pytest.raises(ValueError, match="rotary"):
        model(torch.zeros(1, 641, dtype=torch.long))


# --- generation and training -----------------------------------------------------------------------------------

def test_generate_greedy_matches_naive_and_is_seeded():
    model = random_model()
    prompt = [5, 17, 3, 99]
    got = list(model.generate(prompt, max_tokens=8, temperature=0))
    seq = list(prompt)
    with torch.no_grad():
        for _ in range(8):
            seq.append(model(torch.tensor([seq]))[0, -1].argmax().item())
    assert got == seq[len(prompt):]
    assert list(model.generate(prompt, 8, top_k=1)) == got  # top-1 sampling is greedy
    a = list(model.generate(prompt, 12, temperature=1.0, seed=7))
    assert a == list(model.generate(prompt, 12, temperature=1.0, seed=7))
    assert a != list(model.generate(prompt, 12, temperature=1.0, seed=8))
    with pytest.raises(ValueError, match="prompt"):
        next(model.generate([], 3))


def test_tiny_model_overfits_one_batch():
    torch.manual_seed(0)
    model = build_model(GPTConfig(sequence_len=32, vocab_size=128, n_layer=2, n_head=2, n_kv_head=1, n_embd=64))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    idx = torch.randint(0, 128, (4, 32))
    x, y = idx[:, :-1], idx[:, 1:]
    for _ in range(150):
        loss = model(x, y)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    assert loss.item() < 0.05


def test_compile_matches_eager():
    model = random_model(n_layer=1, vocab_size=128)
    compiled = torch.compile(model, dynamic=False)
    idx, targets = torch.randint(0, 128, (2, 16)), torch.randint(0, 128, (2, 16))
    grads = []  # one graph (forward + backward of the training path) keeps compilation short
    for m in (compiled, model):  # compiled: simple head, traced; eager: fused head
        model.zero_grad(set_to_none=True)
        loss = m(idx, targets)
        loss.backward()
        grads.append([loss.detach()] + [p.grad.clone() for p in model.parameters()])
    torch.compiler.reset()
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
