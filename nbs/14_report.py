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
# # The report card
# > One Markdown file that says what was trained, on what, for how long, at what cost, and how good it got; and a
# > chart for every stage.

# %% [markdown]
# A speedrun leaves a run directory full of evidence: checkpoints with their settings, a metrics file per training
# stage with one line per step, and `metrics/eval.jsonl` with every evaluation. Nobody reads that directly. nanochat
# ends each run with a *report card*, `report.md`: the machine and the code it ran on, one section per stage with its
# settings and results, and a summary table `| Metric | BASE | MID | SFT | RL |` that says in a glance what each
# stage bought. It is what people post when they share a run, and what we compare against nanochat's published
# cards. This chapter builds it, and the charts that go with it, from the files alone: a section can be written the
# moment its stage ends or an hour later, and a stage that crashed leaves the others intact.
#
# *Pipeline:* every stage before (tokenizer 01, pretraining 06, evaluation 10, midtraining 11, SFT 12, RL 13) writes
# the files this chapter reads; the command line (99) writes a section after each stage, and `speedrun.ipynb` shows
# them as it goes.

# %%
#| default_exp report

# %%
#| export
import json, os, platform, re, subprocess
from datetime import datetime
from pathlib import Path

import torch

import nanochat_nb
from nanochat_nb.checkpoint import checkpoint_dir, latest_step
from nanochat_nb.common import atomic_write
from nanochat_nb.eval import read_records
from nanochat_nb.model import GPT, GPTConfig
from nanochat_nb.pretrain import MetricsError, MetricsLog

# %%
#| hide
import shutil, tempfile

from fastcore.test import test_eq, test_fail
from IPython.display import Markdown, display

# %% [markdown]
# ## A run to report on
#
# We need a real run directory. Chapter 07's `demo_run` trains a tokenizer and a tiny base model in a temporary
# folder; on top of it we midtrain and fine-tune for a handful of steps and measure the base model's bits per byte,
# so that every kind of file the report reads is there. The numbers will be poor; the report does not care. Point
# `run_dir` at a finished run instead (for example `"../runs/speedrun"`) to see its card: the report is written into
# a copy, so the run itself is not touched.

# %%
run_dir = None  # a finished run to report on (copied first); None: make a small one here

# %%
from nanochat_nb.engine import demo_run
from nanochat_nb.eval import run_eval
from nanochat_nb.midtrain import PRESETS as MID_PRESETS, make_chat_config, midtrain
from nanochat_nb.sft import PRESETS as SFT_PRESETS, sft

quiet = lambda *a, **k: None
started = datetime.now()  # the run starts here; the report's wall-clock time counts from it
if run_dir is None:
    run_dir = demo_run(steps=30)  # tokenizer + data + 30 steps of a depth-2 model
    small = dict(device_batch_size=4, rows_per_step=4, eval_problems=4, eval_max_tokens=48, arithmetic=400,
                 spelling=50, simple_spelling=50, identity=20)
    midtrain(run_dir, make_chat_config(MID_PRESETS, "micro", num_iterations=8, eval_every=4, **small), log=quiet)
    sft(run_dir, make_chat_config(SFT_PRESETS, "micro", from_stage="mid", num_iterations=6, eval_every=3, **small),
        log=quiet)
    run_eval("bpb", run_dir, "base", eval_tokens=2048, log=quiet)
else:
    run_dir = Path(shutil.copytree(run_dir, Path(tempfile.mkdtemp()) / Path(run_dir).name))
run_dir = Path(run_dir)
print(sorted(str(p.relative_to(run_dir)) for p in run_dir.rglob("*") if p.is_file() and p.suffix != ".lock"))


# %% [markdown]
# ## One section: a title, a time, and `- key: value` lines
#
# nanochat's sections all look alike: `## Title`, a `timestamp:` line, then one `- key: value` line per fact, with
# floats at 4 decimals and large integers with thousands separators so that `21,400` steps read at a glance. Some
# stages add a table as plain Markdown. So a section is a list of *items*: a dict becomes key-value lines, a string
# goes in as it is.

# %%
#| export
def format_value(v):
    "A value as the report prints it: floats to 4 decimals, ints of 10,000 and more with separators."
    if isinstance(v, bool) or v is None:
        return str(v)
    if isinstance(v, float):
        return f"{v:.4f}"
    if isinstance(v, int):
        return f"{v:,}" if abs(v) >= 10_000 else str(v)
    if isinstance(v, (dict, list, tuple)):
        return json.dumps(v)
    return str(v)


def section_lines(title, items, timestamp):
    "The lines of a section: `## title`, `timestamp: ...`, then `- key: value` for dicts and strings as they are."
    yield f"## {title}\n"
    yield f"timestamp: {timestamp:%Y-%m-%d %H:%M:%S}\n\n"
    for item in items:
        if isinstance(item, dict):
            for k, v in item.items():
                yield f"- {k}: {format_value(v)}\n"
        else:
            yield f"\n{item}\n\n"
    yield "\n"


# %%
test_eq([format_value(v) for v in (0.123456, 21400, 9999, True, "bf16")], ["0.1235", "21,400", "9999", "True", "bf16"])
print("".join(section_lines("Base model training", [{"depth": 20, "num_iterations": 21400, "val_bpb": 0.81234}],
                            datetime(2025, 10, 13, 9, 30))))


# %% [markdown]
# A section file is read by `report generate` while later stages are still running, and a stage can die while it
# writes one. So the file is written through `atomic_write` (chapter 00): the lines go to a temporary file beside it,
# which replaces the old file only once complete. The lines are produced *while* writing, so an error part-way (a
# value that cannot be formatted, a full disk) leaves the previous section as it was, and no half file.

# %%
#| export
def write_lines(path, lines):
    "Write an iterable of text lines to `path` atomically: a failure part-way leaves the previous file as it was."
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, lambda f: [f.write(line.encode("utf-8")) for line in lines])
    return path


# %%
_tmp = Path(tempfile.mkdtemp()) / "section.md"
write_lines(_tmp, section_lines("Chat SFT", [{"step": 10}], datetime.now()))


class Unprintable:
    def __str__(self):
        raise RuntimeError("crashed while writing")


test_fail(lambda: write_lines(_tmp, section_lines("Chat SFT", [{"step": 11, "bad": Unprintable()}], datetime.now())),
          contains="crashed while writing")
assert "- step: 10" in _tmp.read_text() and list(_tmp.parent.iterdir()) == [_tmp]  # the old file, no temp left

# %% [markdown]
# ## What the stages left on disk
#
# Every training stage leaves two things: checkpoints whose `meta_NNNNNN.json` records the settings (`user_config`),
# the model's shape and the final validation number, and `metrics/<stage>.jsonl` with one record per step (loss,
# learning-rate multiplier, time, and for pretraining tokens per second and MFU). Evaluations append to
# `metrics/eval.jsonl`. Three small readers get them back. The metrics reader is chapter 06's `MetricsLog.read`: a
# torn last line (a crash during an append) is dropped with a note, and a damaged line elsewhere is an error that
# names the file, the line and the fix.

# %%
#| export
METRICS_FILES = {"base": "pretrain.jsonl", "mid": "mid.jsonl", "sft": "sft.jsonl", "rl": "rl.jsonl"}


def latest_meta(run_dir, stage):
    "(meta dict, path) of the latest complete checkpoint of `stage`, or (None, None) when there is none."
    ckpt_dir = checkpoint_dir(run_dir, stage)
    step = latest_step(ckpt_dir)
    if step is None:
        return None, None
    path = ckpt_dir / f"meta_{step:06d}.json"
    try:
        return json.loads(path.read_text(encoding="utf-8")), path
    except ValueError as e:
        raise ValueError(f"{path} is not valid JSON ({e}); fix: delete that checkpoint step, or re-run the stage "
                         "with --resume from an earlier one") from None


def read_metrics(run_dir, stage, log=print):
    "The step records of a training stage (`[]` when its metrics file is absent); a torn last line is dropped."
    path = Path(run_dir) / "metrics" / METRICS_FILES[stage]
    return MetricsLog.read(path, log) if path.exists() else []


def eval_results(run_dir, log=print):
    "The records of metrics/eval.jsonl (`[]` when absent); lines that are not complete records are skipped, with a note."
    path = Path(run_dir) / "metrics" / "eval.jsonl"
    if not path.exists():
        return []
    keys = {"stage", "task", "metric", "value"}
    records = [r for r in read_records(path) if keys <= r.keys() and isinstance(r["value"], (int, float))]
    lines = sum(1 for line in path.read_text(encoding="utf-8", errors="replace").splitlines() if line.strip())
    if lines > len(records) and log:
        log(f"{path}: skipped {lines - len(records)} line(s) that are not complete evaluation records")
    return records


# %%
meta, meta_path = latest_meta(run_dir, "base")
print(meta_path.name, {k: meta[k] for k in ("step", "val_bpb", "model_config")})
print(read_metrics(run_dir, "base")[-2:])
print(eval_results(run_dir)[:2])

# %% [markdown]
# ## The sections, stage by stage
#
# nanochat's report has eleven sections, in pipeline order; each file is named after its title (`Chat SFT` →
# `chat-sft.md`). We key them by short names that the command line and the speedrun notebook use.

# %%
#| export
SECTIONS = {"tokenizer": "Tokenizer training", "tokenizer-eval": "Tokenizer evaluation",
            "base": "Base model training", "base-loss": "Base model loss", "base-eval": "Base model evaluation",
            "mid": "Midtraining", "mid-eval": "Chat evaluation mid", "sft": "Chat SFT",
            "sft-eval": "Chat evaluation sft", "rl": "Chat RL", "rl-eval": "Chat evaluation rl"}


def section_path(run_dir, section):
    "report/<slug>.md of a section key, the slug as nanochat's (title lowercased, spaces to dashes)."
    if section not in SECTIONS:
        raise ValueError(f"unknown report section {section!r}; fix: use one of {', '.join(SECTIONS)}")
    return Path(run_dir) / "report" / (SECTIONS[section].lower().replace(" ", "-") + ".md")


# %% [markdown]
# A training stage's results come from its metrics: the final smoothed loss, the best and last validation number
# (bits per byte for pretraining, the loss for the chat stages), the throughput and the time. Tokens per step are the
# batch of pretraining (`total_batch_size`) or, for the chat stages, rows × sequence length (padding included); when
# the metrics record tokens per second and the step time, their product is the exact number.

# %%
#| export
def tokens_per_step(meta):
    "Tokens of one optimizer step, from a checkpoint's meta (padding included for chat stages); None if unknown."
    if not meta:
        return None
    if meta.get("total_batch_size"):
        return int(meta["total_batch_size"])
    user, model = meta.get("user_config") or {}, meta.get("model_config") or {}
    rows = user.get("rows_per_step", -1)
    rows = rows if rows and rows > 0 else user.get("device_batch_size", 0) * meta.get("world_size", 1)
    T = user.get("sequence_len", -1)
    T = T if T and T > 0 else model.get("sequence_len", 0)
    return rows * T or None


def training_results(records, meta=None):
    "A stage's results from its metrics records (and checkpoint meta): losses, validation, throughput, time."
    train = [r for r in records if "loss" in r]
    out = {}
    if train:
        out["Steps trained"] = train[-1]["step"] + 1
        out["Final train loss (smoothed)"] = float(train[-1].get("smooth_loss", train[-1]["loss"]))
    for key, name in (("val_bpb", "validation bpb"), ("val_loss", "validation loss")):
        vals = [r[key] for r in records if isinstance(r.get(key), (int, float))]
        if vals:
            out[f"Minimum {name}"], out[f"Final {name}"] = float(min(vals)), float(vals[-1])
    timed = [r for r in train[1:] if r.get("dt")]  # step 0 includes warm-up (compilation, allocation)
    per_step = tokens_per_step(meta)
    tps = [r["tokens_per_s"] for r in timed if "tokens_per_s" in r] or \
          ([per_step / r["dt"] for r in timed] if per_step else [])
    if tps:
        out["Mean tokens/s"] = round(sum(tps) / len(tps))
    mfu = [r["mfu"] for r in timed if "mfu" in r]
    if mfu:
        out["Mean MFU %"] = sum(mfu) / len(mfu)
    rewards = [r["reward"] for r in records if isinstance(r.get("reward"), (int, float))]
    if rewards:  # RL
        out["Mean reward (last 10 steps)"] = sum(rewards[-10:]) / len(rewards[-10:])
    passk = [r for r in records if any(k.startswith("pass@") for k in r)]
    if passk:
        out.update({f"Final {k}": float(v) for k, v in passk[-1].items() if k.startswith("pass@")})
    elapsed = max((r.get("elapsed") or 0.0 for r in records), default=0.0)
    if records:
        out["Total training time"] = f"{elapsed / 60:.2f}m"
    return out


# %%
training_results(read_metrics(run_dir, "base"), meta)


# %% [markdown]
# The settings come from the checkpoint's `user_config`, and the model's size from its `model_config`: a GPT built
# on PyTorch's `meta` device has the right parameter count without allocating a byte, so even a d26 section is
# instant.

# %%
#| export
def model_facts(meta):
    "Parameters and FLOPs per token of the model a meta describes (built on the meta device: no memory)."
    with torch.device("meta"):
        model = GPT(GPTConfig(**meta["model_config"]))
    return {"Number of parameters": model.num_params(), "Number of FLOPs per token": f"{model.estimate_flops():e}"}


def training_section(run_dir, stage, log=print):
    "Items of a training stage's section (base, mid, sft, rl) and the files they came from; None before the stage."
    meta, meta_path = latest_meta(run_dir, stage)
    metrics_path = Path(run_dir) / "metrics" / METRICS_FILES[stage]
    if meta is None and not metrics_path.exists():
        return None
    items, sources = [], [p for p in (meta_path, metrics_path) if p is not None and p.exists()]
    if meta:
        items.append(meta.get("user_config") or {})
        facts = {"Checkpoint step": meta.get("step")}
        if meta.get("model_config"):
            facts.update(model_facts(meta))
        if meta.get("from_stage"):
            facts["Started from"] = f"{meta['from_stage']} step {meta.get('from_step')}"
        facts["DDP world size"] = meta.get("world_size", 1)
        if tokens_per_step(meta):
            facts["Tokens per step"] = tokens_per_step(meta)
            facts["Number of training tokens"] = tokens_per_step(meta) * (meta.get("step") or 0)
        items.append(facts)
    try:
        items.append(training_results(read_metrics(run_dir, stage, log), meta))
    except MetricsError as e:
        log(f"report: {e}")
        items.append({"Metrics": f"unreadable ({e})"})
    return items, sources


# %%
training_section(run_dir, "mid")[0]


# %% [markdown]
# The evaluation sections list what `metrics/eval.jsonl` holds for their stage, the latest value of each task and
# metric (a re-run evaluation replaces the old number). `pass@1` equals the accuracy (one sample), so it is left
# out. The base model's bits per byte get their own section, as in nanochat ("Base model loss"); a chat model's,
# when measured, go with its other evaluations.

# %%
#| export
def latest_results(records):
    "{(stage, task, metric): record}, the last record of each (a re-run evaluation replaces the earlier one)."
    return {(r["stage"], r["task"], r["metric"]): r for r in records}


def eval_section(run_dir, stage, bpb=None, log=print):
    "Items of an evaluation section: the stage's bpb results (`bpb=True`), its others (False) or all; None if none."
    path = Path(run_dir) / "metrics" / "eval.jsonl"
    rows = [r for (s, _, m), r in latest_results(eval_results(run_dir, log)).items()
            if s == stage and (bpb is None or (m == "bpb") == bpb) and m != "pass@1"]
    if not rows:
        return None
    name = lambda r: r["task"] if r["metric"] in ("accuracy", "core", "chatcore") else f"{r['task']} {r['metric']}"
    items = [{"Checkpoint step": rows[-1].get("step")}, {name(r): float(r["value"]) for r in rows}]
    if bpb:
        items[1]["Evaluated tokens"] = max(int(r.get("n", 0)) for r in rows)
    return items, [path]


# %% [markdown]
# The tokenizer leaves `tokenizer/token_bytes.pt`, the length in bytes of every token (0 for the special tokens):
# enough for its size and the lengths of what it learned. What `nanochat-nb tokenizer train` prints (documents,
# characters, time) it hands to the section itself. The evaluation table (bytes per token on several kinds of text,
# against GPT-4's tokenizer, chapter 01) is computed again when no one handed it over: a few seconds.

# %%
#| export
def tokenizer_section(run_dir, evaluation=False, log=print):
    "Items of the tokenizer sections from run_dir/tokenizer (training facts, or the evaluation table); None if none."
    directory = Path(run_dir) / "tokenizer"
    path = directory / "token_bytes.pt"
    if not path.exists():
        return None
    sources = [p for p in directory.iterdir() if p.is_file()]
    if evaluation:
        from nanochat_nb.tokenizer import eval_report
        return [eval_report(run_dir)], sources
    sizes = torch.load(path, weights_only=True)
    learned = sizes[sizes > 0].float()
    return [{"Vocabulary size": int(sizes.numel()), "Special tokens": int((sizes == 0).sum()),
             "Token bytes min": int(learned.min()), "Token bytes max": int(learned.max()),
             "Token bytes mean": float(learned.mean())}], sources


# %% [markdown]
# `write_section` puts it together: it asks the right reader, adds what the caller handed over (`data`: dicts and
# strings, as `section_lines` takes them) and writes the file. Its timestamp is the time of the newest file the
# section was derived from (when the stage wrote its last result), not the time of writing: so a section written an
# hour late still dates its stage correctly, and the report's wall-clock time stays right.

# %%
#| export
def _collect(run_dir, section, data, log):
    "(items, source files) of a section, or None when its stage left nothing on disk."
    stage, _, kind = section.partition("-")
    if stage == "tokenizer":
        return ([*data], []) if kind and data else tokenizer_section(run_dir, bool(kind), log)
    if kind:  # the base model's bpb has a section of its own ("loss"); a chat stage's goes with its evaluations
        return eval_section(run_dir, stage, kind == "loss" if stage == "base" else None, log)
    return training_section(run_dir, stage, log)


def write_section(run_dir, section, data=None, log=print):
    "Write report/<slug>.md for `section` (a key of SECTIONS) from the run's files, plus `data`; None if no data yet."
    path = section_path(run_dir, section)
    found = _collect(run_dir, section, data or [], log)
    if found is None:
        return None
    items, sources = found
    if data and section != "tokenizer-eval":
        items = [*items, *data]
    mtimes = [p.stat().st_mtime for p in sources if p.exists()]
    when = datetime.fromtimestamp(max(mtimes)) if mtimes else datetime.now()
    return write_lines(path, section_lines(SECTIONS[section], items, when))


# %%
for key in SECTIONS:
    written = write_section(run_dir, key)
    print(f"{key:15} -> {written.name if written else '(nothing on disk yet)'}")
display(Markdown(section_path(run_dir, "base").read_text()))

# %% [markdown]
# A stage that never ran (RL here) writes nothing, and nothing stops the others.

# %%
assert write_section(run_dir, "rl") is None and not section_path(run_dir, "rl").exists()
assert section_path(run_dir, "sft").exists()

# %% [markdown]
# ## The header: the code, the machine, the price
#
# The header says what ran where: the git commit (and whether the tree had uncommitted changes, "dirty"), the
# hardware and an hourly price for it, the software versions, and the size of the code (nanochat calls it "bloat":
# characters, lines, files and about a quarter as many tokens as characters). The hourly rates are nanochat's: $3.00
# per H100-hour, $1.79 per A100, $0.55 per V100, $2.00 for any other GPU, times the number of GPUs (8×H100 =
# $24/hour). A CPU costs nothing extra here.

# %%
#| export
GPU_RATES = {"H100": 3.00, "A100": 1.79, "V100": 0.55}


def hourly_rate(gpu_names):
    "Dollars per hour for these GPUs at nanochat's rates (H100 3.00, A100 1.79, V100 0.55, other 2.00); 0 for none."
    return sum(next((rate for name, rate in GPU_RATES.items() if name in gpu), 2.00) for gpu in gpu_names)


def git_info(root):
    "Branch, short commit with (dirty)/(clean) and the first message line of the checkout at `root`."
    def git(*args):
        out = subprocess.run(["git", *args], cwd=root, capture_output=True, text=True, timeout=10)
        return out.stdout.strip() if out.returncode == 0 else None
    try:
        commit = git("rev-parse", "--short", "HEAD")
    except (OSError, subprocess.SubprocessError):
        commit = None
    if commit is None:
        return {"Git": "not a git checkout"}
    dirty = "dirty" if git("status", "--porcelain", "--untracked-files=no") else "clean"
    return {"Branch": git("rev-parse", "--abbrev-ref", "HEAD"), "Commit": f"{commit} ({dirty})",
            "Message": (git("log", "-1", "--format=%s") or "")[:80]}


# %%
test_eq(hourly_rate(["NVIDIA H100 80GB HBM3"] * 8), 24.0)
test_eq(hourly_rate(["NVIDIA A100-SXM4-40GB", "Tesla V100"]), 1.79 + 0.55)
test_eq(hourly_rate(["NVIDIA H200"]), 2.0)
test_eq(hourly_rate([]), 0)
git_info(Path(nanochat_nb.__file__).parent)


# %%
#| export
def hardware_info():
    "Platform, CPUs, memory, GPUs with their memory and CUDA version, and the hourly rate."
    try:
        ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 1024**3
    except (ValueError, OSError, AttributeError):  # not a POSIX system
        ram = None
    gpus = [torch.cuda.get_device_properties(i) for i in range(torch.cuda.device_count())] \
        if torch.cuda.is_available() else []
    info = {"Platform": platform.platform(), "CPUs": f"{os.cpu_count()} logical",
            "Memory": f"{ram:.1f} GB" if ram else "unknown"}
    if gpus:
        info["GPUs"] = f"{len(gpus)}x {gpus[0].name}"
        info["GPU Memory"] = f"{sum(g.total_memory for g in gpus) / 1024**3:.1f} GB total"
        info["CUDA Version"] = torch.version.cuda or "unknown"
        info["Hourly Rate"] = f"${hourly_rate([g.name for g in gpus]):.2f}/hour"
    else:
        info["GPUs"] = "none (CPU only)"
        info["Hourly Rate"] = "n/a (CPU only)"
    return info


def code_size(root):
    "Characters, lines, files and approximate tokens (characters / 4) of the Python sources under `root`."
    files = sorted(p for p in Path(root).rglob("*.py") if p.name != "_modidx.py")
    texts = [p.read_text(encoding="utf-8", errors="replace") for p in files]
    chars = sum(len(t) for t in texts)
    return {"Characters": chars, "Lines": sum(t.count("\n") for t in texts), "Files": len(files),
            "Tokens (approx)": chars // 4}


# %%
print(hardware_info())
code_size(Path(nanochat_nb.__file__).parent)


# %% [markdown]
# `reset` starts a report: it deletes the sections, charts and report of an earlier run and writes the header, which
# ends with "Run started", the origin of the total wall-clock time.

# %%
#| export
def header_lines(run_started=None, note=""):
    "The header of the report: title, environment (git, hardware, software, code size) and 'Run started'."
    package = Path(nanochat_nb.__file__).parent
    parts = [("Git Information", git_info(package.parent)), ("Hardware", hardware_info()),
             ("Software", {"Python": platform.python_version(), "PyTorch": torch.__version__}),
             ("Bloat", code_size(package))]
    yield "# nanochat-nb training report\n\n"
    yield f"Generated: {datetime.now():%Y-%m-%d %H:%M:%S}\n\n## Environment\n\n"
    for title, facts in parts:
        yield f"### {title}\n"
        yield from (f"- {k}: {format_value(v)}\n" for k, v in facts.items())
        yield "\n"
    started = f"{run_started:%Y-%m-%d %H:%M:%S}" if run_started else "unknown (no `nanochat-nb report reset`)"
    yield f"Run started: {started}{note}\n\n---\n\n"


def reset(run_dir, run_started=None):
    "Start a report: delete report/'s sections, report.md and charts of an earlier run; write report/header.md."
    report = Path(run_dir) / "report"
    for path in [*report.glob("*.md"), *report.glob("*.png")]:
        path.unlink()
    return write_lines(report / "header.md", header_lines(run_started or datetime.now()))


# %% [markdown]
# ## The summary table
#
# The summary is nanochat's table: one row per metric, one column per stage, `-` where a stage has no number.
# CORE comes first (base models), then the chat benchmarks in alphabetical order, then our synthetic tasks and bits
# per byte when they ran, and ChatCORE last. Each cell is the latest accuracy of that task at that stage. The base
# model's bits per byte come from `eval bpb` when it ran, else from the checkpoint's last validation.

# %%
#| export
COLUMNS = ("base", "mid", "sft", "rl")
ROWS = [("CORE", "CORE", "core"), ("ARC-Challenge", "arc-challenge", "accuracy"), ("ARC-Easy", "arc-easy", "accuracy"),
        ("GSM8K", "gsm8k", "accuracy"), ("HumanEval", "humaneval", "accuracy"), ("MMLU", "mmlu", "accuracy")]
EXTRA_ROWS = [("Arithmetic", "arithmetic", "accuracy"), ("Identity", "identity", "accuracy"),
              ("SimpleSpelling", "simple-spelling", "accuracy"), ("SpellingBee", "spelling", "accuracy"),
              ("Val BPB", "val", "bpb")]


def summary_table(records, fallback=None):
    "nanochat's `| Metric | BASE | MID | SFT | RL |` table from eval records; `fallback`: {(stage, task, metric): v}."
    latest = {**(fallback or {}), **{k: r["value"] for k, r in latest_results(records).items()}}
    has = lambda task, metric: any((s, task, metric) in latest for s in COLUMNS)
    rows = ROWS + [r for r in EXTRA_ROWS if has(*r[1:])] + [("ChatCORE", "ChatCORE", "chatcore")]
    cell = lambda stage, task, metric: format_value(float(latest[stage, task, metric])) \
        if (stage, task, metric) in latest else "-"
    lines = ["| Metric | BASE | MID | SFT | RL |", "|---|---|---|---|---|"]
    return lines + [f"| {name} | " + " | ".join(cell(s, task, metric) for s in COLUMNS) + " |"
                    for name, task, metric in rows]


# %%
_records = [{"stage": "base", "task": "CORE", "metric": "core", "value": 0.2219},
            {"stage": "mid", "task": "arc-easy", "metric": "accuracy", "value": 0.30},
            {"stage": "mid", "task": "arc-easy", "metric": "accuracy", "value": 0.3561},  # re-run: replaces 0.30
            {"stage": "sft", "task": "gsm8k", "metric": "accuracy", "value": 0.0455},
            {"stage": "sft", "task": "ChatCORE", "metric": "chatcore", "value": 0.2734}]
_table = summary_table(_records, {("base", "val", "bpb"): 0.8123})
print("\n".join(_table))
test_eq(_table[3], "| ARC-Challenge | - | - | - | - |")
test_eq(_table[4], "| ARC-Easy | - | 0.3561 | - | - |")
test_eq(_table[-2:], ["| Val BPB | 0.8123 | - | - | - |", "| ChatCORE | - | - | 0.2734 | - |"])


# %% [markdown]
# The total wall-clock time is, as in nanochat, from "Run started" to the last section that is not RL (RL is
# optional and nanochat's speedrun leaves it out). With an hourly rate in the header it becomes a cost.

# %%
#| export
def _stamp(text, label):
    "The datetime after `label` in `text` (e.g. 'timestamp: 2025-10-13 09:30:00'), or None."
    m = re.search(rf"^{label}: (\d{{4}}-\d\d-\d\d \d\d:\d\d:\d\d)", text, re.M)
    return datetime.strptime(m.group(1), "%Y-%m-%d %H:%M:%S") if m else None


def wall_clock(header, sections):
    "(seconds from 'Run started' to the last non-RL section, or None; a 'XhYm' string) from the report's texts."
    start = _stamp(header, "Run started")
    ends = [t for key, text in sections.items() if not key.startswith("rl") and (t := _stamp(text, "timestamp"))]
    if start is None or not ends or max(ends) < start:
        return None, "unknown (no `report reset` before the stages, or sections older than the reset)"
    seconds = (max(ends) - start).total_seconds()
    text = f"{int(seconds // 3600)}h{int(seconds % 3600 // 60)}m"
    return seconds, text + (f" ({seconds:.0f} s)" if seconds < 600 else "")  # a CPU run: the seconds matter


# %% [markdown]
# ## The charts
#
# A report card says where a run ended; a chart says how it got there. For each training stage we draw six panels
# from its metrics file: the training loss against steps and against tokens, the validation number against both, the
# learning-rate multiplier, and the throughput (tokens per second, with MFU where recorded). Each figure is closed
# in pyplot as soon as it is made, so a notebook shows it once (when displayed) and a script keeps no figures
# around; it is saved as PNG through `atomic_write`.

# %%
#| export
def _figure(rows, cols, title, size=(4.2, 3.0)):
    "A figure with a grid of axes and a title, closed in pyplot (shown only when displayed or returned)."
    import matplotlib.pyplot as plt  # pyplot sets up the notebook's display of figures; headless, it draws with Agg
    fig, axes = plt.subplots(rows, cols, squeeze=False, figsize=(size[0] * cols, size[1] * rows), layout="constrained")
    plt.close(fig)  # else a notebook would show it twice, and a long run would keep every figure in memory
    fig.suptitle(title)
    return fig, axes


def _empty(ax, text):
    "An axis that says why it is empty."
    ax.text(0.5, 0.5, text, ha="center", va="center", transform=ax.transAxes, fontsize=9, color="0.4", wrap=True)
    ax.set_xticks([]); ax.set_yticks([])


def save_figure(fig, path):
    "Save a figure as PNG atomically; returns the path."
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=90))
    return path


# %%
#| export
STAGE_TITLES = {"base": "Base model training", "mid": "Midtraining", "sft": "Chat SFT", "rl": "Chat RL"}


def plot_training(records, meta, title):
    "Six panels of a training stage: loss and validation against steps and tokens, lr multiplier, throughput."
    train = [r for r in records if "loss" in r]
    vkey = "val_bpb" if any("val_bpb" in r for r in records) else "val_loss"
    val = [r for r in records if isinstance(r.get(vkey), (int, float))]
    per_step = tokens_per_step(meta)
    exact = {r["step"]: r["tokens_per_s"] * r["dt"] for r in train if "tokens_per_s" in r and r.get("dt")}
    tokens, total = {}, 0.0  # tokens seen before each step
    for s in range(max((r["step"] for r in records), default=-1) + 1):
        tokens[s], total = total, total + exact.get(s, per_step or 0)
    tokens[s + 1 if tokens else 0] = total
    known = bool(exact) or bool(per_step)
    fig, ax = _figure(2, 3, title)
    vname = "validation bits per byte" if vkey == "val_bpb" else "validation loss (nats/token)"
    for a, xs, name in ((ax[0, 0], "step", "step"), (ax[0, 1], "tokens", "tokens seen")):
        if not train or (xs == "tokens" and not known):
            _empty(a, "no training steps recorded" if not train else "tokens per step unknown (no checkpoint yet)")
            continue
        x = [r["step"] if xs == "step" else tokens[r["step"] + 1] for r in train]
        a.plot(x, [r["loss"] for r in train], lw=0.8, alpha=0.4, label="loss")
        a.plot(x, [r.get("smooth_loss", r["loss"]) for r in train], label="smoothed")
        a.set(xlabel=name, ylabel="train loss (nats/token)", title=f"training loss vs {name}")
        a.legend()
    for a, xs, name in ((ax[0, 2], "step", "step"), (ax[1, 0], "tokens", "tokens seen")):
        if not val or (xs == "tokens" and not known):
            _empty(a, f"no {vkey} recorded" if not val else "tokens per step unknown (no checkpoint yet)")
            continue
        a.plot([r["step"] if xs == "step" else tokens[r["step"]] for r in val], [r[vkey] for r in val], "o-", color="C2")
        a.set(xlabel=name, ylabel=vname, title=f"validation vs {name}")
    lr = [r for r in train if "lr_mult" in r]
    if lr:
        ax[1, 1].plot([r["step"] for r in lr], [r["lr_mult"] for r in lr], color="C3")
        ax[1, 1].set(xlabel="step", ylabel="multiplier of the base rates", title="learning-rate schedule")
    else:
        _empty(ax[1, 1], "no learning rate recorded")
    timed = [r for r in train[1:] if "tokens_per_s" in r or (per_step and r.get("dt"))]
    if timed:
        a = ax[1, 2]
        a.plot([r["step"] for r in timed], [r.get("tokens_per_s") or per_step / r["dt"] for r in timed], color="C4")
        a.set(xlabel="step", ylabel="tokens / s", title="throughput" + ("" if exact else " (rows x T, with padding)"))
        if any("mfu" in r for r in timed):
            twin = a.twinx()
            twin.plot([r["step"] for r in timed if "mfu" in r], [r["mfu"] for r in timed if "mfu" in r], color="C5",
                      lw=0.8, alpha=0.7)
            twin.set_ylabel("MFU %", color="C5")
    else:
        _empty(ax[1, 2], "no step times recorded")
    return fig


# %%
#| fig-alt: "Six panels of the base stage: loss and validation bits per byte against steps and tokens, the learning-rate multiplier, and tokens per second with MFU."
plot_training(read_metrics(run_dir, "base"), latest_meta(run_dir, "base")[0], "Base model training")


# %% [markdown]
# RL (chapter 13) logs a mean reward per step and pass@k on held-out problems every so often; records may carry
# either, both or neither, so the chart draws what each record has. The evaluation chart puts every stage's
# results side by side: accuracy per task (and CORE, ChatCORE) as grouped bars, bits per byte in a panel of its own.
# The tokenizer's chart is the distribution of its tokens' lengths in bytes.

# %%
#| export
def plot_rl(records, title="Chat RL"):
    "Reward and pass@k against steps, each drawn from the records that have it."
    fig, ax = _figure(1, 2, title)
    rewarded = [r for r in records if isinstance(r.get("reward"), (int, float))]
    if rewarded:
        ax[0, 0].plot([r["step"] for r in rewarded], [r["reward"] for r in rewarded], color="C1")
        ax[0, 0].set(xlabel="step", ylabel="mean reward", title="reward")
    else:
        _empty(ax[0, 0], "no reward recorded")
    ks = sorted({int(k[5:]) for r in records for k in r if re.fullmatch(r"pass@\d+", k)})
    for k in ks:
        have = [r for r in records if isinstance(r.get(f"pass@{k}"), (int, float))]
        ax[0, 1].plot([r["step"] for r in have], [r[f"pass@{k}"] for r in have], "o-", label=f"pass@{k}")
    if ks:
        ax[0, 1].set(xlabel="step", ylabel="fraction solved", title="pass@k")
        ax[0, 1].legend()
    else:
        _empty(ax[0, 1], "no pass@k recorded")
    return fig


def plot_eval(records, title="Evaluation"):
    "Grouped bars of the latest accuracy (CORE, ChatCORE) per task and stage, and bits per byte per stage."
    latest = latest_results(records)
    names = {"core": "CORE", "chatcore": "ChatCORE"}
    scores = {(s, names.get(m, t)): r["value"] for (s, t, m), r in latest.items() if m in ("accuracy", *names)}
    bpb = {s: r["value"] for (s, t, m), r in latest.items() if m == "bpb"}
    fig, ax = _figure(1, 2, title, size=(6.0, 3.4))
    stages = [s for s in COLUMNS if any(k[0] == s for k in scores)] + \
        sorted({k[0] for k in scores} - set(COLUMNS))
    tasks = sorted({t for _, t in scores})
    width = 0.8 / max(1, len(stages))
    for i, s in enumerate(stages):
        xs = [j + i * width for j, t in enumerate(tasks) if (s, t) in scores]
        ax[0, 0].bar(xs, [scores[s, t] for t in tasks if (s, t) in scores], width, label=s)
    if scores:
        ax[0, 0].set_xticks([j + width * (len(stages) - 1) / 2 for j in range(len(tasks))], tasks, rotation=30,
                            ha="right")
        ax[0, 0].set(xlabel="task", ylabel="accuracy (CORE, ChatCORE: centered)", title="results per task and stage",
                     ylim=(min(0.0, *scores.values()), max(1.0, *scores.values())))
        ax[0, 0].legend()
    else:
        _empty(ax[0, 0], "no task results in metrics/eval.jsonl")
    if bpb:
        ax[0, 1].bar(list(bpb), list(bpb.values()), color="C2")
        ax[0, 1].set(xlabel="stage", ylabel="bits per byte (lower is better)", title="validation bits per byte")
    else:
        _empty(ax[0, 1], "no bits per byte in metrics/eval.jsonl")
    return fig


def plot_tokenizer(token_bytes, title="Tokenizer"):
    "Histogram of the learned tokens' lengths in bytes."
    fig, ax = _figure(1, 1, title, size=(5.0, 3.2))
    sizes = token_bytes[token_bytes > 0]
    ax[0, 0].hist(sizes.tolist(), bins=range(1, int(sizes.max()) + 2), color="C0", align="left")
    ax[0, 0].set(xlabel="token length (bytes)", ylabel="number of tokens",
                 title=f"{int(token_bytes.numel()):,} tokens, mean {sizes.float().mean():.2f} bytes")
    return fig


# %%
#| fig-alt: "Grouped bars of each evaluation's result per stage, and a panel of bits per byte."
plot_eval(eval_results(run_dir))

# %% [markdown]
# `plot_stage` is what the speedrun notebook calls after each stage: it reads the files, draws, saves
# `report/<stage>.png` and returns the figure. A stage without files is one clear error naming what is missing.

# %%
#| export
CHARTS = ("tokenizer", "base", "mid", "sft", "rl", "eval")


def plot_stage(run_dir, stage, log=print):
    "The chart of `stage` (tokenizer, base, mid, sft, rl, eval) from the run's files; also saved as report/<stage>.png."
    run_dir = Path(run_dir)
    if stage not in CHARTS:
        raise ValueError(f"no chart for {stage!r}; fix: use one of {', '.join(CHARTS)}")
    if stage == "tokenizer":
        path = run_dir / "tokenizer" / "token_bytes.pt"
        if not path.exists():
            raise ValueError(f"{path} does not exist; fix: run `nanochat-nb tokenizer train --run-dir {run_dir}`")
        fig = plot_tokenizer(torch.load(path, weights_only=True))
    elif stage == "eval":
        records = eval_results(run_dir, log)
        if not records:
            raise ValueError(f"{run_dir / 'metrics' / 'eval.jsonl'} holds no results; fix: run `nanochat-nb eval` "
                             f"(bpb, core or chat) --run-dir {run_dir}")
        fig = plot_eval(records)
    else:
        records = read_metrics(run_dir, stage, log)  # a damaged line: MetricsError naming the file and line
        if not records:
            command = {"base": "pretrain", "mid": "midtrain"}.get(stage, stage)
            raise ValueError(f"{run_dir / 'metrics' / METRICS_FILES[stage]} is missing or empty; fix: run "
                             f"`nanochat-nb {command} --run-dir {run_dir}` first")
        fig = plot_rl(records) if stage == "rl" else \
            plot_training(records, latest_meta(run_dir, stage)[0], STAGE_TITLES[stage])
    save_figure(fig, run_dir / "report" / f"{stage}.png")
    return fig


# %%
#| fig-alt: "The midtraining stage's chart: loss and validation loss against steps and tokens, learning-rate multiplier, throughput."
plot_stage(run_dir, "mid")

# %%
assert (run_dir / "report" / "mid.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
test_fail(lambda: plot_stage(run_dir, "rl"), contains="rl.jsonl is missing or empty")


# %% [markdown]
# ## The whole report
#
# `generate` puts it together like nanochat's `report generate`: the header (written now if `reset` never ran, the
# run then dated by its first section), every section in order (a missing one whose stage left files is written
# first), then the summary: the code size,
# the table, the total wall-clock time and, on GPUs, its cost. With `charts=True` it also draws every chart that has
# data, and links them at the end.

# %%
#| export
def _summary_lines(run_dir, header, sections, charts, log):
    "The lines of the report's summary: code size, the metrics table, wall clock and cost, the charts."
    meta = latest_meta(run_dir, "base")[0]
    fallback = {("base", "val", "bpb"): meta["val_bpb"]} if meta and meta.get("val_bpb") is not None else {}
    yield "## Summary\n\n"
    yield from (line + "\n" for line in re.findall(r"^- (?:Characters|Lines|Files|Tokens \(approx\)): .*$",
                                                    header, re.M))
    yield "\n" + "\n".join(summary_table(eval_results(run_dir, log), fallback)) + "\n\n"
    seconds, text = wall_clock(header, sections)
    yield f"Total wall clock time: {text}\n"
    rate = re.search(r"^- Hourly Rate: \$([\d.]+)/hour", header, re.M)
    if rate and seconds is not None:
        yield f"Estimated cost: ${float(rate.group(1)) * seconds / 3600:.2f} (hourly rate x wall clock)\n"
    if charts:
        yield "\n## Charts\n\n" + "".join(f"![{c}]({c}.png)\n" for c in charts)


def generate(run_dir, charts=True, log=print):
    "Write report/report.md: header, the sections in order, the summary table and wall clock; charts with `charts`."
    run_dir, report = Path(run_dir), Path(run_dir) / "report"
    for key in SECTIONS:
        if not section_path(run_dir, key).exists():
            try:
                write_section(run_dir, key, log=log)
            except (ValueError, OSError) as e:  # one damaged stage must not cost the whole report
                log(f"report: section {SECTIONS[key]!r} not written: {e}")
    sections = {k: p.read_text(encoding="utf-8") for k in SECTIONS if (p := section_path(run_dir, k)).exists()}
    if not (report / "header.md").exists():  # no `reset`: date the run by its first section
        first = min(filter(None, (_stamp(t, "timestamp") for t in sections.values())), default=None)
        write_lines(report / "header.md", header_lines(first, " (estimated: the end of the first stage; no `report "
                                                              "reset` at the start)" if first else ""))
    header = (report / "header.md").read_text(encoding="utf-8")
    drawn = []
    for stage in CHARTS if charts else ():
        try:
            plot_stage(run_dir, stage, log)
            drawn.append(stage)
        except MetricsError as e:
            log(f"report: chart {stage!r} not drawn: {e}")
        except ValueError:
            pass  # that stage has not run
    lines = [header, *sections.values(), *_summary_lines(run_dir, header, sections, drawn, log)]
    return write_lines(report / "report.md", iter(lines))


# %% [markdown]
# Our small run, from the header to the summary, as the reader of a run directory will see it:

# %%
reset(run_dir, started)  # a fresh header; the sections are written again, as each stage's command would
for key in SECTIONS:
    write_section(run_dir, key)
path = generate(run_dir)
display(Markdown(path.read_text().split("## Charts")[0]))  # the chart links are relative to report/: shown below

# %%
text = path.read_text()
assert "| Metric | BASE | MID | SFT | RL |" in text and "| Arithmetic | - |" in text
assert text.index("## Tokenizer training") < text.index("## Base model training") < text.index("## Chat SFT")
print(sorted(p.name for p in (run_dir / "report").iterdir()))

# %% [markdown]
# The charts of the run, as `report.md` links them:

# %%
#| fig-alt: "The charts of the base stage, the SFT stage and the evaluations, one after another."
for stage in ("base", "sft", "eval"):
    display(plot_stage(run_dir, stage))

# %% [markdown]
# ## From the command line
#
# The `nanochat-nb` command writes each stage's section as soon as the stage succeeds (on rank 0 only under
# torchrun), so a report is always up to date with what finished. Two commands frame a run:
#
# ```sh
# nanochat-nb report reset --run-dir runs/speedrun      # first: the header, "Run started"
# ...                                                   # the stages, each adding its section
# nanochat-nb report generate --run-dir runs/speedrun   # last: report/report.md and the charts
# nanochat-nb report section mid --run-dir runs/speedrun  # (re)write one section from the files
# ```

# %% [markdown]
# ## At scale
#
# Nothing in the report depends on the size of the run: it reads JSON files, and the model's parameter count comes
# from a model on the `meta` device. For comparison, the summary of nanochat's d20 card (its README: 561M
# parameters, 11.2B tokens, "Total wall clock time: 3h51m", about $100 at $24/hour; RL not in the wall clock), which
# the same rows here fill in when `eval core` and `eval chat` run on an 8×H100 box:
#
# | Metric | BASE | MID | SFT | RL |
# |---|---|---|---|---|
# | CORE | 0.2219 | - | - | - |
# | ARC-Challenge | - | 0.2875 | 0.2807 | - |
# | ARC-Easy | - | 0.3561 | 0.3876 | - |
# | GSM8K | - | 0.0250 | 0.0455 | 0.0758 |
# | HumanEval | - | 0.0671 | 0.0854 | - |
# | MMLU | - | 0.3111 | 0.3151 | - |
# | ChatCORE | - | 0.0730 | 0.0884 | - |
#
# Its bloat lines read 333,989 characters, 8,304 lines, 44 files; its pretraining ran at about 1.08M tokens/s and
# 47.5% MFU (about 487 ms per step).

# %%
from nanochat_nb.common import at_scale_table
display(Markdown(at_scale_table(["whole speedrun", "cost", "parameters"])))

# %% [markdown]
# ## Summary and exercises
#
# The report card is built from files alone: a section per stage from its checkpoint meta and metrics, written
# atomically and dated by its stage's last output; a header with the code, the machine and its price; the summary
# table `| Metric | BASE | MID | SFT | RL |`; and charts of every stage as PNGs beside it. A crash in one stage leaves
# the other sections intact, and any section can be written after the fact.
#
# 1. Add the peak GPU memory to the base training section (it needs a new field in the checkpoint's meta).
# 2. Plot the validation bits per byte of two runs on one chart, to compare a change against a baseline.
# 3. Add a "Cost" column: each stage's training time times the hourly rate.
