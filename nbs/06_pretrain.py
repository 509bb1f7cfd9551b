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
# # Pretraining
# > The base training loop: one process or many, on a laptop or on 8×H100, and it survives being killed.

# %% [markdown]
# Everything so far was parts: a tokenizer (chapter 01), a model (02), its optimizers and schedules (03), a stream
# of token batches (04) and a way to save all of it (05). This chapter turns the parts into a training system: the
# loop that nanochat calls `base_train`. At the end you will have a base model that has read the standard library's
# sources, a `metrics/pretrain.jsonl` with one line per step, and checkpoints that a killed run resumes from
# *exactly*: the same final weights, bit for bit, as a run that was never interrupted.
#
# Next, the inference engine (07) turns the checkpoint into text, and midtraining (11) teaches it to chat.

# %%
#| default_exp pretrain

# %%
#| export
import json, math, os, time
from itertools import islice
from contextlib import nullcontext
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path

import torch
import torch.distributed as dist

from nanochat_nb.checkpoint import (CheckpointError, RunLock, _check_state, _paths, atomic_write, check_finite,
                                    check_fingerprints, check_run_dir, check_stage_empty, checkpoint_dir,
                                    checkpoint_part, clear_checkpoints, latest_step, load_checkpoint,
                                    prune_checkpoints, save_checkpoint)
from nanochat_nb.data import DataLoader, shards_fingerprint
from nanochat_nb.model import GPTConfig, build_model
from nanochat_nb.optim import (cleanup_distributed, grad_accum_steps, init_distributed, lr_multiplier,
                               muon_momentum, setup_optimizers, training_horizon)
from nanochat_nb.tokenizer import Tokenizer

# %%
#| hide
import tempfile

from fastcore.test import test_eq, test_fail


# %% [markdown]
# ## One config, a few presets
#
# A training run is described by one flat dataclass. Every field can be set from the command line
# (`nanochat-nb pretrain --depth 6 --num-iterations 500`), and presets fill in sensible values for a machine.
# `-1` means "derive it": the batch from the device batch, the horizon from the tokens:parameters ratio, exactly
# as nanochat derives them.

# %%
#| export
@dataclass
class TrainConfig:
    "Every knob of a base training run; -1 means derive it."
    depth: int = 4                     # the one dial: n_layer = depth, n_embd = 64 * depth
    sequence_len: int = 512
    device_batch_size: int = 8         # rows per forward/backward on one device
    total_batch_size: int = -1         # tokens per optimizer step; -1: one micro-batch per rank
    num_iterations: int = -1           # optimizer steps; -1: from target_param_data_ratio
    target_param_data_ratio: float = 20.0
    embedding_lr: float = 0.2
    unembedding_lr: float = 0.004
    matrix_lr: float = 0.02
    weight_decay: float = 0.0
    warmup_ratio: float = 0.0
    warmdown_ratio: float = 0.2
    final_lr_frac: float = 0.0
    grad_clip: float = 1.0             # global norm of the averaged gradient; 0 turns it off
    eval_every: int = 250              # steps between validation bits-per-byte; -1 only at the end
    eval_tokens: int = 20 * 524288
    sample_every: int = 2000           # steps between greedy samples; -1 never
    save_every: int = -1               # steps between checkpoints; -1 only at the end
    dtype: str = "auto"                # auto (bf16 on CUDA, fp32 elsewhere) | fp32 | bf16
    compile: str = "auto"              # auto (on for CUDA) | on | off
    packing: str = "bestfit"           # bestfit | stream
    data_world_size: int = -1          # read data as if this many ranks shared it; -1: the real world size
    seed: int = 42
    device: str = ""                   # empty: cuda, then mps, then cpu
    keep_checkpoints: int = 2          # complete checkpoints kept on disk (older ones are deleted); -1 keeps all


PRESETS = {
    # CPU: the whole base stage on 2 cores in a few minutes, on the default corpus
    # (the stdlib's files are long, so best-fit packing would crop most of them: the flat stream wastes nothing)
    "micro": dict(depth=4, sequence_len=256, device_batch_size=8, total_batch_size=4096, num_iterations=160,
                  eval_every=40, eval_tokens=16 * 4096, sample_every=80, save_every=80, packing="stream"),
    # GPU boxes: nanochat's settings (8×H100: no accumulation at d12/d20, 2 micro-steps at d26)
    "d12": dict(depth=12, sequence_len=2048, device_batch_size=32, total_batch_size=524288),
    "d20": dict(depth=20, sequence_len=2048, device_batch_size=32, total_batch_size=524288),
    "d26": dict(depth=26, sequence_len=2048, device_batch_size=16, total_batch_size=524288),
}


def make_config(preset=None, **overrides):
    "A `TrainConfig` from a preset name plus field overrides; unknown names are errors."
    if preset is not None and preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; choose one of {sorted(PRESETS)}")
    names = {f.name for f in fields(TrainConfig)}
    bad = sorted(set(overrides) - names)
    if bad:
        raise ValueError(f"unknown TrainConfig field(s) {bad}; valid fields: {sorted(names)}")
    return replace(TrainConfig(**PRESETS.get(preset, {})), **overrides)


# %%
cfg = make_config("micro", num_iterations=20)
assert (cfg.depth, cfg.sequence_len, cfg.num_iterations) == (4, 256, 20)
try:
    make_config("micro", depht=3)
except ValueError as e:
    print(e)


# %% [markdown]
# A value can have the right type and still be nonsense: `--num-iterations 0` (which used to mean "derive it" and
# started a 25,600-step run), a negative or NaN learning rate (or one of 1e38, which overflows inside Muon), a
# warmdown longer than the run, `--device tpu`. Each field has a rule, and `validate_config` checks them all before
# the run touches a single file; the error names the flag, the value and what is allowed. The rules are a plain
# dict, so the later stages write their own in a few lines and check them with the same `check_settings`.

# %%
#| export
def _is_int(v):
    return isinstance(v, int) and not isinstance(v, bool)


def int_rule(lo, minus_one=False):
    "A rule: an integer >= lo, or also -1 (derive it, or never) when `minus_one`."
    return (lambda v: _is_int(v) and (v >= lo or (minus_one and v == -1))), \
        f"an integer >= {lo}" + (" (or -1)" if minus_one else "")


def number_rule(lo, hi=math.inf, above=False):
    "A rule: a finite number in [lo, hi] (or above `lo` when `above`)."
    def ok(v):
        return (_is_int(v) or isinstance(v, float)) and math.isfinite(v) and (v > lo if above else v >= lo) and v <= hi
    return ok, (f"a finite number {'>' if above else '>='} {lo}" if hi == math.inf else f"a number in [{lo}, {hi}]")


def choice_rule(*options):
    "A rule: one of `options`."
    return (lambda v: v in options), "one of " + ", ".join(map(repr, options))


def check_settings(config, rules):
    "Check the fields of `config` against `rules` {field: (ok, allowed)}: one line names the flag, value and rule."
    for name, (ok, allowed) in rules.items():
        value = getattr(config, name)
        if not ok(value):
            raise ValueError(f"--{name.replace('_', '-')} {value!r} is not allowed: it must be {allowed}")


# %%
#| export
TRAIN_RULES = dict(
    depth=int_rule(1), sequence_len=int_rule(1), device_batch_size=int_rule(1), total_batch_size=int_rule(1, True),
    num_iterations=int_rule(1, True), target_param_data_ratio=number_rule(0, above=True),
    embedding_lr=number_rule(0, 1000), unembedding_lr=number_rule(0, 1000), matrix_lr=number_rule(0, 1000),
    weight_decay=number_rule(0), warmup_ratio=number_rule(0, 1), warmdown_ratio=number_rule(0, 1),
    final_lr_frac=number_rule(0, 1), grad_clip=number_rule(0), eval_every=int_rule(1, True),
    eval_tokens=int_rule(1), sample_every=int_rule(1, True), save_every=int_rule(1, True),
    dtype=choice_rule("auto", "fp32", "bf16"), compile=choice_rule("auto", "on", "off"),
    packing=choice_rule("bestfit", "stream"), data_world_size=int_rule(1, True), seed=int_rule(0),
    device=(lambda v: isinstance(v, str), "a device name"), keep_checkpoints=int_rule(1, True))


def check_device(device):
    "A clear error unless `device` is empty (the best one here) or a device that this machine has."
    try:
        d = torch.device(device) if device else None
    except RuntimeError:
        d = None
    if device and (d is None or d.type not in ("cpu", "cuda", "mps")):
        raise ValueError(f"--device {device!r} is not allowed: it must be cpu, cuda, cuda:N or mps (or empty: the "
                         "best one this machine has)")
    mps = getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available()
    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if d is not None and ((d.type == "cuda" and (d.index or 0) >= count) or (d.type == "mps" and not mps)):
        have = f"{count} CUDA device(s)" if d.type == "cuda" else "no MPS device"
        raise ValueError(f"--device {device!r}: this machine has {have}; fix: --device cpu, or leave --device "
                         "empty to use the best one available")


def validate_config(config):
    "Check every setting of a TrainConfig before any file is touched; returns the config."
    check_settings(config, TRAIN_RULES)
    if config.warmup_ratio + config.warmdown_ratio > 1:
        raise ValueError(f"--warmup-ratio {config.warmup_ratio} plus --warmdown-ratio {config.warmdown_ratio} is more "
                         "than the whole run; fix: make them add up to 1 or less")
    check_device(config.device)
    return config


# %%
validate_config(make_config("micro"))
for bad in (dict(num_iterations=0), dict(matrix_lr=float("nan")), dict(embedding_lr=-0.1), dict(warmdown_ratio=1.5),
            dict(eval_tokens=0), dict(device="tpu"), dict(warmup_ratio=0.6, warmdown_ratio=0.6)):
    try:
        validate_config(make_config("micro", **bad))
    except ValueError as e:
        print(e)
    else:
        raise AssertionError(f"accepted {bad}")

# %% [markdown]
# ## How fast is fast? Peak FLOP/s and MFU
#
# Model FLOPs utilisation (MFU) is the fraction of the hardware's peak that the training step turns into model
# arithmetic: FLOPs per token (from `GPT.estimate_flops`) × tokens per step ÷ seconds per step ÷ peak. On a GPU the
# peak is the datasheet's dense bf16 number (nanochat hard-codes the H100's 989 TFLOP/s). A laptop CPU has no
# datasheet we can trust, so we *measure* it: time matmuls of a few sizes in the training dtype and keep the fastest.
# On a shared machine that measurement can come out low (another job had the cores), which shows up as an MFU above
# 100%: the training loop then measures again and keeps the larger peak, so MFU stays an honest fraction. Even so, CPU
# MFU moves by ±10 points between runs on a busy machine; compare runs measured on a quiet one.

# %%
#| export
GPU_PEAK_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "4090": 165.2e12, "L40S": 362e12, "A10": 125e12}


def peak_flops(device, dtype=torch.float32, sizes=(512, 1024, 2048), trials=3):
    "Peak FLOP/s of one device: the datasheet on a GPU; on a CPU the fastest of timed matmuls of a few sizes."
    device = torch.device(device)
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        return next((v for k, v in GPU_PEAK_FLOPS.items() if k in name), float("nan"))
    best = 0.0
    for size in sizes:  # the best size differs between CPUs (caches, blocking), so try a few
        a, b = torch.randn(size, size, dtype=dtype), torch.randn(size, size, dtype=dtype)
        a @ b  # warm-up
        repeats = max(1, 2**30 // size**3)  # about 2 GFLOP per trial
        for _ in range(trials):  # a busy machine only ever makes a matmul slower: keep the fastest
            t0 = time.perf_counter()
            for _ in range(repeats):
                a @ b
            best = max(best, 2 * size**3 * repeats / (time.perf_counter() - t0))
    return best


# %%
print(f"this CPU: {peak_flops('cpu') / 1e9:.0f} GFLOP/s fp32")


# %% [markdown]
# ## Bits per byte
#
# Validation loss in nats per token depends on the tokenizer: a bigger vocabulary packs more bytes into a token and
# so has a larger loss per token. Bits per byte divides that out: sum the loss over the targets, convert nats to bits,
# and divide by the number of UTF-8 bytes those targets stand for (the tokenizer's `token_bytes` table; special tokens
# count 0 bytes and are left out, as are ignored targets). With several ranks, each evaluates its own slice of the
# validation shard and the two sums are added across ranks before dividing.

# %%
#| export
@torch.no_grad()
def evaluate_bpb(model, batches, steps, token_bytes, autocast=nullcontext):
    "Bits per byte of `model` over `steps` batches of (inputs, targets), summed across ranks."
    total_nats = torch.zeros((), dtype=torch.float64, device=token_bytes.device)
    total_bytes = torch.zeros((), dtype=torch.float64, device=token_bytes.device)
    for _ in range(steps):
        x, y = next(batches)[:2]
        with autocast():
            loss = model(x, y, loss_reduction="none").view(-1)
        y = y.view(-1)
        nbytes = torch.where(y >= 0, token_bytes[y.clamp(min=0)], 0)
        counted = nbytes > 0
        total_nats += loss[counted].double().sum()
        total_bytes += nbytes[counted].double().sum()
    if dist.is_initialized():
        dist.all_reduce(total_nats)
        dist.all_reduce(total_bytes)
    return (total_nats / (math.log(2) * total_bytes)).item()


# %% [markdown]
# A sanity check: an untrained model (zero-initialised `lm_head`, so uniform predictions) has a loss of
# ln(vocab_size) nats per token, which is log2(vocab_size) / (bytes per token) bits per byte.

# %%
#| hide
from nanochat_nb.model import GPT

# %%
_vocab, _T = 300, 16
_model = GPT(GPTConfig(sequence_len=_T, vocab_size=_vocab, n_layer=1, n_head=1, n_kv_head=1, n_embd=64))
_tb = torch.full((_vocab,), 2, dtype=torch.int32)
_y = torch.randint(0, _vocab, (2, _T))
_bpb = evaluate_bpb(_model, iter([(_y, _y)]), 1, _tb)
assert abs(_bpb - math.log2(_vocab) / 2) < 1e-3, _bpb


# %% [markdown]
# ## Metrics, one JSON line per step
#
# Every step appends one line to `run_dir/metrics/pretrain.jsonl`: easy to tail, to plot, and to read back into
# the report. When a run resumes from step *s*, the lines the killed run wrote after *s* describe a future that
# did not happen, so they are dropped first.
#
# A crash, or a full disk, in the middle of an append leaves a torn last line: half a JSON record without its
# newline. Reading tolerates exactly that (the torn line is dropped, and said so); any other line that is not a
# record with a `step` is an error that names the file and the line, never a bare `JSONDecodeError`.

# %%
#| export
class MetricsError(ValueError):
    "A metrics file that cannot be read; the message names the file, the line and the fix."


def _metrics_lines(path, log=None):
    "[(line, record)] of a metrics file; a torn last line is dropped (and reported through `log`)."
    lines = Path(path).read_text(encoding="utf-8", errors="replace").split("\n")
    out = []
    for i, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except ValueError as e:
            if i == len(lines):  # the last line, without its newline: an append that never finished
                if log:
                    log(f"{path}: dropped a torn last line (a crash or a full disk during a write): {line[:60]!r}")
                break
            raise MetricsError(f"{path}:{i} is not a JSON record ({e}); fix: delete that line") from None
        if not isinstance(record, dict) or not _is_int(record.get("step")):
            raise MetricsError(f"{path}:{i} is a record without an integer 'step' ({line[:60]!r}); fix: delete "
                               "that line")
        out.append((line, record))
    return out


class MetricsLog:
    "Append-only JSON-lines log of a stage's steps, trimmed back to the resume point on restart."
    def __init__(self, path, resume_step=None, enabled=True, log=None):
        self.path, self.enabled = Path(path), enabled
        if not enabled:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        keep = []
        if resume_step is not None and self.path.exists():
            keep = [line for line, r in _metrics_lines(self.path, log) if r["step"] < resume_step]
        atomic_write(self.path, lambda f: f.write("".join(l + "\n" for l in keep).encode()))

    def write(self, record):
        "Append one record."
        if self.enabled:
            with self.path.open("a") as f:
                f.write(json.dumps(record) + "\n")

    @staticmethod
    def read(path, log=None):
        "All records of a metrics file (a torn last line is dropped)."
        return [record for _, record in _metrics_lines(path, log)]


# %%
with tempfile.TemporaryDirectory() as d:
    path = Path(d) / "pretrain.jsonl"
    path.write_text('{"step": 0, "loss": 5.1}\n{"step": 1, "loss": 4.7}\n{"step": 2, "lo')  # torn by a crash
    test_eq([r["step"] for r in MetricsLog.read(path, log=print)], [0, 1])
    MetricsLog(path, resume_step=1).write({"step": 1, "loss": 4.6})
    test_eq(MetricsLog.read(path), [{"step": 0, "loss": 5.1}, {"step": 1, "loss": 4.6}])
    path.write_text('{"step": 0}\n{"loss": 4.7}\n')
    test_fail(lambda: MetricsLog.read(path), contains="pretrain.jsonl:2")


# %% [markdown]
# ## Gradients across ranks
#
# There is no DDP wrapper: the distributed optimizers of chapter 03 average the gradients themselves
# (reduce-scatter to the owner of each shard). Clipping by the global norm, though, must see the *averaged*
# gradient before any optimizer steps; clipping each rank's local gradient (as nanochat does) would make a
# two-process run differ from a one-process run on the same batch. So when clipping is on and there are several
# ranks, we average the gradients first with one all-reduce per parameter. The optimizers then reduce-scatter
# gradients that are already equal everywhere, which changes nothing (x+x halves back to x exactly). It costs one
# extra all-reduce per step; `--grad-clip 0` skips it.

# %%
#| export
def clip_gradients(model, max_norm):
    "Clip the rank-averaged gradient to `max_norm`; returns the norm before clipping."
    params = [p for p in model.parameters() if p.grad is not None]
    if dist.is_initialized() and dist.get_world_size() > 1:
        for p in params:
            dist.all_reduce(p.grad, op=dist.ReduceOp.AVG)
    return torch.nn.utils.clip_grad_norm_(params, max_norm).item()


# %% [markdown]
# ## Reading data as several ranks
#
# Each rank reads its own row groups (rank *r* of *W* reads *r*, *r+W*, …). That makes the global batch depend on the
# number of processes, which is a pity: a run on one GPU would see different data from the same run on eight. So a
# process can read *as if* it were several ranks: with `data_world_size=2` a single process keeps two loaders, for
# ranks 0 and 1, and takes its micro-batches from them in turn. One process with two micro-steps then trains on
# exactly the global batches of two processes with one micro-step each, which is how the tests compare them.

# %%
#| export
class RankedBatches:
    "Round-robin over the data loaders of the virtual ranks that this process reads for."
    def __init__(self, make_loader, rank, world_size, data_world_size, resume=None):
        if data_world_size % world_size:
            raise ValueError(f"data_world_size={data_world_size} must be a multiple of the world size {world_size}")
        self.ranks = list(range(rank, data_world_size, world_size))
        resume = resume or {"states": [None] * len(self.ranks), "turn": 0}
        if len(resume["states"]) != len(self.ranks):
            raise ValueError(f"resume state holds {len(resume['states'])} loaders, this run reads {len(self.ranks)}: "
                             "resume with the same number of processes and data_world_size")
        self.loaders = [iter(make_loader(r, s)) for r, s in zip(self.ranks, resume["states"])]
        self.states = list(resume["states"])    # per loader: its state after the last *consumed* batch
        self.fetch_turn = self.next_turn = resume["turn"]

    def __iter__(self):
        return self

    def __next__(self):
        "The next batch as (inputs, targets, token); pass the token to `consumed` once it is trained on."
        i = self.fetch_turn
        x, y, state = next(self.loaders[i])
        self.fetch_turn = (i + 1) % len(self.loaders)
        return x, y, (i, state)

    def consumed(self, token):
        "Mark a batch as trained on, so that a checkpoint resumes right after it."
        i, state = token
        self.states[i], self.next_turn = state, (i + 1) % len(self.loaders)

    def state_dict(self):
        "Where every loader stands after the consumed batches (JSON-serialisable)."
        return {"states": list(self.states), "turn": self.next_turn}


# %% [markdown]
# ## The pieces every stage shares
#
# Pretraining is the first of four training stages (base, mid, SFT, RL), and the later ones differ only in their
# data, their loss and their schedule. Two pieces of the loop are the same in all of them, so they live here as
# functions the later chapters import: the optimizer step (clip the rank-averaged gradient, refuse a non-finite loss,
# set every group's learning rate and Muon's momentum from the schedule, step, clear the gradients), and putting a
# checkpoint's optimizer shards back with a clear error when they do not fit.

# %%
#| export
def optimizer_step(model, optimizers, loss, lrm, momentum, grad_clip=1.0, step=0, ckpt_dir=None):
    "Clip, check, schedule and step `[adamw, muon]` on the accumulated gradients; returns (mean loss, grad norm)."
    grad_norm = clip_gradients(model, grad_clip) if grad_clip > 0 else None
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(loss, op=dist.ReduceOp.AVG)
    loss = loss.item()
    check_finite(step, ckpt_dir, loss=loss, grad_norm=grad_norm)  # the same on every rank: all stop
    for opt in optimizers:
        for group in opt.param_groups:
            group["lr"] = group["initial_lr"] * lrm
    for group in optimizers[1].param_groups:
        group["momentum"] = momentum
    for opt in optimizers:
        opt.step()
    model.zero_grad(set_to_none=True)
    return loss, grad_norm


def restore_optimizers(optimizers, optim_state, optim_path):
    "Load a checkpoint's optimizer states (this rank's shards) into `optimizers`, or fail naming the file."
    optim_states = checkpoint_part(optim_state, "optimizers", optim_path, list)
    try:
        if len(optim_states) != len(optimizers):
            raise ValueError(f"it holds {len(optim_states)} optimizer states, this run has {len(optimizers)}")
        for opt, state in zip(optimizers, optim_states):
            opt.load_state_dict(state)
    except (ValueError, KeyError, TypeError, IndexError, RuntimeError) as e:
        raise CheckpointError(f"{optim_path} does not fit this run's optimizers ({type(e).__name__}: {e}); "
                              "fix: resume from another step, or start over with --overwrite") from e


# %%
_m = GPT(GPTConfig(sequence_len=8, vocab_size=64, n_layer=1, n_head=1, n_kv_head=1, n_embd=64))
_m.init_weights()
_opts = setup_optimizers(_m, distributed=False)
_x = torch.randint(0, 64, (2, 8))
_loss = _m(_x, _x)
_loss.backward()
_l, _g = optimizer_step(_m, _opts, _loss.detach(), lrm=0.5, momentum=0.9)
assert _l == _loss.item() and _g > 0 and all(p.grad is None for p in _m.parameters())
assert all(g["lr"] == g["initial_lr"] * 0.5 for o in _opts for g in o.param_groups)


# %% [markdown]
# ## The loop
#
# `pretrain` is nanochat's `base_train`, step for step:
#
# 1. set up the processes (`torchrun` sets the environment; without it we are a single process), the tokenizer,
#    the model built from the depth dial, the optimizers and the data;
# 2. derive the horizon and the gradient accumulation from the batch sizes (clear errors when they do not divide);
# 3. loop `num_iterations + 1` times so that the last pass can evaluate and save: evaluate bits per byte, print
#    samples, save a checkpoint when due; then run the micro-steps, clip, set the learning rates and Muon's momentum
#    from the schedules, step the optimizers, and log one line.
#
# Two details make resuming exact. The checkpoint records where each loader stood *after the last consumed batch*
# (the loop has always prefetched one more), and the loop state (step, smoothed loss, training time) travels with
# it; the model, every rank's optimizer shard and the data position are everything that decides the next update.

# %%
#| export
def _autocast_factory(device, dtype):
    "A zero-argument context factory for the chosen compute dtype."
    if dtype == "fp32":
        return nullcontext
    return lambda: torch.autocast(device_type=device.type, dtype=torch.bfloat16)


def _resolve(config, device):
    "Turn the 'auto' fields into decisions for this device."
    dtype = config.dtype if config.dtype != "auto" else ("bf16" if device.type == "cuda" else "fp32")
    compile_ = config.compile == "on" or (config.compile == "auto" and device.type == "cuda")
    if dtype not in ("fp32", "bf16"):
        raise ValueError(f"dtype must be auto, fp32 or bf16, not {config.dtype!r}")
    if config.compile not in ("auto", "on", "off"):
        raise ValueError(f"compile must be auto, on or off, not {config.compile!r}")
    return dtype, compile_


# %%
#| export
SAMPLE_PROMPTS = ["def fibonacci(n):", "import os\n", "The purpose of this module is", "class Stack:"]


def pretrain(run_dir, config=None, resume=False, on_step=None, log=print, overwrite=False,
             allow_data_change=False, allow_tokenizer_change=False):
    "Train a base model on `run_dir/data` with `run_dir/tokenizer`; returns a summary dict."
    config = validate_config(config or TrainConfig())  # every setting, before any file is touched
    if resume and overwrite:
        raise ValueError("--resume and --overwrite contradict each other: continue the run, or delete it and start "
                         "over; fix: pass one of them")
    run_dir = check_run_dir(run_dir)
    # rank 0 claims the run directory: base for itself alone, the tokenizer and the data against writers
    lock = RunLock(run_dir, writes=["base"], reads=["tokenizer", "data"], log=log) \
        if int(os.environ.get("RANK", "0")) == 0 else nullcontext()
    allow = [name for name, ok in (("data", allow_data_change), ("tokenizer", allow_tokenizer_change)) if ok]
    with lock:
        return _pretrain(run_dir, config, resume, overwrite, allow, on_step, log)


def _pretrain(run_dir, config, resume, overwrite, allow, on_step, log):
    "The loop of `pretrain`, run while the run directory is held."
    info = init_distributed(torch.device(config.device).type if config.device else None)
    rank, world = info.rank, info.world_size
    device = torch.device(config.device) if config.device else info.device
    master = rank == 0
    say = log if master else (lambda *a, **k: None)
    dtype, use_compile = _resolve(config, device)
    autocast = _autocast_factory(device, dtype)
    torch.manual_seed(config.seed)

    tokenizer = Tokenizer.load(run_dir / "tokenizer")
    token_bytes = tokenizer.token_bytes.to(device)
    ckpt_dir, metrics_path = checkpoint_dir(run_dir, "base"), run_dir / "metrics" / "pretrain.jsonl"
    if not resume and not overwrite:
        check_stage_empty(ckpt_dir, metrics_path)  # a fresh run never lands on an earlier one
    fingerprints = {"tokenizer": tokenizer.fingerprint, "data": shards_fingerprint(run_dir / "data")}
    model_config = GPTConfig.from_depth(config.depth, sequence_len=config.sequence_len,
                                        vocab_size=tokenizer.vocab_size)
    model = build_model(model_config, device)
    num_params, flops_per_token = model.num_params(), model.estimate_flops()

    B, T = config.device_batch_size, config.sequence_len
    total_batch = config.total_batch_size if config.total_batch_size > 0 else B * T * world
    accum = grad_accum_steps(total_batch, B, T, world)
    data_world = config.data_world_size if config.data_world_size > 0 else world
    if (accum * world) % data_world:
        raise ValueError(f"{accum} micro-steps on {world} rank(s) cannot be spread evenly over "
                         f"data_world_size={data_world}; pick a data_world_size that divides {accum * world}")
    num_iterations = (config.num_iterations if config.num_iterations > 0
                      else training_horizon(num_params, config.target_param_data_ratio, total_batch))
    optimizers = setup_optimizers(model, unembedding_lr=config.unembedding_lr, embedding_lr=config.embedding_lr,
                                  matrix_lr=config.matrix_lr, weight_decay=config.weight_decay)
    say(f"model: depth {config.depth}, {num_params:,} parameters, {flops_per_token:.3g} FLOPs/token | "
        f"{world} rank(s) on {device.type}, {dtype}, compile {use_compile}")
    say(f"batch: {total_batch:,} tokens/step = {B} rows x {T} tokens x {world} rank(s) x {accum} micro-step(s); "
        f"{num_iterations} steps = {num_iterations * total_batch:,} tokens")

    # --- resume: model, this rank's optimizer shard, data positions, loop state
    step, loop = 0, dict(min_val_bpb=None, smooth_train_loss=0.0, total_training_time=0.0)
    data_states, val_bpb = None, None
    if resume and latest_step(ckpt_dir) is not None:
        step = latest_step(ckpt_dir)
        model_state, optim_state, meta = load_checkpoint(ckpt_dir, step, device, load_optimizer=True, rank=rank)
        model_path, meta_path, optim_path = _paths(ckpt_dir, step, rank)
        if checkpoint_part(meta, "model_config", meta_path) != asdict(model_config):
            raise ValueError(f"checkpoint in {ckpt_dir} has model_config {meta['model_config']}, this run builds "
                             f"{asdict(model_config)}: resume with the same --depth/--sequence-len and tokenizer")
        if meta.get("world_size", world) != world or meta.get("data_world_size", data_world) != data_world:
            raise ValueError(f"checkpoint was written by {meta.get('world_size')} rank(s) reading as "
                             f"{meta.get('data_world_size')}; resume with the same number of processes")
        unchecked = check_fingerprints(meta_path, meta.get("fingerprints"), fingerprints, allow)
        if unchecked:
            say(f"note: {meta_path} records no fingerprint of the {' and '.join(unchecked)} (an older checkpoint): "
                "not checked")
        val_bpb = meta.get("val_bpb")
        if step > num_iterations:
            raise ValueError(f"{meta_path} is at step {step}, past --num-iterations {num_iterations}, so the run "
                             f"would never end; fix: --num-iterations {step} or more, or --overwrite to start over")
        loop = checkpoint_part(meta, "loop_state", meta_path)
        data_states = checkpoint_part(meta, "dataloader_state", meta_path, list)[rank]
        _check_state(model.state_dict(), model_state, model_path)
        model.load_state_dict(model_state, strict=True)
        restore_optimizers(optimizers, optim_state, optim_path)
        if meta.get("num_iterations", num_iterations) != num_iterations:
            say(f"note: the checkpoint was trained toward {meta['num_iterations']} steps; the learning-rate "
                f"schedule now aims at {num_iterations}")
        say(f"resumed from step {step} ({ckpt_dir})")
        if step == num_iterations:
            say(f"the run already reached step {step} of {num_iterations}: nothing to train (raise "
                "--num-iterations to train on)")
            cleanup_distributed()
            return dict(step=step, val_bpb=val_bpb, min_val_bpb=loop.get("min_val_bpb"), num_params=num_params,
                        total_training_time=loop.get("total_training_time"),
                        final_loss=loop.get("smooth_train_loss"), checkpoint_dir=str(ckpt_dir))
    elif resume:
        say(f"nothing to resume in {ckpt_dir}: starting from scratch")

    train_model = torch.compile(model, dynamic=False) if use_compile else model
    data_dir = run_dir / "data"

    def make_loader(r, state, split="train"):
        return DataLoader(tokenizer, data_dir, B, T, split=split, rank=r, world_size=data_world,
                          device=device, packing=config.packing, state=state)

    try:
        batches = RankedBatches(make_loader, rank, world, data_world, data_states)
    except (KeyError, TypeError, IndexError, ValueError) as e:
        if data_states is None:
            raise
        raise CheckpointError(f"{meta_path}: its dataloader_state does not fit this run ({type(e).__name__}: {e}); "
                              "fix: resume with the settings it was saved with, or start over with --overwrite") from e
    if overwrite and master:
        say(f"--overwrite: deleted {clear_checkpoints(ckpt_dir)} checkpoint file(s) and the metrics of the earlier run")
    metrics = MetricsLog(metrics_path, resume_step=step if resume else None, enabled=master, log=say)
    peak_dtype = torch.bfloat16 if dtype == "bf16" else torch.float32
    peak, remeasured = peak_flops(device, peak_dtype), 0
    eval_steps = max(1, config.eval_tokens // (B * T * data_world))   # per virtual rank

    val_cache = []

    def val_batches():
        "The same validation batches at every evaluation: each virtual rank's slice, tokenised once."
        if not val_cache:
            for r in batches.ranks:
                val_cache.extend(islice(iter(make_loader(r, None, "val")), eval_steps))
        return iter(val_cache)

    def due(every):
        return every > 0 and step % every == 0

    x, y, token = next(batches)
    resume_step = step
    while True:
        last = step == num_iterations
        record = {"step": step}
        # --- evaluate, sample, save (the model here has taken `step` optimizer steps)
        if last or due(config.eval_every):
            model.eval()
            val_bpb = evaluate_bpb(model, val_batches(), eval_steps * len(batches.ranks), token_bytes, autocast)
            loop["min_val_bpb"] = min(loop["min_val_bpb"] or val_bpb, val_bpb)
            record["val_bpb"] = val_bpb
            say(f"step {step:05d} | val bpb {val_bpb:.4f}")
            model.train()
        if master and (last or due(config.sample_every)):
            model.eval()
            for prompt in SAMPLE_PROMPTS:
                ids = tokenizer.encode(prompt, prepend=tokenizer.bos_id)
                with autocast():
                    out = list(model.generate(ids, max_tokens=24, temperature=0))
                say(f"  sample: {tokenizer.decode(ids[1:] + out)!r}")
            model.train()
        if step > resume_step and (last or due(config.save_every)):
            check_finite(step, ckpt_dir, val_bpb=val_bpb, weights=model)  # never save a NaN over a good checkpoint
            all_states = [None] * world
            mine = batches.state_dict()
            if world > 1:
                dist.all_gather_object(all_states, mine)
            else:
                all_states = [mine]
            meta = dict(step=step, val_bpb=val_bpb, model_config=asdict(model_config), user_config=asdict(config),
                        device_batch_size=B, max_seq_len=T, total_batch_size=total_batch,
                        num_iterations=num_iterations, world_size=world, data_world_size=data_world,
                        dataloader_state=all_states, loop_state=loop, fingerprints=fingerprints)
            save_checkpoint(ckpt_dir, step, model.state_dict(), {"optimizers": [o.state_dict() for o in optimizers]},
                            meta, rank=rank, barrier=dist.barrier if world > 1 else None)
            say(f"saved checkpoint {ckpt_dir}/model_{step:06d}.pt")
            if master and config.keep_checkpoints > 0:
                prune_checkpoints(ckpt_dir, config.keep_checkpoints, remove_temps=False)
        if last:
            if len(record) > 1:
                metrics.write(record | {"elapsed": loop["total_training_time"]})
                if on_step:
                    on_step(record)
            break

        # --- one optimizer step: accumulate gradients over the micro-steps
        t0 = time.perf_counter()
        train_loss = torch.zeros((), device=device)
        for _ in range(accum):
            with autocast():
                loss = train_model(x, y)
            train_loss += loss.detach()
            (loss / accum).backward()
            batches.consumed(token)
            x, y, token = next(batches)   # prefetch while the GPU works
        lrm = lr_multiplier(step, num_iterations, config.warmup_ratio, config.warmdown_ratio, config.final_lr_frac)
        train_loss, grad_norm = optimizer_step(model, optimizers, train_loss / accum, lrm, muon_momentum(step),
                                               config.grad_clip, step, ckpt_dir)
        if device.type == "cuda":
            torch.cuda.synchronize()
        dt = time.perf_counter() - t0

        # --- bookkeeping: the first steps are warm-up (compilation), so they do not count towards the time
        if step > resume_step:
            loop["total_training_time"] += dt
        beta = 0.9
        loop["smooth_train_loss"] = beta * loop["smooth_train_loss"] + (1 - beta) * train_loss
        smooth = loop["smooth_train_loss"] / (1 - beta ** (step + 1))
        tok_per_s = total_batch / dt
        mfu = 100 * flops_per_token * total_batch / dt / (peak * world)
        if mfu > 100 and device.type == "cpu" and remeasured < 3:  # the peak was measured while the cores were busy
            peak, remeasured = max(peak, peak_flops(device, peak_dtype)), remeasured + 1
            mfu = 100 * flops_per_token * total_batch / dt / (peak * world)
        record.update(loss=train_loss, smooth_loss=smooth, lr_mult=lrm, lr=config.matrix_lr * lrm,
                      grad_norm=grad_norm, tokens_per_s=tok_per_s, mfu=mfu, dt=dt,
                      elapsed=loop["total_training_time"])
        metrics.write(record)
        if on_step:
            on_step(record)
        if step % max(1, num_iterations // 20) == 0 or step < 3:
            say(f"step {step:05d}/{num_iterations} | loss {train_loss:.4f} | lrm {lrm:.2f} | "
                f"{tok_per_s:,.0f} tok/s | mfu {mfu:.1f}% | {dt * 1000:.0f} ms")
        step += 1

    summary = dict(step=step, val_bpb=val_bpb, min_val_bpb=loop["min_val_bpb"], num_params=num_params,
                   total_training_time=loop["total_training_time"], final_loss=loop["smooth_train_loss"],
                   checkpoint_dir=str(ckpt_dir))
    cleanup_distributed()
    return summary


# %% [markdown]
# ## Watching it learn
#
# Inside a notebook, `on_step` receives every record as it is written; this callback redraws a chart in place
# every few steps, so the loss falls while you watch.

# %%
#| export
class LiveLossChart:
    "An `on_step` callback that redraws the training loss and validation bpb in place, in a notebook."
    def __init__(self, every=5, title="pretraining"):
        import matplotlib.pyplot as plt
        from IPython.display import display
        self.every, self.records = every, []
        self.fig, (self.ax_loss, self.ax_bpb) = plt.subplots(1, 2, figsize=(10, 3.2))
        self.fig.suptitle(title)
        plt.close(self.fig)  # shown only through the display handle
        self.handle = display(self.fig, display_id=True)

    def __call__(self, record):
        self.records.append(record)
        if record["step"] % self.every == 0 or "loss" not in record:
            self.draw()

    def draw(self):
        "Redraw both panels from the records so far."
        train = [r for r in self.records if "loss" in r]
        val = [r for r in self.records if "val_bpb" in r]
        self.ax_loss.clear(); self.ax_bpb.clear()
        self.ax_loss.plot([r["step"] for r in train], [r["loss"] for r in train], lw=0.8, alpha=0.5, label="loss")
        self.ax_loss.plot([r["step"] for r in train], [r["smooth_loss"] for r in train], label="smoothed")
        self.ax_loss.set(xlabel="step", ylabel="train loss (nats/token)"); self.ax_loss.legend()
        self.ax_bpb.plot([r["step"] for r in val], [r["val_bpb"] for r in val], "o-", color="C2")
        self.ax_bpb.set(xlabel="step", ylabel="validation bits per byte")
        self.fig.tight_layout()
        if self.handle is not None:
            self.handle.update(self.fig)


# %% [markdown]
# ## A run, start to finish
#
# Here is the whole base stage on the default corpus, at a size that a laptop finishes in well under a minute: a
# 4096-token vocabulary, the standard library packed into shards, and 20 steps of a depth-4 model. (The `micro`
# preset of `nanochat-nb pretrain` runs the same thing for 160 steps; set `num_iterations` below to try it.)

# %% tags=["parameters"]
run_dir = "../runs/chapter06"
vocab_size = 4096
num_iterations = 20

# %%
from nanochat_nb.data import prepare_data
from nanochat_nb.tokenizer import train_tokenizer

tok_stats = train_tokenizer(run_dir, vocab_size=vocab_size, max_chars=20_000_000)
data_stats = prepare_data(run_dir)
print(tok_stats, data_stats, sep="\n")

# %%
config = make_config("micro", num_iterations=num_iterations, eval_every=5, sample_every=-1, save_every=-1,
                      eval_tokens=4 * 4096)
chart = LiveLossChart(every=5)
summary = pretrain(run_dir, config, on_step=chart, overwrite=True)  # overwrite: the chapter's own scratch run
chart.draw()
summary

# %% [markdown]
# The validation bits per byte starts near log2(4096)/(bytes per token), what a model that knows nothing pays, and
# falls fast. The metrics file holds the same numbers for the report:

# %%
records = MetricsLog.read(Path(run_dir) / "metrics" / "pretrain.jsonl")
bpbs = [r["val_bpb"] for r in records if "val_bpb" in r]
print(f"{len(records)} records; val bpb {bpbs[0]:.3f} -> {bpbs[-1]:.3f}")
assert len(records) == num_iterations + 1 and bpbs[-1] < bpbs[0] - 0.5

# %% [markdown]
# Measured on a 2-core CPU with nothing else running, the full `micro` preset (`make speedrun`: 160 steps, 655K
# tokens, fp32) trains at about 0.9 s per step (≈4,400 tokens/s, ≈65% of the measured fp32 peak), 149 s in all,
# and its validation bits per byte go 3.23 → 2.39 → 2.28 → 2.16 → 1.93 at steps 0, 40, 80, 120 and 160. The same
# preset under `torchrun --nproc_per_node=2` takes about 1.0 s per step and ends at 2.01 (two ranks read the data in
# another order). `docs/benchmarks.md` keeps these numbers.

# %% [markdown]
# ## Many processes, one result
#
# Under `torchrun`, each process trains on its own slice of the batch, the optimizers average the gradients and
# shard their state, and rank 0 alone writes files. The command line is the same, prefixed:
#
# ```sh
# torchrun --standalone --nproc_per_node=2 -m nanochat_nb.cli pretrain --preset micro --run-dir runs/demo
# ```
#
# On a CPU that uses gloo; on GPUs nccl. The test suite (`tests/test_pretrain.py`) runs two processes on gloo and
# checks that their losses and final weights equal those of one process with two micro-steps on the same global
# batches, and that a run killed with SIGKILL and restarted with `--resume` ends on the same weights as a run that
# was never interrupted.

# %% [markdown]
# ## Going further: a run that cannot be broken
#
# Surviving `kill -9` is half of it; the other half is the user. `pretrain` puts the shared pieces of the checkpoint
# chapter around the loop, in this order, so that a mistake costs one line and nothing else:
#
# 1. `validate_config`: every setting, before any file is touched;
# 2. `check_run_dir` and `RunLock`: the run directory is usable, this process alone writes its `base` stage (a second
#    `pretrain`, or a `data prepare` under a running one, is refused with the holder's pid), and temp files of
#    killed saves are swept;
# 3. `check_stage_empty`: without `--resume`, an earlier run is never silently mixed in (`--overwrite` clears it);
# 4. on `--resume`: the checkpoint's parts are checked (`checkpoint_part`), its step must not be past
#    `--num-iterations`, and its `fingerprints` must match the tokenizer and data of the run directory
#    (`--allow-data-change`, `--allow-tokenizer-change` to go on anyway);
# 5. in the loop: `check_finite` on the loss and gradient norm of every step and on the weights before every save,
#    and `prune_checkpoints` after each save, keeping `--keep-checkpoints` (default 2).
#
# Here are two of them on the run above: a fresh start over it, and a resume that asks for fewer steps than it has.
# `tests/test_robust_*.py` meets every one of these as a user would, through the command line.

# %%
from nanochat_nb.checkpoint import RunDirError

for attempt in (lambda: pretrain(run_dir, config),
                lambda: pretrain(run_dir, replace(config, num_iterations=num_iterations // 2), resume=True)):
    try:
        attempt()
    except (RunDirError, ValueError) as e:
        print(e, end="\n\n")
    else:
        raise AssertionError("expected a refusal")

# %% [markdown]
# ## At scale
#
# On an 8×H100 box the same loop runs nanochat's d20: `--preset d20` sets depth 20 (561M parameters), sequence
# 2,048, 32 rows per GPU and 524,288 tokens per step, so no gradient accumulation; the horizon from the 20:1
# tokens:parameters ratio is 21,400 steps (11.2B tokens). bf16 autocast and `torch.compile` turn on by themselves
# on CUDA. nanochat reports about 487 ms per step, 1.08M tokens/s and 47–48% MFU, about 3 hours, ending near
# 0.81 validation bits per byte. Validation runs every 250 steps over 10.5M tokens, samples every 2,000. Data:
# `nanochat-nb data download --shards 240` first (about 24 GB of FineWeb-edu).
#
# ```sh
# torchrun --standalone --nproc_per_node=8 -m nanochat_nb.cli pretrain --preset d20 --run-dir runs/d20
# ```
#
# On one GPU the same command without torchrun accumulates 8 micro-steps per step and takes about 8× longer;
# `--data-world-size 8` makes it read exactly the data that eight GPUs would.

# %% [markdown]
# ## Summary and exercises
#
# We built the base training loop: presets and a flat config, MFU against a measured or datasheet peak, bits per
# byte, a JSON-lines metrics log, exact gradient clipping across ranks, data read as any number of ranks, and
# checkpoints that resume exactly; around it, settings checked before anything is touched, a run directory that one
# process owns, and no NaN ever saved.
#
# 1. Train the `micro` preset with `--dtype bf16` and compare the loss curve and tokens/s with fp32.
# 2. Turn `warmdown_ratio` to 0 and then to 0.5: how does the final validation bpb move?
# 3. Kill a run with Ctrl-C halfway, restart it with `--resume`, and diff the two `pretrain.jsonl` files.
