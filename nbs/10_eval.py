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
# # Evaluation
# > Put numbers on a model: bits per byte, CORE for base models, the chat benchmarks and ChatCORE, each computed
# > exactly as nanochat computes it.

# %% [markdown]
# A loss curve tells us that training works; it does not tell us whether the model is any good, or whether this
# run beats the last one. nanochat answers with three kinds of numbers, and this chapter builds all three:
#
# - **bits per byte** on held-out text: how well the model predicts the next token, in a unit that does not depend
#   on the tokenizer;
# - **CORE**, for base models: 22 benchmarks from the DCLM paper, scored by comparing losses of candidate answers, no
#   sampling involved, summed up as one number between 0 (chance) and 1;
# - the **chat evaluations**, for the models that chat: multiple-choice questions answered with one letter, math word
#   problems, code that has to pass its tests, and their summary, ChatCORE.
#
# Every number goes into `metrics/eval.jsonl`, one line per result, and to the screen as a table; the report card
# (chapter 14) reads that file. Each piece is built twice where it matters: once the plain way, as nanochat writes
# it, and once batched, checked equal. Evaluation must not dominate a CPU run.
#
# *Pipeline:* the engine and its model loader (07), the tasks (09) and the sandbox that runs model-written code (09)
# come before; midtraining (11), SFT (12) and RL (13) call these evaluations, and the report card (14) prints them.

# %%
#| default_exp eval

# %%
#| export
import csv, hashlib, json, math, os, random, re, shutil, tempfile, time, urllib.error, urllib.request, zipfile
from contextlib import nullcontext
from dataclasses import dataclass
from http.client import HTTPException
from itertools import chain, islice
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
import yaml

from nanochat_nb.checkpoint import atomic_write
from nanochat_nb.data import DataLoader
from nanochat_nb.engine import Engine, load_for_inference
from nanochat_nb.optim import cleanup_distributed, init_distributed
from nanochat_nb.pretrain import evaluate_bpb
from nanochat_nb.tasks import ANSWER_RE, FinalAnswerTask, HumanEval, load_task

# %%
#| hide
import http.server, subprocess, sys, threading

import matplotlib.pyplot as plt
import pyarrow as pa
import pyarrow.parquet as pq
from fastcore.test import test_close, test_eq, test_fail

from nanochat_nb.engine import demo_run

# %% [markdown]
# ## A model to evaluate
#
# Point `run_dir` at a run that `make speedrun` finished (for example `"../runs/speedrun"`) to evaluate its
# checkpoint. Left at `None`, the chapter trains chapter 07's tiny model (`demo_run`) in a temporary folder: two
# layers that have read a little of the standard library. Its scores will be near chance on anything but Python, which is
# what we want here: this chapter is about measuring, and a number near chance is a fine thing to measure.

# %%
run_dir = None  # a run with a base checkpoint and its data (its metrics/eval.jsonl gets our results); None: train one

# %%
run_dir = Path(run_dir) if run_dir is not None else demo_run()  # chapter 07's tiny model, trained in seconds
model, tokenizer, meta = load_for_inference(run_dir, "base", device="cpu")
print(f"{model.num_params():,} parameters, stage {meta['stage']}, step {meta['step']}")


# %% [markdown]
# ## One process or many
#
# Every evaluation here works the way nanochat's do under `torchrun`: each process takes every `world`-th example
# (rank 0 takes examples 0, W, 2W, ..., rank 1 takes 1, W+1, ...), scores its share, and the counts are summed over
# the processes with an all-reduce. In one process the stride is 1 and the sum is a no-op, so the same code runs
# both ways, and a test (in `tests/test_eval.py`) checks that two processes give exactly the numbers of one.

# %%
#| export
def rank_world():
    "(rank, world size) of this process: (0, 1) unless torch.distributed is initialised."
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def all_sum(values):
    "Sum a list of numbers element-wise over every process (in float64); in one process, the list itself."
    if rank_world()[1] == 1:
        return [float(v) for v in values]
    device = "cuda" if dist.get_backend() == "nccl" else "cpu"  # nccl reduces only GPU tensors
    t = torch.tensor([float(v) for v in values], dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.tolist()


# %% [markdown]
# ## Where results go
#
# A result is one line of JSON in `run_dir/metrics/eval.jsonl`:
# `{"stage", "task", "metric", "value", "n", "step"}`, where `metric` is `accuracy`, `centered`, `pass@k` (with a
# number for k, such as `pass@1`), `bpb`, `core` or `chatcore`, `n` is how many examples (or tokens, for bpb) the
# value rests on and `step` is the checkpoint's step. The file only ever grows: an evaluation of a later checkpoint
# adds lines, it never rewrites old ones.
#
# The file is appended to, not replaced, so `atomic_write` (write a copy, rename it) is the wrong tool: two
# evaluations finishing at once would each rename their copy over the other's and one result would be lost. Instead
# each batch of lines goes to the end of the file in **one** `write` on a descriptor opened with `O_APPEND`, which
# the kernel positions and writes as one piece, so concurrent writers never interleave or overwrite each other's
# lines. If an earlier writer died halfway through a line (a crash, a full disk), we start on a new line, so its
# torn fragment spoils no good record, and the reader skips it.

# %%
#| export
METRICS = ("accuracy", "centered", "bpb", "core", "chatcore")


def eval_record(stage, task, metric, value, n, step):
    "One result as the dict written to eval.jsonl; `metric` is one of METRICS or pass@k (k a number)."
    if metric not in METRICS and not re.fullmatch(r"pass@[1-9]\d*", metric):
        raise ValueError(f"unknown metric {metric!r}; use one of {', '.join(METRICS)} or pass@k")
    return {"stage": stage, "task": task, "metric": metric, "value": float(value), "n": int(n), "step": step}


def append_records(path, records):
    "Append records to a JSON-lines file in one O_APPEND write, so that concurrent writers never mix their lines."
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    data = "".join(json.dumps(r) + "\n" for r in records).encode()
    fd = os.open(path, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        size = os.fstat(fd).st_size
        if size and os.pread(fd, 1, size - 1) != b"\n":
            data = b"\n" + data  # a writer died mid-line: leave its fragment on a line of its own
        if os.write(fd, data) != len(data):
            raise OSError(28, "short write (is the disk full?)", str(path))
        os.fsync(fd)
    finally:
        os.close(fd)


def read_records(path):
    "The records of a JSON-lines file; lines that are not complete JSON objects (torn writes) are skipped."
    out = []
    for line in Path(path).read_text(encoding="utf-8", errors="replace").splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if isinstance(record, dict):
            out.append(record)
    return out


# %% [markdown]
# And a table for the screen, one row per record:

# %%
#| export
def format_table(records):
    "Records as an aligned text table: stage, task, metric, value (4 decimals), n, step."
    head = ("stage", "task", "metric", "value", "n", "step")
    rows = [(str(r["stage"]), str(r["task"]), r["metric"], f"{r['value']:.4f}", str(r["n"]), str(r["step"]))
            for r in records]
    widths = [max(len(x) for x in col) for col in zip(head, *rows)]
    line = lambda cells: "  ".join(c.rjust(w) if i >= 3 else c.ljust(w) for i, (c, w) in enumerate(zip(cells, widths)))
    return "\n".join([line(head), line(["-" * w for w in widths]), *map(line, rows)])


# %%
demo_file = Path(tempfile.mkdtemp()) / "metrics" / "eval.jsonl"
append_records(demo_file, [eval_record("base", "demo", "accuracy", 0.5, 10, 60)])
with open(demo_file, "a") as f:
    f.write('{"stage": "base", "task": "torn", "met')  # a writer that died halfway through its line
append_records(demo_file, [eval_record("base", "demo", "pass@8", 0.75, 10, 60)])
print(demo_file.read_text())
print(format_table(read_records(demo_file)))
test_eq([r["metric"] for r in read_records(demo_file)], ["accuracy", "pass@8"])
test_fail(lambda: eval_record("base", "demo", "accurazy", 0.5, 1, 0), contains="unknown metric")


# %% [markdown]
# ## Bits per byte
#
# The validation loss in nats per token depends on the tokenizer: a vocabulary with longer tokens has fewer, harder
# predictions to make. Dividing the total loss by the number of *bytes* those tokens stand for, and converting nats to
# bits, gives a number that compares models with different tokenizers: bits per byte. Chapter 06 wrote
# `evaluate_bpb` for the training loop; here we only feed it the same validation batches the loop fed it, read from
# the run's last shard with the settings stored in the checkpoint (rows per batch, packing, how many tokens, how
# many data ranks), so that the number equals the `val_bpb` that training recorded at that step.

# %%
#| export
def val_bpb(model, tokenizer, run_dir, meta=None, eval_tokens=None, device_batch_size=None):
    "Bits per byte on run_dir's validation shard, read as pretraining read it; returns (bpb, tokens evaluated)."
    user = (meta or {}).get("user_config") or {}
    rank, world = rank_world()
    B, T = device_batch_size or user.get("device_batch_size", 8), model.config.sequence_len
    eval_tokens = eval_tokens or user.get("eval_tokens", 20 * 524288)
    data_world = (meta or {}).get("data_world_size") or world
    if data_world % world:  # another number of processes than in training: each reads for itself
        data_world = world
    steps = max(1, eval_tokens // (B * T * data_world))  # per data rank, as in pretraining
    device = model.lm_head.weight.device
    loaders = [islice(DataLoader(tokenizer, Path(run_dir) / "data", B, T, split="val", rank=r, world_size=data_world,
                                 device=device, packing=user.get("packing", "bestfit")), steps)
               for r in range(rank, data_world, world)]
    autocast = (lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if device.type == "cuda" else nullcontext
    bpb = evaluate_bpb(model, chain(*loaders), steps * len(loaders), tokenizer.token_bytes.to(device), autocast)
    return bpb, steps * data_world * B * T


# %%
bpb, n_tokens = val_bpb(model, tokenizer, run_dir, meta)
print(f"val bpb {bpb:.4f} over {n_tokens:,} tokens; training recorded {meta['val_bpb']:.4f} at step {meta['step']}")
test_close(bpb, meta["val_bpb"], eps=1e-5)

# %% [markdown]
# ## CORE
#
# CORE comes from the DCLM paper: 22 existing benchmarks (HellaSwag, ARC, PIQA, Winograd, LAMBADA, SQuAD, ...) put in
# one of three shapes, so that one small scorer handles all of them, and none needs the model to *generate*: every
# answer is judged by the losses the model assigns to candidate texts.
#
# - **multiple choice** (`query`, `choices`, `gold`): the same question with each choice appended; the model is
#   right if the gold choice has the lowest mean loss over its own tokens;
# - **schema** (`context_options`, `continuation`, `gold`): several contexts, one shared continuation (Winograd:
#   "The trophy doesn't fit in the suitcase because *the trophy* / *the suitcase* ... is too big"); right if the gold
#   context makes the continuation least surprising;
# - **language modelling** (`context`, `continuation`): right only if greedy decoding would produce the continuation
#   exactly, every token the argmax.
#
# A task's accuracy is then *centered* against its random baseline, $(\text{acc} - b)/(1 - b)$, so that guessing
# scores 0 on a 4-way task as on a 2-way one, and CORE is the mean of the 22 centered accuracies. GPT-2 (1.5B) scores
# 0.2565; nanochat's d20 about 0.22.
#
# ### The bundle
#
# nanochat downloads the data once, as `eval_bundle.zip` (about 162 MB), holding one folder `eval_bundle/` with:
#
# - `core.yaml`: a list `icl_tasks` with each task's `label`, `dataset_uri` (a path under `eval_data/`),
#   `num_fewshot` (a list; the first entry is used), `icl_task_type` and, optionally, `continuation_delimiter`
#   (default one space);
# - `eval_data/<category>/<task>.jsonl`: the items, one JSON object per line;
# - `eval_meta_data.csv`: one row per task, of which we read two columns, `Eval Task` and `Random baseline` (in
#   percent).
#
# We cannot download the real bundle here, so we write a small one in exactly that layout: a few items of each type,
# Python-flavoured so that our little model has a chance. `write_core_bundle` is also how you would package
# benchmarks of your own for CORE's scorer.

# %%
#| export
CORE_TYPES = ("multiple_choice", "schema", "language_modeling")


class BundleError(ValueError):
    "An eval bundle that cannot be downloaded, unpacked or read; the message names the file and the fix."


def write_core_bundle(root, tasks):
    "Write `tasks` (dicts: label, type, items, shots, delimiter, baseline, category) as root/eval_bundle; its path."
    bundle = Path(root) / "eval_bundle"
    entries, meta_rows = [], []
    for t in tasks:
        uri = f"{t.get('category', 'custom')}/{t['label']}.jsonl"
        entry = {"label": t["label"], "dataset_uri": uri, "num_fewshot": [t.get("shots", 0)],
                 "icl_task_type": t["type"]}
        if "delimiter" in t:
            entry["continuation_delimiter"] = t["delimiter"]
        entries.append(entry)
        meta_rows.append([t["label"], t.get("category", "custom"), t.get("shots", 0), len(t["items"]),
                          t.get("baseline", 0)])
        (bundle / "eval_data" / uri).parent.mkdir(parents=True, exist_ok=True)
        lines = "".join(json.dumps(item) + "\n" for item in t["items"])
        atomic_write(bundle / "eval_data" / uri, lambda f: f.write(lines.encode()))
    atomic_write(bundle / "core.yaml", lambda f: f.write(yaml.safe_dump({"icl_tasks": entries},
                                                                        sort_keys=False).encode()))
    table = [["Eval Task", "Task Category", "#shots", "#datapoints", "Random baseline"], *meta_rows]
    atomic_write(bundle / "eval_meta_data.csv", lambda f: f.write("".join(
        ",".join(map(str, row)) + "\n" for row in table).encode()))
    return bundle


def zip_core_bundle(bundle, zip_path):
    "Zip a bundle folder as `eval_bundle/...`, the layout of nanochat's eval_bundle.zip; returns the zip's path."
    bundle, zip_path = Path(bundle), Path(zip_path)
    zip_path.parent.mkdir(parents=True, exist_ok=True)
    def write(f):
        with zipfile.ZipFile(f, "w", zipfile.ZIP_DEFLATED) as z:
            for p in sorted(bundle.rglob("*")):
                z.write(p, "eval_bundle/" + p.relative_to(bundle).as_posix())
    atomic_write(zip_path, write)
    return zip_path


# %% [markdown]
# The items of our small bundle. Each type appears once with a plain space between context and answer and, for
# multiple choice, once with ARC's `"\nAnswer: "` delimiter and two shots, so that the prompts below show how
# few-shot examples are laid out.

# %%
#| export
def demo_core_tasks():
    "A few Python-flavoured items of each CORE type (tests, the chapter and the benchmark build bundles from them)."
    mc = [("for i in", ["range(10):", "the morning light", "]]] + +", "purple elephants"], 0),
          ("import", ["yesterday we sailed", "os", "+= ==", "green tea"], 1),
          ("def __init__(self,", ["**", "bananas and", "*args, **kwargs):", "the the the"], 2),
          ("return", ["sky of", "self.value", ":= ;;", "moon"], 1),
          ("class Foo(", ["object):", "cheese", "}}}", "the cat sat"], 0),
          ("if __name__ ==", ["tomorrow", "'__main__':", "@@@@", "four"], 1)]
    qa = [("Question: Which keyword defines a function?", ["def", "car", "blue"], 0),
          ("Question: Which value is false?", ["sky", "None", "tree"], 1),
          ("Question: Which word starts a loop?", ["apple", "wall", "while"], 2),
          ("Question: Which keyword imports a module?", ["import", "river", "song"], 0),
          ("Question: Which word raises an error?", ["cloud", "raise", "shoe"], 1)]
    schema = [(["if x is", "if x was"], "None:", 0), (["for key in d.", "for key in the."], "items():", 0),
              (["self.assertEqual(a,", "self.assertEqual a a"], "b)", 0), (["the river", "except"], "Exception:", 1),
              (["with open(path) as", "with open(path) was"], "f:", 0), (["print(", "p r i n t"], "x)", 0)]
    lm = [("import", "os"), ("def __init__(self):", "pass"), ("if __name__ ==", "'__main__':"),
          ("return", "None"), ("from typing import", "Any"), ("raise", "ValueError")]
    return [
        dict(label="python_mc", type="multiple_choice", category="language_understanding", baseline=25,
             items=[{"query": q, "choices": c, "gold": g} for q, c, g in mc]),
        dict(label="python_qa", type="multiple_choice", category="symbolic_problem_solving", baseline=33.33,
             shots=2, delimiter="\nAnswer: ", items=[{"query": q, "choices": c, "gold": g} for q, c, g in qa]),
        dict(label="python_schema", type="schema", category="commonsense_reasoning", baseline=50,
             items=[{"context_options": o, "continuation": c, "gold": g} for o, c, g in schema]),
        dict(label="python_lm", type="language_modeling", category="language_understanding", baseline=0, shots=2,
             items=[{"context": c + " ", "continuation": a} for c, a in lm]),
    ]


# %%
bundle_src = write_core_bundle(Path(tempfile.mkdtemp()), demo_core_tasks())
print((bundle_src / "core.yaml").read_text())
print((bundle_src / "eval_meta_data.csv").read_text())
print(sorted(p.relative_to(bundle_src).as_posix() for p in bundle_src.rglob("*.jsonl")))
print((bundle_src / "eval_data/commonsense_reasoning/python_schema.jsonl").read_text().splitlines()[0])

# %% [markdown]
# ### Downloading it once, safely
#
# The bundle comes over the network into the run's cache (`run_dir/cache/eval_bundle`), and three things can go
# wrong on the way: the download stops early, the file is not the one we expect, or the process dies while
# unpacking. Each must leave either a complete bundle or nothing, never half of one that a later run would trust.
#
# - The download streams into a temporary file beside its destination (`atomic_write`), counting bytes and hashing
#   them as they come. Fewer bytes than the server announced is an error; so is a SHA-256 that differs from the one
#   we were given. On any error the temporary file is deleted.
# - The zip is checked (every member's CRC) and unpacked into a temporary folder *inside* the cache, the layout is
#   checked by reading the tasks, and only then is the folder renamed to `eval_bundle`: one rename, which is atomic.
#   If two processes race, the second finds the first's bundle in place and keeps it.
#
# nanochat does not publish the SHA-256 of its `eval_bundle.zip`, and we could not fetch it to pin it, so by default
# the download is checked for length and integrity only; pass `sha256` (`--bundle-sha256`) to pin it. The digest of
# what was downloaded is printed, so a first run can tell you what to pin.

# %%
#| export
EVAL_BUNDLE_URL = "https://karpathy-public.s3.us-west-2.amazonaws.com/eval_bundle.zip"


def download(url, dest, sha256=None, timeout=60):
    "Fetch `url` to `dest` through a temp file; a short read or a SHA-256 mismatch is an error and leaves no file."
    digest, fix = hashlib.sha256(), "fix: check the URL and the network, or fetch the zip by hand and pass its path " \
        "as --bundle-url file:///path/to/eval_bundle.zip"
    def write(f):
        with urllib.request.urlopen(url, timeout=timeout) as r:
            expected, got = r.headers.get("Content-Length"), 0
            while block := r.read(1 << 20):
                f.write(block), digest.update(block)
                got += len(block)
        if expected is not None and got != int(expected):
            raise BundleError(f"download of {url} stopped after {got:,} of {int(expected):,} bytes; fix: run again")
        if sha256 and digest.hexdigest() != sha256.lower():
            raise BundleError(f"{url} has SHA-256 {digest.hexdigest()}, expected {sha256}: not the file we want "
                              "(changed upstream, or a wrong --bundle-sha256); fix: check the URL and the checksum")
    try:
        atomic_write(dest, write)
    except (urllib.error.URLError, HTTPException, TimeoutError, ConnectionError) as e:
        raise BundleError(f"cannot download {url} ({getattr(e, 'reason', e)}); {fix}") from None
    return digest.hexdigest()


# %% [markdown]
# Reading a bundle turns each task into a `CoreTask`. As nanochat does, the items are shuffled with seed 1337 (the
# files are often sorted, and we want a cut to be a fair sample) and then cut to `max_per_task`. A task asks for
# `num_fewshot` examples drawn from its *other* items; when a cut leaves fewer items than that (nanochat would stop
# with an error), it gets as many as there are. Anything malformed is a `BundleError` that names the file.

# %%
#| export
@dataclass
class CoreTask:
    "One CORE task: label, type, shots, delimiter, items (shuffled and cut), random baseline in percent."
    label: str
    task_type: str
    num_fewshot: int
    delimiter: str
    items: list
    baseline: float


def load_core_tasks(bundle_dir, max_per_task=-1, source=None):
    "The tasks of an unpacked bundle, in core.yaml's order, items shuffled with seed 1337 and cut to max_per_task."
    bundle_dir, where = Path(bundle_dir), Path(bundle_dir) / "core.yaml"
    try:
        entries = yaml.safe_load(where.read_text(encoding="utf-8"))["icl_tasks"]
        if not entries:
            raise ValueError("icl_tasks lists no task")
        where = bundle_dir / "eval_meta_data.csv"
        with open(where, newline="", encoding="utf-8") as f:
            baselines = {row["Eval Task"]: float(row["Random baseline"]) for row in csv.DictReader(f)}
        tasks = []
        for e in entries:
            where = bundle_dir / "eval_meta_data.csv"
            baseline = baselines[e["label"]]
            where = bundle_dir / "eval_data" / e["dataset_uri"]
            items = [json.loads(line) for line in where.read_text(encoding="utf-8").splitlines() if line.strip()]
            if e["icl_task_type"] not in CORE_TYPES or not items or not 0 <= baseline < 100:
                raise ValueError(f"task {e['label']!r}: type must be one of {CORE_TYPES}, with items and a "
                                 "random baseline in [0, 100)")
            random.Random(1337).shuffle(items)
            tasks.append(CoreTask(e["label"], e["icl_task_type"], int(e["num_fewshot"][0]),
                                  e.get("continuation_delimiter", " "),
                                  items[:max_per_task] if max_per_task > 0 else items, baseline))
    except (OSError, ValueError, KeyError, TypeError, IndexError, yaml.YAMLError) as e:
        what = f"{type(e).__name__}: {e}".replace(f"{bundle_dir.parent}{os.sep}", "")
        if source is not None:  # a fresh download: the URL is wrong, not the cache
            raise BundleError(f"{source} is not a CORE bundle in nanochat's layout "
                              f"({where.relative_to(bundle_dir.parent)}: {what}); fix: check the bundle URL") from None
        raise BundleError(f"{where}: not a CORE bundle in nanochat's layout ({what}); fix: delete {bundle_dir} "
                          "and fetch the bundle again") from None
    return tasks


# %% [markdown]
# Unpacking, and the one call that does it all: download on first use (on rank 0 only, the others wait for it),
# nothing after that.

# %%
#| export
def unpack_bundle(zip_path, cache_dir, source=None):
    "Unzip into a temp folder in cache_dir, check it reads as a bundle, then rename it to cache_dir/eval_bundle."
    cache_dir = Path(cache_dir)
    tmp = Path(tempfile.mkdtemp(prefix=".eval_bundle.", dir=cache_dir))
    try:
        with zipfile.ZipFile(zip_path) as z:
            if (bad := z.testzip()) is not None:
                raise BundleError(f"{zip_path}: member {bad} is damaged; fix: download the bundle again")
            z.extractall(tmp)  # extractall drops absolute paths and '..', so members stay inside tmp
        load_core_tasks(tmp / "eval_bundle", source=source or zip_path)
        try:
            os.rename(tmp / "eval_bundle", cache_dir / "eval_bundle")
        except OSError:
            if not (cache_dir / "eval_bundle" / "core.yaml").is_file():
                raise  # not a racing process that unpacked it first
    except zipfile.BadZipFile:
        raise BundleError(f"{zip_path} is not a zip archive (a truncated download, or the wrong file); fix: check "
                          "the bundle URL") from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return cache_dir / "eval_bundle"


def fetch_core_bundle(cache_dir, url=EVAL_BUNDLE_URL, sha256=None, log=print):
    "cache_dir/eval_bundle, downloaded, checked and unpacked on first use (by rank 0; the other ranks wait)."
    cache_dir, error = Path(cache_dir), None
    bundle, zip_path = cache_dir / "eval_bundle", cache_dir / "eval_bundle.zip"
    if rank_world()[0] == 0 and not (bundle / "core.yaml").is_file():
        try:
            cache_dir.mkdir(parents=True, exist_ok=True)
            log(f"downloading the CORE bundle from {url}")
            digest = download(url, zip_path, sha256)
            unpack_bundle(zip_path, cache_dir, source=url)
            log(f"placed it in {bundle} (SHA-256 {digest})")
        except Exception as e:
            error = e
        finally:
            zip_path.unlink(missing_ok=True)
    if all_sum([error is not None])[0] and error is None:  # every rank learns whether rank 0 failed
        raise BundleError(f"rank 0 could not fetch the CORE bundle from {url}; see its message")
    if error is not None:
        raise error
    return bundle


# %% [markdown]
# To try it without the network we serve the zip from a web server on the loopback interface, in a thread: the
# real download, checks and unpacking run. A wrong checksum, then a server that hangs up halfway, must fail with a
# message and leave the cache as it was.

# %%
def serve_folder(folder, truncate=None):
    "Serve `folder` over HTTP on 127.0.0.1 in a thread (or only the first `truncate` bytes of each file): the server."
    class Handler(http.server.SimpleHTTPRequestHandler):
        def __init__(self, *a, **kw):
            super().__init__(*a, directory=str(folder), **kw)

        def copyfile(self, source, outputfile):  # a server that hangs up early, for the tests
            outputfile.write(source.read(truncate) if truncate is not None else source.read())

        def log_message(self, *args):
            pass
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


# %% [markdown]
# Now the three cases, in that order:

# %%
served = Path(tempfile.mkdtemp())
zip_core_bundle(bundle_src, served / "eval_bundle.zip")
good_sha = hashlib.sha256((served / "eval_bundle.zip").read_bytes()).hexdigest()
server = serve_folder(served)
url = f"http://127.0.0.1:{server.server_port}/eval_bundle.zip"
cache = Path(tempfile.mkdtemp()) / "cache"  # the command line below uses the run's own, run_dir/cache

test_fail(lambda: fetch_core_bundle(cache, url, sha256="0" * 64), contains="expected 0000")
short = serve_folder(served, truncate=1000)
test_fail(lambda: fetch_core_bundle(cache, f"http://127.0.0.1:{short.server_port}/eval_bundle.zip"),
          contains="stopped after 1,000")
test_eq(sorted(cache.iterdir()) if cache.exists() else [], [])  # nothing half-done was left behind
bundle = fetch_core_bundle(cache, url, sha256=good_sha)
print(sorted(p.name for p in bundle.iterdir()))
short.shutdown()


# %% [markdown]
# ### Prompts
#
# For each item, nanochat renders the texts to score with a small template: the few-shot examples first, each a
# solved item followed by a blank line, then the item itself, once per candidate. Written out as plain strings:
#
# - multiple choice: `query + delimiter + choice`, one text per choice; shots show their gold choice;
# - schema: `context option + delimiter + continuation`, one text per option; shots show their gold option;
# - language modelling: two texts, the prompt without the answer and with it. Contexts are stripped of surrounding
#   whitespace (some datasets store a trailing space) and the text without the answer is stripped once more, so its
#   last token is a clean prefix of the text with the answer: the delimiter's space moves into the answer's first
#   token.

# %%
#| export
def core_prompts(item, task_type, delimiter, shots=()):
    "The texts nanochat scores for one item: one per choice (MC) or per option (schema), or [without, with] (LM)."
    d = delimiter
    if task_type == "multiple_choice":
        head = "".join(f"{s['query']}{d}{s['choices'][s['gold']]}\n\n" for s in shots)
        return [f"{head}{item['query']}{d}{choice}" for choice in item["choices"]]
    if task_type == "schema":
        head = "".join(f"{s['context_options'][s['gold']]}{d}{s['continuation']}\n\n" for s in shots)
        return [f"{head}{option}{d}{item['continuation']}" for option in item["context_options"]]
    head = "".join(f"{str(s['context']).strip()}{d}{s['continuation']}\n\n" for s in shots)
    without = f"{head}{str(item['context']).strip()}{d}"
    return [without.strip(), f"{without}{item['continuation']}"]


# %%
tasks = {t.label: t for t in load_core_tasks(bundle)}
qa, lm = tasks["python_qa"], tasks["python_lm"]
for text in core_prompts(qa.items[0], qa.task_type, qa.delimiter, qa.items[1:3]):
    print(repr(text))
print(core_prompts(lm.items[0], lm.task_type, lm.delimiter, lm.items[1:3]))
test_eq(core_prompts({"query": "Q", "choices": ["a", "b"], "gold": 1}, "multiple_choice", " ",
                     [{"query": "S", "choices": ["x", "y"], "gold": 0}]), ["S x\n\nQ a", "S x\n\nQ b"])
test_eq(core_prompts({"context": " ctx ", "continuation": "ans"}, "language_modeling", " "), ["ctx", "ctx ans"])


# %% [markdown]
# ### Which tokens are the answer
#
# Tokenized (with BOS in front), the texts of an item share a beginning (multiple choice: everything up to where the
# choices differ) or an ending (schema: the continuation). The scored span of a text is what it does not share:
# for multiple choice from the end of the common token prefix to the end; for schema the common token suffix. The
# boundary is found on *tokens*, not characters, which matters: when two choices begin with the same word, that
# word is left out of both spans, and for schema the shared suffix can reach back into the options (`'s`, ` was`).
# For language modelling the span is what the answer adds to the text without it, which must be a token prefix.

# %%
#| export
def common_length(rows, direction="left"):
    "Length of the token prefix (left) or suffix (right) that all rows share."
    n = min(len(r) for r in rows)
    for i in range(n):
        j = i if direction == "left" else -1 - i
        if any(r[j] != rows[0][j] for r in rows):
            return i
    return n


def core_sequences(tokenizer, prompts, task_type):
    "Token rows (BOS first) to score and each row's answer span [start, end)."
    rows = [tokenizer.encode(p, prepend=tokenizer.bos_id) for p in prompts]  # 2 to 4 short texts: no thread pool
    ends = [len(r) for r in rows]
    if task_type == "multiple_choice":
        return rows, [common_length(rows, "left")] * len(rows), ends
    if task_type == "schema":
        k = common_length(rows, "right")
        return rows, [e - k for e in ends], ends
    without, full = rows
    if not len(without) < len(full) or full[:len(without)] != without:
        raise ValueError(f"the prompt without its answer does not tokenize as a prefix of the prompt with it: "
                         f"{prompts[0][-40:]!r}; this item cannot be scored as language modelling")
    return [full], [len(without)], [len(full)]


# %%
rows, starts, ends = core_sequences(tokenizer, core_prompts(tasks["python_schema"].items[0], "schema", " "), "schema")
for r, s, e in zip(rows, starts, ends):
    print([tokenizer.decode([t]) for t in r[1:s]], "| scored:", [tokenizer.decode([t]) for t in r[s:e]])
test_eq(common_length([[1, 2, 3], [1, 2, 4]]), 2)
test_eq(common_length([[1, 2, 3], [0, 2, 3]], "right"), 2)
test_eq(common_length([[1, 2], [1, 2, 3]]), 2)  # a choice that is a prefix of another gets an empty span


# %% [markdown]
# ### Scoring an item
#
# One forward pass over an item's rows, padded on the right with BOS (the model is causal, so what comes after a
# row's end changes nothing before it), gives at every position the loss of the next token and the model's argmax.
# The loss at position $t$ is about token $t+1$, so the span $[s, e)$ is judged by positions $s-1$ to $e-2$:
#
# - multiple choice and schema: the mean loss over each row's span (in float32, as nanochat computes it); the
#   prediction is the row with the lowest mean (the first, on a tie), right if it is `gold`;
# - language modelling: right if the argmax equals the token at every position of the span.
#
# Prompts longer than the model's rotary table are cut from the left, keeping the answer. First the plain version,
# one item per forward pass, as nanochat does:

# %%
#| export
@torch.no_grad()
def forward_losses(model, input_ids):
    "Per position, the loss of predicting the next token (NaN in the last column), and the argmax predictions."
    logits = model(input_ids)
    B, T, V = logits.shape
    targets = torch.roll(input_ids, shifts=-1, dims=1)
    losses = F.cross_entropy(logits.view(B * T, V), targets.view(B * T), reduction="none").view(B, T)
    losses[:, -1] = float("nan")
    return losses, logits.argmax(dim=-1)


def judge(task_type, losses, predictions, input_ids, starts, ends, gold=None):
    "Is one item right? MC and schema: the row of lowest mean span loss is gold; LM: every span token is the argmax."
    if task_type == "language_modeling":
        s, e = starts[0], ends[0]
        return bool(torch.all(predictions[0, s - 1:e - 1] == input_ids[0, s:e]))
    mean_losses = [losses[i, s - 1:e - 1].mean().item() for i, (s, e) in enumerate(zip(starts, ends))]
    return mean_losses.index(min(mean_losses)) == gold


# %%
#| export
def item_sequences(tokenizer, task, idx, max_len=None):
    "Rows and spans of item `idx` of a CoreTask: shots drawn as nanochat draws them, rows over max_len cut on the left."
    items = task.items
    shots, k = [], min(task.num_fewshot, len(items) - 1)
    if k > 0:  # seed 1234 + idx: an item always gets the same shots, whatever runs beside it
        shots = [items[i] for i in random.Random(1234 + idx).sample([i for i in range(len(items)) if i != idx], k)]
    rows, starts, ends = core_sequences(tokenizer, core_prompts(items[idx], task.task_type, task.delimiter, shots),
                                        task.task_type)
    if max_len is not None:
        cut = [max(0, len(r) - max_len) for r in rows]
        rows = [r[c:] for r, c in zip(rows, cut)]
        starts, ends = [s - c for s, c in zip(starts, cut)], [e - c for e, c in zip(ends, cut)]
    return rows, starts, ends


def pad_rows(rows, pad_id, device="cpu"):
    "A (B, T) long tensor of rows padded on the right with `pad_id`."
    out = torch.full((len(rows), max(len(r) for r in rows)), pad_id, dtype=torch.long)
    for i, r in enumerate(rows):
        out[i, :len(r)] = torch.tensor(r, dtype=torch.long)
    return out.to(device)


def score_item(model, tokenizer, task, idx):
    "nanochat's way: one forward pass over one item's rows; True if the model gets item `idx` right."
    rows, starts, ends = item_sequences(tokenizer, task, idx, getattr(model, "rotary_seq_len", None))
    ids = pad_rows(rows, tokenizer.bos_id, model.lm_head.weight.device)
    losses, predictions = forward_losses(model, ids)
    return judge(task.task_type, losses, predictions, ids, starts, ends, task.items[idx].get("gold"))


# %% [markdown]
# Let us do one multiple-choice item by hand beside it: tokenize each choice's text, take the log-softmax of the
# logits at the positions before the scored tokens, average the negative log-probabilities of those tokens, and pick
# the smallest.

# %%
mc = tasks["python_mc"]
item = mc.items[0]
texts = core_prompts(item, mc.task_type, mc.delimiter)
by_hand = []
for text in texts:
    ids = tokenizer.encode(text, prepend=tokenizer.bos_id)
    with torch.no_grad():
        logprobs = torch.log_softmax(model(torch.tensor([ids]))[0], dim=-1)
    start = common_length(tokenizer.encode(texts, prepend=tokenizer.bos_id))
    nll = [-logprobs[t - 1, ids[t]].item() for t in range(start, len(ids))]
    by_hand.append(sum(nll) / len(nll))
print(f"query {item['query']!r}, gold {item['choices'][item['gold']]!r}")
for text, loss in zip(texts, by_hand):
    print(f"  mean loss {loss:.4f}  {text!r}")
right_by_hand = by_hand.index(min(by_hand)) == item["gold"]
print("right by hand:", right_by_hand, "| score_item:", score_item(model, tokenizer, mc, 0))
test_eq(score_item(model, tokenizer, mc, 0), right_by_hand)

# %% [markdown]
# And one language-modelling item: with its two shots, is every token of the answer the model's greedy choice?

# %%
rows, starts, ends = item_sequences(tokenizer, lm, 0)
with torch.no_grad():
    greedy = model(torch.tensor(rows))[0].argmax(-1)
s, e = starts[0], ends[0]
print(repr(tokenizer.decode(rows[0][1:s])), "->", repr(tokenizer.decode(rows[0][s:e])))
print("model's greedy tokens there:", repr(tokenizer.decode(greedy[s - 1:e - 1].tolist())))
test_eq(score_item(model, tokenizer, lm, 0), greedy[s - 1:e - 1].tolist() == rows[0][s:e])


# %% [markdown]
# ### Many items per forward pass
#
# One item is 1 to 4 short rows: a forward pass that small leaves most of a GPU (and much of a CPU) idle. So the
# fast version packs the rows of consecutive items into one batch of about `batch_tokens` tokens (rows × longest
# row), runs one forward pass and judges each item on its own slice. It must give the same verdict on every item.

# %%
#| export
def score_items(model, tokenizer, task, indices, batch_tokens=8192):
    "score_item for many items, their rows packed into forward passes of about batch_tokens (rows x longest row)."
    device, max_len = model.lm_head.weight.device, getattr(model, "rotary_seq_len", None)
    verdicts, batch = [], []
    def run(batch):
        ids = pad_rows([r for _, rows, _, _ in batch for r in rows], tokenizer.bos_id, device)
        losses, predictions = forward_losses(model, ids)
        at = 0
        for idx, rows, starts, ends in batch:
            part = slice(at, at + len(rows))
            verdicts.append(judge(task.task_type, losses[part], predictions[part], ids[part], starts, ends,
                                  task.items[idx].get("gold")))
            at += len(rows)
    for idx in indices:
        item = (idx, *item_sequences(tokenizer, task, idx, max_len))
        grown = batch + [item]
        if batch and sum(len(b[1]) for b in grown) * max(len(r) for b in grown for r in b[1]) > batch_tokens:
            run(batch)
            grown = [item]
        batch = grown
    if batch:
        run(batch)
    return verdicts


# %%
for t in tasks.values():
    one_by_one = [score_item(model, tokenizer, t, i) for i in range(len(t.items))]
    test_eq(score_items(model, tokenizer, t, range(len(t.items)), batch_tokens=512), one_by_one)
print("batched verdicts == one item at a time, on every task")


# %% [markdown]
# ### The CORE number
#
# A task's accuracy: items strided over the processes, the right ones summed over them, the mean taken in float32
# as nanochat takes it. Then the centered accuracy with the baseline in percent, and CORE as their mean.

# %%
#| export
def evaluate_core_task(model, tokenizer, task, batch_tokens=8192):
    "Accuracy on one CoreTask: items strided over ranks, right answers summed over ranks, mean in float32."
    rank, world = rank_world()
    mine = list(range(rank, len(task.items), world))
    correct = torch.zeros(len(task.items), dtype=torch.float32)
    correct[mine] = torch.tensor(score_items(model, tokenizer, task, mine, batch_tokens), dtype=torch.float32)
    return torch.tensor(all_sum(correct.tolist()), dtype=torch.float32).mean().item()


def evaluate_core(model, tokenizer, bundle_dir, max_per_task=-1, batch_tokens=8192, log=print):
    "CORE on a bundle: {'tasks': [{task, accuracy, centered, n}], 'core': mean centered accuracy}."
    results = []
    for task in load_core_tasks(bundle_dir, max_per_task):
        t0 = time.perf_counter()
        acc = evaluate_core_task(model, tokenizer, task, batch_tokens)
        centered = (acc - 0.01 * task.baseline) / (1.0 - 0.01 * task.baseline)
        results.append({"task": task.label, "accuracy": acc, "centered": centered, "n": len(task.items)})
        log(f"{task.label:<35} accuracy {acc:.4f} | centered {centered:.4f} | {time.perf_counter() - t0:.2f}s")
    return {"tasks": results, "core": sum(r["centered"] for r in results) / len(results)}


# %%
core = evaluate_core(model, tokenizer, bundle)
by_hand = {}
for t in tasks.values():
    acc = sum(score_item(model, tokenizer, t, i) for i in range(len(t.items))) / len(t.items)
    by_hand[t.label] = (acc - t.baseline / 100) / (1 - t.baseline / 100)
print(f"CORE {core['core']:.4f}; by hand {sum(by_hand.values()) / len(by_hand):.4f}")
for r in core["tasks"]:
    test_close(r["centered"], by_hand[r["task"]], eps=1e-6)

# %% [markdown]
# A centered score can be negative: below chance. Here is where each task stands:

# %%
#| fig-alt: "Horizontal bars of centered accuracy per CORE task on the demo bundle, with a line at zero for chance."
fig, ax = plt.subplots(figsize=(6, 2.4))
labels = [r["task"] for r in core["tasks"]]
ax.barh(labels, [r["centered"] for r in core["tasks"]], color="tab:blue")
ax.axvline(0, color="k", lw=0.8)
ax.set(xlabel="centered accuracy (0 = chance, 1 = perfect)", title=f"CORE {core['core']:.3f} on the demo bundle")
plt.tight_layout(); plt.show()


# %% [markdown]
# ## Chat evaluation
#
# A chat model is asked questions as a user would ask them, rendered as a conversation ending with
# `<|assistant_start|>` (`render_for_completion`, chapter 01). The tasks of chapter 09 say how each is judged:
#
# - **categorical** (ARC-Easy, ARC-Challenge, MMLU): the prompt lists the choices as `- choice=letter` lines and asks
#   for the letter. Nothing is sampled: one forward pass, and at the last prompt position the model's logits are
#   compared *only among the allowed letters*. Even a model that would rather say "Hello" has a best letter.
# - **generative** (GSM8K, HumanEval, our arithmetic and spelling): the engine samples a reply, tools and all, and
#   the task scores it: the number after `####`, or the code's tests in the sandbox.
#
# ### Categorical, one question at a time

# %%
#| export
def letter_ids(tokenizer, letters):
    "The token id of each answer letter; a letter that is not exactly one token is an error."
    out = []
    for letter in letters:
        ids = tokenizer.encode(letter)
        if len(ids) != 1:
            raise ValueError(f"answer letter {letter!r} is {len(ids)} tokens in this tokenizer; categorical "
                             "evaluation needs one token per letter")
        out.append(ids[0])
    return out


@torch.no_grad()
def predict_letter(model, tokenizer, conversation):
    "The allowed letter with the largest logit at the prompt's last position (after <|assistant_start|>)."
    ids = tokenizer.render_for_completion(conversation)
    logits = model(torch.tensor([ids], device=model.lm_head.weight.device))[0, -1]
    letters = conversation["letters"]
    return letters[logits[letter_ids(tokenizer, letters)].argmax().item()]


# %% [markdown]
# A few questions in ARC's own layout (chapter 09 reads them with the real `datasets` code from a folder laid out
# like the hub repository):

# %%
arc_root = Path(tempfile.mkdtemp()) / "allenai/ai2_arc"
(arc_root / "ARC-Easy").mkdir(parents=True)
arc_schema = pa.schema([("id", pa.string()), ("question", pa.string()),
                        ("choices", pa.struct([("text", pa.list_(pa.string())), ("label", pa.list_(pa.string()))])),
                        ("answerKey", pa.string())])
questions = [("Which keyword defines a function in Python?", ["class", "def", "lambda", "import"], "B"),
             ("Which of these is a gas at room temperature?", ["iron", "helium", "wax", "salt"], "B"),
             ("What do plants take in to make food?", ["carbon dioxide", "sand", "salt", "plastic"], "A"),
             ("Which planet is closest to the Sun?", ["Mars", "Venus", "Mercury", "Earth"], "C"),
             ("Which value is false in Python?", ["1", "'a'", "[0]", "None"], "D"),
             ("What is 2 + 3?", ["5", "6", "23", "1"], "A"), ("Which is a loop keyword?", ["if", "while", "def"], "B"),
             ("What does len('abc') return?", ["2", "3", "'abc'", "None"], "B"),
             ("Which animal can fly?", ["dog", "cat", "eagle", "fish"], "C")]
rows = [{"id": f"q{i}", "question": q, "choices": {"text": c, "label": list("ABCD")[:len(c)]}, "answerKey": a}
        for i, (q, c, a) in enumerate(questions)]
pq.write_table(pa.Table.from_pylist(rows, schema=arc_schema), arc_root / "ARC-Easy/test-00000-of-00001.parquet")
arc = load_task("arc-easy", "test", data_root=arc_root.parent.parent)
conversation = arc[0]
print(conversation["messages"][0]["content"])
print("model says:", predict_letter(model, tokenizer, conversation), "| reference:",
      conversation["messages"][-1]["content"])


# %% [markdown]
# ### Categorical, batched
#
# As nanochat does, `batch_size` prompts go through one forward pass, padded on the right with BOS; each prompt's
# answer is read at its own last position, before the padding.

# %%
#| export
@torch.no_grad()
def predict_letters(model, tokenizer, conversations, batch_size=8):
    "predict_letter for many conversations, batch_size prompts per forward pass."
    out = []
    for i in range(0, len(conversations), batch_size):
        batch = conversations[i:i + batch_size]
        prompts = [tokenizer.render_for_completion(c) for c in batch]
        logits = model(pad_rows(prompts, tokenizer.bos_id, model.lm_head.weight.device))
        for c, p, row in zip(batch, prompts, logits):
            out.append(c["letters"][row[len(p) - 1, letter_ids(tokenizer, c["letters"])].argmax().item()])
    return out


# %%
conversations = list(arc)
test_eq(predict_letters(model, tokenizer, conversations, batch_size=4),
        [predict_letter(model, tokenizer, c) for c in conversations])
print(predict_letters(model, tokenizer, conversations))

# %% [markdown]
# ### Generative: sample, and stop at the answer
#
# A generative problem gets `num_samples` replies from one prompt (the engine's batched sampling, chapter 07),
# each judged by the task; nanochat counts a problem as solved if *any* sample is right. Defaults are nanochat's:
# temperature 0, top-k 50, at most 512 new tokens, one sample.
#
# A model that has not learned to stop writes until the limit, and on a CPU 512 tokens per problem is most of the
# evaluation's time. But often the verdict is settled long before: GSM8K-style tasks read the *first*
# `#### number`, so once that number is followed by anything else, nothing more the model writes can change the
# score; HumanEval reads the first fenced code block, so once one has closed, the same. `answer_stop` gives that test
# for a task (None when there is none), and `sample_replies` stops a row as soon as it holds. The verdicts are the
# ones a full-length reply would get, and the `tests/` check that.

# %%
#| export
CODE_BLOCK = re.compile(r"```(?:python)?\s*\n(.*?)\n```", re.DOTALL)  # the first fenced block, as tasks reads it


def answer_stop(task):
    "A test on a reply's text that holds once more text cannot change its score; None if there is none."
    if isinstance(task, FinalAnswerTask):  # the first `#### n`, once something follows n
        return lambda text: (m := ANSWER_RE.search(text)) is not None and m.end() < len(text)
    if isinstance(task, HumanEval):  # the first fenced code block, once it is closed
        return lambda text: CODE_BLOCK.search(text) is not None
    return None


def sample_replies(engine, prompt, num_samples=1, max_tokens=512, temperature=0.0, top_k=50, seed=42, stop=None):
    "The text of `num_samples` replies to `prompt`; a row ends at <|assistant_end|>, at max_tokens, or once stop(text)."
    tokenizer, rows = engine.tokenizer, [[] for _ in range(num_samples)]
    done = [False] * num_samples
    for column, _ in engine.generate(prompt, num_samples, max_tokens=max_tokens, temperature=temperature,
                                     top_k=top_k, seed=seed):
        for i, token in enumerate(column):
            if done[i]:
                continue
            if token in (engine.end, engine.bos):
                done[i] = True
                continue
            rows[i].append(token)
            done[i] = stop is not None and stop(tokenizer.decode(rows[i]))
        if all(done):
            break
    return [tokenizer.decode(r) for r in rows]


# %% [markdown]
# The test that stops a row must hold exactly when the score is settled:

# %%
stop = answer_stop(load_task("arithmetic"))
test_eq([stop(t) for t in ["so 12 - 3 = 9.\n#### 9", "#### 9\n", "#### 1,234 apples", "##### 9x", "#### -"]],
        [False, True, True, True, False])
code_stop = answer_stop(load_task("humaneval"))
test_eq([code_stop(t) for t in ["```python\ndef f():\n    return 1", "```python\ndef f():\n    return 1\n```"]],
        [False, True])


# %% [markdown]
# `sample_replies` decodes one problem at a time, at batch 1, and on a CPU a decode step for 8 rows costs little more
# than one for a single row (chapter 07 has the figure). `sample_replies_many` hands a list of prompts to the engine's
# `generate_many`, which decodes about `batch_size` rows together (prompts of different lengths padded on the left)
# and ends each row at its own `stop`. Each problem's replies are the ones `sample_replies` gives it alone, with the
# same seeds, so the scores do not change; only the time does.

# %%
#| export
def sample_replies_many(engine, prompts, num_samples=1, max_tokens=512, temperature=0.0, top_k=50, seed=42, stop=None,
                        batch_size=8):
    "[sample_replies(engine, p, ...) for p in prompts], about batch_size rows decoded together."
    out = engine.generate_many(prompts, num_samples, batch_size, stop, seed, max_tokens=max_tokens,
                               temperature=temperature, top_k=top_k)
    return [[engine.tokenizer.decode(row[len(p):]) for row in rows] for p, (rows, _) in zip(prompts, out)]


# %%
engine = Engine(model, tokenizer)
arith_prompts = [tokenizer.render_for_completion(load_task("arithmetic")[i]) for i in range(6)]
for temperature, n in ((0.0, 1), (1.0, 2)):
    test_eq(sample_replies_many(engine, arith_prompts, n, 40, temperature, stop=stop, batch_size=4),
            [sample_replies(engine, p, n, 40, temperature, stop=stop) for p in arith_prompts])
print("prompt lengths", [len(p) for p in arith_prompts], "| replies batched == one at a time")


# %% [markdown]
# A problem with $n$ samples of which $c$ are right also gives **pass@k** for any $k \le n$: the chance that at
# least one of $k$ samples drawn from those $n$ is right, $1 - \binom{n-c}{k} / \binom{n}{k}$, the unbiased estimator
# of the HumanEval paper. With $k = n$ it is nanochat's "any sample right"; with $k = 1$ it is the fraction of
# right samples.

# %%
#| export
def pass_at_k(n, c, k):
    "Chance that at least one of k samples drawn from n, of which c are right, is right."
    if n - c < k:
        return 1.0
    return 1.0 - math.comb(n - c, k) / math.comb(n, k)


# %%
test_eq([pass_at_k(8, 0, 1), pass_at_k(8, 8, 1), pass_at_k(8, 2, 1), pass_at_k(8, 1, 8)], [0.0, 1.0, 0.25, 1.0])
test_close(pass_at_k(4, 1, 2), 0.5)  # of the 6 pairs from 4 samples, the 3 holding the right one

# %% [markdown]
# HumanEval's replies are programs, and the task (chapter 09) runs them with the sandbox's `check_program`, which
# refuses a program that exits (with status 0) before its tests finish, a trick a model could stumble on:

# %%
humaneval = load_task("humaneval")
problem = humaneval[0]
canonical = problem["messages"][1]["content"]
cheat = problem["messages"][0]["content"] + "    import sys; sys.exit(0)\n"
print(problem["task_id"], "| canonical:", humaneval.evaluate(problem, canonical),
      "| exits early:", humaneval.evaluate(problem, cheat))
assert humaneval.evaluate(problem, canonical) and not humaneval.evaluate(problem, cheat)


# %% [markdown]
# ### One task, any kind
#
# `evaluate_chat_task` runs either kind over this process's stride of the first `max_problems` problems and returns
# the sums over all processes: problems, problems solved, and pass@k for k = 1 and k = `num_samples`. `batch_size` is
# the number of prompts per forward pass for a categorical task, and of rows decoded together for a generative one.

# %%
#| export
def evaluate_chat_task(model, tokenizer, task, max_problems=None, num_samples=1, max_tokens=512, temperature=0.0,
                       top_k=50, batch_size=8, seed=42):
    "One chat task on the first max_problems problems: {'n', 'accuracy', 'pass@k'...} summed over ranks."
    n = len(task) if max_problems is None else min(len(task), max_problems)
    if n < 1:
        raise ValueError(f"{type(task).__name__}: no problems to evaluate (max_problems={max_problems})")
    rank, world = rank_world()
    mine = [task[i] for i in range(rank, n, world)]
    if task.eval_type == "categorical":
        letters = predict_letters(model, tokenizer, mine, batch_size)
        right = [[bool(task.evaluate(c, letter))] for c, letter in zip(mine, letters)]
    elif task.eval_type == "generative":
        replies = sample_replies_many(Engine(model, tokenizer), [tokenizer.render_for_completion(c) for c in mine],
                                      num_samples, max_tokens, temperature, top_k, seed, answer_stop(task), batch_size)
        right = [[bool(task.evaluate(c, reply)) for reply in rs] for c, rs in zip(mine, replies)]
    else:
        raise ValueError(f"{type(task).__name__} has no automatic score (eval_type {task.eval_type!r})")
    ks = sorted({1, num_samples}) if task.eval_type == "generative" else []  # the same on a rank with no problems
    sums = all_sum([len(mine), sum(any(r) for r in right)] + [sum(pass_at_k(len(r), sum(r), k) for r in right)
                                                              for k in ks])
    n = int(sums[0])
    return {"n": n, "accuracy": sums[1] / n, **{f"pass@{k}": v / n for k, v in zip(ks, sums[2:])}}


# %%
arith = load_task("arithmetic")
print(arith[0]["messages"][0]["content"])
result = evaluate_chat_task(model, tokenizer, arith, max_problems=4, num_samples=2, max_tokens=48, temperature=1.0)
print(result)
print(evaluate_chat_task(model, tokenizer, arc))

# %% [markdown]
# Our two-layer model, never taught to chat, solves nothing, and guesses letters: that is what the numbers say, and
# the point of a baseline.
#
# ### ChatCORE
#
# nanochat sums the chat evaluations up like CORE: each task's accuracy centered against what guessing gets, 0.25
# for the four-choice ARC and MMLU and 0 for the open-ended tasks, and ChatCORE is the mean. nanochat computes it only
# when all six of its tasks (ARC-Easy, ARC-Challenge, MMLU, GSM8K, HumanEval, SpellingBee) ran; we compute it over
# whichever tasks ran, so compare ChatCOREs only across runs of the same tasks.

# %%
#| export
CHAT_BASELINES = {"arc-easy": 0.25, "arc-challenge": 0.25, "mmlu": 0.25}  # anything else: 0 (open-ended)


def chat_task(name, data_root=None):
    "An evaluation task by name, its test split; the synthetic ones get 256 problems, as nanochat's SpellingBee."
    synthetic = name in ("arithmetic", "spelling", "simple-spelling", "identity")
    try:
        return load_task(name, "test", data_root, **({"size": 256} if synthetic else {}))
    except RuntimeError as e:  # a hub dataset that is neither cached nor reachable
        raise ValueError(f"{e} (from the command line: --data-root)") from None


def evaluate_chat(model, tokenizer, names, data_root=None, log=print, **options):
    "Chat evaluation of tasks by name: {'tasks': {name: {n, accuracy, centered, pass@k}}, 'chatcore': mean centered}."
    tasks = {name: chat_task(name, data_root) for name in names}  # a wrong name fails before any work
    results = {}
    for name, task in tasks.items():
        t0 = time.perf_counter()
        r = evaluate_chat_task(model, tokenizer, task, **options)
        base = CHAT_BASELINES.get(name, 0.0)
        results[name] = {"n": r["n"], "accuracy": r["accuracy"], "centered": (r["accuracy"] - base) / (1.0 - base),
                         **{k: v for k, v in r.items() if k.startswith("pass@")}}
        log(f"{name:<15} accuracy {r['accuracy']:.4f} on {r['n']} problems | {time.perf_counter() - t0:.2f}s")
    return {"tasks": results, "chatcore": sum(r["centered"] for r in results.values()) / len(results)}


# %%
chat = evaluate_chat(model, tokenizer, ["arc-easy", "arithmetic"], data_root=arc_root.parent.parent,
                     max_problems=4, max_tokens=48)
by_hand = ((chat["tasks"]["arc-easy"]["accuracy"] - 0.25) / 0.75 + chat["tasks"]["arithmetic"]["accuracy"]) / 2
print(f"ChatCORE {chat['chatcore']:.4f}, by hand {by_hand:.4f}")
test_close(chat["chatcore"], by_hand, eps=1e-12)


# %% [markdown]
# ## From checkpoint to `eval.jsonl`
#
# The last piece ties it together for the command line (and for anyone with a checkpoint): open a checkpoint with
# the engine's loader (a stage of a run, or a checkpoint directory nanochat wrote), join `torchrun`'s processes if
# there are any, run one kind of evaluation, turn its results into records, append them (rank 0 only) and print the
# table. On a GPU the forward passes run in bfloat16, as nanochat's do.

# %%
#| export
def evaluate_checkpoint(kind, model, tokenizer, meta, run_dir, log=print, **options):
    "Run one kind of evaluation (bpb, core or chat) on a loaded model; its results as eval.jsonl records."
    row = lambda task, metric, value, n: eval_record(meta["stage"], task, metric, value, n, meta.get("step"))
    if kind == "bpb":
        bpb, n = val_bpb(model, tokenizer, run_dir, meta, options.get("eval_tokens"))
        return [row("val", "bpb", bpb, n)]
    device = model.lm_head.weight.device
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else nullcontext()
    if kind == "core":
        bundle = fetch_core_bundle(Path(run_dir) / "cache", options.get("bundle_url") or EVAL_BUNDLE_URL,
                                   options.get("bundle_sha256"), log)
        with autocast:
            out = evaluate_core(model, tokenizer, bundle, options.get("max_per_task", -1), log=log)
        return [row(r["task"], m, r[m], r["n"]) for r in out["tasks"] for m in ("accuracy", "centered")] + \
            [row("CORE", "core", out["core"], sum(r["n"] for r in out["tasks"]))]
    if kind == "chat":
        names = options.pop("tasks")
        with autocast:
            out = evaluate_chat(model, tokenizer, names, options.pop("data_root", None), log=log, **options)
        return [row(name, m, v, r["n"]) for name, r in out["tasks"].items() for m, v in r.items() if m != "n"] + \
            [row("ChatCORE", "chatcore", out["chatcore"], sum(r["n"] for r in out["tasks"].values()))]
    raise ValueError(f"unknown evaluation {kind!r}; use bpb, core or chat")


def run_eval(kind, run_dir, stage=None, step=None, device=None, log=print, **options):
    "Evaluate a checkpoint (one process or under torchrun), append to run_dir/metrics/eval.jsonl, print a table."
    info = init_distributed(torch.device(device).type if device else None)
    say = log if info.rank == 0 else (lambda *a, **k: None)
    try:
        model, tokenizer, meta = load_for_inference(run_dir, stage, step,
                                                    device=info.device if info.is_ddp or not device else device)
        say(f"evaluating {meta['stage']} step {meta.get('step')} ({model.num_params():,} parameters) on "
            f"{info.world_size} process(es), {info.device}")
        records = evaluate_checkpoint(kind, model, tokenizer, meta, run_dir, log=say, **options)
        if info.rank == 0:
            append_records(Path(run_dir) / "metrics" / "eval.jsonl", records)
        say(format_table(records))
        return records
    finally:
        cleanup_distributed()


# %%
records = run_eval("chat", run_dir, "base", device="cpu", tasks=["arithmetic"], max_problems=2, max_tokens=16)
test_eq(read_records(run_dir / "metrics" / "eval.jsonl")[-len(records):], records)


# %% [markdown]
# ## The command line
#
# `nanochat-nb eval` (chapter 99) is `run_eval` with options:
#
# ```sh
# nanochat-nb eval bpb  --run-dir runs/speedrun                 # the validation shard
# nanochat-nb eval core --run-dir runs/speedrun --max-per-task 500
# nanochat-nb eval chat --run-dir runs/speedrun --tasks humaneval,arithmetic,spelling --max-problems 50
# torchrun --standalone --nproc_per_node=8 -m nanochat_nb.cli eval chat --tasks arc-easy,mmlu,gsm8k,humaneval
# ```
#
# Here both run on our model, CORE on the bundle from our loopback server (fetched into `run_dir/cache` on first use)
# and the chat tasks offline:

# %%
def cli(*args):
    "Run `nanochat-nb` in a fresh process and show its output."
    r = subprocess.run([sys.executable, "-m", "nanochat_nb.cli", *map(str, args)], capture_output=True, text=True,
                       env={**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"})
    print(r.stdout[-3000:], r.stderr[-2000:])
    assert r.returncode == 0


cli("eval", "core", "--run-dir", run_dir, "--bundle-url", url, "--max-per-task", 8)
cli("eval", "chat", "--run-dir", run_dir, "--tasks", "humaneval,arithmetic,spelling", "--max-problems", 3,
    "--max-tokens", 48)
server.shutdown()

# %% [markdown]
# `metrics/eval.jsonl` now holds every result of this chapter's runs, the CLI's included:

# %%
print(format_table(read_records(run_dir / "metrics" / "eval.jsonl")[-6:]))

# %% [markdown]
# ## How fast
#
# `bench/eval.py` measures a `micro`-sized model (depth 4, vocabulary 4,096, random weights) on a CPU: categorical
# questions and CORE items per second, one per forward pass and batched, and generative problems per second. On
# these 2 shared cores, one thread: 72 questions/s one at a time and 102 batched; 71 CORE items/s and 122 batched;
# 6.9 generative problems/s at 64 tokens each (about 440 tokens/s). So a reply that runs to the 512-token limit costs
# about 1.2 s, and one that ends 60 tokens in, at `<|assistant_end|>` or at the stop after its answer, about 0.14 s:
# a few dozen synthetic problems take seconds. `docs/benchmarks.md` records the numbers and how they were taken.
#
# ## At scale
#
# On 8×H100 nanochat runs CORE on every item of the real bundle after base training, and on 500 items per task every
# 2,000 steps during it (`max_per_task`); its chat evaluations after midtraining and SFT run ARC-Easy, ARC-Challenge,
# MMLU (14,042 questions, 8 per forward pass), GSM8K (1,319 problems, up to 512 new tokens each), HumanEval (164
# programs in the sandbox) and SpellingBee (256). The d20 run's report card: CORE 0.2219 for the base model; after SFT
# ARC-Easy 0.3876, ARC-Challenge 0.2807, MMLU 0.3151, GSM8K 0.0455, HumanEval 0.0854, ChatCORE 0.0884. `torchrun`
# splits every one of these over the 8 GPUs by striding, as here, and the forward passes run in bfloat16. On a GPU,
# packing many CORE items into one forward pass matters more than on a CPU: one item's 2 to 4 short rows leave most
# of an H100 idle. GPT-2 (1.5B) scores CORE 0.2565, the target of nanochat's time-to-GPT-2 leaderboard.
#
# ## Summary
#
# - Bits per byte reuses the pretraining chapter's function on the same validation batches, and matches the number
#   training recorded.
# - CORE: the bundle fetched once into the run's cache, checked and unpacked atomically; prompts, shots (seeds 1337
#   and 1234 + index), token spans and the mean-loss and argmax rules exactly as nanochat's; items batched into few
#   forward passes with the same verdicts; centered accuracies and their mean.
# - Chat: letters compared among themselves at the answer position, batched; sampled replies that stop once the
#   score is settled; pass@k; HumanEval in the sandbox; ChatCORE.
# - Everything strides over `torchrun`'s processes and sums over them; every result is a line of
#   `metrics/eval.jsonl`, appended in one write.
#
# ## Exercises
#
# 1. Write a CORE task of your own (say, 20 multiple-choice questions about Python's standard library) with
#    `write_core_bundle`, and see whether a longer-trained model's centered accuracy rises above 0.
# 2. CORE's multiple-choice rule uses the *mean* loss over a choice's tokens. Change it to the sum and evaluate the
#    demo bundle again: which choices win now, and why does length matter?
# 3. Sample 8 replies per arithmetic problem at temperature 1.0 (`sample_replies`), count the right ones per problem
#    and plot the mean of `pass_at_k` for k = 1..8. How does the curve change with the temperature?
