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

# %%

# %% [markdown]
# # Midtraining
# > The base model learns the chat format, the calculator and a few skills, from whole conversations packed into rows.

# %% [markdown]
# A base model continues text. A chat model answers turns: it sees `<|user_start|>…<|user_end|>`, opens
# `<|assistant_start|>`, writes, maybe calls the calculator between `<|python_start|>` and `<|python_end|>`, reads the
# tool's `<|output_start|>…<|output_end|>`, and closes with `<|assistant_end|>`. None of those tokens occurs in the
# pretraining corpus, so the base model has never seen one. Midtraining (nanochat's `mid_train`) is more pretraining,
# on conversations instead of documents: same loss on every token, same optimizers, a short schedule.
#
# This chapter builds the post-training loop that the next stages reuse (SFT in chapter 12 swaps its batches and its
# schedule, RL in chapter 13 its batches, its loss weights and its evaluation), trains the `micro` preset on an
# offline mixture of the synthetic tasks of chapter 09 and of questions about the pretraining corpus, and measures
# what it did on the held-out `arithmetic` problems.

# %%
#| default_exp midtrain

# %%
#| export
import os, random, re, time, zlib
from contextlib import nullcontext
from dataclasses import asdict, dataclass
from functools import lru_cache
from pathlib import Path

import torch
import torch.distributed as dist

from nanochat_nb.checkpoint import (CheckpointError, RunLock, _check_state, _paths, check_finite, check_run_dir,
                                    check_stage_empty,
                                    checkpoint_dir, checkpoint_part, clear_checkpoints, latest_step,
                                    load_checkpoint, load_model, prune_checkpoints, save_checkpoint)
from nanochat_nb.eval import append_records, evaluate_checkpoint
from nanochat_nb.optim import cleanup_distributed, init_distributed, lr_multiplier, muon_momentum, setup_optimizers
from nanochat_nb.pretrain import (MetricsLog, _autocast_factory, build_config, check_device, choice_rule,
                                  int_rule, number_rule, optimizer_step, restore_optimizers)
from nanochat_nb.tasks import Task, TaskMixture, load_task, split_of
from nanochat_nb.tokenizer import Tokenizer, stdlib_documents

# %%
#| hide
from fastcore.test import test_eq, test_fail

# %% [markdown]
# ## The mixture
#
# nanochat's midtraining mixture is SmolTalk, MMLU's auxiliary set, GSM8K with calculator calls, identity
# conversations and two spelling tasks, 848K conversations. Offline we have the synthetic tasks of chapter 09, each
# with a train and a held-out test split: `arithmetic` (GSM8K-format word problems whose solutions call the
# calculator), `spelling` and `simple-spelling`, and `identity` (who the model is). Templates alone would teach the
# chat format on a handful of sentence shapes, so we add conversations built from the pretraining corpus itself:
# a question about a function or class of the standard library, answered with the first sentence of its docstring.
# The model has read that source during pretraining; now it learns to answer a question about it in a turn.

# %%
#| export
_DEF = re.compile(r'^(def|class) ([A-Za-z]\w*)\b[^:]*?:[ \t]*\n'   # a top-level def or class line, then
                  r'[ \t]+[rRuU]?"""[ \t]*\n?[ \t]*([^\n].*?)(?:"""|\n[ \t]*\n)',  # its docstring's first paragraph
                  re.M | re.S)


@lru_cache(maxsize=1)
def stdlib_docstrings():
    "(kind, name, first sentence) of the documented top-level functions and classes of the corpus, names unique."
    found = {}
    for doc in stdlib_documents():
        for kind, name, text in _DEF.findall(doc):
            first = re.match(r"(.+?\.)(?:\s|$)", " ".join(text.split()))
            if first and 20 <= len(first[1]) <= 160 and first[1][0].isupper() and "test" not in name.lower():
                found.setdefault(name, []).append(("function" if kind == "def" else "class", first[1]))
    return sorted((v[0][0], name, v[0][1]) for name, v in found.items() if len(v) == 1)


# %% [markdown]
# A name that occurs in several modules (`main`, `open`) has no single answer, so only unique names are kept; test
# helpers are left out. Each entry lands in the train or the test split by a hash of its name (chapter 09's
# `split_of`), so the held-out questions are about functions the model never saw asked about.

# %%
#| export
DOC_QUESTIONS = ["What does the {kind} `{name}` of Python's standard library do?",
                 "In the Python standard library, what is `{name}` for?",
                 "Explain the standard-library {kind} `{name}` in one sentence.",
                 "I found `{name}` in the standard library. What does it do?"]


class DocstringQA(Task):
    "Questions about standard-library functions and classes, answered with the first sentence of their docstring."
    def __init__(self, split="train", size=None, seed=0, **kwargs):
        super().__init__(**kwargs)
        if split not in ("train", "test"):
            raise ValueError(f"DocstringQA needs split train or test, got {split!r}")
        self.entries = [e for e in stdlib_docstrings() if split_of(e[1]) == split]
        random.Random(seed).shuffle(self.entries)
        self.entries = self.entries[:size]

    def num_examples(self):
        return len(self.entries)

    def get_example(self, index):
        kind, name, sentence = self.entries[index]
        question = DOC_QUESTIONS[zlib.crc32(name.encode()) % len(DOC_QUESTIONS)].format(kind=kind, name=name)
        return {"messages": [{"role": "user", "content": question}, {"role": "assistant", "content": sentence}]}


# %%
docs_train, docs_test = DocstringQA("train"), DocstringQA("test")
print(len(docs_train), "train,", len(docs_test), "test;", docs_train[0]["messages"])
assert not {e[1] for e in docs_train.entries} & {e[1] for e in docs_test.entries}  # disjoint by name
test_eq(DocstringQA("train", size=5)[3], docs_train[3])  # deterministic


# %% [markdown]
# With the hub datasets on disk (`--data-root`, a folder laid out like the hub repositories, chapter 09), the
# mixture is nanochat's: SmolTalk, MMLU's auxiliary set (MMLU's test set for validation) and GSM8K join the synthetic
# tasks. The mixture lays the tasks end to end and shuffles them once with a fixed seed, so conversation *i* is the
# same in every process and every run.

# %%
#| export
def hub_tasks(split, data_root):
    "nanochat's midtraining datasets from `data_root`: SmolTalk, MMLU (auxiliary train; test for validation), GSM8K."
    mmlu = load_task("mmlu-aux", data_root=data_root) if split == "train" else \
        load_task("mmlu", "test", data_root=data_root, stop=5200)
    return [load_task("smoltalk", split, data_root=data_root), mmlu, load_task("gsm8k", split, data_root=data_root)]


def default_mixture(split="train", arithmetic=4000, spelling=500, simple_spelling=500, identity=200, seed=42,
                    docstrings=0, extra=()):
    "The mixture: the synthetic tasks (sizes per task; 0 leaves one out), docstring Q&A, `extra` tasks; shuffled."
    sizes = {"arithmetic": arithmetic, "spelling": spelling, "simple-spelling": simple_spelling,
             "identity": identity}
    tasks = [load_task(name, split, size=n) for name, n in sizes.items() if n > 0]
    tasks += [DocstringQA(split, docstrings)] if docstrings > 0 else []
    tasks += list(extra)
    if not tasks:
        raise ValueError("the mixture is empty: give at least one task a size > 0 (e.g. --arithmetic 4000)")
    return TaskMixture(tasks, seed=seed)


# %%
mix = default_mixture(arithmetic=40, spelling=5, simple_spelling=5, identity=5, docstrings=5)
print(len(mix), mix[0]["messages"][0]["content"][:100])


# %% [markdown]
# ## Packing conversations into rows
#
# A batch is B rows of T+1 tokens (inputs are the first T, targets the last T). nanochat's midtraining streams the
# rendered conversations end to end, so a conversation may start in one row and end in the next. We keep every row
# *BOS-aligned*: it holds whole conversations, each starting with its `<|bos|>`, taken in order while they fit; the
# space left at the end is padding whose targets are -1 (the loss ignores them). A conversation longer than a row is
# cropped to it. The position in the data is one integer, the index of the next conversation, which makes resuming
# exact: the checkpoint records it, and the next batch is a function of it.
#
# Midtraining learns every token, as nanochat does (the mask of `render_conversation` is for SFT).

# %%
#| export
class Renderer:
    "Conversation `i` of a task rendered to (ids, mask) of at most `max_tokens`, remembering the last few."
    def __init__(self, tokenizer, task, max_tokens):
        self.tokenizer, self.task, self.max_tokens, self.cache = tokenizer, task, max_tokens, {}

    def __call__(self, i):
        if i not in self.cache:
            if len(self.cache) > 4096:
                self.cache.clear()
            self.cache[i] = self.tokenizer.render_conversation(self.task[i % len(self.task)], self.max_tokens)
        return self.cache[i]


def pack_rows(render, cursor, rows, T, pad_id):
    "`rows` BOS-aligned rows of whole conversations from index `cursor` on: (inputs, targets, next cursor)."
    x = torch.full((rows, T), pad_id, dtype=torch.long)
    y = torch.full((rows, T), -1, dtype=torch.long)
    for r in range(rows):
        row = []
        while True:
            ids, _ = render(cursor)
            if row and len(row) + len(ids) > T + 1:
                break
            row, cursor = row + ids[:T + 1 - len(row)], cursor + 1
        n = len(row)
        x[r, :n - 1] = torch.tensor(row[:-1])
        y[r, :n - 1] = torch.tensor(row[1:])
    return x, y, cursor


# %%
from nanochat_nb.tokenizer import Tokenizer
_tok = Tokenizer.train(" ".join(mix[i]["messages"][0]["content"] for i in range(len(mix))) * 3, vocab_size=400)
_render = Renderer(_tok, mix, 65)
_x, _y, _next = pack_rows(_render, 0, 3, 64, _tok.bos_id)
print(f"3 rows of 64 tokens hold conversations 0..{_next - 1}; padding targets: {(_y == -1).sum().item()}")
_both = _y[:, 1:] >= 0  # inputs are the targets shifted by one, wherever both are real tokens
assert (_x[:, 0] == _tok.bos_id).all() and (_x[:, 1:][_both] == _y[:, :-1][_both]).all()
test_eq(pack_rows(_render, 0, 3, 64, _tok.bos_id)[2], _next)  # deterministic: a function of the cursor


# %% [markdown]
# ## The settings and the schedule
#
# One dataclass describes a post-training stage; `PRESETS` and `make_config` work as in chapter 06. nanochat's
# midtraining keeps the base learning rates (multiplier 1.0) constant for the first 80% of the steps and then lowers
# them linearly to 0: that is `lr_multiplier` of chapter 03 with a warmdown ratio of 0.2. (nanochat's first version
# computed this multiplier backwards, rising instead of falling; the test below, and `tests/test_midtrain.py` on the
# written metrics, check that it falls.)

# %%
#| export
@dataclass
class ChatTrainConfig:
    "Every knob of a post-training stage (midtraining or SFT); -1 means derive it."
    from_stage: str = "base"           # the stage whose latest checkpoint we start from
    device_batch_size: int = 8         # rows per forward/backward on one device
    rows_per_step: int = -1            # rows per optimizer step; -1: one micro-batch per rank
    sequence_len: int = -1             # -1: the model's
    num_iterations: int = 200          # optimizer steps; -1 (SFT): one epoch of the mixture
    embedding_lr: float = 0.2
    unembedding_lr: float = 0.004
    matrix_lr: float = 0.02
    weight_decay: float = 0.0
    init_lr_frac: float = 1.0          # the stage's multiplier on the base learning rates
    warmdown_ratio: float = 0.2        # the last fraction of steps where the rate falls linearly to 0
    grad_clip: float = 1.0
    eval_every: int = 50               # steps between validation losses; -1 only at the end
    eval_batches: int = 4              # validation micro-batches (of the test split); 0: no validation loss
    save_every: int = -1               # -1: only at the end
    eval_problems: int = 256           # held-out arithmetic problems at the end (greedy); 0 skips it
    eval_max_tokens: int = 160
    arithmetic: int = 4000             # conversations per task in the mixture (0 leaves a task out)
    spelling: int = 500
    simple_spelling: int = 500
    identity: int = 200
    docstrings: int = 1000             # questions about standard-library functions (DocstringQA)
    data_root: str = ""                # a folder with the hub datasets: nanochat's mixture joins the synthetic one
    dtype: str = "auto"
    device: str = ""
    seed: int = 42
    keep_checkpoints: int = 2


PRESETS = {"micro": dict(device_batch_size=8, rows_per_step=8, num_iterations=120, eval_every=40, docstrings=500),
           "d20": dict(device_batch_size=32, rows_per_step=256, num_iterations=800, eval_every=150,
                       arithmetic=100_000, spelling=80_000, simple_spelling=200_000, identity=2000),
           "d26": dict(device_batch_size=16, rows_per_step=256, num_iterations=800, eval_every=150,
                       arithmetic=100_000, spelling=80_000, simple_spelling=200_000, identity=2000)}

CHAT_RULES = dict(
    from_stage=choice_rule("base", "mid", "sft", "rl"), device_batch_size=int_rule(1), rows_per_step=int_rule(1, True),
    sequence_len=int_rule(2, True), num_iterations=int_rule(1, True), embedding_lr=number_rule(0, 1000),
    unembedding_lr=number_rule(0, 1000), matrix_lr=number_rule(0, 1000), weight_decay=number_rule(0),
    init_lr_frac=number_rule(0, 1000), warmdown_ratio=number_rule(0, 1), grad_clip=number_rule(0),
    eval_every=int_rule(1, True), eval_batches=int_rule(0), save_every=int_rule(1, True),
    eval_problems=int_rule(0), eval_max_tokens=int_rule(1), arithmetic=int_rule(0), spelling=int_rule(0),
    simple_spelling=int_rule(0), identity=int_rule(0), docstrings=int_rule(0),
    data_root=(lambda v: isinstance(v, str), "a folder"), dtype=choice_rule("auto", "fp32", "bf16"),
    device=(lambda v: isinstance(v, str), "a device name"), seed=int_rule(0), keep_checkpoints=int_rule(1, True))


def make_chat_config(presets, preset=None, **overrides):
    "A checked `ChatTrainConfig` from a preset of `presets` plus field overrides; unknown names are errors."
    config = build_config(ChatTrainConfig, presets, CHAT_RULES, preset, **overrides)  # chapter 06's, shared
    check_device(config.device)
    return config


# %%
cfg = make_chat_config(PRESETS, "micro")
lrms = [lr_multiplier(s, cfg.num_iterations, 0.0, cfg.warmdown_ratio) for s in range(cfg.num_iterations)]
assert lrms[0] == 1.0 and all(a >= b for a, b in zip(lrms, lrms[1:])) and lrms[-1] < 0.05  # it falls, never rises
test_fail(lambda: make_chat_config(PRESETS, "micro", matrix_lr=-1.0), contains="--matrix-lr")


# %% [markdown]
# ## One loop for every post-training stage
#
# `train_chat_stage` is the loop of chapter 06 with the pretraining particulars taken out, shared by midtraining,
# SFT (chapter 12) and RL (chapter 13). A stage hands it three things:
#
# - `make_data(tokenizer, config, T, split, model)`, which returns `(next_batches, epoch_size)`;
#   `next_batches(cursor, n)` gives the next `n` micro-batches and the new cursor, an integer that the checkpoints
#   record so that a resumed run continues from the same place. The model is passed because RL's batches are
#   samples of the model being trained.
# - micro-batches `(x, y)`, trained with the mean cross-entropy over the targets `y >= 0`, or `(x, y, w)` with a
#   float weight per target token (RL's advantages): the loss is then the sum of `w` × cross-entropy over the
#   targets, divided by their number.
# - optionally `evaluate(model, step) -> dict`, its own metrics (RL's pass@k) at the evaluation steps.
#
# Each optimizer step takes `world × accumulation` micro-batches; rank *r* trains on micro-batches *r*, *r + world*,
# …, so one process with two micro-steps sees exactly what two processes with one see. The rest is the shared
# machinery: `optimizer_step` and `restore_optimizers` (chapter 06), `save_checkpoint`, `MetricsLog`, the run lock
# and the finite checks (chapter 05).
#
# First, the loss of one micro-batch, in its two forms. Weights of 1 everywhere give back the plain mean:

# %%
#| export
def micro_loss(model, batch):
    "Loss of one micro-batch: mean CE over targets >= 0 for (x, y); for (x, y, w) the sum of w x CE over them / count."
    x, y, *w = batch
    if not w:
        return model(x, y)
    valid = y >= 0
    per_token = model(x, y, loss_reduction="none")
    return (per_token * w[0].to(per_token.dtype))[valid].sum() / valid.sum().clamp(min=1)


# %%
from nanochat_nb.model import GPTConfig, build_model
_m = build_model(GPTConfig.from_depth(1, vocab_size=64, sequence_len=16), "cpu")
_xb = torch.randint(0, 64, (2, 16)); _yb = _xb.clone(); _yb[:, :5] = -1
torch.testing.assert_close(micro_loss(_m, (_xb, _yb, torch.ones(2, 16))), micro_loss(_m, (_xb, _yb)))
test_eq(micro_loss(_m, (_xb, _yb, torch.zeros(2, 16))).item(), 0.0)  # zero advantage: nothing to learn


# %% [markdown]
# The validation loss is the mean loss per target token over a fixed set of micro-batches of the test split,
# summed over ranks before dividing, so that it does not depend on the number of processes.

# %%
#| export
@torch.no_grad()
def mean_loss(model, batches, autocast=nullcontext):
    "Mean loss per target token over (inputs, targets) micro-batches, summed across ranks."
    total = torch.zeros(2, dtype=torch.float64, device=model.lm_head.weight.device)
    for x, y, *_ in batches:
        with autocast():
            loss = model(x, y, loss_reduction="none").view(-1)
        counted = y.view(-1) >= 0
        total += torch.stack([loss[counted].double().sum(), counted.sum().double()])
    if dist.is_initialized():
        dist.all_reduce(total)
    return (total[0] / total[1].clamp(min=1)).item()


def _micro(batch, device):
    return tuple(t.to(device) for t in batch)


# %% [markdown]
# The entry point holds the run directory (so that two jobs never write the same stage) and sets up the process
# group; everything else happens inside.

# %%
#| export
def train_chat_stage(run_dir, stage, config, make_data, resume=False, overwrite=False, on_step=None, log=print,
                     evaluate=None):
    "Train `stage` from `config.from_stage` on `make_data`'s batches; checkpoints, metrics, eval; a summary dict."
    if resume and overwrite:
        raise ValueError("--resume and --overwrite contradict each other; fix: pass one of them")
    if config.from_stage == stage:
        raise ValueError(f"--from-stage {stage} is the stage being trained; fix: start from an earlier stage")
    run_dir = check_run_dir(run_dir)
    lock = RunLock(run_dir, writes=[stage], reads=["tokenizer", config.from_stage], log=log) \
        if int(os.environ.get("RANK", "0")) == 0 else nullcontext()
    with lock:
        info = init_distributed(torch.device(config.device).type if config.device else None)
        try:
            run = _setup_stage(run_dir, stage, config, make_data, resume, overwrite, log, info)
            return _train_chat_stage(run, config, on_step, evaluate)
        finally:
            cleanup_distributed()


# %% [markdown]
# What the loop carries from step to step is one object: the model and its optimizers, the data, where we are
# (step, cursor, the loop state that a checkpoint saves) and how to report.

# %%
#| export
@dataclass
class StageRun:
    "The state of a post-training stage between steps."
    run_dir: Path
    stage: str
    model: torch.nn.Module
    tokenizer: Tokenizer
    optimizers: list             # [adamw, muon]
    next_batches: object         # next_batches(cursor, n) -> (n micro-batches, new cursor)
    device: torch.device
    autocast: object             # a zero-argument context factory
    rank: int
    world: int
    accum: int                   # micro-steps per optimizer step on each rank
    num_iterations: int
    ckpt_dir: Path
    start_meta: dict             # the meta of the checkpoint we started from
    say: object                  # print on rank 0, nothing elsewhere
    val: list = None             # this rank's validation micro-batches, or None
    metrics: MetricsLog = None
    step: int = 0
    cursor: int = 0
    loop: dict = None            # smoothed loss and training time, saved with each checkpoint
    val_loss: float = None


# %%
#| export
def _setup_stage(run_dir, stage, config, make_data, resume, overwrite, log, info):
    "Load the previous stage, build the optimizers and the data, resume if asked: a `StageRun` at its first step."
    rank, world = info.rank, info.world_size
    device = torch.device(config.device) if config.device else info.device
    dtype = config.dtype if config.dtype != "auto" else ("bf16" if device.type == "cuda" else "fp32")
    torch.manual_seed(config.seed)
    ckpt_dir, metrics_path = checkpoint_dir(run_dir, stage), run_dir / "metrics" / f"{stage}.jsonl"
    if not resume and not overwrite:
        check_stage_empty(ckpt_dir, metrics_path)
    tokenizer = Tokenizer.load(run_dir / "tokenizer")
    model, start_meta = load_model(run_dir, config.from_stage, device=device, tokenizer=tokenizer)
    T = config.sequence_len if config.sequence_len > 0 else model.config.sequence_len
    B = config.device_batch_size
    rows = config.rows_per_step if config.rows_per_step > 0 else B * world
    if rows % (B * world):
        raise ValueError(f"--rows-per-step {rows} must be a multiple of --device-batch-size x processes = {B * world}")
    next_batches, epoch = make_data(tokenizer, config, T, "train", model)
    lr = config.init_lr_frac
    run = StageRun(run_dir, stage, model, tokenizer, setup_optimizers(
        model, unembedding_lr=config.unembedding_lr * lr, embedding_lr=config.embedding_lr * lr,
        matrix_lr=config.matrix_lr * lr, weight_decay=config.weight_decay), next_batches, device,
        _autocast_factory(device, dtype), rank, world, rows // (B * world),
        config.num_iterations if config.num_iterations > 0 else max(1, epoch // rows), ckpt_dir, start_meta,
        log if rank == 0 else (lambda *a, **k: None), loop=dict(smooth_train_loss=0.0, total_training_time=0.0))
    run.say(f"{stage}: from {config.from_stage} step {start_meta.get('step')} | {model.num_params():,} parameters | "
            f"{world} rank(s) on {device.type}, {dtype} | {rows} rows of {T} tokens per step = {B} x {world} rank(s) "
            f"x {run.accum} micro-step(s) | {run.num_iterations} steps")
    _resume_stage(run, config, resume, overwrite)
    run.metrics = MetricsLog(metrics_path, resume_step=run.step if resume else None, enabled=rank == 0, log=run.say)
    if config.eval_batches > 0:  # RL has no validation batches
        val_next, _ = make_data(tokenizer, config, T, "test", model)
        run.val = [_micro(b, device) for b in val_next(0, config.eval_batches * world)[0][rank::world]]
    return run


# %% [markdown]
# Resuming puts back everything that decides the next update: the weights, this rank's optimizer shards, the data
# cursor and the loop state, with a one-line error naming the file when a checkpoint does not fit.

# %%
#| export
def _resume_stage(run, config, resume, overwrite):
    "Load the latest checkpoint of the stage into `run` when resuming; clear the stage's checkpoints on --overwrite."
    step = latest_step(run.ckpt_dir) if resume else None
    if step is not None:
        model_state, optim_state, meta = load_checkpoint(run.ckpt_dir, step, run.device, load_optimizer=True,
                                                         rank=run.rank)
        model_path, meta_path, optim_path = _paths(run.ckpt_dir, step, run.rank)
        if meta.get("world_size", run.world) != run.world or step > run.num_iterations:
            raise ValueError(f"{meta_path} (step {step}, {meta.get('world_size')} rank(s)) does not fit this run "
                             f"({run.num_iterations} steps, {run.world} rank(s)); fix: the same --num-iterations and "
                             "number of processes, or --overwrite")
        _check_state(run.model.state_dict(), model_state, model_path)
        run.model.load_state_dict(model_state, strict=True)
        restore_optimizers(run.optimizers, optim_state, optim_path)
        cursor, run.loop = meta.get("cursor"), checkpoint_part(meta, "loop_state", meta_path)
        if not isinstance(cursor, int) or cursor < 0:
            raise CheckpointError(f"{meta_path} has no valid data 'cursor' (found {cursor!r}); fix: resume from "
                                  "another step (delete this step's meta file), or start over with --overwrite")
        run.step, run.cursor, run.val_loss = step, cursor, meta.get("val_loss")
        run.say(f"resumed from step {step} ({run.ckpt_dir})")
    elif resume:
        run.say(f"nothing to resume in {run.ckpt_dir}: starting from {config.from_stage}")
    if overwrite and run.rank == 0:
        run.say(f"--overwrite: deleted {clear_checkpoints(run.ckpt_dir)} checkpoint file(s) of the earlier "
                f"{run.stage} run")


# %% [markdown]
# One training step: the micro-batches of this rank, forward and backward with the loss divided by the number of
# micro-steps (so the gradients add up to the mean), then the shared optimizer step with the stage's schedule.

# %%
#| export
def _train_step(run, config):
    "One optimizer step of `run` on its next micro-batches; the step's metrics."
    t0 = time.perf_counter()
    micro, run.cursor = run.next_batches(run.cursor, run.world * run.accum)
    train_loss = torch.zeros((), device=run.device)
    for batch in micro[run.rank::run.world]:
        with run.autocast():
            loss = micro_loss(run.model, _micro(batch, run.device))
        train_loss += loss.detach()
        (loss / run.accum).backward()
    lrm = lr_multiplier(run.step, run.num_iterations, 0.0, config.warmdown_ratio)
    train_loss, grad_norm = optimizer_step(run.model, run.optimizers, train_loss / run.accum, lrm,
                                           muon_momentum(run.step), config.grad_clip, run.step, run.ckpt_dir)
    dt = time.perf_counter() - t0
    loop = run.loop
    loop["total_training_time"] += dt
    loop["smooth_train_loss"] = 0.9 * loop["smooth_train_loss"] + 0.1 * train_loss
    if run.step % max(1, run.num_iterations // 10) == 0:
        run.say(f"step {run.step:05d}/{run.num_iterations} | loss {train_loss:.4f} | lrm {lrm:.2f} | "
                f"{dt * 1000:.0f} ms")
    return dict(loss=train_loss, smooth_loss=loop["smooth_train_loss"] / (1 - 0.9 ** (run.step + 1)), lr_mult=lrm,
                grad_norm=grad_norm, cursor=run.cursor, dt=dt, elapsed=loop["total_training_time"])


# %% [markdown]
# Evaluating and saving happen at the top of a step, before it trains, and once more after the last step: the
# validation loss (when the stage has validation batches), the stage's own `evaluate`, and a checkpoint when due.

# %%
#| export
def _evaluate_and_save(run, config, record, last, resume_step, evaluate=None):
    "At the evaluation steps add the validation loss and `evaluate`'s metrics to `record`; save when due."
    due = lambda every: every > 0 and run.step % every == 0
    if last or due(config.eval_every):
        run.model.eval()
        if run.val is not None:
            run.val_loss = record["val_loss"] = mean_loss(run.model, run.val, run.autocast)
            run.say(f"step {run.step:05d} | val loss {run.val_loss:.4f}")
        if evaluate is not None:
            extra = evaluate(run.model, run.step)
            record.update(extra)
            run.say(f"step {run.step:05d} | " + " | ".join(f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}"
                                                           for k, v in extra.items()))
        run.model.train()
    if run.step > resume_step and (last or due(config.save_every)):
        check_finite(run.step, run.ckpt_dir, val_loss=run.val_loss, weights=run.model)
        meta = dict(step=run.step, val_loss=run.val_loss, model_config=asdict(run.model.config),
                    user_config=asdict(config), num_iterations=run.num_iterations, world_size=run.world,
                    cursor=run.cursor, loop_state=run.loop, from_stage=config.from_stage,
                    from_step=run.start_meta.get("step"))
        save_checkpoint(run.ckpt_dir, run.step, run.model.state_dict(),
                        {"optimizers": [o.state_dict() for o in run.optimizers]}, meta, rank=run.rank,
                        barrier=dist.barrier if run.world > 1 else None)
        if run.rank == 0 and config.keep_checkpoints > 0:
            prune_checkpoints(run.ckpt_dir, config.keep_checkpoints, remove_temps=False)


# %% [markdown]
# With the pieces named, the loop itself reads as what it does: evaluate and save when due, stop after the last
# step, otherwise train one step and log it. At the end the stage answers `eval_problems` held-out arithmetic
# problems greedily with the engine (chapter 10's `evaluate_checkpoint`) and appends the accuracy to
# `metrics/eval.jsonl`.

# %%
#| export
def _train_chat_stage(run, config, on_step=None, evaluate=None):
    "The loop of `train_chat_stage`: steps until `num_iterations`, then the held-out evaluation; a summary."
    resume_step = run.step
    while True:
        last, record = run.step == run.num_iterations, {"step": run.step}
        _evaluate_and_save(run, config, record, last, resume_step, evaluate)
        if last:
            run.metrics.write(record | {"elapsed": run.loop["total_training_time"]})
            break
        record.update(_train_step(run, config))
        run.metrics.write(record)
        if on_step:
            on_step(record)
        run.step += 1
    summary = dict(stage=run.stage, step=run.step, val_loss=run.val_loss, final_loss=run.loop["smooth_train_loss"],
                   total_training_time=run.loop["total_training_time"], checkpoint_dir=str(run.ckpt_dir))
    if config.eval_problems > 0:
        summary["arithmetic"] = stage_arithmetic(run.model.eval(), run.tokenizer, run.run_dir, run.stage, run.step,
                                                 config, run.say, run.rank)
    return summary


# %%
#| export
def stage_arithmetic(model, tokenizer, run_dir, stage, step, config, say=print, rank=0):
    "Greedy accuracy on the held-out arithmetic problems, appended to metrics/eval.jsonl for `stage`; returns it."
    t0 = time.perf_counter()
    records = evaluate_checkpoint("chat", model, tokenizer, {"stage": stage, "step": step}, run_dir, log=say,
                                  tasks=["arithmetic"], max_problems=config.eval_problems,
                                  max_tokens=config.eval_max_tokens)
    if rank == 0:
        append_records(Path(run_dir) / "metrics" / "eval.jsonl", records)
    accuracy = next(r["value"] for r in records if r["task"] == "arithmetic" and r["metric"] == "accuracy")
    say(f"{stage} arithmetic accuracy {accuracy:.3f} ({time.perf_counter() - t0:.0f}s)")
    return accuracy


# %% [markdown]
# ## Midtraining
#
# All that is particular to midtraining is now three lines: its data (the mixture, packed), its schedule (the
# presets and the defaults of `ChatTrainConfig`) and its name.

# %%
#| export
def mid_data(tokenizer, config, T, split, model=None):
    "Midtraining's batches: the mixture's conversations packed into BOS-aligned rows; (next_batches, epoch size)."
    task = default_mixture(split, config.arithmetic, config.spelling, config.simple_spelling, config.identity,
                           seed=config.seed, docstrings=config.docstrings,
                           extra=hub_tasks(split, config.data_root) if config.data_root else ())
    render = Renderer(tokenizer, task, T + 1)

    def next_batches(cursor, n):
        out = []
        for _ in range(n):
            x, y, cursor = pack_rows(render, cursor, config.device_batch_size, T, tokenizer.bos_id)
            out.append((x, y))
        return out, cursor
    return next_batches, len(task)


def midtrain(run_dir, config=None, resume=False, overwrite=False, on_step=None, log=print):
    "Midtrain the latest `config.from_stage` checkpoint of `run_dir` into stage `mid`; returns a summary dict."
    config = config or make_chat_config(PRESETS)
    return train_chat_stage(run_dir, "mid", config, mid_data, resume, overwrite, on_step, log)


# %% [markdown]
# ## A run
#
# The chapter starts from the base model of chapter 06 (`../runs/chapter06`, 20 steps of pretraining) when it is
# there, and otherwise from a freshly initialised model with a small tokenizer, so that it runs on its own. The
# numbers below are small on purpose, to finish in about a minute on a laptop CPU; `nanochat-nb midtrain --preset
# micro` trains 120 steps of 8 rows and answers 256 held-out problems.

# %% tags=["parameters"]
run_dir = "../runs/chapter11"
base_run = "../runs/chapter06"
num_iterations = 30
eval_problems = 16

# %%
import shutil
from nanochat_nb.checkpoint import checkpoint_dir as _ckpt_dir, save_checkpoint as _save
from nanochat_nb.model import GPTConfig, build_model
from nanochat_nb.tokenizer import train_tokenizer

shutil.rmtree(run_dir, ignore_errors=True)
if latest_step(_ckpt_dir(base_run, "base")) is not None and (Path(base_run) / "tokenizer" / "tokenizer.json").exists():
    shutil.copytree(Path(base_run) / "tokenizer", Path(run_dir) / "tokenizer")
    shutil.copytree(_ckpt_dir(base_run, "base"), _ckpt_dir(run_dir, "base"))
else:  # no chapter 06 run: a small tokenizer and an untrained depth-4 model stand in for the base stage
    train_tokenizer(run_dir, vocab_size=1024, max_chars=1_000_000)
    _config = GPTConfig.from_depth(4, vocab_size=1024, sequence_len=256)
    _save(_ckpt_dir(run_dir, "base"), 0, build_model(_config).state_dict(), None,
          {"model_config": asdict(_config), "val_bpb": None})
print(sorted(p.name for p in _ckpt_dir(run_dir, "base").iterdir()))

# %% [markdown]
# Before: the base model, asked a held-out problem, continues it as text (it has never seen a chat token).

# %%
from nanochat_nb.engine import Engine, load_for_inference

problem = load_task("arithmetic", "test", size=1)[0]


def answer(stage):
    "The greedy reply of a stage's model to the held-out problem."
    model, tok, _ = load_for_inference(run_dir, stage, device="cpu")
    prompt = tok.render_for_completion(problem)
    rows, _ = Engine(model, tok).generate_batch(prompt, max_tokens=80, temperature=0)
    return tok.decode(rows[0][len(prompt):])


print(problem["messages"][0]["content"], "\n---\n", answer("base")[:300])

# %%
#| fig-alt: "Midtraining's training loss and validation loss per token against steps, both falling."
from nanochat_nb.pretrain import LiveLossChart

config = make_chat_config(PRESETS, "micro", num_iterations=num_iterations, device_batch_size=4, rows_per_step=4,
                          eval_every=10, eval_problems=eval_problems, eval_max_tokens=96)
chart = LiveLossChart(every=5, title="midtraining (stage mid)", val_key="val_loss",
                      val_label="validation loss (nats per token)")
summary = midtrain(run_dir, config, on_step=chart)
chart.draw()
summary

# %% [markdown]
# After: the same problem. The reply now has the shape of a chat answer (the format tokens, a calculator call
# between `<|python_start|>` and `<|python_end|>`), even when the numbers are not yet right.

# %%
print(answer("mid")[:400])
records = MetricsLog.read(Path(run_dir) / "metrics" / "mid.jsonl")
val = [r["val_loss"] for r in records if "val_loss" in r]
print(f"validation loss {val[0]:.3f} -> {val[-1]:.3f}")
assert val[-1] < val[0]

# %% [markdown]
# ## At scale
#
# nanochat midtrains d20 on 8×H100 for about 8 minutes (765–809 steps of 524,288 tokens, one epoch of 848K
# conversations) on SmolTalk, MMLU's auxiliary set, GSM8K with tool calls, identity conversations and the two
# spelling tasks. `--preset d20` sets 256 rows of 2,048 tokens per step and the synthetic tasks at nanochat's sizes;
# the hub datasets join the mixture when their loaders (chapter 09) find them.
#
# ```sh
# torchrun --standalone --nproc_per_node=8 -m nanochat_nb.cli midtrain --preset d20 --run-dir runs/d20
# ```
#
# **Measured** on 2 CPU cores, offline, from the `micro` base of `make speedrun` (depth 4, 160 steps), on
# 2026-12-02 while seven other jobs shared the machine (load average about 12), so the times are several times an
# idle machine's: the held-out arithmetic accuracy (256 problems, greedy) is 0.000 for the base model (`nanochat-nb
# eval chat --stage base --tasks arithmetic --max-problems 256`: it has never seen a chat token) and 0.098 (25/256)
# after `midtrain --preset micro`, whose
# validation loss fell 7.28 → 1.17 → 0.75 → 0.55 at steps 0, 40, 80, 120. The 120 steps took 839 s and the 256
# problems 401 s of wall time on the busy machine, 3.5 min of CPU time in all; on an idle machine a step takes
# about 0.3–0.5 s. SFT (chapter 12) then takes the same model to 0.977 (250/256).
#
# What limits midtraining's number: in 120 steps of 8 rows it sees 1,314 conversations (about 920 of them
# arithmetic), and its loss counts every token, most of them the random numbers of the questions, which no model can
# predict. Copying three operands into three calculator calls and the results back, all exactly, takes more
# examples than that; SFT's loss on the assistant's tokens only, over 480 steps, is where the skill is learned.

# %% [markdown]
# ## Summary and exercises
#
# We wrote the post-training loop `train_chat_stage` on the pieces of chapter 06 that every stage shares
# (`optimizer_step`, `restore_optimizers`, `MetricsLog`, checkpoints and the run lock), split into a setup, a resume,
# one training step and the periodic evaluation and save; a stage gives it its data (which may carry per-token
# weights) and, if it likes, its own evaluation. Midtraining is that loop plus a mixture (synthetic tasks, questions
# about the standard library answered from its docstrings, nanochat's hub datasets when present) packed into
# BOS-aligned rows, and a schedule that stays flat and then falls to 0. A run writes `checkpoints/mid`,
# `metrics/mid.jsonl` and its held-out arithmetic accuracy in `metrics/eval.jsonl`, resumes exactly, and runs under
# torchrun.
#
# 1. Train with `--arithmetic 0`: what happens to the reply to the arithmetic problem? And with `--docstrings 0`,
#    to the reply to a held-out `DocstringQA("test")` question?
# 2. Pack rows the way nanochat does (a flat stream that crosses conversation boundaries) and compare the loss.
# 3. Set `--warmdown-ratio 0` (a constant rate) and compare the final validation loss.
