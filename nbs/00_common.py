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
# # Common helpers
# > The few helpers every chapter uses: the device, rank-0 printing, atomic files, and one table of at-scale numbers.

# %%
#| default_exp common

# %% [markdown]
# This chapter is short and safe to skip: it holds the plumbing that every later chapter needs and that none of them
# is about. Keeping it in one place, at the bottom of the book's dependency order, means the book agrees with itself:
# there is one way to pick a device, one way to write a file that a crash cannot leave half-written, and one table of
# nanochat's at-scale numbers that every "At scale" section quotes. nanochat keeps the same kind of helpers in its
# `common.py`.
#
# *Pipeline:* nothing comes before this module; every chapter from the tokenizer (01) on imports from it.

# %%
#| export
import os
from pathlib import Path

import torch

# %%
#| hide
import tempfile

from fastcore.test import test_eq, test_fail
from IPython.display import Markdown, display


# %% [markdown]
# ## The device
#
# nanochat picks CUDA, then Apple's MPS, then the CPU. The rest of the book passes `device` through this one function,
# so a machine with a GPU uses it without being told, and a reader can always force `"cpu"`.

# %%
#| export
def get_device(device=None):
    "`device` as a `torch.device`; when None, the best available: cuda, then mps, then cpu."
    if device is not None:
        return torch.device(device)
    if torch.cuda.is_available():
        return torch.device("cuda")
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


# %%
test_eq(get_device("cpu"), torch.device("cpu"))
print("this machine:", get_device())


# %% [markdown]
# ## Printing from one process
#
# Under `torchrun` eight processes run the same script; a `print` in it prints eight times. `print0` prints only on
# global rank 0 (the `RANK` variable torchrun sets; a plain `python` run has none and counts as rank 0).

# %%
#| export
def print0(*args, **kwargs):
    "`print` on global rank 0 only (torchrun's `RANK`; a single process is rank 0)."
    if int(os.environ.get("RANK", 0)) == 0:
        print(*args, **kwargs)


# %%
print0("printed once, by rank 0")


# %% [markdown]
# ## Atomic files
#
# Every file the pipeline writes (the tokenizer, the data shards, checkpoints, logs of evaluation data) goes through
# one helper. It writes into a temp file beside the target, `fsync`s it so the bytes are on disk, renames it onto the
# final name in one step (`os.replace` is atomic), and `fsync`s the directory so the rename survives a power cut. A
# crash at any point leaves either the old file or the new one, never half of one. Chapter 05 (checkpoints) shows
# the failure this prevents, step by step.

# %%
#| export
def _fsync_dir(path):
    "Flush a directory entry (a rename) to disk; skipped where directories cannot be opened (Windows)."
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass  # some file systems refuse fsync on a directory; the rename is still atomic there
    finally:
        os.close(fd)


# %% [markdown]
# When the disk fills up in the middle of a `torch.save`, PyTorch reports a bare `RuntimeError: [enforce fail at
# inline_container.cc:672]` that never says the disk is full. So the file handed to `write_fn` is wrapped in a small
# recorder that keeps the operating system's own error, and that error is what `atomic_write` raises, with the final
# file name attached.

# %%
#| export
class _RecordingFile:
    "A file wrapper that keeps the OSError of a failed write (torch.save hides a full disk behind a RuntimeError)."

    def __init__(self, f):
        self.f, self.error = f, None

    def write(self, data):
        try:
            return self.f.write(data)
        except OSError as e:
            self.error = e
            raise

    def __getattr__(self, name):
        return getattr(self.f, name)


# %%
#| export
def atomic_write(path, write_fn):
    "Write `path` by `write_fn(file)` into a temp file beside it, fsync it, then rename it onto `path`."
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as f:
            out = _RecordingFile(f)
            try:
                write_fn(out)
            except Exception as e:
                if out.error is None or out.error is e:
                    raise
                raise out.error from e  # the disk's own error (ENOSPC, EFBIG, ...), not torch's wrapper of it
            f.flush()
            os.fsync(f.fileno())  # the bytes are on disk before any name points at them
        os.replace(tmp, path)  # atomic: readers see the old file or the new one
    except BaseException as e:
        tmp.unlink(missing_ok=True)
        if isinstance(e, OSError) and e.errno is not None and e.filename in (None, str(tmp)):
            raise OSError(e.errno, e.strerror, str(path)) from e  # name the file the caller asked for
        raise
    _fsync_dir(path.parent)


# %% [markdown]
# A write that fails halfway leaves the old file whole and no temp file behind:

# %%
d = Path(tempfile.mkdtemp())
atomic_write(d / "a.txt", lambda f: f.write(b"old"))

def fail_halfway(f):
    f.write(b"ne")
    raise RuntimeError("killed mid-write")

test_fail(lambda: atomic_write(d / "a.txt", fail_halfway), contains="killed mid-write")
test_eq((d / "a.txt").read_bytes(), b"old")
test_eq(sorted(p.name for p in d.iterdir()), ["a.txt"])

# %% [markdown]
# ## The numbers at scale
#
# Every "At scale" section compares with nanochat's d20 speedrun on 8×H100. These are the numbers they quote, in one
# place, each with where it comes from: nanochat's README and code, or a count computed from the model's shapes
# (chapters 02, 03 and 05 show the arithmetic). Numbers that only appear in third-party run reports are left out.

# %%
#| export
AT_SCALE = {
    "parameters": ("560,988,160", "12·L·d² + 2·V·d at L=20, d=1280, V=65,536 (computed, ch. 02)"),
    "training tokens": ("11.2B (20 × parameters)", "nanochat's Chinchilla ratio (code)"),
    "steps × batch": ("21,400 × 524,288 tokens", "nanochat's base_train defaults (code)"),
    "training FLOPs": ("≈3.9e19", "FLOPs per token (3.49e9) × tokens (computed)"),
    "base training time": ("about 3 h", "nanochat's README"),
    "whole speedrun": ("3 h 51 min wall clock (without RL)", "nanochat's README example report"),
    "cost": ("about $92–96 at $24/h", "the wall clock × nanochat's quoted 8×H100 price"),
    "model file": ("2.1 GB", "bf16 wte + fp32 lm_head and blocks (computed, ch. 05)"),
    "optimizer state per GPU": ("0.32 GB", "Muon momentum + AdamW moments, sharded over 8 (computed, ch. 03/05)"),
    "logits of one micro-batch": ("17.2 GB in fp32", "32 × 2,048 × 65,536 × 4 bytes (computed, ch. 02)"),
}


# %%
#| export
def at_scale_table(keys=None):
    "The d20 reference numbers of `AT_SCALE` (all, or `keys`) as a Markdown table."
    rows = [f"| {k} | {AT_SCALE[k][0]} | {AT_SCALE[k][1]} |" for k in (keys or AT_SCALE)]
    return "\n".join(["| d20 on 8×H100 | value | source |", "|---|---|---|", *rows])


# %%
display(Markdown(at_scale_table()))
test_eq(f"{12 * 20 * 1280**2 + 2 * 65_536 * 1280:,}", AT_SCALE["parameters"][0])

# %% [markdown]
# ## Summary
#
# `get_device`, `print0`, `atomic_write` and `AT_SCALE` are all the shared plumbing there is. Chapters re-export what
# they used to define (`nanochat_nb.model.get_device`, `nanochat_nb.checkpoint.atomic_write`), so either import works.
#
# **Exercises.** (1) Make `fail_halfway` write 100 MB before it raises and check that the directory still holds one
# file. (2) Run `RANK=1 python -c "from nanochat_nb.common import print0; print0('hi')"`: what prints, and why?
