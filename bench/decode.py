"""Decode speed of nanochat_nb's Engine: tokens/s at batch 1 and with N samples from one prefill, and without a cache.

    python bench/decode.py                        # depth 4, vocab 8192, fp32, 32-token prompt, 128 new tokens
    python bench/decode.py --depth 20 --device cuda --dtype bf16

The model has random weights (speed does not depend on what they say), with the stop tokens' output rows zeroed so
that no sample ends early: every row generates exactly --new tokens. Each setting is timed --repeats times after a
warm-up and the median is printed; the time includes the prefill. The last line is one JSON object.
"""
import argparse
import contextlib
import json
import statistics
import time

import torch

from nanochat_nb.engine import Engine, generate_naive
from nanochat_nb.model import GPTConfig, build_model
from nanochat_nb.tokenizer import Tokenizer, tokenizer_corpus


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--depth", type=int, default=4, help="model depth (%(default)s)")
    p.add_argument("--vocab-size", type=int, default=8192, help="%(default)s")
    p.add_argument("--prompt", type=int, default=32, help="prompt tokens (%(default)s)")
    p.add_argument("--new", type=int, default=128, help="tokens generated per sample (%(default)s)")
    p.add_argument("--samples", type=int, default=8, help="samples from one prefill in the batched run (%(default)s)")
    p.add_argument("--temperature", type=float, default=0.6, help="%(default)s")
    p.add_argument("--top-k", type=int, default=50, help="%(default)s")
    p.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32", help="bf16 = autocast (%(default)s)")
    p.add_argument("--repeats", type=int, default=5, help="timed runs per setting (%(default)s)")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    p.add_argument("--device", default=None, help="cpu, cuda, ... (default: the best available)")
    p.add_argument("--skip-no-cache", action="store_true", help="skip the slow run without a cache")
    return p.parse_args(argv)


def bench_model(depth, vocab_size, device):
    "A GPT with random weights whose stop tokens are never among the likely ones, and a tokenizer of that size."
    tokenizer = Tokenizer.train((doc for doc in tokenizer_corpus("train")), vocab_size)
    torch.manual_seed(0)
    model = build_model(GPTConfig.from_depth(depth, vocab_size=vocab_size, sequence_len=2048), device)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 2 and ("c_proj" in name or "lm_head" in name):  # zero-initialised: give them weights
                p.normal_(0, p.size(1) ** -0.5)
        for name in ("<|assistant_end|>", "<|bos|>"):
            model.lm_head.weight[tokenizer.encode_special(name)] = 0  # logit 0: never in the top-k
    return model.eval(), tokenizer


def timed(fn, repeats, device):
    "Median seconds of fn() over `repeats` runs, after one warm-up."
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    fn(); sync()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter(); fn(); sync()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main(argv=None):
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    model, tokenizer = bench_model(args.depth, args.vocab_size, device)
    prompt = [tokenizer.bos_id] + list(range(300, 300 + args.prompt - 1))
    engine = Engine(model, tokenizer)
    amp = (torch.autocast(device.type, dtype=torch.bfloat16) if args.dtype == "bf16" else contextlib.nullcontext())
    settings = dict(max_tokens=args.new, temperature=args.temperature, top_k=args.top_k)

    def run(n):
        with amp:
            rows, _ = engine.generate_batch(prompt, num_samples=n, **settings)
        assert all(len(r) == len(prompt) + args.new for r in rows), "a sample ended early"

    def run_naive():
        with amp:
            assert len(list(generate_naive(model, prompt, args.new, args.temperature, args.top_k))) == args.new

    out = {"device": str(device), "threads": torch.get_num_threads(), "depth": args.depth,
           "vocab_size": args.vocab_size, "dtype": args.dtype, "params": model.num_params(),
           "prompt": args.prompt, "new": args.new}
    t1 = timed(lambda: run(1), args.repeats, device)
    out["batch1_tok_s"] = round(args.new / t1, 1)
    print(f"KV cache, batch 1:            {out['batch1_tok_s']:>9,.1f} tokens/s  ({t1 * 1e3 / args.new:.2f} ms/token)")
    tn = timed(lambda: run(args.samples), args.repeats, device)
    out[f"samples{args.samples}_tok_s"] = round(args.samples * args.new / tn, 1)
    print(f"KV cache, {args.samples} samples/prefill:  {out[f'samples{args.samples}_tok_s']:>9,.1f} tokens/s  "
          f"({tn * 1e3 / args.new:.2f} ms/step)")
    if not args.skip_no_cache:
        t0 = timed(run_naive, max(1, args.repeats // 2), device)
        out["nocache_tok_s"] = round(args.new / t0, 1)
        print(f"no cache, batch 1:            {out['nocache_tok_s']:>9,.1f} tokens/s  ({t0 * 1e3 / args.new:.2f} ms/token)")
    print(json.dumps(out))


if __name__ == "__main__":
    main()
