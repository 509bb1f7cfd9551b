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
# # The inference engine
# > Turn a checkpoint into text, fast: a KV cache, batched samples from one prefill, and a calculator the model can call.

# %% [markdown]
# Pretraining (chapter 06) left us a checkpoint that nobody can talk to. Everything that follows (the chat surfaces,
# every evaluation, reinforcement learning) needs the same thing from it: *given these tokens, what comes next?*, asked
# thousands of times, for one conversation or for many samples at once. This chapter builds the piece that answers:
# nanochat's `Engine`.
#
# We build it in steps. First the obvious loop, which re-reads the whole sequence for every new token. Then the KV
# cache from chapter 02, which makes each step cost the same however long the text is, and a decode step trimmed to
# what one new token needs. Then many samples from one prompt, read once. Then tool use: the model writes
# `<|python_start|>12*7<|python_end|>`, the engine runs a small, safe calculator and pastes the answer back into the
# stream, marked so that RL (chapter 13) knows the model did not write it. Last, one loader that opens any checkpoint,
# ours or nanochat's own.
#
# *Pipeline:* the model and its `KVCache` (02), the tokenizer's special tokens (01) and checkpoints (05) come before;
# the chat surfaces (08), evaluation (10) and RL (13) generate through this engine.

# %%
#| default_exp engine

# %%
#| export
import ast, operator, tempfile, time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from fastcore.basics import patch

from nanochat_nb.checkpoint import STAGES, CheckpointError, checkpoint_dir, latest_step, load_model, load_model_dir
from nanochat_nb.model import GPT, KVCache, get_device, softcap_logits
from nanochat_nb.tokenizer import Tokenizer

# %%
#| hide
from collections import Counter

import matplotlib.pyplot as plt
from fastcore.test import test_eq, test_fail
from IPython.display import Markdown, display

from nanochat_nb.model import GPTConfig, build_model

# %% [markdown]
# ## A model to talk to
#
# We need a trained model to make the text readable. Point `run_dir` at a run that `make speedrun` finished (for
# example `"../runs/speedrun"`) to use its checkpoint; left at `None`, the chapter trains a tiny one in a temporary
# folder in about twenty seconds: a 2-layer model that has read a little of the standard library. It writes
# Python-looking text; its grammar is shaky, which is fine, since this chapter is about the machinery.

# %%
run_dir = None  # a run directory with a base checkpoint; None trains a tiny model here
demo_steps = 60


# %% [markdown]
# The recipe is a function, because the chat chapters (08) and anyone who wants a model to try something on need it
# too:

# %%
#| export
def demo_run(run_dir=None, steps=60):
    "A run directory (a new temporary one by default) with a tiny base model trained in ~20 s on a CPU."
    from nanochat_nb.data import prepare_data  # here, not at the top: generating needs none of the training code
    from nanochat_nb.pretrain import make_config, pretrain
    from nanochat_nb.tokenizer import train_tokenizer
    run_dir = Path(run_dir) if run_dir is not None else Path(tempfile.mkdtemp(prefix="nanochat_demo_"))
    train_tokenizer(run_dir, vocab_size=2048, max_chars=3_000_000)
    prepare_data(run_dir, max_docs=300)
    pretrain(run_dir, make_config("micro", depth=2, sequence_len=128, num_iterations=steps, eval_every=-1,
                                  sample_every=-1, save_every=-1, total_batch_size=1024), log=lambda *a: None)
    return run_dir


# %%
if run_dir is None:
    run_dir = demo_run(steps=demo_steps)
model, meta = load_model(run_dir, "base")
model.eval()
tokenizer = Tokenizer.load(Path(run_dir) / "tokenizer")
prompt = tokenizer.encode("def ", prepend="<|bos|>")
print(f"{model.num_params():,} parameters, step {meta['step']}, prompt {prompt}")


# %% [markdown]
# ## Sampling, one generator per row
#
# A step of generation turns the last position's logits into one token. At temperature 0 that is the argmax. Otherwise
# nanochat keeps the `top_k` largest logits, divides by the temperature and draws from the softmax.
#
# We draw with the *Gumbel-max trick*: add to each kept logit (divided by the temperature) the noise
# $-\log(-\log u)$ with $u$ uniform, and take the argmax. The winner is distributed exactly as a softmax draw, and the
# trick makes one thing easy that matters later: every row of a batch gets its **own** random generator, seeded with
# `seed + row`. A sample's tokens then depend on its seed, not on how many other samples were drawn beside it, so "8
# samples from one prompt" equals "8 runs, one sample each, seeds 42 to 49", which is how we test the batched engine.

# %%
#| export
def row_generators(seed, num_rows, device="cpu"):
    "One `torch.Generator` per row, row i seeded with `seed + i`: a row's draws do not depend on its batch."
    return [torch.Generator(device=device).manual_seed(seed + i) for i in range(num_rows)]


def sample_tokens(logits, rngs, temperature=1.0, top_k=None):
    "Next ids (B,) from `logits` (B, V): argmax at temperature 0, else Gumbel-max over the top-k, row i with rngs[i]."
    if temperature == 0:
        return logits.argmax(dim=-1)
    vals, ids = (torch.topk(logits, top_k, dim=-1) if top_k is not None and top_k < logits.size(-1)
                 else (logits, None))
    u = torch.stack([torch.rand(vals.size(-1), generator=g, device=vals.device) for g in rngs])
    pick = (vals / temperature - torch.log(-torch.log(u))).argmax(dim=-1)  # u = 0 gives -inf: never picked
    return pick if ids is None else ids.gather(1, pick[:, None]).squeeze(1)


# %% [markdown]
# Does the trick really sample from the softmax? Draw 20,000 times from five logits and compare the frequencies with
# the probabilities:

# %%
logits5 = torch.tensor([[2.0, 1.0, 0.5, 0.0, -1.0]])
rng = row_generators(0, 1)
counts = Counter(sample_tokens(logits5, rng, temperature=0.8).item() for _ in range(20_000))
probs = F.softmax(logits5[0] / 0.8, dim=-1)
freqs = torch.tensor([counts[i] / 20_000 for i in range(5)])
print("softmax  ", [f"{p:.3f}" for p in probs.tolist()])
print("sampled  ", [f"{f:.3f}" for f in freqs.tolist()])
assert (freqs - probs).abs().max() < 0.015
test_eq(set(Counter(sample_tokens(logits5, rng, 1.0, top_k=2).item() for _ in range(500))), {0, 1})  # top-k keeps 2


# %% [markdown]
# ## The simple way: re-read everything
#
# The most direct generator runs the model over the whole sequence, keeps the last position's logits, appends the
# sampled token and repeats. It is correct, and we keep it as the reference the fast engine must match.

# %%
#| export
@torch.inference_mode()
def generate_naive(model, tokens, max_tokens, temperature=1.0, top_k=None, seed=42):
    "Yield `max_tokens` ids continuing `tokens`, re-running the model over the whole sequence at every step."
    device = model.lm_head.weight.device
    rngs = row_generators(seed, 1, device)
    idx = torch.tensor([tokens], dtype=torch.long, device=device)
    for _ in range(max_tokens):
        nxt = sample_tokens(model(idx)[:, -1], rngs, temperature, top_k)
        idx = torch.cat([idx, nxt[:, None]], dim=1)
        yield nxt.item()


# %%
greedy = list(generate_naive(model, prompt, 24, temperature=0))
print(repr(tokenizer.decode(prompt + greedy)))


# %% [markdown]
# ## The KV cache: pay for each token once
#
# Step $t$ of the simple loop runs the model over $t$ tokens, although the keys and values of the first $t-1$ did not
# change since the last step. The `KVCache` of chapter 02 keeps them: the prompt is read once (the *prefill*), then
# each step feeds only the newest token, which attends over the cached keys. Here is the cost of one step against
# the position it generates, both ways:

# %%
#| hide
def time_per_token(step_fn, positions, repeats=5):
    "Fastest of `repeats` timings of `step_fn(pos)`, for each pos (the minimum filters out a busy machine)."
    out = []
    for pos in positions:
        ts = []
        for _ in range(repeats):
            t0 = time.perf_counter(); step_fn(pos); ts.append(time.perf_counter() - t0)
        out.append(min(ts))
    return out


# %% [markdown]
# Speed does not depend on what the weights say, so we time a depth-4 model with random weights and room for 1,024
# positions:

# %%
#| fig-alt: "Milliseconds per generated token against position, with and without the KV cache: without it the time grows with the position, with it the time stays nearly flat."
timing_model = build_model(GPTConfig.from_depth(4, vocab_size=tokenizer.vocab_size, sequence_len=1024)).eval()
c = timing_model.config
positions = list(range(16, 1024, 64))
seq = torch.randint(0, c.vocab_size, (1, positions[-1] + 1))
with torch.inference_mode():
    no_cache = time_per_token(lambda p: timing_model(seq[:, :p + 1]), positions)
    cache = KVCache(1, c.n_kv_head, positions[-1] + 1, c.head_dim, c.n_layer)
    timing_model(seq[:, :positions[-1]], kv_cache=cache)
    def cached_step(p):
        cache.pos = p  # pretend the prefix up to p is cached (its contents do not change the cost)
        timing_model(seq[:, p:p + 1], kv_cache=cache)
    with_cache = time_per_token(cached_step, positions)
fig, ax = plt.subplots(figsize=(6, 3))
ax.plot(positions, [t * 1e3 for t in no_cache], "o-", label="no cache: re-read all")
ax.plot(positions, [t * 1e3 for t in with_cache], "o-", label="KV cache: one new token")
ax.set(xlabel="position of the new token", ylabel="ms per token", title="Why the cache matters (depth 4, CPU)")
ax.legend(); plt.show()
print(f"at position {positions[-1]}: {no_cache[-1] * 1e3:.1f} ms without the cache, {with_cache[-1] * 1e3:.2f} ms with it")


# %% [markdown]
# Without the cache a step grows with the text (its attention even grows with the square), so a long answer costs
# the square of its length; with the cache a step costs about the same at position 500 as at 20.

# %% [markdown]
# ## A decode step for one token
#
# The model's `forward` serves training, prefill and decoding alike, and for one token per row much of its work is
# bookkeeping: three projections where one matmul would do, a general attention kernel built for long blocks, masks
# and transposes. On a small model on a CPU those fixed costs *are* the time. So decoding gets its own step, the same
# arithmetic specialised to $T = 1$:
#
# - q, k and v come from one matmul with the three weight matrices stacked (`fused_qkv`, built once per call);
# - rotary angles of a single position; q and k rotated and normalised together;
# - the new key and value written straight into the cache, and attention as two small matmuls and a softmax, with
#   query heads grouped by the key/value head they share (GQA);
# - no masks: one new token may attend to everything before it. (The optional `pad` is for rows whose prompts have
#   different lengths; it waits until "Many prompts at once" below.)

# %%
#| export
def fast_norm(x):
    "`norm` (F.rms_norm, default eps) in four plain ops: on a CPU its general kernel costs ~30 µs per call."
    return x * torch.rsqrt(x.square().mean(dim=-1, keepdim=True) + torch.finfo(x.dtype).eps)


def fused_qkv(model):
    "Per layer, the q, k and v projection weights stacked: one matmul instead of three when decoding."
    return [torch.cat([b.attn.c_q.weight, b.attn.c_k.weight, b.attn.c_v.weight]) for b in model.transformer.h]


def decode_step(model, idx, cache, qkv, pad=None):
    "Logits (B, V) for one new token per row `idx` (B,), appended to `cache`: the model's forward for T = 1, lean."
    c, t = model.config, cache.pos
    B, H, Hk, D = idx.size(0), c.n_head, c.n_kv_head, c.head_dim
    d, cos, sin = D // 2, model.cos[t], model.sin[t]
    if pad is not None:  # row b's first pad[b] cache slots are padding: its positions start after them
        cos, sin = model.cos[t - pad][:, None], model.sin[t - pad][:, None]
        hide = (torch.arange(t + 1, device=idx.device) < pad[:, None])[:, None, None]  # (B, 1, 1, t + 1)
    x = model.transformer.wte(idx)
    if not torch.is_autocast_enabled(idx.device.type):
        x = x.to(model.lm_head.weight.dtype)
    x = fast_norm(x)
    for layer, block in enumerate(model.transformer.h):
        h = F.linear(fast_norm(x), qkv[layer]).view(B, H + 2 * Hk, D)
        a, b = h[:, :H + Hk, :d], h[:, :H + Hk, d:]
        qk = fast_norm(torch.cat([a * cos + b * sin, b * cos - a * sin], dim=-1))  # rotate, then QK norm
        keys, values = cache.kv[layer, 0], cache.kv[layer, 1]  # (B, Hk, T, D)
        keys[:, :, t], values[:, :, t] = qk[:, H:], h[:, H + Hk:]
        q = qk[:, :H].view(B, Hk, H // Hk, D)  # query heads grouped by their key/value head
        att = (q @ keys[:, :, :t + 1].transpose(-1, -2)).mul_(D ** -0.5)
        att = (att if pad is None else att.masked_fill_(hide, float("-inf"))).softmax(dim=-1)
        x = x + F.linear((att @ values[:, :, :t + 1]).view(B, H * D), block.attn.c_proj.weight)
        x = x + F.linear(F.relu(F.linear(fast_norm(x), block.mlp.c_fc.weight)).square(), block.mlp.c_proj.weight)
    cache.pos = t + 1
    return softcap_logits(fast_norm(x), model.lm_head.weight, c.vocab_size, model.softcap)


# %% [markdown]
# It must give the logits of the model's own forward over the same cache, for a batch of rows and with grouped
# key/value heads too:

# %%
with torch.inference_mode():
    for n_kv_head in (c.n_head, 1):
        torch.manual_seed(0)
        m = build_model(GPTConfig(sequence_len=64, vocab_size=300, n_layer=2, n_head=4, n_kv_head=n_kv_head,
                                  n_embd=64))
        for p in m.parameters():
            p.data.normal_(0, 0.1)
        ids = torch.randint(0, 300, (3, 12))
        slow = KVCache(3, n_kv_head, 20, 16, 2)
        m(ids[:, :10], kv_cache=slow)
        fast = KVCache(3, n_kv_head, 20, 16, 2)
        m(ids[:, :10], kv_cache=fast)
        qkv = fused_qkv(m)
        for t in (10, 11):
            ref, got = m(ids[:, t:t + 1], kv_cache=slow)[:, -1], decode_step(m, ids[:, t], fast, qkv)
            assert torch.allclose(ref, got, atol=1e-5), (ref - got).abs().max()
print("decode_step == model.forward with the cache")

# %% [markdown]
# ## Many samples from one prompt
#
# RL (chapter 13) and pass@k evaluation want several answers to the same question. Reading the prompt once per
# sample would repeat identical work, so the engine prefills at batch 1, copies the cache into `num_samples` rows
# (`KVCache.expand`) and decodes every row together: one matmul with 8 rows costs little more than with one.
#
# ## Tools: the calculator
#
# nanochat's models learn (in midtraining and SFT) to call a calculator: they write `<|python_start|>`, an expression,
# `<|python_end|>`, and the engine pastes the result between `<|output_start|>` and `<|output_end|>`. The expression
# is model output, which is to say untrusted input, so we never hand it to `eval`. We parse it with Python's own
# parser and walk the tree, allowing only what the tool is for: numbers, `+ - * / //`, unary signs, brackets, string
# literals and `'text'.count('x')`. Everything else (names, attributes other than `count`, calls, `**`, comprehensions,
# lambdas) is refused with an error the model can read. Sizes are bounded up front: at most 1,000 characters, so no
# product can grow past about a thousand digits and no string past a thousand characters, and a nesting limit and a
# deadline bound the walk. Like nanochat, commas are dropped from an expression without quotes, so `1,234 + 1` works.

# %%
#| export
MAX_EXPR_CHARS, MAX_DEPTH, MAX_RESULT_BITS, MAX_SECONDS = 1000, 60, 4000, 0.05
_BINARY = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv,
           ast.FloorDiv: operator.floordiv}
_UNARY = {ast.UAdd: operator.pos, ast.USub: operator.neg}
_SYMBOLS = {ast.Pow: "**", ast.Mod: "%", ast.LShift: "<<", ast.RShift: ">>", ast.BitAnd: "&", ast.BitOr: "|",
            ast.BitXor: "^", ast.MatMult: "@"}


class CalculatorError(ValueError):
    "An expression the calculator refuses; the message is what the model gets to read."


def _walk(node, depth, deadline):
    "The value of an allowed expression tree, or CalculatorError."
    if depth > MAX_DEPTH or time.perf_counter() > deadline:
        raise CalculatorError("expression too complex")
    if isinstance(node, ast.Constant) and type(node.value) in (int, float, str):
        return node.value
    if isinstance(node, ast.BinOp) and type(node.op) in _BINARY:
        a, b = _walk(node.left, depth + 1, deadline), _walk(node.right, depth + 1, deadline)
        if isinstance(a, str) or isinstance(b, str):
            if isinstance(a, str) and isinstance(b, str) and isinstance(node.op, ast.Add):
                return a + b
            raise CalculatorError("text can only be joined with + or counted with .count()")
        return _BINARY[type(node.op)](a, b)
    if isinstance(node, ast.UnaryOp) and type(node.op) in _UNARY:
        v = _walk(node.operand, depth + 1, deadline)
        if isinstance(v, str):
            raise CalculatorError("a sign in front of text")
        return _UNARY[type(node.op)](v)
    if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "count"
            and len(node.args) == 1 and not node.keywords):
        text, sub = _walk(node.func.value, depth + 1, deadline), _walk(node.args[0], depth + 1, deadline)
        if isinstance(text, str) and isinstance(sub, str):
            return text.count(sub)
        raise CalculatorError(".count() counts text in text, as in 'strawberry'.count('r')")
    what = f"operator {_SYMBOLS.get(type(node.op), type(node.op).__name__)}" if isinstance(node, ast.BinOp) \
        else type(node).__name__
    raise CalculatorError(f"{what} not allowed; use + - * / // ( ) or 'text'.count('x')")


# %%
#| export
def calculator(expr):
    "Evaluate a tool call safely: the result as text, or 'Error: ...' (never raises, never runs code)."
    try:
        if not isinstance(expr, str) or len(expr) > MAX_EXPR_CHARS:
            raise CalculatorError(f"expression longer than {MAX_EXPR_CHARS} characters")
        if "'" not in expr and '"' not in expr:
            expr = expr.replace(",", "")  # 1,234 is a number to a reader; nanochat drops the commas too
        value = _walk(ast.parse(expr.strip(), mode="eval").body, 0, time.perf_counter() + MAX_SECONDS)
        if isinstance(value, str):
            raise CalculatorError("the result is text, not a number")
        if isinstance(value, int) and value.bit_length() > MAX_RESULT_BITS:
            raise CalculatorError("result too large")
        return str(value)
    except CalculatorError as e:
        return f"Error: {e}"
    except ZeroDivisionError:
        return "Error: division by zero"
    except (SyntaxError, ValueError):
        return "Error: not a valid expression"
    except Exception as e:  # RecursionError, MemoryError, OverflowError...: the model hears, the caller never does
        return f"Error: {type(e).__name__}"


# %%
examples = ["12*7", "1,234 + 1", "(3 + 4) / 2", "'strawberry'.count('r')", "10 // 3 - -2", "7 / 0", "2 ** 10",
            "__import__('os').system('ls')", "'a' * 10**9", "open('/etc/passwd')", "(lambda: 1)()", "x + 1",
            "9" * 500 + " * " + "9" * 499, "((" * 150 + "1" + "))" * 150]
rows = [(e if len(e) < 40 else e[:37] + "...", calculator(e)) for e in examples]
rows = [(e, r if len(r) < 50 else r[:47] + "...") for e, r in rows]
display(Markdown("| expression | result |\n|---|---|\n" + "\n".join(f"| `{e}` | {r} |" for e, r in rows)))
test_eq(calculator("12*7"), "84")
test_eq(calculator("'strawberry'.count('r')"), "3")
assert all(calculator(e).startswith("Error") for e in examples[5:12])


# %% [markdown]
# ## The engine: a state machine per row
#
# Each row of a batch remembers where it is: the tokens it has, tokens waiting to be *forced* (a tool's output), and
# whether a python block is open. Every step, a row that has forced tokens waiting takes the next one instead of its
# sample, with mask 0; otherwise it takes its sample, with mask 1. Then the row reacts to its token:
#
# - `<|assistant_end|>` or `<|bos|>`: the row is done; afterwards it repeats that token with mask 0, so that the
#   batch keeps its shape;
# - `<|python_start|>`: open a block and collect the tokens that follow;
# - `<|python_end|>`: decode the block, call the calculator, queue `<|output_start|>`, the result's tokens and
#   `<|output_end|>` to be forced, one per step.
#
# `generate` streams a column of tokens and a column of masks per step; `generate_batch` collects each row's tokens
# (the prompt, then what was generated, without the stop token) and masks (0 for the prompt and forced tokens).

# %%
#| export
@dataclass
class RowState:
    "One sample in flight: its tokens, tokens waiting to be forced, an open python block, done or not."
    tokens: list = field(default_factory=list)
    forced: deque = field(default_factory=deque)
    python: list | None = None  # the tokens of an open <|python_start|> block
    stop: int | None = None  # the token that ended the row


def _check_sampling(tokens, num_samples, max_tokens, temperature, top_k, vocab_size):
    "One clear ValueError for settings generation cannot use."
    if not tokens or not all(isinstance(t, int) and 0 <= t < vocab_size for t in tokens):
        raise ValueError(f"the prompt must be a non-empty list of token ids in [0, {vocab_size}); start it with "
                         "<|bos|> (tokenizer.encode(text, prepend='<|bos|>'))")
    if not (isinstance(num_samples, int) and num_samples >= 1):
        raise ValueError(f"num_samples must be an int >= 1, got {num_samples!r}")
    if max_tokens is not None and not (isinstance(max_tokens, int) and max_tokens >= 1):
        raise ValueError(f"max_tokens must be an int >= 1 (or None for the model's sequence_len), got {max_tokens!r}")
    if not (isinstance(temperature, (int, float)) and 0 <= temperature < float("inf")):
        raise ValueError(f"temperature must be a number >= 0 (0 = greedy), got {temperature!r}")
    if top_k is not None and not (isinstance(top_k, int) and top_k >= 1):
        raise ValueError(f"top_k must be an int >= 1, or None to keep every token, got {top_k!r}")


def _check_room(model, prompt_len, max_tokens):
    "max_tokens, or a ValueError if the prompt and max_tokens do not fit the model's positions."
    if prompt_len + max_tokens > getattr(model, "rotary_seq_len", float("inf")):
        raise ValueError(f"prompt ({prompt_len}) + max_tokens ({max_tokens}) is beyond the model's "
                         f"{model.rotary_seq_len} positions; fix: shorten the prompt or ask for fewer tokens")
    return max_tokens


# %%
#| export
class Engine:
    "Generate from a GPT with a KV cache: one prefill, many samples, nanochat's calculator tool."

    def __init__(self, model, tokenizer):
        self.model, self.tokenizer = model, tokenizer
        self.bos, self.end, self.py_start, self.py_end, self.out_start, self.out_end = map(tokenizer.encode_special, (
            "<|bos|>", "<|assistant_end|>", "<|python_start|>", "<|python_end|>", "<|output_start|>", "<|output_end|>"))

    def _advance(self, row, token):
        "Move one row's state machine by the token it just took."
        row.tokens.append(token)
        if token in (self.end, self.bos):
            row.stop = token
        elif token == self.py_start:
            row.python = []
        elif token == self.py_end and row.python is not None:
            result = calculator(self.tokenizer.decode(row.python))
            row.python = None
            row.forced.extend([self.out_start, *self.tokenizer.encode(result), self.out_end])
        elif row.python is not None:
            row.python.append(token)

    def _take(self, rows, sampled):
        "The column of tokens and masks of one step: forced tokens first, samples otherwise, stop tokens once done."
        column, masks = [], []
        for row, token in zip(rows, sampled):
            if row.stop is not None:
                column.append(row.stop); masks.append(0)
                continue
            forced = bool(row.forced)
            token = row.forced.popleft() if forced else token
            column.append(token); masks.append(0 if forced else 1)
            self._advance(row, token)
        return column, masks


# %% [markdown]
# Generation itself: check the settings, prefill, expand, then sample, take and decode until every row has stopped
# or `max_tokens` have been generated. A model that is not our `GPT` (the scripted model below, say) decodes through
# its own `forward`; `fast=False` does the same for a GPT, which is how we check the lean step inside the engine.

# %%
#| export
@patch
@torch.inference_mode()
def generate(self: Engine, tokens, num_samples=1, max_tokens=None, temperature=1.0, top_k=None, seed=42,
             fast=True):
    "Stream (token column, mask column) per step for `num_samples` continuations of `tokens`; mask 1 = sampled."
    m, c = self.model, self.model.config
    _check_sampling(tokens, num_samples, max_tokens, temperature, top_k, c.vocab_size)
    max_tokens = _check_room(m, len(tokens), max_tokens or max(1, c.sequence_len - len(tokens)))
    device = next(m.parameters()).device
    rngs = row_generators(seed, num_samples, device)
    prefill = KVCache(1, c.n_kv_head, len(tokens), c.head_dim, c.n_layer)
    logits = m(torch.tensor([tokens], dtype=torch.long, device=device), kv_cache=prefill)[:, -1]
    cache = prefill.expand(num_samples, len(tokens) + max_tokens)
    logits = logits.expand(num_samples, -1)
    qkv = fused_qkv(m) if fast and isinstance(m, GPT) else None
    rows = [RowState(tokens=list(tokens)) for _ in range(num_samples)]
    yield from self._decode(rows, logits, rngs, cache, qkv, max_tokens, temperature, top_k)


# %%
#| export
@patch
def _decode(self: Engine, rows, logits, rngs, cache, qkv, max_tokens, temperature, top_k, pad=None):
    "The loop: sample, take, yield the column, decode it, until every row has stopped or max_tokens are out."
    for _ in range(max_tokens):
        column, masks = self._take(rows, sample_tokens(logits, rngs, temperature, top_k).tolist())
        yield column, masks
        if all(row.stop is not None for row in rows):
            break
        idx = torch.tensor(column, dtype=torch.long, device=logits.device)
        logits = (decode_step(self.model, idx, cache, qkv, pad) if qkv is not None
                  else self.model(idx[:, None], kv_cache=cache)[:, -1])


# %%
#| export
@patch
def generate_batch(self: Engine, tokens, num_samples=1, **kwargs):
    "Every row's tokens (prompt + generated, without the stop token) and masks (0 for prompt and forced tokens)."
    results, masks = [list(tokens) for _ in range(num_samples)], [[0] * len(tokens) for _ in range(num_samples)]
    done = [False] * num_samples
    for column, mask_column in self.generate(tokens, num_samples, **kwargs):
        for i, (token, mask) in enumerate(zip(column, mask_column)):
            if done[i] or token in (self.end, self.bos):
                done[i] = True
                continue
            results[i].append(token)
            masks[i].append(mask)
    return results, masks


# %% [markdown]
# With the cache, the lean step and the engine's loop, greedy decoding must give exactly the tokens of the simple
# loop above, and the engine's own slow path must agree with its fast one:

# %%
engine = Engine(model, tokenizer)
cached, _ = engine.generate_batch(prompt, max_tokens=24, temperature=0)
slow, _ = engine.generate_batch(prompt, max_tokens=24, temperature=0, fast=False)
n = len(cached[0]) - len(prompt)
test_eq(cached[0][len(prompt):], greedy[:n])
test_eq(slow, cached)
print(repr(tokenizer.decode(cached[0])))

# %% [markdown]
# And the 8 samples of one batched call are the 8 single-sample calls with seeds 42 to 49:

# %%
batch, batch_masks = engine.generate_batch(prompt, num_samples=8, max_tokens=20, temperature=1.0, top_k=50, seed=42)
for i in range(8):
    single, _ = engine.generate_batch(prompt, num_samples=1, max_tokens=20, temperature=1.0, top_k=50, seed=42 + i)
    test_eq(single[0], batch[i])
print("\n".join(repr(tokenizer.decode(r[len(prompt):])) for r in batch[:4]))

# %% [markdown]
# ## Sampling settings side by side
#
# Temperature and top-k shape the text: at 0 the model always takes its favourite token, and repeats itself; as the
# temperature rises it ventures further, and top-k cuts off the long tail of unlikely tokens that makes high
# temperatures babble.

# %%
settings = [(0.0, None), (0.6, 50), (1.0, 50), (1.0, None), (1.5, None)]
table = []
for temperature, top_k in settings:
    (row,), _ = engine.generate_batch(prompt, max_tokens=30, temperature=temperature, top_k=top_k, seed=1)
    text = tokenizer.decode(row[len(prompt):]).replace("\n", "⏎").replace("|", "¦")
    table.append(f"| {temperature} | {top_k} | `{text[:90]}` |")
display(Markdown("| temperature | top-k | continuation of `def ` |\n|---|---|---|\n" + "\n".join(table)))


# %% [markdown]
# ## A tool call, token by token
#
# The base model has never seen a tool call, so to watch the state machine we drive the engine with a *scripted
# model*: a stand-in with the GPT's interface whose logits always pick the next token of a script, whatever it is
# fed. It writes a question's working as a tool call; the engine must run the calculator and force the result.

# %%
#| export
class ScriptedModel(torch.nn.Module):
    "A stand-in for a GPT that emits `script` token by token (then `<|assistant_end|>`), whatever it is fed."

    def __init__(self, script, config, end_id):
        super().__init__()
        self.scripts = script if isinstance(script, dict) else None  # {prompt as a tuple: its script}, or one script
        self.script, self.config, self.end_id = [] if self.scripts else list(script), config, end_id
        self.dummy = torch.nn.Parameter(torch.zeros(1))  # so the engine can find a device
        self.fed, self.prompts, self.decoding = 0, [], False  # fed: tokens after the prompt, the script position

    def forward(self, idx, kv_cache=None):
        "One-hot logits (B, T, V) for the next scripted token at every position (row r: its prompt's script)."
        B, T = idx.shape
        prompts = self.prompts  # the rows: each prompt's samples side by side
        if kv_cache is not None:
            if kv_cache.pos == 0:  # a prefill, of a new generation if the last one decoded or ended at once
                done = self.decoding or all(self._script(p)[:1] in ([], [self.end_id]) for p in self.prompts)
                prompts = [tuple(r) for r in idx.tolist()]
                self.prompts = ([] if done else self.prompts) + prompts
                self.fed, self.decoding = 0, False
            else:
                self.fed, self.decoding = self.fed + T, True
            kv_cache.pos += T
        logits = torch.full((B, T, self.config.vocab_size), -1e4)
        for r in range(B):
            script = self._script(prompts[r * len(prompts) // B] if prompts else None)
            logits[r, :, script[self.fed] if self.fed < len(script) else self.end_id] = 1e4
        return logits

    def _script(self, prompt):
        "The script of a prompt: the one script, or the prompt's own."
        return self.script if self.scripts is None else self.scripts[prompt]


# %% [markdown]
# The script writes `<|python_start|>`, `12*7`, `<|python_end|>`, and then, after the forced output, "The answer is 84".
# While the engine forces the calculator's output the scripted model keeps being fed, so its script has filler
# tokens (here `?`) at those positions: whatever it "wants" there is overruled. The trace shows each step's token,
# who wrote it (mask 1: the model, 0: forced) and the row's state:

# %%
sp = tokenizer.encode_special
out_ids = [sp("<|output_start|>"), *tokenizer.encode("84"), sp("<|output_end|>")]
script = ([sp("<|python_start|>"), *tokenizer.encode("12*7"), sp("<|python_end|>")]
          + tokenizer.encode("?") * len(out_ids) + tokenizer.encode(" The answer is 84") + [sp("<|assistant_end|>")])
scripted = Engine(ScriptedModel(script, model.config, sp("<|assistant_end|>")), tokenizer)
trace = []
for column, masks in scripted.generate([tokenizer.bos_id], max_tokens=40):
    token, mask = column[0], masks[0]
    shown = tokenizer.decode([token]).replace("|", "\\|").replace("\n", "⏎")  # a table cell needs | escaped
    trace.append(f"| {len(trace)} | `{shown}` | {mask} |")
display(Markdown("| step | token | mask |\n|---|---|---|\n" + "\n".join(trace)))
(tool_row,), (tool_mask,) = scripted.generate_batch([tokenizer.bos_id], max_tokens=40)
assert [t for t, m in zip(tool_row, tool_mask) if m == 0][1:] == out_ids  # the result is forced, masked 0

# %% [markdown]
# ## Many prompts at once
#
# Evaluation (chapter 10) asks the other kind of "many": 256 *different* questions, one greedy reply each. Asked one
# at a time, through `generate`, every reply is decoded at batch 1, and on a CPU a batch-1 decode step is mostly
# fixed cost: reading the weights, launching a dozen small kernels. Here is what one decode step costs as the batch
# grows, for the depth-4 timing model at position 100:

# %%
#| fig-alt: "Time of one decode step against the number of rows decoded together: it grows far more slowly than the batch, so each row costs less in a batch."
with torch.inference_mode():
    batch_sizes, qkv_t = [1, 2, 4, 8, 16, 32], fused_qkv(timing_model)
    def step_at(B):
        cache = KVCache(B, c.n_kv_head, 128, c.head_dim, c.n_layer)
        cache.kv, cache.pos = torch.zeros(cache.shape), 100
        idx = torch.zeros(B, dtype=torch.long)
        return lambda _: (setattr(cache, "pos", 100), decode_step(timing_model, idx, cache, qkv_t))
    per_step = [time_per_token(step_at(B), [0], repeats=10)[0] for B in batch_sizes]
fig, ax = plt.subplots(figsize=(6, 3))
ax.plot(batch_sizes, [t * 1e3 for t in per_step], "o-", label="one decode step")
ax.plot(batch_sizes, [t * 1e3 / B for t, B in zip(per_step, batch_sizes)], "o-", label="per row")
ax.set(xscale="log", xticks=batch_sizes, xticklabels=batch_sizes, xlabel="rows in the batch", ylabel="ms",
       title="Batched decoding is nearly free per row (depth 4, CPU)")
ax.legend(); plt.show()
print(", ".join(f"batch {B}: {t * 1e3:.2f} ms" for B, t in zip(batch_sizes, per_step)))


# %% [markdown]
# A step for 8 rows costs little more than a step for one, so decoding 8 questions together is nearly 8 times the
# replies per second. The catch is that the rows of a batch share one cache position, and the questions have prompts
# of different lengths (the 256 arithmetic prompts of chapter 10 come in about 40 lengths). Two ways out:
#
# - **Buckets.** Prompts of equal length share a position: stack them and decode, nothing else changes. This works
#   for any model, the scripted one below included.
# - **Left padding.** Put each prompt at the right end of its cache row, so that all rows end at the same slot, and
#   let row $b$ skip its first `pad[b]` slots: its positions (the rotary angles) count from its first real token, and
#   attention never looks at the padding. That is the `pad` argument of `decode_step`: a mask of $-\infty$ on the
#   padding slots before the softmax, and the angles of slot $-$ `pad[b]`. Any prompts can then share a batch.
#
# Either way, each prompt is *read* alone, at batch 1, exactly as `generate` reads it (one forward pass per prompt,
# small next to the hundred or more decode steps of a reply), and its keys and values are copied into its rows:

# %%
#| export
def prefill_rows(model, prompts, num_samples, seq_len):
    "(cache, logits, pad): each prompt read alone as `generate` does, in `num_samples` rows, right-aligned."
    c, device, T, n = model.config, next(model.parameters()).device, max(map(len, prompts)), num_samples
    cache, logits = KVCache(len(prompts) * n, c.n_kv_head, seq_len, c.head_dim, c.n_layer), []
    for i, tokens in enumerate(prompts):
        one = KVCache(1, c.n_kv_head, len(tokens), c.head_dim, c.n_layer)
        out = model(torch.tensor([tokens], dtype=torch.long, device=device), kv_cache=one)[:, -1]
        logits.append(out.expand(n, -1))
        if one.kv is not None:  # (a scripted model keeps no keys)
            if cache.kv is None:
                cache.kv = one.kv.new_zeros(cache.shape)  # zeros: padding is hidden, but must not be NaN
            cache.kv[:, :, i * n:(i + 1) * n, :, T - len(tokens):T] = one.kv[:, :, :, :, :len(tokens)]
    cache.pos = T
    pad = torch.tensor([T - len(tokens) for tokens in prompts for _ in range(n)], device=device)
    return cache, torch.cat(logits), pad


def _seeds(seed, n):
    "One seed per prompt: `seed` for all of them, or a list of n."
    seeds = [seed] * n if isinstance(seed, int) else list(seed)
    if len(seeds) != n or not all(isinstance(s, int) for s in seeds):
        raise ValueError(f"seed must be an int or a list of {n} ints (one per prompt), got {seed!r}")
    return seeds


# %% [markdown]
# `generate_rows` is `generate` for several prompts: prompt $p$'s sample $j$ is row $p \cdot n + j$ and draws with
# its own generator, seeded `seed[p] + j`, where `seed` is one int for every prompt or a list with one per prompt.
# That is the promise: **a prompt's rows are the rows of `generate(prompt, n, seed=its seed)`**, whatever other
# prompts share the batch. Prompts of different lengths need the lean decode step of a GPT (the padding lives there);
# with the model's own `forward` they must have equal lengths.

# %%
#| export
@patch
@torch.inference_mode()
def generate_rows(self: Engine, prompts, num_samples=1, max_tokens=None, temperature=1.0, top_k=None, seed=42,
                  fast=True):
    "`generate` for many prompts at once: row p*num_samples + j is prompt p's sample j, drawn with seed[p] + j."
    m, c = self.model, self.model.config
    if not prompts:
        raise ValueError("generate_rows needs at least one prompt")
    seeds = _seeds(seed, len(prompts))
    for tokens in prompts:
        _check_sampling(tokens, num_samples, max_tokens, temperature, top_k, c.vocab_size)
    T = max(map(len, prompts))
    qkv = fused_qkv(m) if fast and isinstance(m, GPT) else None
    if qkv is None and min(map(len, prompts)) < T:
        raise ValueError("prompts of different lengths need the lean decode step of a GPT (fast=True); "
                         "fix: pass prompts of one length (generate_many groups them)")
    max_tokens = _check_room(m, T, max_tokens or max(1, c.sequence_len - T))
    rngs = [g for s in seeds for g in row_generators(s, num_samples, next(m.parameters()).device)]
    cache, logits, pad = prefill_rows(m, prompts, num_samples, T + max_tokens)
    rows = [RowState(tokens=list(tokens)) for tokens in prompts for _ in range(num_samples)]
    yield from self._decode(rows, logits, rngs, cache, qkv, max_tokens, temperature, top_k,
                            pad if qkv is not None and pad.any() else None)


# %% [markdown]
# The same prompt alone must give the columns of `generate`, and prompts of three different lengths, decoded together
# with padding, must each give what they give alone, greedy and sampled:

# %%
texts = ["def ", "import os", "class Foo(object):"]
prompts = [tokenizer.encode(t, prepend="<|bos|>") for t in texts]
print("prompt lengths", [len(p) for p in prompts])
test_eq(list(engine.generate_rows([prompts[0]], 3, max_tokens=16, seed=5)),
        list(engine.generate(prompts[0], 3, max_tokens=16, seed=5)))
seeds = [1, 2, 3]
for temperature in (0, 1.0):
    columns = list(engine.generate_rows(prompts, 2, max_tokens=24, temperature=temperature, seed=seeds))
    for p, (tokens, s) in enumerate(zip(prompts, seeds)):
        alone = list(engine.generate(tokens, 2, max_tokens=24, temperature=temperature, seed=s))
        test_eq([(col[2 * p:2 * p + 2], mask[2 * p:2 * p + 2]) for col, mask in columns[:len(alone)]], alone)
print("each prompt's rows == its own generate call")


# %% [markdown]
# `generate_many` is the collector on top, `generate_batch` for a list of prompts: it sorts the prompts by length and
# cuts them into groups of about `batch_size` rows (`num_samples` rows per prompt, whole prompts only), padded when
# the model allows it and in buckets of one length otherwise. It also takes the `stop(text)` test that evaluation
# uses (chapter 10) to end a row as soon as its answer is settled: the row keeps the token that settled it and takes
# nothing more, and a group is done when all its rows are. (With `max_tokens=None` the limit depends on the prompt's
# length, so then only prompts of one length share a group.)

# %%
#| export
def length_groups(lengths, per_group, mixed=True):
    "Indices, shortest first, in groups of at most `per_group`; mixed=False: only equal lengths share a group."
    groups = []
    for i in sorted(range(len(lengths)), key=lambda i: lengths[i]):
        if groups and len(groups[-1]) < per_group and (mixed or lengths[groups[-1][0]] == lengths[i]):
            groups[-1].append(i)
        else:
            groups.append([i])
    return groups


@patch
def generate_many(self: Engine, prompts, num_samples=1, batch_size=8, stop=None, seed=42, **kwargs):
    "[generate_batch(p, num_samples, ...) for p in prompts], ~batch_size rows at a time; a row also ends at stop(text)."
    seeds, n, out = _seeds(seed, len(prompts)), num_samples, [None] * len(prompts)
    mixed = kwargs.get("fast", True) and isinstance(self.model, GPT) and kwargs.get("max_tokens") is not None
    for group in length_groups([len(p) for p in prompts], max(1, batch_size // n), mixed):
        rows = [list(prompts[i]) for i in group for _ in range(n)]
        masks, start, done = [[0] * len(r) for r in rows], [len(r) for r in rows], [False] * len(rows)
        for column, mask_column in self.generate_rows([prompts[i] for i in group], n,
                                                      seed=[seeds[i] for i in group], **kwargs):
            for r, (token, mask) in enumerate(zip(column, mask_column)):
                if done[r] or token in (self.end, self.bos):
                    done[r] = True
                    continue
                rows[r].append(token)
                masks[r].append(mask)
                done[r] = stop is not None and stop(self.tokenizer.decode(rows[r][start[r]:]))
            if all(done):
                break
        for k, i in enumerate(group):
            out[i] = rows[k * n:(k + 1) * n], masks[k * n:(k + 1) * n]
    return out


# %%
test_eq(length_groups([5, 3, 5, 4, 3], 2), [[1, 4], [3, 0], [2]])
test_eq(length_groups([5, 3, 5, 4, 3], 2, mixed=False), [[1, 4], [3], [0, 2]])

# %% [markdown]
# The check that matters: replies of many prompts decoded together are the replies of one call per prompt, exactly,
# greedy and sampled, for prompts of several lengths in batches that do not divide them evenly:

# %%
many_texts = ["def ", "import os", "class Foo(object):", "x = [", "for i in range(10):", "return self.", "# "]
many = [tokenizer.encode(t, prepend="<|bos|>") for t in many_texts]
for temperature, n in ((0, 1), (1.0, 2)):
    together = engine.generate_many(many, n, batch_size=4, max_tokens=30, temperature=temperature, top_k=50, seed=9)
    test_eq(together, [engine.generate_batch(p, n, max_tokens=30, temperature=temperature, top_k=50, seed=9)
                       for p in many])
print("\n".join(repr(tokenizer.decode(rows[0])) for rows, _ in together[:3]))


# %% [markdown]
# Tool calls too, with a scripted model that has a script per prompt: two prompts call the calculator at different
# times, one answers straight away, one never ends by itself (it stops at `max_tokens`), and their replies end at
# different steps. Prompts of one length share a batch (the scripted model has no decode step to pad), and the
# `stop` test ends the row that writes "stop" early:

# %%
def tool_script(expr, after):
    "A script: call the calculator on expr, filler while the result is forced, then the text `after`."
    result = [sp("<|output_start|>"), *tokenizer.encode(calculator(expr)), sp("<|output_end|>")]
    return ([sp("<|python_start|>"), *tokenizer.encode(expr), sp("<|python_end|>")] + tokenizer.encode("?") * len(result)
            + tokenizer.encode(after) + [sp("<|assistant_end|>")])

tool_prompts = [[tokenizer.bos_id, *tokenizer.encode(t)] for t in ("a", "b", "c", "d", "ab")]
scripts = {tuple(tool_prompts[0]): tool_script("12*7", " so 84"), tuple(tool_prompts[1]): tokenizer.encode(" 5 stop 6"),
           tuple(tool_prompts[2]): tokenizer.encode(" no tools") + [sp("<|assistant_end|>")],
           tuple(tool_prompts[3]): tokenizer.encode(" on and on " * 9), tuple(tool_prompts[4]): tool_script("3+4", "")}
scripted_many = Engine(ScriptedModel(scripts, model.config, sp("<|assistant_end|>")), tokenizer)
stop_word = lambda text: "stop" in text
together = scripted_many.generate_many(tool_prompts, batch_size=8, max_tokens=20, stop=stop_word)

def cut_at_stop(rows, masks, start):
    "One call's rows cut where stop_word first holds, as a caller that reads one reply at a time would cut them."
    ends = [next((k for k in range(start + 1, len(r) + 1) if stop_word(tokenizer.decode(r[start:k]))), len(r))
            for r in rows]
    return [r[:k] for r, k in zip(rows, ends)], [m[:k] for m, k in zip(masks, ends)]

test_eq(together, [cut_at_stop(*scripted_many.generate_batch(p, max_tokens=20), len(p)) for p in tool_prompts])
for p, ((row,), (mask,)) in zip(tool_prompts, together):
    print(f"{sum(mask):>2} sampled, {len(mask) - len(p) - sum(mask)} forced | {tokenizer.decode(row[len(p):])!r}")


# %% [markdown]
# ## One loader for every model
#
# Chat, evaluation and RL all start from "open that model". `load_for_inference` takes either a run directory of ours
# (a stage: `base`, `mid`, `sft` or `rl`, by default the last one trained; the latest step unless one is named) or a
# checkpoint directory written by nanochat itself (`model_NNNNNN.pt` and `meta_NNNNNN.json`, with nanochat's
# `tokenizer/` beside it, in the same folder or up to two levels above, as `~/.cache/nanochat/tokenizer` sits above
# `base_checkpoints/d20`). Someone who trained with nanochat can chat with and evaluate their model here. nanochat
# stores its tokenizer as a pickle, which can run code when loaded, so it is read only when asked
# (`allow_pickle=True`) or after converting it once (`nanochat-nb tokenizer convert`, chapter 01). The weights are
# always read with `weights_only=True`, which cannot run code. A wrong path, a missing tokenizer or a vocabulary that
# does not match the model gives one line that names it.

# %%
#| export
def latest_stage(run_dir):
    "The last stage of a run that has a checkpoint (rl, then sft, mid, base), or None."
    return next((s for s in reversed(STAGES) if latest_step(checkpoint_dir(run_dir, s)) is not None), None)


def _nanochat_tokenizer(ckpt_dir, allow_pickle=False):
    "The tokenizer that sits beside a checkpoint directory, or a FileNotFoundError saying where we looked."
    places = [ckpt_dir / "tokenizer", ckpt_dir.parent / "tokenizer", ckpt_dir.parent.parent / "tokenizer"]
    for place in places:
        if any((place / name).is_file() for name in ("tokenizer.json", "tokenizer.tiktoken", "tokenizer.pkl")):
            return Tokenizer.load(place, allow_pickle=allow_pickle), place
    raise FileNotFoundError(f"no tokenizer beside the checkpoint {ckpt_dir} (looked in "
                            f"{', '.join(map(str, places))}); fix: copy the tokenizer folder of the run that trained "
                            "it next to the checkpoint")


# %%
#| export
def load_for_inference(path, stage=None, step=None, device=None, allow_pickle=False):
    "(model, tokenizer, meta) from a run directory's stage or a nanochat checkpoint directory; ready to generate."
    path, device = Path(path).expanduser(), get_device(device)
    if not path.is_dir():
        raise FileNotFoundError(f"{path} is not a directory; fix: pass a run directory (--run-dir of a training run) "
                                "or a checkpoint directory holding model_NNNNNN.pt and meta_NNNNNN.json")
    if any(path.glob("model_*.pt")):  # a checkpoint directory: nanochat's layout (ours is the same inside)
        tokenizer, tok_dir = _nanochat_tokenizer(path, allow_pickle)
        model, meta = load_model_dir(path, step, device, tokenizer, tok_dir)
        meta = {**meta, "stage": stage or "nanochat", "source": str(path)}
    else:
        stage = stage or latest_stage(path)
        if stage is None:
            raise CheckpointError(f"{path} holds no checkpoint of any stage ({', '.join(STAGES)}) under "
                                  f"{path / 'checkpoints'}; fix: train one (nanochat-nb pretrain --run-dir {path})")
        tokenizer = Tokenizer.load(path / "tokenizer", allow_pickle=allow_pickle)
        model, meta = load_model(path, stage, step, device, tokenizer)
        meta = {**meta, "stage": stage, "source": str(path)}
    return model.eval(), tokenizer, meta


# %%
m2, tok2, meta2 = load_for_inference(run_dir)
print(meta2["stage"], meta2["step"], tok2)
test_fail(lambda: load_for_inference(Path(run_dir) / "nowhere"), contains="is not a directory")

# %% [markdown]
# ## How fast, and where the time went
#
# `bench/decode.py` measures decoding for a depth-4 model with a vocabulary of 8,192 in fp32: 128 new tokens after a
# 32-token prompt, temperature 0.6, top-k 50, at batch 1 and with 8 samples from one prefill, and at batch 1 without
# a cache. nanochat's own engine does about 260-290 tokens/s at batch 1 and 1,200-1,450 with 8 samples on these
# 2-core machines. `docs/benchmarks.md` records our numbers and what each change bought.
#
# `bench/eval.py` measures the many-prompt path where it matters: the 256 held-out arithmetic problems of chapter 10,
# greedy, at most 160 tokens, on the speedrun's depth-4 base model. On a machine busy with other jobs (one thread),
# one problem at a time answered 0.43 problems per second, `generate_many` with 8 rows 1.42 (3.3×) and with 32 rows
# 2.86 (6.7×), and all 256 replies were identical to the one-at-a-time ones.

# %% [markdown]
# ## At scale
#
# On a GPU the same engine runs a d20 model; prefill is one big matmul per layer, and decoding is limited by reading
# the weights and the cache from memory once per step, so batching samples is nearly free until the batch is large.
# nanochat's web server keeps one engine per GPU (chapter 08). The KV cache of d20 at 2,048 positions is
# 20 layers × 2 × 10 heads × 128 × 2,048 × 2 bytes (bf16) ≈ 210 MB per row: plenty of room for 8 samples on an H100.
# For many prompts, reading each one alone costs a few kernel launches per layer per prompt, which on a GPU is worth
# batching too: a padded prefill with an attention mask. Servers go further with *continuous batching*: a finished
# row is refilled at once with the next prompt, its own position and all, instead of idling until its group ends.
#
# ## Summary
#
# - The simple loop re-reads the sequence every step; the KV cache makes each step cost the same at any position.
# - A decode step specialised to one token per row (fused q/k/v, no masks) cuts the fixed costs that dominate small
#   models; it is checked equal to the model's own forward.
# - Samples draw with the Gumbel-max trick, one generator per row, so batched samples equal separate runs.
# - Tool calls are a per-row state machine; the calculator walks a parsed expression and never runs code; forced
#   tokens carry mask 0 for RL.
# - Different prompts decode together too (`generate_many`): each is read alone, then the rows share decode steps,
#   prompts of different lengths padded on the left with their own positions; each prompt's replies are exactly
#   those of its own call, so evaluation gets faster without changing a score.
# - `load_for_inference` opens a stage of any run, or a checkpoint nanochat wrote.
#
# ## Exercises
#
# 1. Add `%` (modulo) to the calculator. Which hostile input must you think about first?
# 2. `generate_many` keeps a finished row in its batch until the whole group is done. Drop finished rows from the
#    cache (and their generators) as they end; when does it pay off on your machine?
# 3. Add top-p (nucleus) sampling to `sample_tokens`, keeping "row i depends only on seed + i" true.
