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
# # Checkpoints
# > Save a run so that a crash, a kill or a full disk never costs more than the last save: atomic files, a commit
# > marker, and strict loading.

# %%
#| default_exp checkpoint

# %% [markdown]
# A pretraining run is hours of GPU time held in memory. A checkpoint is how that work survives: the pretraining loop
# writes one at the end (and every `save_every` steps if asked), resumes from one after a crash, and every later stage
# (mid-training, SFT, RL, evaluation, chat) starts by loading one. So two things must hold. A checkpoint that exists
# must be *whole*: a half-written file under a real name is worse than none, because the next resume loads garbage or
# dies on it. And loading must be *strict*: a model built from the wrong config, or paired with the wrong tokenizer,
# must fail loudly with a message that says which file and what to do, not train on quietly.
#
# By the end of this chapter we have `save_checkpoint`, `load_checkpoint` and `load_model`, and we have watched a
# crash in the middle of a save leave the previous checkpoint loadable.
#
# *Pipeline:* the model (GPT, `build_model`) and the tokenizer come before; the pretraining loop is the first caller,
# and every stage after it reads what this chapter writes.

# %%
#| export
import errno
import json
import math
import os
import re
import socket
import sys
import time
from pathlib import Path

import torch

try:
    import fcntl  # POSIX file locks; on Windows run directories are simply not locked
except ImportError:
    fcntl = None

from nanochat_nb.common import atomic_write
from nanochat_nb.model import GPTConfig, build_model
from nanochat_nb.tokenizer import Tokenizer

# %%
import io
import shutil
import subprocess
import tempfile
from unittest import mock

import matplotlib.pyplot as plt
import pandas as pd
import torch.nn.functional as F
from fastcore.test import test_eq, test_fail
from IPython.display import Markdown, display

from nanochat_nb.common import AT_SCALE
from nanochat_nb.data import DataLoader, prepare_data
from nanochat_nb.optim import lr_multiplier, muon_momentum, setup_optimizers
from nanochat_nb.tokenizer import stdlib_documents

# the chapter's models are tiny: on a small, busy CPU one thread beats two (restored at the end of the chapter)
_saved_threads = torch.get_num_threads()
torch.set_num_threads(1)

# %% [markdown]
# ## Where a run keeps its checkpoints
#
# Everything a run produces lives under one `run_dir`, so a run can be copied, archived or deleted as one folder:
#
# | Path | What | Written by |
# |---|---|---|
# | `run_dir/tokenizer/` | the trained tokenizer | tokenizer training |
# | `run_dir/data/` | token shards | data preparation |
# | `run_dir/checkpoints/<stage>/` | checkpoints of `stage` in `base`, `mid`, `sft`, `rl` | each training stage |
# | `run_dir/metrics/`, `run_dir/report/` | logs and the report card | every stage |
#
# A stage directory holds, for each saved step (zero-padded to six digits, as in nanochat):
#
# | File | What | Written by |
# |---|---|---|
# | `model_000500.pt` | `state_dict` of the uncompiled model | rank 0 |
# | `optim_000500_rank{r}.pt` | this rank's optimizer state (the optimizers are sharded, so each rank holds a different part) | every rank |
# | `meta_000500.json` | step, `model_config`, val_bpb, dataloader and loop state, the user's config: indented JSON | rank 0, **last** |
#
# nanochat puts these under `base_checkpoints/d20/` and friends; we drop the model tag, since one `run_dir` holds one
# model.

# %%
#| export
STAGES = ("base", "mid", "sft", "rl")


class CheckpointError(Exception):
    "A checkpoint that cannot be saved or loaded; the message names the file, what is wrong and the fix."


def checkpoint_dir(run_dir, stage="base"):
    "The directory that holds the checkpoints of `stage`: `run_dir/checkpoints/<stage>`."
    if stage not in STAGES:
        raise ValueError(f"unknown stage {stage!r}; fix: use one of {', '.join(STAGES)}")
    return Path(run_dir) / "checkpoints" / stage


# %%
test_eq(checkpoint_dir("runs/demo", "sft"), Path("runs/demo/checkpoints/sft"))
test_fail(lambda: checkpoint_dir("runs/demo", "pretrain"), contains="unknown stage 'pretrain'")

# %% [markdown]
# ## Why a plain `torch.save` is not enough
#
# `torch.save(state, "model_000500.pt")` opens the final name first and then fills it. If the process dies halfway
# (an out-of-memory kill, a preempted node, a full disk), the final name holds half a file. Let's inject exactly that:
# a `torch.save` that writes the first half of its bytes and then fails, as a full disk would.

# %%
real_save = torch.save


def half_save(obj, f):
    "A torch.save that writes half of its bytes and then fails, as a full disk would."
    buf = io.BytesIO()
    real_save(obj, buf)
    data = buf.getvalue()
    if isinstance(f, (str, os.PathLike)):
        with open(f, "wb") as fh:
            fh.write(data[: len(data) // 2])
    else:
        f.write(data[: len(data) // 2])
    raise OSError(28, "No space left on device (injected)")


tmp = Path(tempfile.mkdtemp())
torch.save({"w": torch.ones(1000)}, tmp / "plain.pt")          # yesterday's good file
with mock.patch.object(torch, "save", half_save):
    try:
        torch.save({"w": torch.zeros(1000)}, tmp / "plain.pt")  # today's save dies halfway
    except OSError as e:
        print("save failed:", e)
try:
    torch.load(tmp / "plain.pt")
except Exception as e:
    print("and now the old file is gone too:", type(e).__name__, str(e)[:80])

# %% [markdown]
# Both the new state and the old one are lost. The fix is old and simple, the same one databases and editors use:
#
# 1. write into a **temp file in the same directory** (same directory, so that the rename below stays on one file
#    system, where it is atomic);
# 2. `flush` and **`fsync`** it, so the bytes are on the disk and not only in the page cache;
# 3. **`os.replace`** it onto the final name: atomic on POSIX and on Windows, so any reader sees the old file or the new
#    one, never a mix;
# 4. `fsync` the **directory**, so that the rename itself survives a power cut.
#
# If anything fails before step 3, the temp file is removed and the final name is untouched. If the process is killed
# outright (SIGKILL gives it no chance to clean up), a stray temp file stays behind, but the final name is still the
# old, whole file. Temp names start with a dot and end in `.tmp`, so nothing that looks for checkpoints mistakes them
# for one.

# %% [markdown]
# That helper is `atomic_write`, in the common module (chapter 00), because the tokenizer and the data shards need it
# as much as checkpoints do. It also unwraps one PyTorch quirk: a full disk in the middle of a `torch.save` surfaces as
# a bare `RuntimeError: [enforce fail at inline_container.cc:672]`, so `atomic_write` keeps the operating system's own
# error and raises that, with the final file name attached. It is re-exported here, so
# `from nanochat_nb.checkpoint import atomic_write` keeps working.

# %% [markdown]
# The same injected failure, now through `atomic_write`: the save still fails, but yesterday's file is untouched and no
# temp file is left.

# %%
atomic_write(tmp / "atomic.pt", lambda f: torch.save({"w": torch.ones(1000)}, f))
with mock.patch.object(torch, "save", half_save):
    test_fail(lambda: atomic_write(tmp / "atomic.pt", lambda f: torch.save({"w": torch.zeros(1000)}, f)),
              contains="No space left")
test_eq(torch.load(tmp / "atomic.pt")["w"].sum().item(), 1000.0)
print(sorted(p.name for p in tmp.iterdir()))

# %% [markdown]
# And a real full disk: Linux's `/dev/full` answers every write with "No space left on device". `torch.save` may turn
# that into its `RuntimeError`; the recorder still has the disk's own words.

# %%
from nanochat_nb.common import _RecordingFile

if Path("/dev/full").exists():
    with open("/dev/full", "wb", buffering=0) as f:
        out = _RecordingFile(f)
        try:
            torch.save({"w": torch.ones(100_000)}, out)
        except (RuntimeError, OSError) as e:  # which one depends on where in the zip file the write failed
            print("torch says:   ", f"{type(e).__name__}: {str(e)[:60]}")
            print("the disk says:", out.error)
    test_eq(out.error.errno, errno.ENOSPC)

# %% [markdown]
# ## The commit marker
#
# One checkpoint is several files, and no file system renames several files at once. So we order the writes and let
# the last one decide: first every rank's optimizer shard, then the model, and **last the meta file**. A step counts as
# saved only once its `meta_*.json` exists next to its `model_*.pt`; a crash at any earlier point leaves a step without
# meta, which every reader ignores. The meta file is the *commit marker*, like the final record of a database
# transaction.
#
# `latest_step` is the one place that decides which steps are complete.

# %%
#| export
_MODEL, _META = r"model_(\d{6,})\.pt", r"meta_(\d{6,})\.json"


def _paths(ckpt_dir, step, rank=0):
    "The model, meta and (this rank's) optimizer file of one step."
    d = Path(ckpt_dir)
    return d / f"model_{step:06d}.pt", d / f"meta_{step:06d}.json", d / f"optim_{step:06d}_rank{rank}.pt"


def _steps(ckpt_dir, pattern):
    "The steps of the files in `ckpt_dir` whose whole name matches `pattern`."
    return {int(m.group(1)) for p in Path(ckpt_dir).iterdir() if (m := re.fullmatch(pattern, p.name))}


def latest_step(ckpt_dir):
    "The largest step whose model and meta files both exist (a complete checkpoint), or None."
    if not Path(ckpt_dir).is_dir():
        return None
    return max(_steps(ckpt_dir, _MODEL) & _steps(ckpt_dir, _META), default=None)


# %%
d = tmp / "marker"
d.mkdir()
for name in ["model_000100.pt", "meta_000100.json",    # step 100: complete
             "model_000200.pt",                         # step 200: died before its meta
             ".model_000300.pt.4242.tmp"]:              # step 300: killed mid-write
    (d / name).touch()
test_eq(latest_step(d), 100)
test_eq(latest_step(tmp / "nowhere"), None)


# %% [markdown]
# ## Saving a step
#
# The meta dict is checked before a single byte is written: a value JSON cannot hold (a tensor, a `Path`, a numpy
# float) fails here with the key named, instead of after the model file is already on disk. A `GPTConfig` dataclass is
# turned into a plain dict, since `model_config` is what `load_model` rebuilds the model from.

# %%
#| export
def _meta_json(meta, step):
    "The meta dict with `step` set, as indented JSON; a clear error names a key that JSON cannot hold."
    if not isinstance(meta, dict) or "model_config" not in meta:
        raise CheckpointError(f"meta of step {step} has no 'model_config'; fix: pass meta={{'model_config': "
                              "dataclasses.asdict(config), ...}} so the model can be rebuilt when loading")
    meta = {"step": step, **{k: v for k, v in meta.items() if k != "step"}}
    if not isinstance(meta["model_config"], dict):
        meta["model_config"] = vars(meta["model_config"]).copy()
    for key, value in meta.items():
        try:
            json.dumps({key: value})
        except (TypeError, ValueError) as e:
            raise CheckpointError(f"meta[{key!r}] of step {step} cannot be saved as JSON ({e}); nothing was "
                                  "written; fix: pass plain numbers, strings, lists and dicts "
                                  "(e.g. tensor.item(), str(path), float(x))") from None
    return json.dumps(meta, indent=2)


# %% [markdown]
# Then `save_checkpoint` itself. In a distributed run every rank calls it: each writes its own optimizer shard, all
# wait at the `barrier` (so that no shard is still missing when the step is committed), and rank 0 writes the model and
# then the meta. `torch.compile` wraps a model and prefixes its keys with `_orig_mod.`; we strip that so a checkpoint
# loads into a plain model.

# %% [markdown]
# When the disk refuses a save (full, read-only, a quota), the error should say so in words, name the file, and tell
# the user what they still have. `explain_os_error` turns an `OSError` into that line; `save_checkpoint` adds which
# step is still the latest complete one. Its error is both a `CheckpointError` and an `OSError` (with the errno), so
# callers can catch either.

# %%
#| export
_NO_SPACE = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG}


def explain_os_error(e):
    "One line for an OSError: what the system refused, on which file, and the fix."
    where = f": {e.filename}" if e.filename else ""
    if e.errno in _NO_SPACE:
        return (f"the disk is full, or a quota or file-size limit was reached ({e.strerror}){where}; fix: free some "
                "space, or use a --run-dir on a disk with room")
    if e.errno == errno.EROFS:
        return f"the file system is read-only{where}; fix: use a --run-dir on a writable disk"
    if e.errno in (errno.EACCES, errno.EPERM):
        return f"permission denied ({e.strerror}){where}; fix: use a --run-dir you are allowed to write to"
    if e.errno in (errno.ENOTDIR, errno.EEXIST, errno.EISDIR):
        return f"{e.strerror}{where}: a file stands where a folder is needed, or the reverse; fix: check the path"
    return f"{e.strerror or e}{where}"


class CheckpointWriteError(CheckpointError, OSError):
    "A save the operating system refused (disk full, read-only, ...): an OSError with its errno, and a clear message."

    def __init__(self, error, message):
        super().__init__(error.errno, error.strerror, error.filename)
        self.message = message

    def __str__(self):
        return self.message


# %%
for code in (errno.ENOSPC, errno.EROFS, errno.EACCES):
    print(explain_os_error(OSError(code, os.strerror(code), "runs/demo/checkpoints/base/model_000500.pt")))
assert "read-only" in explain_os_error(OSError(errno.EROFS, os.strerror(errno.EROFS), "x"))


# %%
#| export
def save_checkpoint(ckpt_dir, step, model_state, optimizer_state, meta, rank=0, barrier=None):
    "Save one step: every rank its optimizer shard, then rank 0 the model and, last, the meta that commits it."
    # every rank that has the meta checks it, so a bad value fails on all ranks at once instead of hanging the barrier
    meta_text = _meta_json(meta, step) if rank == 0 or meta is not None else None
    if rank == 0 and model_state is None:
        raise CheckpointError(f"rank 0 must pass the model state of step {step}; fix: pass model.state_dict()")
    ckpt_dir = Path(ckpt_dir)
    model_path, meta_path, optim_path = _paths(ckpt_dir, step, rank)
    try:
        ckpt_dir.mkdir(parents=True, exist_ok=True)
        if rank == 0:
            meta_path.unlink(missing_ok=True)  # saving a step again withdraws its old commit before touching its files
        if optimizer_state is not None:
            atomic_write(optim_path, lambda f: torch.save(optimizer_state, f))
        if barrier is not None:
            barrier()  # all shards are on disk before rank 0 commits the step
        if rank == 0:
            model_state = {k.removeprefix("_orig_mod."): v for k, v in model_state.items()}
            atomic_write(model_path, lambda f: torch.save(model_state, f))
            atomic_write(meta_path, lambda f: f.write(meta_text.encode()))
    except OSError as e:
        if e.errno is None:
            raise
        latest = latest_step(ckpt_dir) if ckpt_dir.is_dir() else None
        intact = f"step {latest} is still the latest complete checkpoint" if latest is not None else \
            "no step was saved before"
        raise CheckpointWriteError(e, f"saving step {step} failed: {explain_os_error(e)}; {intact}") from e


# %% [markdown]
# A tiny real GPT and one AdamW step, so that the optimizer has state worth saving. We save step 1 as two ranks would:
# rank 1 writes only its shard, rank 0 its shard, the model and the meta. (In one process the barrier is not needed:
# the calls already run in order.)

# %%
torch.manual_seed(0)
config = GPTConfig(sequence_len=32, vocab_size=256, n_layer=2, n_head=2, n_kv_head=2, n_embd=64)
model = build_model(config, "cpu")
optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
idx = torch.randint(0, config.vocab_size, (4, config.sequence_len))
targets = torch.roll(idx, -1, dims=1)


def train_step():
    "One AdamW step on the fixed batch; returns the loss."
    loss = F.cross_entropy(model(idx).flatten(0, 1).float(), targets.flatten())
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return loss.item()


loss = train_step()
run_dir = tmp / "run"
ckpt_dir = checkpoint_dir(run_dir, "base")
meta = {"model_config": vars(config).copy(), "val_bpb": 3.21, "loop_state": {"smooth_train_loss": loss},
        "dataloader_state_dict": {"shard": 0, "row_group": 3}, "user_config": {"depth": 2, "lr": 1e-3}}
t0 = time.perf_counter()
save_checkpoint(ckpt_dir, 1, None, {"optimizers": [optimizer.state_dict()]}, None, rank=1)
save_checkpoint(ckpt_dir, 1, model.state_dict(), {"optimizers": [optimizer.state_dict()]}, meta, rank=0)
save_s = time.perf_counter() - t0
for p in sorted(ckpt_dir.iterdir()):
    print(f"{p.name:28s} {p.stat().st_size:>9,} bytes")
print(f"saved in {save_s * 1000:.0f} ms")
test_eq(latest_step(ckpt_dir), 1)

# %% [markdown]
# The meta file is plain, indented JSON, readable with `cat` and by any tool:

# %%
print((ckpt_dir / "meta_000001.json").read_text())


# %% [markdown]
# ## Loading a step
#
# Loading is where the errors surface, so every way it can fail names its file and the fix: a missing directory, a
# directory with no complete step, a step whose file is gone, a file that is truncated or corrupt (whatever
# `torch.load` says about it), and an optimizer shard missing for this rank (a resume with more ranks than the save
# had). We load with `weights_only=True`, so a checkpoint can hold tensors and plain containers but never code that
# runs on load. Like nanochat, a bf16 model state is cast to fp32 when it lands on a CPU (or MPS), where bf16 matmuls
# are slow or missing.

# %%
#| export
def _torch_load(path, device):
    "torch.load that turns any failure into a CheckpointError naming the file."
    try:
        return torch.load(path, map_location=device, weights_only=True)
    except Exception as e:
        why = str(e).split(". ")[0][:200]  # torch's own message runs on for several sentences
        raise CheckpointError(f"{path} cannot be loaded ({type(e).__name__}: {why}); it is truncated or corrupt "
                              "(a crash or a full disk while copying it?); fix: copy it again, or delete this "
                              "step's files and load an earlier step") from e


# %%
#| export
def load_checkpoint(ckpt_dir, step=None, device="cpu", load_optimizer=False, rank=0):
    "Load (model_state, this rank's optimizer state or None, meta) of one step; step None means the latest."
    ckpt_dir = Path(ckpt_dir)
    if not ckpt_dir.is_dir():
        raise CheckpointError(f"no checkpoint directory {ckpt_dir}; fix: train this stage first, or check run_dir "
                              "and stage")
    complete = sorted(_steps(ckpt_dir, _MODEL) & _steps(ckpt_dir, _META))
    if step is None:
        if not complete:
            raise CheckpointError(f"{ckpt_dir} holds no complete checkpoint (a model_*.pt with its meta_*.json); "
                                  "fix: train this stage first (an interrupted save leaves no meta file)")
        step = complete[-1]
    model_path, meta_path, optim_path = _paths(ckpt_dir, step, rank)
    for path in (meta_path, model_path):
        if not path.exists():
            raise CheckpointError(f"{path} does not exist, so step {step} is not a complete checkpoint; fix: load "
                                  f"one of the complete steps {complete} (step=None picks the latest)")
    if load_optimizer and not optim_path.exists():
        raise CheckpointError(f"{optim_path} does not exist: step {step} holds no optimizer shard for rank {rank}; "
                              "fix: resume with as many ranks as the run that saved it, or load_optimizer=False")
    try:
        meta = json.loads(meta_path.read_text())
    except (ValueError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{meta_path} is not valid JSON ({e}); fix: repair or delete it (deleting it "
                              "uncommits the step) and load another step") from e
    if not isinstance(meta, dict):
        raise CheckpointError(f"{meta_path} holds a JSON {type(meta).__name__}, not an object; fix: repair or delete "
                              "it (deleting it uncommits the step) and load another step")
    model_state = _torch_load(model_path, device)
    if not isinstance(model_state, dict) or not all(isinstance(v, torch.Tensor) for v in model_state.values()):
        raise CheckpointError(f"{model_path} holds a {type(model_state).__name__}, not a model state_dict of tensors; "
                              "fix: delete this step's files and load an earlier step")
    model_state = {k.removeprefix("_orig_mod."): v for k, v in model_state.items()}
    if torch.device(device).type in ("cpu", "mps"):
        model_state = {k: v.float() if v.dtype == torch.bfloat16 else v for k, v in model_state.items()}
    optimizer_state = _torch_load(optim_path, device) if load_optimizer else None
    return model_state, optimizer_state, meta


# %% [markdown]
# A round trip: the model state, both ranks' optimizer shards and the meta come back equal to what was saved.

# %%
t0 = time.perf_counter()
model_state, optimizer_state, meta_back = load_checkpoint(ckpt_dir, load_optimizer=True)
load_s = time.perf_counter() - t0
print(f"loaded in {load_s * 1000:.0f} ms")
for k, v in model.state_dict().items():
    assert torch.equal(model_state[k], v), k
saved_adam = optimizer.state_dict()["state"]
for r in (0, 1):
    shard = load_checkpoint(ckpt_dir, load_optimizer=True, rank=r)[1]["optimizers"][0]["state"]
    for i, s in saved_adam.items():
        assert torch.equal(shard[i]["exp_avg_sq"], s["exp_avg_sq"]), (r, i)
test_eq(meta_back, {"step": 1, **meta})


# %% [markdown]
# ## Loading a model
#
# `load_model` is what the later stages call: it finds the stage's latest step, rebuilds the GPT from the saved
# `model_config` through `build_model` (meta device, `to_empty`, `init_weights`, so that buffers such as the rotary
# tables exist), and loads the weights strictly. Before that it checks two things that PyTorch would report badly or
# not at all:
#
# - **the weights fit the config**: a key missing, an extra key, or a shape that differs is listed by name (the usual
#   cause: a `meta_*.json` from one run next to a `model_*.pt` from another);
# - **the tokenizer fits the model**: a tokenizer with another vocabulary would load without complaint and produce
#   nonsense, so its `vocab_size` must equal `model_config["vocab_size"]`. The run's own `run_dir/tokenizer/` is used
#   when no tokenizer is passed.

# %%
#| export
def _check_state(expected, got, path):
    "Raise a CheckpointError listing the keys and shapes where a state_dict does not fit the model."
    def few(keys):
        return ", ".join(keys[:4]) + (f" and {len(keys) - 4} more" if len(keys) > 4 else "")
    missing, unexpected = sorted(expected.keys() - got.keys()), sorted(got.keys() - expected.keys())
    shapes = [f"{k} {tuple(got[k].shape)} vs {tuple(expected[k].shape)}"
              for k in sorted(expected.keys() & got.keys()) if got[k].shape != expected[k].shape]
    problems = ([f"missing keys: {few(missing)}"] if missing else []) + \
               ([f"unexpected keys: {few(unexpected)}"] if unexpected else []) + \
               ([f"shape mismatch (checkpoint vs model): {few(shapes)}"] if shapes else [])
    if problems:
        raise CheckpointError(f"{path} does not fit the model built from its meta's model_config: "
                              f"{'; '.join(problems)}; fix: load the model and meta files of the same run and step")


# %%
#| export
def load_model_dir(ckpt_dir, step=None, device="cpu", tokenizer=None, tokenizer_dir=None):
    "Rebuild the GPT saved in a checkpoint directory (ours or nanochat's), load it strictly, check the tokenizer fits."
    model_state, _, meta = load_checkpoint(ckpt_dir, step, device)
    model_path, meta_path, _ = _paths(ckpt_dir, meta["step"])
    try:
        config = GPTConfig(**meta["model_config"])
    except (KeyError, TypeError, ValueError) as e:
        raise CheckpointError(f"{meta_path}: model_config cannot build a GPTConfig ({e}); fix: save meta with "
                              "model_config=dataclasses.asdict(config) (nanochat's newer checkpoints, with "
                              "window_pattern, are a different model and cannot be loaded here)") from e
    if tokenizer is not None and tokenizer.vocab_size != config.vocab_size:
        raise CheckpointError(f"{meta_path}: the model has vocab_size {config.vocab_size} but the tokenizer has "
                              f"{tokenizer.vocab_size}; fix: use the tokenizer this model was trained with"
                              + (f" ({tokenizer_dir})" if tokenizer_dir else ""))
    model = build_model(config, device)
    _check_state(model.state_dict(), model_state, model_path)
    model.load_state_dict(model_state, strict=True)
    return model, meta


def load_model(run_dir, stage="base", step=None, device="cpu", tokenizer=None):
    "Rebuild the GPT saved at `stage`/`step` of a run, load its weights strictly, and check the tokenizer fits."
    if tokenizer is None and (Path(run_dir) / "tokenizer").is_dir():
        tokenizer = Tokenizer.load(Path(run_dir) / "tokenizer")
    return load_model_dir(checkpoint_dir(run_dir, stage), step, device, tokenizer, Path(run_dir) / "tokenizer")


# %% [markdown]
# The reloaded model gives exactly the same logits as the one that was saved:

# %%
model.eval()
model2, meta2 = load_model(run_dir, "base")
model2.eval()
with torch.no_grad():
    logits, logits2 = model(idx), model2(idx)
print("max |logits - logits after reload|:", (logits - logits2).abs().max().item())
assert torch.equal(logits, logits2)
test_eq(meta2["step"], 1)

# %% [markdown]
# ## Resuming a run exactly
#
# The point of all this is that a run which stops and resumes ends where an uninterrupted one would have, to the bit.
# Three things must come back for that: the weights, the optimizer state (AdamW's moments, Muon's momentum), and
# where the data stood: the loader's state from chapter 04, stored in the meta. The step number, saved as well,
# puts the learning-rate and momentum schedules back where they were.
#
# A small run shows it: a tokenizer and a corpus from a couple of hundred stdlib files, the tiny GPT, nanochat's
# Muon + AdamW with their schedules, ten steps. Run A goes straight through and saves at step 5. Run B starts a
# fresh process's worth of objects (model, optimizers, loader, all built anew), loads step 5 and trains to 10.

# %%
resume_run = tmp / "resume_run"
prepare_data(resume_run, max_docs=200, chars_per_shard=400_000, docs_per_row_group=16)
resume_tok = Tokenizer.train(stdlib_documents(max_docs=60), vocab_size=512)
resume_config = GPTConfig(sequence_len=64, vocab_size=resume_tok.vocab_size, n_layer=2, n_head=2, n_kv_head=2,
                          n_embd=64)
resume_ckpt = checkpoint_dir(resume_run, "base")


def tiny_run(num_steps=10, save_at=None, resume=False):
    "Train the tiny GPT to `num_steps`, saving at `save_at` or resuming from the latest checkpoint; returns what it saw."
    torch.manual_seed(0)
    model = build_model(resume_config)
    optimizers = setup_optimizers(model)
    step, loader_state = 0, None
    if resume:
        model_state, optimizer_state, meta = load_checkpoint(resume_ckpt, load_optimizer=True)
        model.load_state_dict(model_state)
        for opt, state in zip(optimizers, optimizer_state["optimizers"]):
            opt.load_state_dict(state)
        step, loader_state = meta["step"], meta["dataloader_state_dict"]
    loader = DataLoader(resume_tok, resume_run / "data", 4, 64, buffer_docs=64, state=loader_state)
    batches, losses = {}, {}
    while step < num_steps:
        inputs, targets, loader_state = next(loader)
        for opt in optimizers:
            for group in opt.param_groups:
                group["lr"] = group["initial_lr"] * lr_multiplier(step, num_steps)
        optimizers[1].param_groups[0]["momentum"] = muon_momentum(step)
        loss = model(inputs, targets)
        loss.backward()
        for opt in optimizers:
            opt.step()
        model.zero_grad(set_to_none=True)
        step += 1
        batches[step], losses[step] = inputs, loss.item()
        if step == save_at:
            save_checkpoint(resume_ckpt, step, model.state_dict(), {"optimizers": [o.state_dict() for o in optimizers]},
                            {"model_config": vars(resume_config).copy(), "dataloader_state_dict": loader_state})
    return model, batches, losses


t0 = time.perf_counter()
model_a, batches_a, losses_a = tiny_run(save_at=5)
model_b, batches_b, losses_b = tiny_run(resume=True)
print(f"two runs in {time.perf_counter() - t0:.1f} s")

# %% [markdown]
# Run B saw steps 6 to 10 only. Step by step, its batch and its loss next to run A's, and at the end every weight:

# %%
weights_a, weights_b = model_a.state_dict(), model_b.state_dict()
resume_rows = [{"step": step, "run B's batch is run A's": torch.equal(batches_a[step], batches_b[step]),
                "loss, run A": losses_a[step], "loss, run B (resumed)": losses_b[step]} for step in sorted(batches_b)]
display(pd.DataFrame(resume_rows).set_index("step").style.format(precision=6))
weight_gap = max((weights_a[k] - weights_b[k]).abs().max().item() for k in weights_a)
print(f"after step 10, the largest difference between any weight of run A and run B: {weight_gap}")
test_eq(sorted(batches_b), [6, 7, 8, 9, 10])
assert all(torch.equal(batches_a[s], batches_b[s]) for s in batches_b)
test_eq([losses_b[s] for s in batches_b], [losses_a[s] for s in batches_b])
assert all(torch.equal(weights_a[k], weights_b[k]) for k in weights_a)


# %% [markdown]
# Bit-identical, not merely close: the same arithmetic on the same numbers in the same order gives the same bits.
# Leave out any one piece and the equality breaks: resume without the optimizer state and AdamW restarts its
# moments; without the loader state, step 6 trains on step 1's batch again (try it: pass `state=None` to the
# `DataLoader` in `tiny_run`).

# %% [markdown]
# ## A crash in the middle of a save
#
# Now the real test of the design. We train one more step and save step 2, but make the k-th file write of that save
# die halfway through its bytes (the same half-write as above), for every k. Whatever point the crash hits, the
# directory must still offer step 1, complete and loadable, and never a half file under a final name.

# %%
def crashing_atomic_write(k):
    "An atomic_write whose k-th call writes half its bytes and then raises."
    calls, real_write = [], atomic_write  # the real one, taken before the patch below replaces the name

    def write(path, write_fn):
        calls.append(Path(path).name)
        if len(calls) != k:
            return real_write(path, write_fn)

        def half(f):
            buf = io.BytesIO()
            write_fn(buf)
            f.write(buf.getvalue()[: len(buf.getvalue()) // 2])
            raise OSError(f"injected crash while writing {Path(path).name}")
        return real_write(path, half)
    return write


train_step()
state2, optim2 = model.state_dict(), {"optimizers": [optimizer.state_dict()]}
rows = []
for k, during in enumerate(["optim_000002_rank0.pt", "model_000002.pt", "meta_000002.json", "(no crash)"], 1):
    with mock.patch.dict(globals(), atomic_write=crashing_atomic_write(k)):
        try:
            save_checkpoint(ckpt_dir, 2, state2, optim2, meta, rank=0)
        except OSError as e:
            assert during in str(e), (during, e)
    names = sorted(p.name for p in ckpt_dir.iterdir() if "000002" in p.name)
    step = latest_step(ckpt_dir)
    load_checkpoint(ckpt_dir, step, load_optimizer=True)  # whatever is latest loads whole
    rows.append((during, ", ".join(names) or "-", step))
    if k < 4:
        test_eq(step, 1)
        for name in names:  # a file of step 2 under its final name is a whole one, written before the crash
            torch.load(ckpt_dir / name, weights_only=True)
display(Markdown("\n".join(["| crash during | files of step 2 on disk | latest_step |", "|---|---|---|"] +
                            [f"| {during} | {names or '(none)'} | {step} |" for during, names, step in rows])))
test_eq(rows[-1][2], 2)

# %% [markdown]
# The same save on a timeline: each bar is one file being written under its temp name, the tick its rename onto the
# final name. Until the last tick, the meta rename, the step does not exist; from that instant on it is complete.

# %%
#| fig-alt: "Timeline of one save: a bar per file from its temp write to its rename, the meta file last; before its rename a crash leaves step 1 as the latest."
events = []


def timed_write(path, write_fn, real_write=atomic_write):
    "atomic_write that records when each file starts and when it is renamed into place."
    t0 = time.perf_counter()
    real_write(path, write_fn)
    events.append((Path(path).name, t0, time.perf_counter()))


with mock.patch.dict(globals(), atomic_write=timed_write):
    save_checkpoint(tmp / "timeline", 2, state2, optim2, meta)
t_start = events[0][1]
ms = [((a - t_start) * 1e3, (b - t_start) * 1e3) for _, a, b in events]
commit = ms[-1][1]
fig, ax = plt.subplots(figsize=(7, 2.2))
for i, (a, b) in enumerate(ms):
    ax.barh(i, b - a, left=a, color="0.7")
    ax.plot(b, i, "k|", ms=16, mew=2)
ax.axvspan(0, commit, color="tab:red", alpha=0.08)
ax.axvspan(commit, commit * 1.12, color="tab:green", alpha=0.15)
top = ax.get_xaxis_transform()  # x in data, y in axes fractions: labels just above the plot
ax.text(commit / 2, 1.03, "a crash here: step 1 is the latest", transform=top, ha="center", fontsize=8)
ax.text(commit * 1.06, 1.03, "step 2", transform=top, ha="center", fontsize=8)
ax.set_yticks(range(len(ms)), [name for name, _, _ in events]), ax.invert_yaxis()
ax.set_xlim(0, commit * 1.12), ax.set_xlabel("ms since the save began")
ax.set_title("One save of step 2: three atomic writes, the meta last", pad=18)
plt.show()
test_eq([name for name, _, _ in events], ["optim_000002_rank0.pt", "model_000002.pt", "meta_000002.json"])
print("ms per file:", [round(b - a, 1) for a, b in ms])


# %% [markdown]
# Even the meta file, a few hundred bytes, takes milliseconds: on a model this small a save waits for the disk (two
# `fsync`s per file) more than it writes bytes. At d20 the two gigabytes of the model file dominate instead.

# %% [markdown]
# A crash before the meta is written leaves, at most, whole files of step 2 without their commit marker; `latest_step`
# still says 1, and a resume starts from there. No temp file remains, because the failing write cleaned up after
# itself. A process killed with SIGKILL gets no such chance: its half temp file stays, hidden and ignored. The tests
# (`tests/test_checkpoint.py`) do that for real: a child process saves step 1, starts writing a large step 2, and is
# SIGKILLed while the temp file is still growing; step 1 then loads as before.

# %% [markdown]
# ## Keeping the disk in check
#
# With `save_every` set, a long run writes many checkpoints; at d20 each one is several gigabytes (below).
# `prune_checkpoints` keeps the newest few. It removes a step's meta first, so that a crash in the middle of pruning
# leaves an uncommitted step, never a committed one with files missing. It also sweeps the temp files that killed
# saves left behind, so call it only when no save is running (rank 0, after the barrier).

# %%
#| export
def prune_checkpoints(ckpt_dir, keep=2, remove_temps=True):
    "Delete all but the newest `keep` complete checkpoints, and leftover temp files; returns the deleted steps."
    if keep < 1:
        raise ValueError(f"keep={keep} would delete every checkpoint; fix: keep=1 or more")
    ckpt_dir = Path(ckpt_dir)
    complete = sorted(_steps(ckpt_dir, _MODEL) & _steps(ckpt_dir, _META))
    old = complete[:-keep]
    for step in old:
        model_path, meta_path, _ = _paths(ckpt_dir, step)
        meta_path.unlink()  # uncommit first
        model_path.unlink()
        for shard in ckpt_dir.glob(f"optim_{step:06d}_rank*.pt"):
            shard.unlink()
    # files of uncommitted steps older than the newest complete one belong to saves that died: they never commit now
    for path in ckpt_dir.iterdir() if complete else ():
        m = re.fullmatch(r"(?:model|optim)_(\d{6,})(?:_rank\d+)?\.pt", path.name)
        if m and int(m.group(1)) < complete[-1] and int(m.group(1)) not in complete:
            path.unlink()
    for stray in ckpt_dir.glob(".*.tmp") if remove_temps else ():
        stray.unlink()
    return old


# %%
(ckpt_dir / ".model_000003.pt.999.tmp").write_bytes(b"half")
test_eq(prune_checkpoints(ckpt_dir, keep=1), [1])
print(sorted(p.name for p in ckpt_dir.iterdir()))
test_eq(latest_step(ckpt_dir), 2)


# %% [markdown]
# ## Going further: the error messages
#
# Every failure names the file and says what to do. Here they are, one per way a checkpoint goes wrong: a gallery
# to come back to when one of them appears in a real run.

# %%
def show(fn):
    "Call fn and print the error it raises."
    try:
        fn()
    except (CheckpointError, ValueError) as e:
        print(f"{type(e).__name__}: {e}\n")
    else:
        raise AssertionError("expected an error")


bad = tmp / "bad" / "checkpoints" / "base"
shutil.copytree(ckpt_dir, bad)
data = (bad / "model_000002.pt").read_bytes()
(bad / "model_000002.pt").write_bytes(data[: len(data) // 3])      # truncated, e.g. by a failed copy
show(lambda: load_checkpoint(bad))
show(lambda: load_checkpoint(bad, step=7))
show(lambda: load_checkpoint(bad, step=2, load_optimizer=True, rank=3))
show(lambda: load_checkpoint(tmp / "empty"))
show(lambda: save_checkpoint(bad, 3, state2, None, {**meta, "val_bpb": torch.tensor(3.2)}))
show(lambda: checkpoint_dir(run_dir, "chat"))
test_eq(latest_step(bad), 2)  # the refused save wrote nothing
assert not list(bad.glob("*000003*"))

# %% [markdown]
# A meta from a wider model next to these weights, and a tokenizer with another vocabulary:

# %%
wide = tmp / "wide"
save_checkpoint(checkpoint_dir(wide), 1, model.state_dict(), None, {"model_config": {**vars(config), "n_embd": 128,
                                                                                      "n_layer": 3}})
show(lambda: load_model(wide))


class OtherTokenizer:
    vocab_size = 512


show(lambda: load_model(run_dir, tokenizer=OtherTokenizer()))
test_fail(lambda: load_model(wide), contains="shape mismatch")
test_fail(lambda: load_model(run_dir, tokenizer=OtherTokenizer()), contains="vocab_size 256")


# %% [markdown]
# ## Going further: a run directory that cannot be broken
#
# Atomic files protect one save. A run directory meets worse: two commands started on it at once, a fresh run
# typed where a resume was meant, `data prepare` re-run on another corpus before a resume, a full disk, a loss that
# turns into NaN. The pieces below are shared by every training stage (pretraining, midtraining, SFT, RL), so each
# of those failures gets the same answer everywhere: one line that names the problem and the fix, and nothing lost.
# The command-line tests (`tests/test_robust_*.py`) meet each of them as a user would.
#
# **The run directory itself.** An empty `--run-dir` would write into the current folder; a path that is a file, or
# a disk that refuses writes, should fail before an hour of tokenizer training rather than after it.

# %%
#| export
class RunDirError(Exception):
    "A run directory that cannot be used as asked; the message names it, what is wrong and the fix."


def check_run_dir(run_dir):
    "`run_dir` as a Path, created if needed; one clear error if it is empty, a file, or not writable."
    if run_dir is None or not str(run_dir).strip():
        raise RunDirError("--run-dir is empty, which would write into the current folder; fix: name a folder, e.g. "
                          "--run-dir runs/demo")
    run_dir = Path(run_dir)
    if run_dir.exists() and not run_dir.is_dir():
        raise RunDirError(f"--run-dir {run_dir} is a file, not a folder; fix: choose another --run-dir")
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        probe = run_dir / f".write-test.{os.getpid()}.tmp"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        raise RunDirError(f"cannot write to --run-dir {run_dir}: {explain_os_error(e)}") from e
    return run_dir


# %%
test_fail(lambda: check_run_dir(""), contains="current folder")
(tmp / "a_file").write_text("not a folder")
test_fail(lambda: check_run_dir(tmp / "a_file"), contains="is a file")
test_fail(lambda: check_run_dir(tmp / "a_file" / "run"), contains="cannot write")
test_eq(check_run_dir(tmp / "fresh" / "run"), tmp / "fresh" / "run")


# %% [markdown]
# **One writer per stage.** A run directory holds several things, each written by one command: `tokenizer`, `data`
# and each stage's checkpoints (`base`, `mid`, ...). `RunLock` claims them with the operating system's file locks
# (`flock`): `writes` for this process alone, `reads` shared with other readers. Pretraining writes `base` and reads
# `tokenizer` and `data`, so a second pretraining, or a `data prepare` under a running pretraining, gets one line
# naming the process that holds it; downloading data while the tokenizer trains still works. The kernel drops a lock
# when its process dies, however it dies, so a `kill -9` never leaves a stale lock behind. And because whoever holds
# a thing for writing is its only writer, the temp files of a killed save found in its folder are stale by
# definition: they are removed at the start (12 MB each at the `micro` size, gigabytes at d20).

# %%
#| export
def _stage_dirs(run_dir, name):
    "The folders that hold `name`: the tokenizer, the data, or a stage's checkpoints."
    return [run_dir / name] if name in ("tokenizer", "data") else [checkpoint_dir(run_dir, name)]


def remove_stale_temps(run_dir, name, log=None):
    "Delete the temp files that killed writers left in `name`'s folders; call it only while holding `name`."
    stale = [p for d in _stage_dirs(Path(run_dir), name) if d.is_dir() for p in d.glob("*.tmp") if p.is_file()]
    size = sum(p.stat().st_size for p in stale)
    for p in stale:
        p.unlink(missing_ok=True)
    if stale and log:
        log(f"removed {len(stale)} stale temporary file(s) ({size / 1e6:.1f} MB) that a killed process left in "
            f"{stale[0].parent}")
    return stale


def _lock_holder(path):
    "Who holds the lock file at `path`, as far as it says."
    try:
        info = json.loads(path.read_text())
        return f"pid {info['pid']} on {info['host']} (`{info['command']}`, since {info['since']})"
    except (OSError, ValueError, KeyError, TypeError):
        return "another process"


# %%
#| export
class RunLock:
    "Claim parts of a run directory: `writes` for this process alone, `reads` shared; a dead holder's claim lapses."

    def __init__(self, run_dir, writes=(), reads=(), log=None):
        names = set(writes) | set(reads)
        if not names <= {"tokenizer", "data", *STAGES}:
            raise ValueError(f"unknown parts {sorted(names - {'tokenizer', 'data', *STAGES})} of a run directory")
        self.run_dir, self.writes, self.reads, self.log = Path(run_dir), tuple(writes), tuple(reads), log
        self.files = []

    def __enter__(self):
        if fcntl is None:
            return self
        (self.run_dir / ".locks").mkdir(parents=True, exist_ok=True)
        info = json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "since": time.strftime("%H:%M:%S"),
                           "command": " ".join(["nanochat-nb", *sys.argv[1:]])[:160]})
        modes = sorted([(n, fcntl.LOCK_EX) for n in self.writes] + [(n, fcntl.LOCK_SH) for n in self.reads])
        for name, mode in modes:  # a fixed order, so that two processes never wait on each other in a circle
            path = self.run_dir / ".locks" / f"{name}.lock"
            f = open(path, "a+")
            try:
                fcntl.flock(f, mode | fcntl.LOCK_NB)
            except BlockingIOError:
                f.close()
                self.__exit__()
                raise RunDirError(f"{self.run_dir}: its {name} is in use by {_lock_holder(path)}; fix: wait for that "
                                  "process to finish (or stop it), or use another --run-dir") from None
            self.files.append(f)
            f.seek(0), f.truncate(), f.write(info), f.flush()
        for name in self.writes:
            remove_stale_temps(self.run_dir, name, self.log)
        return self

    def __exit__(self, *exc):
        for f in self.files:
            f.close()  # closing the file releases its lock
        self.files = []


# %% [markdown]
# A second process, here a real one, cannot take what the first holds; once the first lets go, it can. A leftover
# temp file of a killed save is swept when `base` is claimed for writing.

# %%
lock_run = tmp / "locked_run"
claim = ("import sys; from nanochat_nb.checkpoint import RunLock, RunDirError\n"
         "try:\n    RunLock(sys.argv[1], writes=['base']).__enter__(); print('got it')\n"
         "except RunDirError as e:\n    print(e)")
(checkpoint_dir(lock_run) / ".model_000002.pt.4242.tmp").parent.mkdir(parents=True)
(checkpoint_dir(lock_run) / ".model_000002.pt.4242.tmp").write_bytes(b"x" * 1000)
with RunLock(lock_run, writes=["base"], reads=["data"], log=print):
    other = subprocess.run([sys.executable, "-c", claim, str(lock_run)], capture_output=True, text=True).stdout
    print(other)
    assert "in use by pid" in other
test_eq(list(checkpoint_dir(lock_run).glob("*.tmp")), [])
with RunLock(lock_run, writes=["base"]):  # released on leaving the block: it can be claimed again
    pass

# %% [markdown]
# **A fresh run never lands on an old one.** Starting a stage without `--resume` where that stage already has
# checkpoints or metrics would mix two runs (the old checkpoints stay, the metrics restart, and a later resume picks
# up the old run's step). So it is refused unless the user says which they mean: `--resume`, or `--overwrite`,
# which clears the stage first with `clear_checkpoints` (metas first, so a crash midway leaves nothing committed).

# %%
#| export
_STEP_FILE = r"(?:model|meta|optim)_\d{6,}(?:_rank\d+)?\.(?:pt|json)"


def check_stage_empty(ckpt_dir, metrics_path):
    "Refuse a fresh start where a stage already has checkpoints or metrics, naming the flags that decide."
    ckpt_dir, metrics_path = Path(ckpt_dir), Path(metrics_path)
    files = [p for p in ckpt_dir.iterdir() if re.fullmatch(_STEP_FILE, p.name)] if ckpt_dir.is_dir() else []
    has_metrics = metrics_path.is_file() and metrics_path.stat().st_size > 0
    if files or has_metrics:
        latest = latest_step(ckpt_dir)
        what = (f"checkpoints up to step {latest}" if latest is not None else f"{len(files)} checkpoint file(s)") \
            if files else f"metrics in {metrics_path}"
        raise RunDirError(f"{ckpt_dir.parent.parent} already holds a {ckpt_dir.name} run ({what}); fix: --resume to "
                          "continue it, --overwrite to delete it and start over, or another --run-dir")


def clear_checkpoints(ckpt_dir):
    "Delete every checkpoint file of a stage, metas first; returns how many files went."
    files = [p for p in Path(ckpt_dir).iterdir() if re.fullmatch(_STEP_FILE, p.name)] if Path(ckpt_dir).is_dir() else []
    for p in sorted(files, key=lambda p: not p.name.startswith("meta_")):
        p.unlink()
    return len(files)


# %%
test_fail(lambda: check_stage_empty(ckpt_dir, tmp / "no_metrics.jsonl"), contains="--overwrite")
check_stage_empty(tmp / "run" / "checkpoints" / "mid", tmp / "no_metrics.jsonl")  # nothing there: fine


# %% [markdown]
# **The inputs a checkpoint was trained on.** Its meta records `fingerprints`: short hashes of the tokenizer
# (`Tokenizer.fingerprint`) and of the data shards (`shards_fingerprint`). A resume compares them with what the run
# directory holds now and stops if they differ, unless the user allows that input to change. Checkpoints from before
# fingerprints existed are resumed unchecked, with a note.

# %%
#| export
def check_fingerprints(meta_path, saved, current, allow=()):
    "Stop a resume whose inputs differ from those in the checkpoint's meta, unless allowed; returns unchecked names."
    saved = saved if isinstance(saved, dict) else {}
    changed = [k for k, v in current.items() if k in saved and saved[k] != v and k not in allow]
    if changed:
        what = ", ".join(f"{k} {saved[k]} (it is {current[k]} now)" for k in changed)
        flags = " ".join(f"--allow-{k}-change" for k in changed)
        raise RunDirError(f"{meta_path} was trained on another {what}; resuming would carry on with different "
                          f"inputs; fix: restore what it was trained on, or pass {flags} to continue on the new ones")
    return [k for k in current if k not in saved]


# %%
test_fail(lambda: check_fingerprints("meta_000010.json", {"data": "ab12"}, {"data": "cd34"}), contains="--allow-data")
test_eq(check_fingerprints("m", {"data": "ab12"}, {"data": "cd34"}, allow=["data"]), [])
test_eq(check_fingerprints("m", None, {"tokenizer": "x"}), ["tokenizer"])


# %% [markdown]
# **Never save a NaN.** A learning rate too high, or a bad batch, can turn the loss into NaN; from then on every
# weight is NaN too, and a NaN checkpoint overwrites a good one if the run carries on to its next save.
# `check_finite` stops training with a clear line as soon as the loss, the gradient norm or (before a save) any
# weight is not finite.

# %%
#| export
class NonFiniteError(ValueError):
    "Training produced NaN or infinity; the message says at which step and which checkpoint is intact."


def check_finite(step, ckpt_dir=None, **values):
    "Raise NonFiniteError if a value (a number, or a module whose weights are checked) is NaN or infinite."
    for name, value in values.items():
        if isinstance(value, torch.nn.Module):
            ok = bool(torch.stack([torch.isfinite(p).all() for p in value.parameters()]).all())
        else:
            ok = value is None or math.isfinite(value)
        if not ok:
            latest = latest_step(ckpt_dir) if ckpt_dir is not None else None
            kept = f"the latest checkpoint is step {latest}" if latest is not None else "no checkpoint exists"
            shown = "not finite" if isinstance(value, torch.nn.Module) else value
            raise NonFiniteError(f"step {step}: the {name.replace('_', ' ')} is {shown}; training stopped before "
                                 f"saving it ({kept}); fix: lower the learning rates or keep --grad-clip on, then "
                                 "--resume")


# %%
check_finite(3, loss=2.5, grad_norm=0.7, weights=model)
test_fail(lambda: check_finite(3, ckpt_dir, loss=float("nan")), contains="the latest checkpoint is step 2")


# %% [markdown]
# **A checkpoint that loads but is malformed** (a meta without its `loop_state`, an optimizer file without
# `optimizers`) must not end in a `KeyError`. `checkpoint_part` fetches a part and names the file when it is missing
# or of the wrong kind.

# %%
#| export
def checkpoint_part(state, key, path, kind=dict):
    "`state[key]`, checked to be a `kind`; a malformed checkpoint gets a CheckpointError naming the file and key."
    value = state.get(key) if isinstance(state, dict) else None
    if not isinstance(value, kind):
        raise CheckpointError(f"{path} has no valid {key!r} (found {type(value).__name__}, expected "
                              f"{kind.__name__}): the checkpoint is malformed or from another program; fix: resume "
                              "from another step (delete this step's meta file), or start over with --overwrite")
    return value


# %%
test_eq(checkpoint_part({"loop_state": {"a": 1}}, "loop_state", "meta.json"), {"a": 1})
test_fail(lambda: checkpoint_part({}, "optimizers", "optim_000002_rank0.pt", list), contains="optim_000002_rank0.pt")

# %% [markdown]
# ## At scale
#
# On the 8×H100 box nothing in the code changes, but sizes do. The model file is the state of the uncompiled model:
# on CUDA, nanochat keeps `wte` in bf16 (2 bytes a weight) and every other weight in fp32 (4 bytes). The optimizer
# state is the Muon momentum (one fp32 buffer per block matrix) and AdamW's two moments for `wte` and `lm_head`, each
# in its parameter's dtype; both optimizers shard it over the 8 ranks, so each `optim_*_rank{r}.pt` holds about an
# eighth. The tiny model above checks the byte count: its file is its weights plus a small zip overhead.

# %%
#| fig-alt: "Model file, per-rank optimizer shard and whole checkpoint size in GB against depth, with d20 marked."
n_bytes = sum(v.numel() * v.element_size() for v in model.state_dict().values())
file_bytes = (ckpt_dir / "model_000002.pt").stat().st_size
print(f"tiny model: weights {n_bytes:,} bytes, file {file_bytes:,} bytes")
assert n_bytes <= file_bytes < n_bytes * 1.1 + 20_000


def checkpoint_gb(depth, vocab_size=65_536, world_size=8):
    "Computed (model file, one rank's optimizer shard) sizes in GB of nanochat's classic GPT at `depth`."
    n_embd = 64 * depth
    blocks, emb = 12 * depth * n_embd**2, vocab_size * n_embd
    model_b = emb * 2 + emb * 4 + blocks * 4                 # wte bf16, lm_head and blocks fp32
    optim_b = blocks * 4 + 2 * emb * 2 + 2 * emb * 4         # Muon momentum; Adam moments of wte and lm_head
    return model_b / 1e9, optim_b / world_size / 1e9


depths = [4, 8, 12, 16, 20, 26, 32]
sizes = [checkpoint_gb(d) for d in depths]
fig, ax = plt.subplots(figsize=(6, 3.2))
ax.plot(depths, [m for m, _ in sizes], "o-", label="model_*.pt (one per step)")
ax.plot(depths, [o for _, o in sizes], "s-", label="optim_*_rank{r}.pt (each of 8)")
ax.plot(depths, [m + 8 * o for m, o in sizes], "^--", label="whole checkpoint")
ax.set_xlabel("depth (n_layer)"), ax.set_ylabel("GB (computed)"), ax.set_title("Checkpoint size, vocab 65,536")
ax.axvline(20, color="grey", lw=0.8, ls=":")
ax.legend()
plt.show()
m20, o20 = checkpoint_gb(20)
print(f"d20: model {m20:.2f} GB, optimizer {o20:.2f} GB per rank, {m20 + 8 * o20:.2f} GB per checkpoint")
test_eq((f"{m20:.1f} GB", f"{o20:.2f} GB"), (AT_SCALE["model file"][0], AT_SCALE["optimizer state per GPU"][0]))

# %% [markdown]
# So a d20 checkpoint is about 4.7 GB (computed), and the model file alone is about 2.1 GB. What that means in
# practice:
#
# - **Save rarely.** nanochat saves base training only at the end (`save_every = -1`); a save every 1,000 of its
#   21,400 steps would keep about 100 GB on disk unless pruned (`--keep-checkpoints 2`, the default, keeps about
#   9.4 GB). The fsync makes each save wait for the disk, which is
#   the point: a save that returned while the bytes sat in the page cache would be lost with the node.
# - **Shared disk for many nodes.** The barrier only orders the writes when all ranks write to one file system. On
#   several nodes with local disks, each node would hold only its own ranks' shards; resume needs them all in one
#   place.
# - **Resume needs the same world size.** The shards are cut for 8 ranks; loading `rank 3` of a 4-rank save fails with
#   the message above instead of mixing states. Re-sharding is an exercise.
# - **bf16 on CPU.** A checkpoint saved on a GPU (bf16 `wte`) loads on a laptop in fp32, as `load_checkpoint` casts it.
# - **Locks.** Only global rank 0 takes `RunLock`, so eight ranks of one job do not lock each other out. `flock` works
#   on local disks and on NFS v4 (Linux turns it into a byte-range lock there); on older network file systems a lock
#   may not be seen by other machines, so run one job per run directory by hand.

# %%
#| hide
shutil.rmtree(tmp)
torch.set_num_threads(_saved_threads)

# %% [markdown]
# ## Summary
#
# - A checkpoint is several files; each one is written atomically (temp file beside it, `fsync`, `os.replace`,
#   `fsync` of the directory), and the meta file is written last as the commit marker.
# - `latest_step` trusts only steps with both model and meta; temp files and uncommitted steps are ignored.
# - `load_checkpoint` and `load_model` fail with the file and the fix named: missing, truncated, mismatched weights,
#   the wrong tokenizer.
# - A crash at any point of a save leaves the previous step loadable; `prune_checkpoints` keeps the disk in check.
# - A full or read-only disk is named as such (`explain_os_error`), not as torch's `RuntimeError`.
# - Shared by every training stage: `check_run_dir`, `RunLock` (one writer per stage, stale temp files swept),
#   `check_stage_empty` and `clear_checkpoints` (no mixed runs), `check_fingerprints` (the same tokenizer and data on
#   resume), `check_finite` (no NaN saved) and `checkpoint_part` (malformed files named).
#
# ## Exercises
#
# 1. On Linux, run one `save_checkpoint` under `strace -f -e trace=openat,write,fsync,rename` and find the order of the
#    system calls. Which `fsync` could you drop if you only cared about process crashes and not power cuts?
# 2. Change `prune_checkpoints` so that it also keeps the step with the lowest `val_bpb` in its meta.
# 3. Write `reshard(ckpt_dir, step, new_world_size)` that rewrites the optimizer files of a save for another number
#    of ranks. `DistAdamW` cuts its state along dim 0 (concatenate the slices, cut again); `DistMuon` keeps whole
#    matrices, owned block-cyclically (chapter 03 draws both). Try it on the two-rank save that
#    `tests/test_checkpoint.py` makes, resharded to one rank.
