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
# > The base training loop, built in steps: twenty lines that learn, then the loop that runs on one process or many,
# > on a laptop or on 8×H100, and survives being killed.

# %% [markdown]
# Everything so far was parts: a tokenizer (chapter 01), a model (02), its optimizers and schedules (03), a stream
# of token batches (04) and a way to save all of it (05). This chapter turns the parts into a training system: the
# loop that nanochat calls `base_train`. We first write the loop a reader can hold in one glance (about twenty
# lines) and watch it learn. Then we add, one at a time and each for a reason, what a real run needs: bigger batches
# than memory holds, clipping, evaluation, samples, metrics, MFU, checkpoints that resume *exactly*, and many
# processes. At the end you will have a base model that has read the standard library's sources, a
# `metrics/pretrain.jsonl` with one line per step, and checkpoints from which a killed run ends on the same weights,
# bit for bit, as a run that was never interrupted.
#
# *Pipeline:* the tokenizer, model, optimizers, data and checkpoints of chapters 01–05 come in; the inference engine
# (07) turns the checkpoint into text, and midtraining (11) teaches it to chat.

# %%
#| default_exp pretrain

# %%
#| export
import json, math, os, time
from itertools import islice
from contextlib import nullcontext
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from types import SimpleNamespace

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

import matplotlib.pyplot as plt
from fastcore.test import test_close, test_eq, test_fail

# %% [markdown]
# ## A tokenizer and shards to train on
#
# The run directory of this chapter holds a 4,096-token tokenizer trained on the standard library's sources
# (chapter 01) and those sources packed into parquet shards (chapter 04). Both take a few seconds.

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


# %% [markdown]
# ## A first loop
#
# Training is four lines repeated: take a batch, compute the loss (forward), compute its gradient (backward), and
# let the optimizers move the weights. Around them we need a model (chapter 02's `build_model`, seeded so that it is
# the same every time), its two optimizers (chapter 03: Muon for the block matrices, AdamW for the embeddings), a
# batch stream (chapter 04's `DataLoader`) and the learning-rate and momentum schedules of chapter 03. Nothing else:
# no evaluation, no saving, one process.

# %%
def simple_loop(run_dir, steps=20, depth=4, B=8, T=256, seed=42, every=5):
    "Train a fresh depth-`depth` model for `steps` steps on `run_dir`'s shards; returns the loss of every step."
    tokenizer = Tokenizer.load(Path(run_dir) / "tokenizer")
    torch.manual_seed(seed)
    model = build_model(GPTConfig.from_depth(depth, sequence_len=T, vocab_size=tokenizer.vocab_size), "cpu")
    adamw, muon = setup_optimizers(model)
    batches = iter(DataLoader(tokenizer, Path(run_dir) / "data", B, T, packing="stream"))
    losses = []
    for step in range(steps):
        x, y, _ = next(batches)                 # B rows of T tokens; y is x shifted by one
        loss = model(x, y)                      # forward: mean cross-entropy of the next token
        loss.backward()                         # backward: a gradient on every parameter
        lrm = lr_multiplier(step, steps)        # flat, then a linear warmdown to 0 (chapter 03)
        for opt in (adamw, muon):
            for group in opt.param_groups:
                group["lr"] = group["initial_lr"] * lrm
        muon.param_groups[0]["momentum"] = muon_momentum(step)
        adamw.step(); muon.step()               # move the weights
        model.zero_grad(set_to_none=True)
        losses.append(loss.item())
        if step % every == 0 or step == steps - 1:
            print(f"step {step:3d} | loss {loss.item():.3f}")
    return losses


# %%
t0 = time.perf_counter()
simple_losses = simple_loop(run_dir, steps=num_iterations)
print(f"{num_iterations} steps in {time.perf_counter() - t0:.0f} s")
assert simple_losses[-1] < simple_losses[0] - 1

# %%
#| fig-alt: "Training loss of the twenty-line loop over its steps, falling by several nats from ln 4096, about 8.3."
plt.figure(figsize=(6, 2.5))
plt.plot(simple_losses, "o-", ms=3)
plt.axhline(math.log(vocab_size), color="grey", ls=":", label=f"ln {vocab_size}: a uniform guess")
plt.xlabel("step"); plt.ylabel("train loss (nats/token)"); plt.title("the twenty-line loop learns"); plt.legend()
plt.show()


# %% [markdown]
# The first loss is ln 4096 ≈ 8.3: the model starts with a zero `lm_head`, so it guesses uniformly. In a few steps it
# learns which tokens are common, and the loss drops by several nats. That is the whole idea of pretraining. What
# follows is what it takes to run this loop for hours on many GPUs without losing the work:
#
# | Feature | Why |
# |---|---|
# | a checked config with presets | one object describes a run, and a typo fails before any file is touched |
# | gradient accumulation | the batch that trains well (nanochat: 524,288 tokens) is larger than one device's memory |
# | data read as several ranks | one GPU and eight must see the same batches, or runs cannot be compared |
# | clipping, one optimizer step | a rare huge gradient must not throw the weights away; every stage shares the step |
# | validation bits per byte | the training loss is measured on batches the model just learned from |
# | greedy samples | a number says *that* it learns; a sample says *what* |
# | metrics and MFU | one line per step to plot, and how much of the hardware the step turns into arithmetic |
# | checkpoints and exact resume | a killed run must cost minutes, not hours, and end where it would have |
# | many processes (torchrun) | eight GPUs train eight times faster on the same batches |
#
# Each gets a section below; the last section assembles them into `pretrain` and checks that, with the features
# turned off, it computes exactly the losses of `simple_loop`.

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


# %% [markdown]
# Every stage of the book has a config like this one and presets like these, so building one from a preset name and
# overrides is a function of the dataclass, the presets and (optionally) the rules of the next section.

# %%
#| export
def build_config(cls, presets, rules=None, preset=None, **overrides):
    "A `cls` from a preset of `presets` plus field overrides; unknown names are errors; checked by `rules` if given."
    if preset is not None and preset not in presets:
        raise ValueError(f"unknown preset {preset!r}; choose one of {sorted(k for k in presets if k)}")
    names = {f.name for f in fields(cls)}
    bad = sorted(set(overrides) - names)
    if bad:
        raise ValueError(f"unknown {cls.__name__} field(s) {bad}; valid fields: {sorted(names)}")
    config = replace(cls(**presets.get(preset, {})), **overrides)
    if rules is not None:
        check_settings(config, rules)
    return config


def make_config(preset=None, **overrides):
    "A `TrainConfig` from a preset name plus field overrides; unknown names are errors."
    return build_config(TrainConfig, PRESETS, None, preset, **overrides)


# %%
cfg = make_config("micro", num_iterations=20)
assert (cfg.depth, cfg.sequence_len, cfg.num_iterations) == (4, 256, 20)
test_fail(lambda: make_config("micro", depht=3), contains="unknown TrainConfig field(s) ['depht']")
test_fail(lambda: make_config("tiny"), contains="choose one of ['d12', 'd20', 'd26', 'micro']")


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
test_fail(lambda: build_config(TrainConfig, PRESETS, TRAIN_RULES, "micro", depth=0), contains="--depth 0")


# %% [markdown]
# ## Bigger batches than memory: gradient accumulation
#
# The batch size that trains well is a property of the problem, not of the GPU: nanochat takes 524,288 tokens per
# optimizer step. One H100 holds 32 rows of 2,048 tokens (65,536) for a forward and backward pass at depth 20. So a
# step runs several *micro-steps*, each adding its gradient (divided by their number) into `.grad`, and the optimizer
# steps once on the sum, which equals the gradient of the whole batch. With 8 GPUs each doing one micro-step there is
# no accumulation at all; with one GPU there are 8 micro-steps and the run is 8× slower, on the same batches.
#
# `_batch_plan` derives the numbers of a run: tokens per step, micro-steps, the number of data ranks, and the horizon
# (nanochat's 20 tokens per parameter when `num_iterations` is -1). When they do not divide, it says so.

# %%
#| export
def _batch_plan(config, world, num_params):
    "Rows, tokens per step, micro-steps, data ranks and the number of steps of a run on `world` processes."
    B, T = config.device_batch_size, config.sequence_len
    total_batch = config.total_batch_size if config.total_batch_size > 0 else B * T * world
    accum = grad_accum_steps(total_batch, B, T, world)
    data_world = config.data_world_size if config.data_world_size > 0 else world
    if (accum * world) % data_world:
        raise ValueError(f"{accum} micro-steps on {world} rank(s) cannot be spread evenly over "
                         f"data_world_size={data_world}; pick a data_world_size that divides {accum * world}")
    num_iterations = (config.num_iterations if config.num_iterations > 0
                      else training_horizon(num_params, config.target_param_data_ratio, total_batch))
    return SimpleNamespace(B=B, T=T, total_batch=total_batch, accum=accum, data_world=data_world,
                           num_iterations=num_iterations)


# %%
for name, world in (("micro", 1), ("micro", 2), ("d20", 1), ("d20", 8)):
    p = _batch_plan(make_config(name), world, num_params=560_988_160)  # nanochat's d20 has 561M parameters
    print(f"{name:5s} on {world} process(es): {p.total_batch:7,} tokens/step = {p.B} x {p.T} x {world} x "
          f"{p.accum} micro-step(s); {p.num_iterations:,} steps")
_p = _batch_plan(make_config("d20"), 8, 560_988_160)
assert _p.accum == 1 and abs(_p.num_iterations * _p.total_batch / 560_988_160 - 20) < 1e-3  # 20 tokens/param
test_fail(lambda: _batch_plan(make_config(device_batch_size=3, sequence_len=64, total_batch_size=1000), 1, 1),
          contains="multiple of 192")


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
# One process reading as two ranks takes rank 0's first batch, then rank 1's, then rank 0's second; a checkpoint
# taken after two consumed batches resumes with the third.

# %%
_tok = Tokenizer.load(Path(run_dir) / "tokenizer")
_make = lambda r, state: DataLoader(_tok, Path(run_dir) / "data", 2, 32, rank=r, world_size=2, packing="stream",
                                    state=state)
_two = RankedBatches(_make, rank=0, world_size=1, data_world_size=2)
_b = [next(_two) for _ in range(3)]
test_eq(_b[0][0], next(iter(_make(0, None)))[0])   # rank 0's first batch
test_eq(_b[1][0], next(iter(_make(1, None)))[0])   # then rank 1's
_two.consumed(_b[0][2]); _two.consumed(_b[1][2])
_again = RankedBatches(_make, 0, 1, 2, resume=_two.state_dict())
test_eq(next(_again)[0], _b[2][0])                 # a resume continues with the third batch


# %% [markdown]
# ## Setting up a run
#
# A run starts by deciding its device and number format (bf16 autocast on CUDA, fp32 elsewhere; `torch.compile` on
# CUDA), joining the other processes (`torchrun` sets the environment; without it we are a single process), loading
# the tokenizer, building the seeded model and its optimizers, and making the batch plan. Everything the loop needs
# then travels in one namespace `r`, so that the functions below take a few arguments rather than twenty.

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
def _setup(run_dir, config, resume, overwrite, log):
    "Processes, device, tokenizer, seeded model, optimizers and batch plan of a run, in one namespace."
    info = init_distributed(torch.device(config.device).type if config.device else None)
    device = torch.device(config.device) if config.device else info.device
    dtype, use_compile = _resolve(config, device)
    torch.manual_seed(config.seed)
    tokenizer = Tokenizer.load(run_dir / "tokenizer")
    ckpt_dir, metrics_path = checkpoint_dir(run_dir, "base"), run_dir / "metrics" / "pretrain.jsonl"
    if not resume and not overwrite:
        check_stage_empty(ckpt_dir, metrics_path)  # a fresh run never lands on an earlier one
    fingerprints = {"tokenizer": tokenizer.fingerprint, "data": shards_fingerprint(run_dir / "data")}
    model_config = GPTConfig.from_depth(config.depth, sequence_len=config.sequence_len,
                                        vocab_size=tokenizer.vocab_size)
    model = build_model(model_config, device)
    r = SimpleNamespace(config=config, run_dir=run_dir, rank=info.rank, world=info.world_size, master=info.rank == 0,
                        say=log if info.rank == 0 else (lambda *a, **k: None), device=device, dtype=dtype,
                        use_compile=use_compile, autocast=_autocast_factory(device, dtype), tokenizer=tokenizer,
                        token_bytes=tokenizer.token_bytes.to(device), ckpt_dir=ckpt_dir, metrics_path=metrics_path,
                        fingerprints=fingerprints, model_config=model_config, model=model, train_model=model,
                        num_params=model.num_params(), flops_per_token=model.estimate_flops(),
                        **vars(_batch_plan(config, info.world_size, model.num_params())))
    r.optimizers = setup_optimizers(model, unembedding_lr=config.unembedding_lr, embedding_lr=config.embedding_lr,
                                    matrix_lr=config.matrix_lr, weight_decay=config.weight_decay)
    r.say(f"model: depth {config.depth}, {r.num_params:,} parameters, {r.flops_per_token:.3g} FLOPs/token | "
          f"{r.world} rank(s) on {device.type}, {dtype}, compile {use_compile}")
    r.say(f"batch: {r.total_batch:,} tokens/step = {r.B} rows x {r.T} tokens x {r.world} rank(s) x {r.accum} "
          f"micro-step(s); {r.num_iterations} steps = {r.num_iterations * r.total_batch:,} tokens")
    return r


# %% [markdown]
# The data come last: the training batches (each virtual rank's loader, resumed where a checkpoint left them) and the
# validation batches, the same at every evaluation so that the numbers are comparable (tokenised once, then kept).

# %%
#| export
def _open_data(r, data_states=None, step=0):
    "The training batches (resumed from `data_states`) and a function that returns the fixed validation batches."
    def make_loader(rank, state, split="train"):
        return DataLoader(r.tokenizer, r.run_dir / "data", r.B, r.T, split=split, rank=rank, world_size=r.data_world,
                          device=r.device, packing=r.config.packing, state=state)
    try:
        batches = RankedBatches(make_loader, r.rank, r.world, r.data_world, data_states)
    except (KeyError, TypeError, IndexError, ValueError) as e:
        if data_states is None:
            raise
        raise CheckpointError(f"{_paths(r.ckpt_dir, step, r.rank)[1]}: its dataloader_state does not fit this run "
                              f"({type(e).__name__}: {e}); fix: resume with the settings it was saved with, or start "
                              "over with --overwrite") from e
    r.eval_steps = max(1, r.config.eval_tokens // (r.B * r.T * r.data_world))   # per virtual rank
    val_cache = []

    def val_batches():
        "The same validation batches at every evaluation: each virtual rank's slice, tokenised once."
        if not val_cache:
            for rank in batches.ranks:
                val_cache.extend(islice(iter(make_loader(rank, None, "val")), r.eval_steps))
        return iter(val_cache)
    return batches, val_batches


# %%
r = _setup(Path(run_dir), make_config("micro", eval_tokens=4096), resume=False, overwrite=True, log=print)
batches, val_batches = _open_data(r)
batch = next(batches)
test_eq((batch[0].shape, r.accum, r.eval_steps), ((8, 256), 2, 2))


# %% [markdown]
# ## Clipping, across ranks
#
# Now and then a batch produces a gradient many times larger than usual, and one step along it undoes hours of
# training. Clipping rescales the whole gradient when its global norm exceeds `grad_clip` (1.0, as nanochat).
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
# ## The optimizer step every stage shares
#
# Pretraining is the first of four training stages (base, mid, SFT, RL), and the later ones differ only in their
# data, their loss and their schedule. The optimizer step is the same in all of them, so it lives here as a function
# the later chapters import: clip the rank-averaged gradient, refuse a non-finite loss (a NaN is never trained on,
# never saved), set every group's learning rate and Muon's momentum from the schedules of chapter 03, step, clear the
# gradients. Putting a checkpoint's optimizer shards back, with a clear error when they do not fit, is the other
# shared piece.

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
#| hide
from nanochat_nb.model import GPT

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
_m(_x, _x).mul(float("nan")).backward()
test_fail(lambda: optimizer_step(_m, _opts, torch.tensor(float("nan")), 1.0, 0.9, step=7), contains="step 7")


# %% [markdown]
# ## One training step
#
# One optimizer step of the real loop is the simple loop's body with the micro-steps around it: each micro-batch's
# loss is divided by their number before `backward`, so that the gradients add up to the gradient of the mean. Two
# details matter later. The next batch is fetched right after the backward pass (on a GPU the data loader then works
# while the GPU computes), so the loop always holds one batch it has not trained on; and each batch is marked
# `consumed` only once it is trained on, which is where a checkpoint resumes.

# %%
#| export
def _train_step(r, batches, batch, step):
    "One optimizer step of `r.accum` micro-steps; returns (loss, grad norm, lr multiplier, seconds, next batch)."
    t0 = time.perf_counter()
    x, y, token = batch
    train_loss = torch.zeros((), device=r.device)
    for _ in range(r.accum):
        with r.autocast():
            loss = r.train_model(x, y)
        train_loss += loss.detach()
        (loss / r.accum).backward()
        batches.consumed(token)
        x, y, token = next(batches)   # prefetch while the GPU works
    c = r.config
    lrm = lr_multiplier(step, r.num_iterations, c.warmup_ratio, c.warmdown_ratio, c.final_lr_frac)
    train_loss, grad_norm = optimizer_step(r.model, r.optimizers, train_loss / r.accum, lrm, muon_momentum(step),
                                           c.grad_clip, step, r.ckpt_dir)
    if r.device.type == "cuda":
        torch.cuda.synchronize()
    return train_loss, grad_norm, lrm, time.perf_counter() - t0, (x, y, token)


# %%
for step in range(2):
    loss, grad_norm, lrm, dt, batch = _train_step(r, batches, batch, step)
    print(f"step {step} | loss {loss:.3f} | grad norm {grad_norm:.2f} | lrm {lrm} | {dt:.1f} s")


# %% [markdown]
# ## Evaluation: bits per byte
#
# The training loss is measured on the batch the model is about to learn from, and it is noisy; we want a number on
# text the model never trains on, the same text every time. Validation loss in nats per token would depend on the
# tokenizer: a bigger vocabulary packs more bytes into a token and so has a larger loss per token. Bits per byte
# divides that out: sum the loss over the targets, convert nats to bits, and divide by the number of UTF-8 bytes those
# targets stand for (the tokenizer's `token_bytes` table; special tokens count 0 bytes and are left out, as are
# ignored targets). With several ranks, each evaluates its own slice of the validation shard and the two sums are
# added across ranks before dividing.

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
_vocab, _T = 300, 16
_model = GPT(GPTConfig(sequence_len=_T, vocab_size=_vocab, n_layer=1, n_head=1, n_kv_head=1, n_embd=64))
_tb = torch.full((_vocab,), 2, dtype=torch.int32)
_y = torch.randint(0, _vocab, (2, _T))
_bpb = evaluate_bpb(_model, iter([(_y, _y)]), 1, _tb)
assert abs(_bpb - math.log2(_vocab) / 2) < 1e-3, _bpb


# %% [markdown]
# In the loop, evaluation switches the model to eval mode over every virtual rank's validation batches and keeps the
# best value seen, which travels with the checkpoint.

# %%
#| export
def _evaluate(r, val_batches, loop):
    "Validation bits per byte over the fixed validation batches; updates the best value in `loop`."
    r.model.eval()
    steps = r.eval_steps * (r.data_world // r.world)   # every virtual rank of this process
    val_bpb = evaluate_bpb(r.model, val_batches(), steps, r.token_bytes, r.autocast)
    r.model.train()
    loop["min_val_bpb"] = min(loop["min_val_bpb"] or val_bpb, val_bpb)
    return val_bpb


# %%
_loop = dict(min_val_bpb=None)
_bpb1, _bpb2 = _evaluate(r, val_batches, _loop), _evaluate(r, val_batches, _loop)
print(f"after 2 steps: val bpb {_bpb1:.3f}")
test_eq(_bpb1, _bpb2)   # the same validation batches every time, so the same number

# %% [markdown]
# ## Samples: what the model writes
#
# Bits per byte says *that* the model learns; a few greedy continuations of fixed prompts say *what*: first repeated
# common tokens, then indentation and keywords, then plausible Python. Rank 0 alone prints them.

# %%
#| export
SAMPLE_PROMPTS = ["def fibonacci(n):", "import os\n", "The purpose of this module is", "class Stack:"]


def _sample(r, prompts=SAMPLE_PROMPTS, max_tokens=24):
    "Print the greedy continuation of each prompt (rank 0 only)."
    if not r.master:
        return
    r.model.eval()
    for prompt in prompts:
        ids = r.tokenizer.encode(prompt, prepend=r.tokenizer.bos_id)
        with r.autocast():
            out = list(r.model.generate(ids, max_tokens=max_tokens, temperature=0))
        r.say(f"  sample: {r.tokenizer.decode(ids[1:] + out)!r}")
    r.model.train()


# %%
_sample(r, prompts=SAMPLE_PROMPTS[:2], max_tokens=12)   # two steps in: not much to read yet


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


# %%
#| export
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
# ## How fast is fast? Peak FLOP/s and MFU
#
# Model FLOPs utilisation (MFU) is the fraction of the hardware's peak that the training step turns into model
# arithmetic: FLOPs per token (from `GPT.estimate_flops`: 6 per parameter for the matmuls forward and backward, plus
# attention) × tokens per step ÷ seconds per step ÷ peak. It answers "how much faster could this step be?", which
# tokens per second alone cannot. On a GPU the peak is the datasheet's dense bf16 number (nanochat hard-codes the
# H100's 989 TFLOP/s), and 40–50% is good.
#
# A CPU has no datasheet we can trust (the clock moves with temperature and load, and the vector units depend on the
# model), so here the peak is *measured*: `peak_flops` times square matmuls in the training dtype, the operation the
# model spends its FLOPs on, at three sizes (the fastest size depends on the caches) and three trials each, and keeps
# the fastest. CPU MFU then means "the fraction of what this machine's best matmul reaches", not of a theoretical
# number: a well-fed step reaches 50–70% of it, since attention, norms and the optimizer run slower than a big matmul.
#
# On a shared machine the measurement is a sample of a moving target. Another job can hold the cores while the peak
# is timed, so the peak comes out low and a later quiet step shows MFU above 100%; the loop then measures the peak
# again (up to three times) and keeps the larger value, so that the peak stays an upper bound in practice. The other
# direction cannot be corrected: a step that shares its cores is slow and shows a low MFU. With other jobs running,
# CPU MFU moves by ±10 points from step to step and between runs; compare runs measured on a quiet machine.

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


# %% [markdown]
# Here is how much the measurement moves on this machine: five measurements in a row, each already the best of nine.

# %%
_peaks = [peak_flops("cpu", sizes=(512, 1024), trials=2) / 1e9 for _ in range(5)]
print(f"this CPU, fp32: {max(_peaks):.0f} GFLOP/s at best; five measurements {[round(p) for p in _peaks]}, "
      f"spread {100 * (max(_peaks) - min(_peaks)) / max(_peaks):.0f}%")


# %% [markdown]
# In the loop, each step's record gets its throughput and MFU; a reading above 100% on a CPU triggers the
# re-measurement first. The record also carries a smoothed loss (an exponential moving average with its start-up bias
# divided out, as nanochat prints) and the training time, which leaves out the steps just after a (re)start: those
# include compilation and warm-up.

# %%
#| export
def _mfu(r, dt):
    "Percent of the peak used by a step of `dt` seconds; a CPU reading above 100% re-measures the peak first."
    mfu = 100 * r.flops_per_token * r.total_batch / dt / (r.peak * r.world)
    if mfu > 100 and r.device.type == "cpu" and r.remeasured < 3:  # the peak was measured while the cores were busy
        r.peak, r.remeasured = max(r.peak, peak_flops(r.device, r.peak_dtype)), r.remeasured + 1
        mfu = 100 * r.flops_per_token * r.total_batch / dt / (r.peak * r.world)
    return mfu


def _step_record(r, step, loop, train_loss, grad_norm, lrm, dt, timed=True):
    "The metrics of one step (smoothed loss, learning rate, throughput, MFU); updates the loop state."
    if timed:
        loop["total_training_time"] += dt
    beta = 0.9
    loop["smooth_train_loss"] = beta * loop["smooth_train_loss"] + (1 - beta) * train_loss
    smooth = loop["smooth_train_loss"] / (1 - beta ** (step + 1))
    return dict(loss=train_loss, smooth_loss=smooth, lr_mult=lrm, lr=r.config.matrix_lr * lrm, grad_norm=grad_norm,
                tokens_per_s=r.total_batch / dt, mfu=_mfu(r, dt), dt=dt, elapsed=loop["total_training_time"])


# %%
r.peak_dtype, r.remeasured = torch.float32, 0
r.peak = max(_peaks) * 1e9 / 4              # as if the cores had been busy while the peak was timed
_dt = r.flops_per_token * r.total_batch / (0.5 * max(_peaks) * 1e9)   # a step at half the best measured peak
_rec = _step_record(r, 0, dict(smooth_train_loss=0.0, total_training_time=0.0), 8.3, 1.0, 1.0, dt=_dt)
print(f"a peak timed 4x too low would show {4 * 50}% MFU; after {r.remeasured} re-measurement(s): {_rec['mfu']:.0f}%")
assert _rec["mfu"] <= 100 or r.remeasured == 3
test_close(_rec["smooth_loss"], 8.3)        # the bias correction: the first smoothed loss is the loss itself


# %% [markdown]
# ## Checkpoints that resume exactly
#
# A run that dies at hour three must not start again from zero, and it should not even end *differently*: a resumed
# run that ends on other weights than an uninterrupted one makes every comparison between runs doubtful. Everything
# that decides the next update must therefore be saved: the weights, every rank's optimizer shard (Muon's momentum,
# AdamW's moments), where every rank's data loader stands, and the loop state (smoothed loss, best val bpb, training
# time). Two details make it exact. The data position recorded is the one *after the last consumed batch*, not after
# the prefetched one. And a checkpoint is written only after `check_finite` has seen finite weights, so a NaN never
# replaces a good checkpoint. `save_checkpoint` (chapter 05) writes each part atomically and the meta file last, as
# the marker that the checkpoint is whole; old checkpoints beyond `keep_checkpoints` are pruned.

# %%
#| export
def _save(r, step, batches, loop, val_bpb):
    "Save weights, every rank's optimizer shard, every rank's data position and the loop state; prune old ones."
    check_finite(step, r.ckpt_dir, val_bpb=val_bpb, weights=r.model)  # never save a NaN over a good checkpoint
    all_states = [None] * r.world
    mine = batches.state_dict()
    if r.world > 1:
        dist.all_gather_object(all_states, mine)
    else:
        all_states = [mine]
    meta = dict(step=step, val_bpb=val_bpb, model_config=asdict(r.model_config), user_config=asdict(r.config),
                device_batch_size=r.B, max_seq_len=r.T, total_batch_size=r.total_batch,
                num_iterations=r.num_iterations, world_size=r.world, data_world_size=r.data_world,
                dataloader_state=all_states, loop_state=loop, fingerprints=r.fingerprints)
    save_checkpoint(r.ckpt_dir, step, r.model.state_dict(), {"optimizers": [o.state_dict() for o in r.optimizers]},
                    meta, rank=r.rank, barrier=dist.barrier if r.world > 1 else None)
    r.say(f"saved checkpoint {r.ckpt_dir}/model_{step:06d}.pt")
    if r.master and r.config.keep_checkpoints > 0:
        prune_checkpoints(r.ckpt_dir, r.config.keep_checkpoints, remove_temps=False)


# %% [markdown]
# Resuming loads the latest checkpoint, but first checks that it belongs to this run: the same model shape, the same
# number of processes and data ranks, the same tokenizer and data (their fingerprints), and a step that is not past
# the end. Each refusal is one line that names the file and the fix.

# %%
#| export
def _new_loop_state():
    "The loop state of a fresh run: best val bpb, smoothed loss, training time."
    return dict(min_val_bpb=None, smooth_train_loss=0.0, total_training_time=0.0)


def _check_resumable(r, meta, meta_path, step, allow):
    "Refuse a checkpoint that another kind of run wrote, or one past the end of this run."
    if checkpoint_part(meta, "model_config", meta_path) != asdict(r.model_config):
        raise ValueError(f"checkpoint in {r.ckpt_dir} has model_config {meta['model_config']}, this run builds "
                         f"{asdict(r.model_config)}: resume with the same --depth/--sequence-len and tokenizer")
    if meta.get("world_size", r.world) != r.world or meta.get("data_world_size", r.data_world) != r.data_world:
        raise ValueError(f"checkpoint was written by {meta.get('world_size')} rank(s) reading as "
                         f"{meta.get('data_world_size')}; resume with the same number of processes")
    unchecked = check_fingerprints(meta_path, meta.get("fingerprints"), r.fingerprints, allow)
    if unchecked:
        r.say(f"note: {meta_path} records no fingerprint of the {' and '.join(unchecked)} (an older checkpoint): "
              "not checked")
    if step > r.num_iterations:
        raise ValueError(f"{meta_path} is at step {step}, past --num-iterations {r.num_iterations}, so the run "
                         f"would never end; fix: --num-iterations {step} or more, or --overwrite to start over")


# %%
#| export
def _resume(r, allow=()):
    "Load the latest checkpoint into `r`'s model and optimizers; returns (step, loop state, data state, val bpb)."
    step = latest_step(r.ckpt_dir)
    if step is None:
        r.say(f"nothing to resume in {r.ckpt_dir}: starting from scratch")
        return 0, _new_loop_state(), None, None
    model_state, optim_state, meta = load_checkpoint(r.ckpt_dir, step, r.device, load_optimizer=True, rank=r.rank)
    model_path, meta_path, optim_path = _paths(r.ckpt_dir, step, r.rank)
    _check_resumable(r, meta, meta_path, step, allow)
    loop = checkpoint_part(meta, "loop_state", meta_path)
    data_states = checkpoint_part(meta, "dataloader_state", meta_path, list)[r.rank]
    _check_state(r.model.state_dict(), model_state, model_path)
    r.model.load_state_dict(model_state, strict=True)
    restore_optimizers(r.optimizers, optim_state, optim_path)
    if meta.get("num_iterations", r.num_iterations) != r.num_iterations:
        r.say(f"note: the checkpoint was trained toward {meta['num_iterations']} steps; the learning-rate "
              f"schedule now aims at {r.num_iterations}")
    r.say(f"resumed from step {step} ({r.ckpt_dir})")
    if step == r.num_iterations:
        r.say(f"the run already reached step {step} of {r.num_iterations}: nothing to train (raise "
              "--num-iterations to train on)")
    return step, loop, data_states, meta.get("val_bpb")


# %% [markdown]
# On the two steps we took above: save at step 2, set up a second run from the same config, resume it, and compare.
# The weights and Muon's momentum buffers are equal, and the batch the resumed run trains on next is the batch the
# first run had prefetched for its third step.

# %%
clear_checkpoints(r.ckpt_dir)
_loop = _new_loop_state()
_save(r, 2, batches, _loop, val_bpb=None)
r2 = _setup(Path(run_dir), r.config, resume=True, overwrite=False, log=print)
_step, _loop2, _data_states, _ = _resume(r2)
_batches2, _ = _open_data(r2, _data_states, _step)
test_eq((_step, _loop2), (2, _loop))
assert all(torch.equal(a, b) for a, b in zip(r.model.state_dict().values(), r2.model.state_dict().values()))
assert all(torch.equal(r.optimizers[1].state[p]["momentum_buffer"], r2.optimizers[1].state[q]["momentum_buffer"])
           for p, q in zip(r.model.transformer.h.parameters(), r2.model.transformer.h.parameters()))
test_eq(next(_batches2)[0], batch[0])


# %% [markdown]
# ## The loop
#
# `pretrain` is nanochat's `base_train`, assembled from the pieces above. The loop runs `num_iterations + 1` times so
# that the last pass can evaluate and save the finished model: each pass first evaluates, samples and saves when they
# are due (the model then has taken `step` optimizer steps), then trains one step and writes one metrics line.

# %%
#| export
def _eval_sample_save(r, step, first, batches, val_batches, loop, record, val_bpb):
    "Evaluate, sample and save when due, and always at the last step; returns the latest val bpb."
    last = step == r.num_iterations
    due = lambda every: last or (every > 0 and step % every == 0)
    if due(r.config.eval_every):
        val_bpb = record["val_bpb"] = _evaluate(r, val_batches, loop)
        r.say(f"step {step:05d} | val bpb {val_bpb:.4f}")
    if due(r.config.sample_every):
        _sample(r)
    if not first and due(r.config.save_every):   # a resumed run does not save the step it loaded again
        _save(r, step, batches, loop, val_bpb)
    return val_bpb


def _summary(r, step, loop, val_bpb):
    "What `pretrain` returns: where the run ended, how well, and where its checkpoints are."
    return dict(step=step, val_bpb=val_bpb, min_val_bpb=loop.get("min_val_bpb"), num_params=r.num_params,
                total_training_time=loop.get("total_training_time"), final_loss=loop.get("smooth_train_loss"),
                checkpoint_dir=str(r.ckpt_dir))


# %%
#| export
def _start(r, step, data_states, resume, overwrite):
    "Compile, open the data, clear an overwritten run, open the metrics and time the peak; returns the streams."
    r.train_model = torch.compile(r.model, dynamic=False) if r.use_compile else r.model
    batches, val_batches = _open_data(r, data_states, step)
    if overwrite and r.master:
        r.say(f"--overwrite: deleted {clear_checkpoints(r.ckpt_dir)} checkpoint file(s) and the metrics of the "
              "earlier run")
    metrics = MetricsLog(r.metrics_path, resume_step=step if resume else None, enabled=r.master, log=r.say)
    r.peak_dtype = torch.bfloat16 if r.dtype == "bf16" else torch.float32
    r.peak, r.remeasured = peak_flops(r.device, r.peak_dtype), 0
    return batches, val_batches, metrics


# %%
#| export
def _pretrain(run_dir, config, resume, overwrite, allow, on_step, log):
    "The loop of `pretrain`, run while the run directory is held."
    r = _setup(run_dir, config, resume, overwrite, log)
    step, loop, data_states, val_bpb = _resume(r, allow) if resume else (0, _new_loop_state(), None, None)
    if step == r.num_iterations:   # a resumed run with nothing left to train
        cleanup_distributed()
        return _summary(r, step, loop, val_bpb)
    batches, val_batches, metrics = _start(r, step, data_states, resume, overwrite)
    batch, resume_step = next(batches), step
    while True:
        record = {"step": step}
        val_bpb = _eval_sample_save(r, step, step == resume_step, batches, val_batches, loop, record, val_bpb)
        if step == r.num_iterations:
            break
        loss, grad_norm, lrm, dt, batch = _train_step(r, batches, batch, step)
        record.update(_step_record(r, step, loop, loss, grad_norm, lrm, dt, timed=step > resume_step))
        metrics.write(record)
        if on_step:
            on_step(record)
        if step % max(1, r.num_iterations // 20) == 0 or step < 3:
            r.say(f"step {step:05d}/{r.num_iterations} | loss {loss:.4f} | lrm {lrm:.2f} | "
                  f"{record['tokens_per_s']:,.0f} tok/s | mfu {record['mfu']:.1f}% | {dt * 1000:.0f} ms")
        step += 1
    if len(record) > 1:   # the final evaluation
        metrics.write(record | {"elapsed": loop["total_training_time"]})
        if on_step:
            on_step(record)
    cleanup_distributed()
    return _summary(r, step, loop, val_bpb)


# %% [markdown]
# Around the loop, `pretrain` checks every setting before it touches a file, and holds the run directory (below, in
# "Going further") so that no other process writes the same stage.

# %%
#| export
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


# %% [markdown]
# ### The full loop computes what the simple one does
#
# With the features that change the arithmetic turned off (one micro-step, no clipping) and the same seed, data and
# schedules, `pretrain` must train exactly as `simple_loop` does: the same loss at every step, to the last bit.
# Evaluation, samples, checkpoints and metrics only read the model, so they may stay on. A small model keeps it quick.

# %%
_simple = simple_loop(run_dir, steps=6, depth=2, B=4, T=64, every=10)
_off = make_config(depth=2, sequence_len=64, device_batch_size=4, num_iterations=6, packing="stream", grad_clip=0.0,
                   eval_every=3, eval_tokens=256, sample_every=-1, device="cpu")
pretrain(run_dir, _off, overwrite=True, log=lambda *a: None)
_full = [r["loss"] for r in MetricsLog.read(Path(run_dir) / "metrics" / "pretrain.jsonl") if "loss" in r]
print("simple:", [round(l, 4) for l in _simple], "\nfull:  ", [round(l, 4) for l in _full])
test_eq(_full, _simple)


# %% [markdown]
# ## Watching it learn
#
# Inside a notebook, `on_step` receives every record as it is written; this callback redraws a chart in place
# every few steps, so the loss falls while you watch.

# %%
#| export
class LiveLossChart:
    "An `on_step` callback that redraws the training loss and a validation metric (bpb by default) in a notebook."
    def __init__(self, every=5, title="pretraining", val_key="val_bpb", val_label="validation bits per byte"):
        import matplotlib.pyplot as plt
        from IPython.display import display
        self.every, self.records, self.val_key, self.val_label = every, [], val_key, val_label
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
        val = [r for r in self.records if r.get(self.val_key) is not None]
        self.ax_loss.clear(); self.ax_bpb.clear()
        self.ax_loss.plot([r["step"] for r in train], [r["loss"] for r in train], lw=0.8, alpha=0.5, label="loss")
        self.ax_loss.plot([r["step"] for r in train], [r["smooth_loss"] for r in train], label="smoothed")
        self.ax_loss.set(xlabel="step", ylabel="train loss (nats/token)"); self.ax_loss.legend()
        self.ax_bpb.plot([r["step"] for r in val], [r[self.val_key] for r in val], "o-", color="C2")
        self.ax_bpb.set(xlabel="step", ylabel=self.val_label)
        self.fig.tight_layout()
        if self.handle is not None:
            self.handle.update(self.fig)


# %% [markdown]
# ## A run, start to finish
#
# Here is the whole base stage with every feature on: the `micro` preset (two micro-steps of 8 × 256 tokens per
# step, clipping, the schedules) for 20 steps, evaluated every 5. (The `micro` preset of `nanochat-nb pretrain` runs
# the same thing for 160 steps; set `num_iterations` at the top to try it.)

# %%
#| fig-alt: "The live chart of the twenty-step run: training loss (raw and smoothed) against steps on the left, validation bits per byte against steps on the right."
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
print("MFU per step (%):", [round(r["mfu"]) for r in records if "mfu" in r])

# %% [markdown]
# Measured on a 2-core CPU with nothing else running, the full `micro` preset (`make speedrun`: 160 steps, 655K
# tokens, fp32) trains at about 0.9 s per step (≈4,400 tokens/s, ≈65% of the measured fp32 peak), 149 s in all,
# and its validation bits per byte go 3.23 → 2.39 → 2.28 → 2.16 → 1.93 at steps 0, 40, 80, 120 and 160. The same
# preset under `torchrun --nproc_per_node=2` takes about 1.0 s per step and ends at 2.01 (two ranks read the data in
# another order). `docs/benchmarks.md` keeps these numbers. The MFU column above moves from step to step by more
# than the model does: the first step includes warm-up, and on a machine shared with other jobs each step gets
# whatever the cores have left.

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
# On a CPU that uses gloo; on GPUs nccl. Nothing in the loop above is specific to one process: `_setup` joins the
# process group, `RankedBatches` gives each rank its data ranks, `clip_gradients` and the distributed optimizers
# average the gradients, `evaluate_bpb` adds its sums across ranks, `_save` gathers every rank's data position and
# writes every rank's optimizer shard. The test suite (`tests/test_pretrain.py`) runs two processes on gloo and
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
# We built the base training loop in steps. First twenty lines: model, optimizers, batches, forward, backward, step.
# Then what a real run needs, each piece a small function: a checked config with presets, gradient accumulation,
# data read as any number of ranks, clipping of the rank-averaged gradient inside one optimizer step that every
# stage shares, validation bits per byte, samples, a JSON-lines metrics log, MFU against a measured or datasheet
# peak, and checkpoints that resume exactly; with the features off, the full loop computes the simple loop's losses
# to the last bit. Around it, settings checked before anything is touched, a run directory that one process owns,
# and no NaN ever saved.
#
# 1. Train the `micro` preset with `--dtype bf16` and compare the loss curve and tokens/s with fp32.
# 2. Turn `warmdown_ratio` to 0 and then to 0.5: how does the final validation bpb move?
# 3. Kill a run with Ctrl-C halfway, restart it with `--resume`, and diff the two `pretrain.jsonl` files.
