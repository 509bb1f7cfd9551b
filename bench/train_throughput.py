"""Training throughput of nanochat_nb's GPT: forward + backward + optimizer step on random tokens.

    python bench/train_throughput.py --depth 4                      # fp32 eager on this machine's device
    python bench/train_throughput.py --depth 4 --dtype bf16 --compile

Prints the median tokens/s, ms/step and MFU over the timed steps (after warm-up); the last line is one JSON object.
MFU = FLOPs/token (model.estimate_flops(), nanochat's formula) x tokens/s / peak. On a CPU the peak is measured on
the spot (the best of a few large matmuls in the chosen dtype, on the same threads as the run, before and after the
timed steps); on a GPU it comes from the datasheet table below (dense bf16, as nanochat, whatever --dtype is).
"""
import argparse
import contextlib
import json
import statistics
import time

import torch

from nanochat_nb.model import GPTConfig, build_model
from nanochat_nb.optim import setup_optimizers

# Dense (no sparsity) bf16 tensor-core peaks from the vendors' datasheets, FLOP/s; first matching name wins.
GPU_PEAK_BF16 = [
    ("H100 NVL", 835e12), ("H100 PCIe", 756e12), ("H100", 989e12), ("H200", 989e12), ("GH200", 989e12),
    ("B200", 2250e12), ("A100", 312e12), ("L40S", 362e12), ("L4", 121e12), ("RTX 4090", 165.2e12),
    ("RTX 3090", 71e12), ("A10", 125e12),
]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--depth", type=int, default=4, help="model depth; width is 64 x depth (%(default)s)")
    p.add_argument("--vocab-size", type=int, default=8192, help="%(default)s")
    p.add_argument("--seq-len", type=int, default=512, help="tokens per row (%(default)s)")
    p.add_argument("--batch-size", type=int, default=8, help="rows per step (%(default)s)")
    p.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32", help="bf16 = autocast (%(default)s)")
    p.add_argument("--compile", action="store_true", help="torch.compile the model")
    p.add_argument("--steps", type=int, default=10, help="timed steps (%(default)s)")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps first; compilation happens here (%(default)s)")
    p.add_argument("--device", default=None, help="cpu, cuda, ... (default: the best available)")
    p.add_argument("--threads", type=int, default=None, help="CPU threads (default: torch's choice)")
    p.add_argument("--grad-clip", type=float, default=1.0, help="clip as the training loop does; 0 = off (%(default)s)")
    p.add_argument("--profile", action="store_true", help="after timing, profile 2 steps and print the top ops")
    args = p.parse_args(argv)
    if args.steps < 1 or args.warmup < 0:
        p.error("--steps must be >= 1 and --warmup >= 0")
    return args


def measure_cpu_peak(dtype, n=2048, reps=5):
    "Best FLOP/s of an n x n x n matmul in `dtype` on the current threads."
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    a @ b  # warm-up: first call allocates and picks kernels
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - t0)
    return 2 * n**3 / best


def gpu_peak(device):
    name = torch.cuda.get_device_name(device)
    for key, peak in GPU_PEAK_BF16:
        if key in name:
            return peak, f"datasheet bf16 dense, {name}"
    return None, f"unknown GPU {name!r}: add it to GPU_PEAK_BF16"


def main(argv=None):
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda":
        torch.set_float32_matmul_precision("high")  # TF32 for fp32 matmuls, as nanochat
    torch.manual_seed(0)
    config = GPTConfig.from_depth(args.depth, vocab_size=args.vocab_size, sequence_len=args.seq_len)
    model = build_model(config, device)
    optimizers = setup_optimizers(model)
    step_model = torch.compile(model, dynamic=False) if args.compile else model
    autocast = (torch.autocast(device.type, dtype=torch.bfloat16) if args.dtype == "bf16"
                else contextlib.nullcontext())
    flops_per_token = model.estimate_flops()
    tokens_per_step = args.batch_size * args.seq_len
    g = torch.Generator().manual_seed(1)
    batches = [(torch.randint(0, args.vocab_size, (args.batch_size, args.seq_len), generator=g).to(device),
                torch.randint(0, args.vocab_size, (args.batch_size, args.seq_len), generator=g).to(device))
               for _ in range(4)]

    def train_step(i):
        idx, targets = batches[i % len(batches)]
        with autocast:
            loss = step_model(idx, targets)
        loss.backward()
        if args.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), args.grad_clip)
        for opt in optimizers:
            opt.step()
        model.zero_grad(set_to_none=True)
        return loss.item()  # also waits for the GPU

    n_threads = torch.get_num_threads()
    peak_dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    # on a shared CPU the peak drifts with the load: measure it before and after the run and keep the better one
    peak_before = measure_cpu_peak(peak_dtype) if device.type == "cpu" else None
    print(f"model: depth {args.depth}, n_embd {config.n_embd}, n_head {config.n_head}, vocab {args.vocab_size}, "
          f"{model.num_params():,} params, {flops_per_token:.3e} FLOPs/token")
    print(f"run: {device.type}{f' ({n_threads} threads)' if device.type == 'cpu' else ''}, {args.dtype}, "
          f"{'compiled' if args.compile else 'eager'}, batch {args.batch_size} x {args.seq_len} = "
          f"{tokens_per_step:,} tokens/step")
    t0 = time.perf_counter()
    for i in range(args.warmup):
        train_step(i)
    print(f"warm-up: {args.warmup} steps in {time.perf_counter() - t0:.1f} s")
    times, losses = [], []
    for i in range(args.steps):
        t0 = time.perf_counter()
        losses.append(train_step(args.warmup + i))
        times.append(time.perf_counter() - t0)
    print("step ms: " + " ".join(f"{t * 1e3:.0f}" for t in times))

    if device.type == "cpu":
        peak = max(peak_before, measure_cpu_peak(peak_dtype))
        peak_source = f"measured: 2048^3 {args.dtype} matmul, {n_threads} threads"
    elif device.type == "cuda":
        peak, peak_source = gpu_peak(device)
    else:
        peak, peak_source = None, f"no peak known for {device.type}"
    step_s = statistics.median(times)
    tokens_per_s = tokens_per_step / step_s
    mfu = flops_per_token * tokens_per_s / peak if peak else None
    print(f"peak: {peak / 1e9:,.0f} GFLOP/s ({peak_source})" if peak else f"peak: unknown ({peak_source})")
    print(f"median: {step_s * 1e3:,.0f} ms/step, {tokens_per_s:,.0f} tokens/s, "
          f"MFU {f'{100 * mfu:.1f}%' if mfu is not None else 'n/a'}, "
          f"achieved {flops_per_token * tokens_per_s / 1e9:,.1f} GFLOP/s")

    if args.profile:
        from torch.profiler import ProfilerActivity, profile
        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
        with profile(activities=activities) as prof:
            for i in range(2):
                train_step(i)
        sort = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
        print(prof.key_averages().table(sort_by=sort, row_limit=25))

    print(json.dumps(dict(
        depth=args.depth, n_embd=config.n_embd, vocab_size=args.vocab_size, seq_len=args.seq_len,
        batch_size=args.batch_size, dtype=args.dtype, compile=args.compile, device=device.type,
        threads=n_threads if device.type == "cpu" else None, params=model.num_params(),
        flops_per_token=flops_per_token, steps=args.steps, warmup=args.warmup,
        ms_per_step=round(step_s * 1e3, 1), tokens_per_s=round(tokens_per_s, 1),
        mfu=round(mfu, 4) if mfu is not None else None, peak_flops=peak, peak_source=peak_source,
        best_ms=round(min(times) * 1e3, 1), step_ms=[round(t * 1e3, 1) for t in times],
        final_loss=round(losses[-1], 4))))


if __name__ == "__main__":
    main()
