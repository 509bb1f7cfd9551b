"""The inference engine: cache == no cache, batched samples == separate runs, many prompts decoded together == one call
per prompt (padding, seeds, tools, stops), tool use, a hostile calculator, and the loader on our run directories and on a checkpoint directory in nanochat's own layout."""
import json, pickle, signal, string
from contextlib import contextmanager
from dataclasses import asdict

import pytest
import torch
from hypothesis import HealthCheck, given, settings, strategies as st

from nanochat_nb.checkpoint import CheckpointError, checkpoint_dir, save_checkpoint
from nanochat_nb.engine import (Engine, ScriptedModel, calculator, decode_step, fused_qkv, generate_naive, latest_stage,
                                length_groups, load_for_inference, prefill_rows, sample_tokens, row_generators)
from nanochat_nb.model import GPTConfig, build_model
from nanochat_nb.tokenizer import Tokenizer


@pytest.fixture(scope="module")
def loaded(tiny_run):
    model, tokenizer, meta = load_for_inference(tiny_run)
    return model, tokenizer


PROMPTS = ["def main():", "The quick brown fox", "import os\n"]


@pytest.mark.parametrize("text", PROMPTS)
def test_greedy_with_cache_equals_without(loaded, text):
    model, tok = loaded
    prompt = tok.encode(text, prepend="<|bos|>")
    naive = list(generate_naive(model, prompt, 40, temperature=0))
    rows, masks = Engine(model, tok).generate_batch(prompt, max_tokens=40, temperature=0)
    got = rows[0][len(prompt):]
    stop = next((i for i, t in enumerate(naive) if t in (tok.bos_id, tok.encode_special("<|assistant_end|>"))),
                len(naive))
    assert got == naive[:stop]  # the engine drops the stop token, the naive loop does not know about it
    assert masks[0] == [0] * len(prompt) + [1] * len(got)


def test_eight_samples_from_one_prefill_equal_eight_runs(loaded):
    model, tok = loaded
    prompt = tok.encode("class Foo:", prepend="<|bos|>")
    engine = Engine(model, tok)
    batch, _ = engine.generate_batch(prompt, num_samples=8, max_tokens=32, temperature=0.9, top_k=50, seed=7)
    for i in range(8):
        single, _ = engine.generate_batch(prompt, num_samples=1, max_tokens=32, temperature=0.9, top_k=50, seed=7 + i)
        assert single[0] == batch[i], f"sample {i}"
    assert len({tuple(r) for r in batch}) > 1  # the samples differ from each other


def test_fast_decode_equals_model_forward_inside_the_engine(loaded):
    model, tok = loaded
    prompt = tok.encode("for i in range(", prepend="<|bos|>")
    engine = Engine(model, tok)
    for temperature in (0, 1.0):
        fast = engine.generate_batch(prompt, num_samples=4, max_tokens=30, temperature=temperature, seed=3)
        slow = engine.generate_batch(prompt, num_samples=4, max_tokens=30, temperature=temperature, seed=3,
                                     fast=False)
        assert fast == slow


def test_same_seed_same_tokens_and_streaming_matches_batch(loaded):
    model, tok = loaded
    prompt = tok.encode("x = ", prepend="<|bos|>")
    engine = Engine(model, tok)
    a = engine.generate_batch(prompt, num_samples=3, max_tokens=20, temperature=1.0, seed=11)
    b = engine.generate_batch(prompt, num_samples=3, max_tokens=20, temperature=1.0, seed=11)
    assert a == b
    steps = list(engine.generate(prompt, num_samples=3, max_tokens=20, temperature=1.0, seed=11))
    assert all(len(col) == 3 and len(mask) == 3 for col, mask in steps)
    assert [prompt + [col[0] for col, _ in steps]][0][:len(a[0][0])] == a[0][0]


def test_max_tokens_and_sampling_settings_are_checked(loaded):
    model, tok = loaded
    engine = Engine(model, tok)
    prompt = [tok.bos_id]
    rows, _ = engine.generate_batch(prompt, max_tokens=5, temperature=0)
    assert len(rows[0]) <= 6
    for bad, match in [(dict(temperature=-1), "temperature"), (dict(top_k=0), "top_k"),
                       (dict(max_tokens=0), "max_tokens"), (dict(num_samples=0), "num_samples"),
                       (dict(max_tokens=10**6), "beyond the model")]:
        with pytest.raises(ValueError, match=match):
            engine.generate_batch(prompt, **bad)
    with pytest.raises(ValueError, match="prompt"):
        engine.generate_batch([])
    with pytest.raises(ValueError, match="prompt"):
        engine.generate_batch([10**6])


def test_top_k_limits_the_choices():
    logits = torch.randn(4, 100)
    rngs = row_generators(0, 4)
    allowed = torch.topk(logits, 3).indices
    for _ in range(50):
        picks = sample_tokens(logits, rngs, temperature=2.0, top_k=3)
        assert all(p in allowed[i] for i, p in enumerate(picks.tolist()))
    assert sample_tokens(logits, rngs, temperature=0).tolist() == logits.argmax(-1).tolist()


# --- tool use, with a scripted model

def scripted_engine(tok, config, expr, after=" done"):
    "An engine whose model writes a tool call of `expr`, filler while the result is forced, then `after`."
    sp = tok.encode_special
    forced = [sp("<|output_start|>"), *tok.encode(calculator(expr)), sp("<|output_end|>")]
    script = ([sp("<|python_start|>"), *tok.encode(expr), sp("<|python_end|>")] + [tok.encode("?")[0]] * len(forced)
              + tok.encode(after) + [sp("<|assistant_end|>")])
    return Engine(ScriptedModel(script, config, sp("<|assistant_end|>")), tok), forced


@pytest.mark.parametrize("expr, result", [("12*7", "84"), ("'strawberry'.count('r')", "3"),
                                          ("(1,000 + 24) / 4", "256.0"), ("2**100", None), ("os.system('x')", None)])
def test_tool_call_is_executed_forced_and_masked(loaded, expr, result):
    model, tok = loaded
    engine, forced = scripted_engine(tok, model.config, expr)
    rows, masks = engine.generate_batch([tok.bos_id], num_samples=2, max_tokens=200)
    for row, mask in zip(rows, masks):
        forced_part = [t for t, m in zip(row[1:], mask[1:]) if m == 0]
        assert forced_part == forced
        text = tok.decode(forced_part[1:-1])
        assert text == result if result is not None else text.startswith("Error:")
        assert tok.decode(row).endswith(" done")
        i = row.index(tok.encode_special("<|output_start|>"))
        assert mask[i - 1] == 1 and row[i - 1] == tok.encode_special("<|python_end|>")


def test_rows_keep_their_shape_after_stopping(loaded):
    model, tok = loaded
    sp = tok.encode_special
    engine = Engine(ScriptedModel(tok.encode("hi") + [sp("<|assistant_end|>")], model.config,
                                  sp("<|assistant_end|>")), tok)
    steps = list(engine.generate([tok.bos_id], num_samples=2, max_tokens=20))
    assert steps[-1][0] == [sp("<|assistant_end|>")] * 2  # the stop token is yielded, then the generator ends
    assert len(steps) == len(tok.encode("hi")) + 1



# --- many prompts decoded together

MANY = ["def main():", "x", "The quick brown fox jumps", "import os\n", "class A:", "for i in range(3):", "y = 2",
        "return self.value + other.value"]


def test_padded_decode_step_equals_each_row_alone(loaded):
    model, tok = loaded
    prompts = [tok.encode(t, prepend="<|bos|>") for t in MANY[:4]]
    with torch.inference_mode():
        cache, logits, pad = prefill_rows(model, prompts, 2, 64)
        assert pad.tolist() == [max(map(len, prompts)) - len(p) for p in prompts for _ in range(2)]
        idx = logits.argmax(-1)
        together = decode_step(model, idx, cache, fused_qkv(model), pad)
        for i, p in enumerate(prompts):
            alone, last = prefill_rows(model, [p], 1, 64)[:2]
            assert torch.equal(last[0], logits[2 * i])  # each prompt is read alone: the very same numbers
            got = decode_step(model, idx[2 * i:2 * i + 1], alone, fused_qkv(model))
            assert torch.allclose(got[0], together[2 * i], atol=1e-4), (got[0] - together[2 * i]).abs().max()


@pytest.mark.parametrize("temperature, num_samples, batch_size", [(0, 1, 3), (0, 1, 8), (1.0, 3, 4), (0.8, 2, 1)])
def test_many_prompts_equal_one_call_per_prompt(loaded, temperature, num_samples, batch_size):
    model, tok = loaded
    engine = Engine(model, tok)
    prompts = [tok.encode(t, prepend="<|bos|>") for t in MANY]
    seeds = [3 * i + 1 for i in range(len(prompts))]
    kw = dict(max_tokens=24, temperature=temperature, top_k=40)
    together = engine.generate_many(prompts, num_samples, batch_size, seed=seeds, **kw)
    assert together == [engine.generate_batch(p, num_samples, seed=s, **kw) for p, s in zip(prompts, seeds)]
    if temperature:  # one seed for all: each prompt draws with seed + j, as a call of its own would
        assert engine.generate_many(prompts[:3], num_samples, batch_size, seed=5, **kw) == [
            engine.generate_batch(p, num_samples, seed=5, **kw) for p in prompts[:3]]


def test_buckets_of_one_length_without_the_fast_step(loaded):
    model, tok = loaded
    engine = Engine(model, tok)
    prompts = [tok.encode(t, prepend="<|bos|>") for t in MANY]
    slow = engine.generate_many(prompts, 2, 4, max_tokens=16, temperature=0.9, seed=2, fast=False)
    assert slow == engine.generate_many(prompts, 2, 4, max_tokens=16, temperature=0.9, seed=2)
    with pytest.raises(ValueError, match="different lengths"):
        list(engine.generate_rows(prompts[:2], max_tokens=4, fast=False))
    assert length_groups([4, 2, 4, 3, 2, 4], 2, mixed=False) == [[1, 4], [3], [0, 2], [5]]
    assert length_groups([4, 2, 4, 3, 2, 4], 4) == [[1, 4, 3, 0], [2, 5]]


def test_many_prompts_with_tools_stops_and_different_ends(loaded):
    model, tok = loaded
    sp, end = tok.encode_special, tok.encode_special("<|assistant_end|>")

    def tool(expr, after):
        forced = [sp("<|output_start|>"), *tok.encode(calculator(expr)), sp("<|output_end|>")]
        return ([sp("<|python_start|>"), *tok.encode(expr), sp("<|python_end|>")] + [tok.encode("?")[0]] * len(forced)
                + tok.encode(after) + [end])

    prompts = [[tok.bos_id, t] for t in (10, 11, 12, 13, 14, 15)] + [[tok.bos_id, 16, 17]]
    scripts = dict(zip(map(tuple, prompts), [tool("12*7", " ok"), tok.encode(" a b c STOP d e f"), [end],
                                             tok.encode(" plain text") + [end], tok.encode(" never ends " * 10),
                                             tool("'strawberry'.count('r')", " STOP here"), tool("2+2", "")]))
    engine = Engine(ScriptedModel(scripts, model.config, end), tok)
    stop = lambda text: "STOP" in text

    def alone(p):  # one call, cut where stop first holds
        (row,), (mask,) = engine.generate_batch(p, max_tokens=30)
        k = next((k for k in range(len(p) + 1, len(row) + 1) if stop(tok.decode(row[len(p):k]))), len(row))
        return [row[:k]], [mask[:k]]

    for batch_size in (1, 4, 8):
        together = engine.generate_many(prompts, batch_size=batch_size, max_tokens=30, stop=stop)
        assert together == [alone(p) for p in prompts]
    ends = [len(rows[0]) for rows, _ in together]
    assert len(set(ends)) >= 5  # the rows finished at different steps
    forced = [len(m[0]) - len(p) - sum(m[0]) for p, (_, m) in zip(prompts, together)]
    assert forced[0] > 0 and forced[5] > 0 and forced[1] == forced[3] == forced[4] == 0
    assert tok.decode(together[1][0][0][2:]).endswith("STOP") and len(together[4][0][0]) == 32
    assert calculator("'strawberry'.count('r')") in tok.decode(together[5][0][0])


def test_many_prompts_settings_are_checked(loaded):
    model, tok = loaded
    engine = Engine(model, tok)
    prompts = [tok.encode(t, prepend="<|bos|>") for t in MANY[:3]]
    with pytest.raises(ValueError, match="one per prompt"):
        engine.generate_many(prompts, seed=[1, 2], max_tokens=4)
    with pytest.raises(ValueError, match="prompt"):
        engine.generate_many(prompts + [[]], max_tokens=4)
    with pytest.raises(ValueError, match="at least one prompt"):
        list(engine.generate_rows([], max_tokens=4))
    assert engine.generate_many([], max_tokens=4) == []

# --- the calculator against hostile input

@contextmanager
def watchdog(seconds=5):
    "Fail (instead of hanging the suite) if the block runs longer than `seconds`."
    def boom(*_):
        raise TimeoutError("calculator did not return")
    old = signal.signal(signal.SIGALRM, boom)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


HOSTILE = ["9**9**9**9", "10**100000", "2**-1", "pow(10, 10**9)", "(" * 5000 + "1" + ")" * 5000,
           "-" * 900 + "1", "+" * 990 + "1", "().__class__.__bases__[0].__subclasses__()", "__import__('os')",
           "import os", "exec('1')", "eval('1+1')", "(lambda: 1)()", "[x for x in range(10**9)]",
           "'a' * 10**7", "'" + "a" * 10**7 + "'.count('a')", "'abc'.count('a', 0, 10**9)", "'a'.__len__()",
           "'x'.upper().count('X')", "١٢٣+٤", "１＋１", "1_000 + 1", "True + True", "1j * 1j", "...", "a.count('a')",
           "'abc'.count(1)", "1e308 * 10", "(10**10) ** 10", "9" * 999 + "*" + "9", "\x00", "1 if 1 else 2",
           "f'{1}'", "b'x'.count(b'x')", "'%s' % 1", "1 << 100000", "~1", "1 @ 1", "not 1", "1 < 2",
           "0 / 0", "1 // 0", "''.count('')", "globals()", "__builtins__", "__debug__"]


def test_hostile_expressions_give_strings():
    for expr in HOSTILE:
        with watchdog():
            out = calculator(expr)
        assert isinstance(out, str) and len(out) < 2000, expr
        assert out.startswith("Error") or out.lstrip("-").replace(".", "").replace("e+", "").isdigit() \
            or out in ("inf", "-inf"), (expr, out)


@settings(max_examples=300, deadline=None)
@given(st.text(alphabet=st.sampled_from(string.printable + "٣１²ⅷ_"), max_size=200))
def test_calculator_never_raises_on_any_text(text):
    with watchdog():
        assert isinstance(calculator(text), str)


def expressions():
    "Arithmetic the calculator must get right, with Python's own answer (eval of our own, trusted, string)."
    leaf = st.integers(-10**6, 10**6).map(str)
    return st.recursive(leaf, lambda inner: st.tuples(inner, st.sampled_from(["+", "-", "*"]), inner).map(
        lambda t: f"({t[0]} {t[1]} {t[2]})"), max_leaves=12)


@settings(max_examples=200, deadline=None)
@given(expressions())
def test_calculator_agrees_with_python_on_arithmetic(expr):
    assert calculator(expr) == str(eval(expr))  # eval of a test-generated string, never of model output


@settings(max_examples=100, deadline=None)
@given(st.text(alphabet="abcxyz,. ", max_size=50), st.sampled_from(list("abcxyz")))
def test_count_agrees_with_python(text, letter):
    expr = f"{text!r}.count({letter!r})"
    assert calculator(expr) == str(text.count(letter))


# --- the loader

def test_latest_stage_and_step(tmp_path, tiny_run):
    import shutil
    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    model, tok, meta = load_for_inference(run)
    assert meta["stage"] == "base" and meta["step"] == 0
    state = model.state_dict()
    save_checkpoint(checkpoint_dir(run, "sft"), 5, state, None, {"model_config": asdict(model.config)})
    save_checkpoint(checkpoint_dir(run, "sft"), 9, state, None, {"model_config": asdict(model.config)})
    assert latest_stage(run) == "sft"
    assert load_for_inference(run)[2]["step"] == 9
    assert load_for_inference(run, step=5)[2]["step"] == 5
    assert load_for_inference(run, stage="base")[2]["stage"] == "base"
    with pytest.raises(CheckpointError, match="mid"):
        load_for_inference(run, stage="mid")


def write_nanochat_checkpoint(base_dir, tokenizer, step=1200):
    "A checkpoint directory exactly as nanochat writes it: base_checkpoints/d2/{model,meta}_NNNNNN and tokenizer/."
    torch.manual_seed(1)
    config = GPTConfig.from_depth(2, vocab_size=tokenizer.vocab_size, sequence_len=256)
    model = build_model(config)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.05)
    ckpt = base_dir / "base_checkpoints" / "d2"
    ckpt.mkdir(parents=True)
    state = {k: (v.bfloat16() if k == "transformer.wte.weight" else v) for k, v in model.state_dict().items()}
    torch.save(state, ckpt / f"model_{step:06d}.pt")  # nanochat keeps wte in bf16 on GPU
    meta = {"step": step, "val_bpb": 0.81, "model_config": asdict(config),
            "user_config": {"depth": 2, "run": "dummy"}, "device_batch_size": 32, "max_seq_len": 256,
            "dataloader_state_dict": {"pq_idx": 0, "rg_idx": 3}, "loop_state": {"min_val_bpb": 0.81}}
    (ckpt / f"meta_{step:06d}.json").write_text(json.dumps(meta, indent=2))
    (base_dir / "tokenizer").mkdir()
    with open(base_dir / "tokenizer" / "tokenizer.pkl", "wb") as f:
        pickle.dump(tokenizer.enc, f)  # nanochat pickles its tiktoken Encoding
    torch.save(tokenizer.token_bytes, base_dir / "tokenizer" / "token_bytes.pt")
    return ckpt, model


def test_loads_a_nanochat_checkpoint_directory(tmp_path, loaded):
    _, tok = loaded
    ckpt, original = write_nanochat_checkpoint(tmp_path / "nanochat", tok)
    with pytest.raises(ValueError, match="pickle"):  # nanochat's tokenizer.pkl could run code: only when asked
        load_for_inference(ckpt)
    model, tok2, meta = load_for_inference(ckpt, allow_pickle=True)
    assert meta["step"] == 1200 and meta["stage"] == "nanochat" and tok2.vocab_size == tok.vocab_size
    idx = torch.tensor([tok.encode("hello world", prepend="<|bos|>")])
    with torch.no_grad():
        ref = original.eval()(idx)
        original.transformer.wte.weight.copy_(original.transformer.wte.weight.bfloat16().float())
        assert torch.allclose(model(idx), original(idx), atol=1e-5)
    rows, _ = Engine(model, tok2).generate_batch(idx[0].tolist(), num_samples=2, max_tokens=8, temperature=0.7)
    assert len(rows) == 2 and ref.shape[-1] == tok.vocab_size


def test_loader_errors_name_the_problem(tmp_path, loaded):
    _, tok = loaded
    with pytest.raises(FileNotFoundError, match="is not a directory"):
        load_for_inference(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="holds no checkpoint"):
        load_for_inference(tmp_path / "empty")
    ckpt, _ = write_nanochat_checkpoint(tmp_path / "nc", tok)
    import shutil
    shutil.rmtree(tmp_path / "nc" / "tokenizer")
    with pytest.raises(FileNotFoundError, match="tokenizer"):
        load_for_inference(ckpt, allow_pickle=True)
    other = Tokenizer.train(" ".join(f"word{i} thing{i * 7} other{i % 13}" for i in range(3000)), vocab_size=300)
    (tmp_path / "nc" / "tokenizer").mkdir()
    with open(tmp_path / "nc" / "tokenizer" / "tokenizer.pkl", "wb") as f:
        pickle.dump(other.enc, f)
    with pytest.raises(CheckpointError, match=f"vocab_size {tok.vocab_size} but the tokenizer has 300"):
        load_for_inference(ckpt, allow_pickle=True)
