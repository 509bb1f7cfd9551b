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
# # The speedrun
# > The whole pipeline in one notebook: tokenizer, data, pretraining, midtraining, SFT, RL, their evaluations and the
# > report card, ending in a chat with the model you trained.

# %% [markdown]
# The chapters built each stage on its own. This notebook runs them all, in nanochat's order, as the `nanochat-nb`
# command line would: every stage is a separate process (under `torchrun` for the training stages when there is more
# than one process), its output streams into the cell below it, and a failure stops the notebook at that stage with
# its error. Everything lands in one run directory; a second run skips what is finished, and a training stage that was
# interrupted resumes from its last checkpoint. It is meant to be run with papermill:
#
# ```sh
# make speedrun      # papermill speedrun.ipynb runs/speedrun/speedrun.ipynb -p run_dir runs/speedrun
# papermill speedrun.ipynb out.ipynb -p preset micro -p nproc 2                 # training under torchrun, 2 processes
# papermill speedrun.ipynb out.ipynb -p preset d20 -p nproc 8 -p data fineweb:240   # nanochat's $100 run
# ```
#
# On 2 CPU cores the `micro` preset takes a few minutes. On 8×H100, `d20` is nanochat's speedrun (about 4 hours).

# %% [markdown]
# ## Parameters
#
# papermill replaces this cell's values (`-p name value`); every one is checked before any work starts.
#
# - `preset`: `micro` (a CPU in minutes), `d12`, `d20`, `d26` (GPU boxes: nanochat's depths and batch sizes).
# - `nproc`: processes per node; above 1 the training stages run under `torchrun` (gloo on a CPU, NCCL on GPUs).
# - `nnodes`, `node_rank`, `rdzv_endpoint`: more than one machine. Each node runs this notebook with its own
#   `node_rank`; `rdzv_endpoint` is `host:port` of node 0 (c10d rendezvous; the training stages use that port and
#   the three after it). `run_dir` must then be on a filesystem
#   that every node sees: node 0 prepares, evaluates and writes the report, the others only join the training stages.
# - `run_dir`: where everything goes. `data`: `default` (the Python standard library's sources, offline), a folder of
#   your own text files, or `fineweb:N` (N FineWeb-edu shards, needs the network).
# - `stages`: `all`, or some of the stage names below (a list or a comma-separated string). `force`: re-run the
#   chosen stages even when their results are on disk (training stages then start over with `--overwrite`).
# - `overrides`: extra command-line flags per stage, e.g. `{"pretrain": "--num-iterations 20"}` (the tests use it
#   for a run of a few steps per stage).

# %% tags=["parameters"]
preset = "micro"
nproc = 1
nnodes = 1
node_rank = 0
rdzv_endpoint = ""
run_dir = "runs/speedrun"
data = "default"
stages = "all"
force = False
overrides = {}

# %%
import importlib.util, json, os, re, shlex, socket, subprocess, sys, time
from pathlib import Path

from IPython.display import Image, Markdown, display

from nanochat_nb.checkpoint import checkpoint_dir, latest_step

# %% [markdown]
# ## What each preset runs
#
# The stage names, in nanochat's order (`REFERENCE` §1): the tokenizer (trained and evaluated), the data, base
# pretraining, its evaluation (bits per byte, and CORE when the DCLM bundle can be had), midtraining, SFT and RL each
# followed by the chat evaluation, and the report card. A preset picks the tokenizer's size, each training stage's
# own preset, and how much of each evaluation to run: on a CPU only the synthetic tasks (arithmetic and spelling),
# which need no download; on a GPU box nanochat's tasks. Held-out arithmetic (256 problems, greedy) is scored by each
# training stage at its end, and by the base evaluation for the base model, so the report's table compares the four.

# %%
STAGES = ["tokenizer", "data", "pretrain", "base_eval", "midtrain", "mid_eval", "sft", "sft_eval", "rl", "rl_eval",
          "report"]
TRAINING = {"pretrain": "base", "midtrain": "mid", "sft": "sft", "rl": "rl"}  # stage name -> checkpoint stage
GPU_TASKS = "arc-easy,arc-challenge,mmlu,gsm8k,humaneval,spelling"
PRESETS = {
    "micro": dict(vocab_size=4096, max_chars=None, train_preset="micro", core_max_per_task=100,
                  chat=["--tasks", "spelling,simple-spelling", "--max-problems", "32", "--max-tokens", "128"],
                  rl_chat=["--tasks", "spelling,simple-spelling", "--max-problems", "32", "--max-tokens", "128"]),
    **{name: dict(vocab_size=65536, max_chars=2_000_000_000, train_preset=name, core_max_per_task=-1,
                  chat=["--tasks", GPU_TASKS], rl_chat=["--tasks", "gsm8k"])
       for name in ("d12", "d20", "d26")},
}
# the training stages score these themselves at their end; the base model gets the same test
ARITHMETIC = ["--tasks", "arithmetic", "--max-problems", "256", "--max-tokens", "160"]
# midtraining and SFT have no d12 preset of their own: d12 takes d20's (the same batch, a smaller model)
CHAT_PRESET = {"micro": "micro", "d12": "d20", "d20": "d20", "d26": "d26"}


# %% [markdown]
# ## Checking the parameters
#
# A typo found after an hour of pretraining is an hour lost, so every parameter is checked first, and a bad one
# stops the notebook with one line that names it and says how to fix it.

# %%
def _int(name, value, low, high=None):
    if isinstance(value, bool) or not isinstance(value, int) or value < low or (high is not None and value > high):
        upper = f" and at most {high}" if high is not None else ""
        raise ValueError(f"parameter {name}={value!r}: must be an integer of at least {low}{upper} "
                         f"(fix: -p {name} {low})")
    return value


def check_parameters(preset, nproc, nnodes, node_rank, rdzv_endpoint, run_dir, data, stages, force, overrides):
    "Every parameter checked before any work: the settings of the run, or a ValueError naming the bad one."
    if preset not in PRESETS:
        raise ValueError(f"parameter preset={preset!r}: unknown preset (fix: -p preset one of {', '.join(PRESETS)})")
    _int("nproc", nproc, 1), _int("nnodes", nnodes, 1), _int("node_rank", node_rank, 0, nnodes - 1)
    endpoint = re.fullmatch(r"[\w.\-]+:(\d{1,5})", str(rdzv_endpoint))
    if nnodes > 1 and not (endpoint and 0 < int(endpoint[1]) <= 65535 - 3):
        raise ValueError(f"parameter rdzv_endpoint={rdzv_endpoint!r}: with nnodes={nnodes} it must be host:port of "
                         "node 0 (fix: -p rdzv_endpoint 10.0.0.1:29500)")
    if not isinstance(run_dir, str) or not run_dir.strip() or Path(run_dir).is_file():
        raise ValueError(f"parameter run_dir={run_dir!r}: must name a directory (fix: -p run_dir runs/speedrun)")
    fineweb = re.fullmatch(r"fineweb:(\d+)", str(data))
    if not (data == "default" or (fineweb and int(fineweb[1]) > 0) or (isinstance(data, str) and Path(data).is_dir())):
        raise ValueError(f"parameter data={data!r}: not 'default', 'fineweb:N' (N > 0) or an existing folder "
                         "(fix: -p data default)")
    chosen = STAGES if stages in ("all", None) else \
        [s.strip() for s in (stages.split(",") if isinstance(stages, str) else stages) if s.strip()]
    if unknown := [s for s in chosen if s not in STAGES]:
        raise ValueError(f"parameter stages: unknown stage(s) {unknown} (fix: 'all' or some of {','.join(STAGES)})")
    if not chosen:
        raise ValueError("parameter stages names no stage (fix: -p stages all)")
    if not isinstance(force, bool):
        raise ValueError(f"parameter force={force!r}: must be True or False (fix: -p force True)")
    if not isinstance(overrides, dict) or [k for k in overrides if k not in STAGES + ["core"]]:
        raise ValueError(f"parameter overrides={overrides!r}: must map stage names ({','.join(STAGES)}, or core) "
                         "to extra flags (fix: -y '{overrides: {pretrain: --num-iterations 20}}')")
    extra = {k: shlex.split(v) if isinstance(v, str) else [str(a) for a in v] for k, v in overrides.items()}
    return dict(preset=preset, nproc=nproc, nnodes=nnodes, node_rank=node_rank, rdzv_endpoint=rdzv_endpoint,
                run_dir=Path(run_dir).resolve(), data=data, stages=[s for s in STAGES if s in chosen], force=force,
                overrides=extra, **PRESETS[preset])


run = check_parameters(preset, nproc, nnodes, node_rank, rdzv_endpoint, run_dir, data, stages, force, overrides)
run_dir = run["run_dir"]
print(f"run directory {run_dir}\nstages {', '.join(run['stages'])}")


# %% [markdown]
# ## Running a stage
#
# A stage is one or more `nanochat-nb` commands. Each is a child process whose output is copied into the cell line
# by line as it comes, so a long pretraining shows its progress; a non-zero exit raises, which stops the notebook
# there (papermill marks the failing cell and leaves the later ones unrun). With more than one process the training
# stages go through `torchrun`: `--standalone` on one node, a c10d rendezvous on `rdzv_endpoint` across nodes.

# %%
def launcher(stage=None):
    "The command that starts one `nanochat-nb` process: python itself, or torchrun for a training stage."
    if stage not in TRAINING or run["nproc"] * run["nnodes"] == 1:
        return [sys.executable]
    torchrun = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={run['nproc']}"]
    if run["nnodes"] == 1:
        return [*torchrun, "--standalone"]
    # each training stage meets on its own port (rdzv port + 0..3), so that a node that finishes a stage early can
    # never join the previous stage's closing rendezvous; node 0 may still be evaluating when the others arrive,
    # so they wait for it up to an hour
    host, port = run["rdzv_endpoint"].rsplit(":", 1)
    return [*torchrun, f"--nnodes={run['nnodes']}", f"--node_rank={run['node_rank']}", "--rdzv_backend=c10d",
            f"--rdzv_endpoint={host}:{int(port) + list(TRAINING).index(stage)}", f"--rdzv_id=speedrun-{stage}",
            "--rdzv_conf=join_timeout=3600"]


class StageFailed(RuntimeError):
    "A stage's command exited with an error; the message holds the command and the end of its output."


def stream(args, distributed=False):
    "Run `nanochat-nb ARGS` (under torchrun if `distributed`), printing its output as it comes; raise if it fails."
    args, start = [str(a) for a in args], launcher(args[0] if distributed else None)
    argv = [*start, "-m", "nanochat_nb.cli", *args]
    shown = ["nanochat-nb", *args] if start == [sys.executable] else ["torchrun", *start[3:], "-m", "nanochat_nb.cli",
                                                                       *args]
    print("$", shlex.join(shown), flush=True)
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    last, error = "(no output)", None
    with subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env) as proc:
        for line in proc.stdout:
            print(line, end="", flush=True)
            if line.strip() and not line.startswith("="):
                last = line.strip()
            if error is None and re.match(r"nanochat-nb [\w ]+: error: ", line):
                error = line.strip()  # the command's own message (under torchrun, the first rank's to fail)
    if proc.returncode:
        last = error or last
        command = " ".join(a for a in args[:2] if not a.startswith("-"))
        raise StageFailed(f"`nanochat-nb {command}` exited with status {proc.returncode}: {last}")


# %% [markdown]
# ## Is a stage done?
#
# The run directory is the only record: a stage is finished when its results are on disk. The tokenizer is its files;
# the data its shards; a training stage is finished when its latest checkpoint is at the last step it was training
# toward; an evaluation when `metrics/eval.jsonl` holds its results for the latest checkpoint of its stage.

# %%
def training_done(ckpt_stage):
    "Whether a training stage's latest checkpoint is at the step it was training toward."
    ckpt = checkpoint_dir(run_dir, ckpt_stage)
    step = latest_step(ckpt)
    if step is None:
        return False
    meta = json.loads((ckpt / f"meta_{step:06d}.json").read_text())
    return step >= meta.get("num_iterations", step + 1)


def eval_done(ckpt_stage, tasks):
    "Whether metrics/eval.jsonl holds a result for each of `tasks` on the stage's latest checkpoint."
    path, step = run_dir / "metrics" / "eval.jsonl", latest_step(checkpoint_dir(run_dir, ckpt_stage))
    if step is None or not path.is_file():
        return False
    have = set()
    for line in path.read_text().splitlines():
        try:
            r = json.loads(line)
        except json.JSONDecodeError:
            continue  # a line cut short by a crash
        if r.get("stage") == ckpt_stage and r.get("step") == step:
            have.add(r.get("task"))
    return set(tasks) <= have


def data_done():
    "Whether the run's shards are complete: two or more (train + val), or N train shards for fineweb:N."
    shards = sorted((run_dir / "data").glob("shard_*.parquet"))
    fineweb = re.fullmatch(r"fineweb:(\d+)", run["data"])
    return len(shards) >= (int(fineweb[1]) + 1 if fineweb else 2) and not (run_dir / "data.tmp").exists()


def report_done():
    "Whether report/report.md is newer than every metrics file."
    card, metrics = run_dir / "report" / "report.md", list((run_dir / "metrics").glob("*.jsonl"))
    return card.is_file() and all(card.stat().st_mtime >= m.stat().st_mtime for m in metrics)


# %% [markdown]
# Some parts of the pipeline depend on what this machine has. CORE needs the DCLM evaluation bundle (about 162 MB),
# which `nanochat-nb eval core` downloads once into the run's `cache/`: it runs when the bundle is already there or
# its server can be reached, and otherwise the notebook says that it skipped it (an offline laptop gets bits per byte
# only; copy the bundle in, or pass `overrides={"core": "--bundle-url file:///path/eval_bundle.zip"}`).

# %%
def core_available():
    "Whether CORE can run: the bundle is in the run's cache, a local zip is given, or its server answers."
    given = " ".join(run["overrides"].get("core", []))
    if (run_dir / "cache" / "eval_bundle" / "core.yaml").is_file() or "file://" in given:
        return True
    try:
        socket.create_connection(("karpathy-public.s3.us-west-2.amazonaws.com", 443), timeout=3).close()
        return True
    except OSError:
        return False


# %% [markdown]
# ## The plan of each stage
#
# `plan(stage)` lists a stage's commands, each with whether its result is already on disk. Training stages always
# pass `--resume` (or `--overwrite` when forced): a stage that was killed half-way continues from its last checkpoint.
# Flags from `overrides` go to the stage's command after the preset's own, so they win (for `base_eval`, to bits per
# byte; CORE takes those under the key `core`).

# %%
def plan(stage):
    "The commands of `stage` as (arguments, distributed, done) triples, or a string: why the stage cannot run here."
    R, extra, chat_preset = ["--run-dir", run_dir], run["overrides"].get(stage, []), CHAT_PRESET[run["preset"]]
    if stage == "tokenizer":
        chars = ["--max-chars", run["max_chars"]] if run["max_chars"] else []
        done = (run_dir / "tokenizer" / "token_bytes.pt").is_file()
        return [(["tokenizer", "train", "--vocab-size", run["vocab_size"], *chars, *R, *extra], False, done),
                (["tokenizer", "eval", *R], False, done)]
    if stage == "data":
        fineweb = re.fullmatch(r"fineweb:(\d+)", run["data"])
        source = ["download", "--shards", fineweb[1]] if fineweb else \
            ["prepare"] + (["--source", Path(run["data"]).resolve()] if run["data"] != "default" else [])
        return [(["data", *source, *R, *extra], False, data_done())]
    if stage in TRAINING:
        preset = run["train_preset"] if stage == "pretrain" else chat_preset
        again = "--overwrite" if run["force"] else "--resume"
        return [([stage, "--preset", preset, again, *R, *extra], True, training_done(TRAINING[stage]))]
    if stage == "base_eval":
        steps = [(["eval", "bpb", "--stage", "base", *R, *extra], False, eval_done("base", ["val"])),
                 # the held-out arithmetic that mid, SFT and RL each score at their end (256 problems, greedy)
                 (["eval", "chat", "--stage", "base", *ARITHMETIC, *R], False, eval_done("base", ["arithmetic"]))]
        if core_available():
            steps.append((["eval", "core", "--stage", "base", "--max-per-task", run["core_max_per_task"], *R,
                           *run["overrides"].get("core", [])], False, eval_done("base", ["CORE"])))
        else:
            print("note: CORE skipped: the DCLM eval bundle is not in the run's cache/ and its server cannot be "
                  "reached from here (offline). Bits per byte only.")
        return steps
    if stage.endswith("_eval"):
        ckpt = stage.removesuffix("_eval")
        if latest_step(checkpoint_dir(run_dir, ckpt)) is None:
            return f"no {ckpt} checkpoint to evaluate (its training stage did not run): {stage} skipped"
        flags = [*(run["rl_chat"] if ckpt == "rl" else run["chat"]), *extra]
        tasks = flags[len(flags) - 1 - flags[::-1].index("--tasks") + 1]  # the last --tasks wins, as in argparse
        return [(["eval", "chat", "--stage", ckpt, *flags, *R], False, eval_done(ckpt, tasks.split(",")))]
    if stage == "report":
        return [(["report", "generate", *R, *extra], False, report_done())]
    raise ValueError(f"unknown stage {stage!r}")


# %% [markdown]
# After each stage the notebook shows what the report card will say about it: its section (`report/<title>.md`,
# written by the stage's command) and its chart (chapter 14's `plot_stage`, also saved as `report/<stage>.png`).

# %%
SHOW = {"tokenizer": (["tokenizer", "tokenizer-eval"], "tokenizer"), "pretrain": (["base"], "base"),
        "base_eval": (["base-loss", "base-eval"], "eval"), "midtrain": (["mid"], "mid"),
        "mid_eval": (["mid-eval"], "eval"), "sft": (["sft"], "sft"), "sft_eval": (["sft-eval"], "eval"),
        "rl": (["rl"], "rl"), "rl_eval": (["rl-eval"], "eval")}
report = importlib.import_module("nanochat_nb.report") if importlib.util.find_spec("nanochat_nb.report") else None


def show_stage(stage):
    "Display the report sections and the chart of a stage (when chapter 14 is installed and the stage left data)."
    if report is None or stage not in SHOW:
        return
    sections, chart = SHOW[stage]
    for key in sections:
        path = report.section_path(run_dir, key)
        path = path if path.is_file() else report.write_section(run_dir, key)
        if path is not None and Path(path).is_file():
            display(Markdown(Path(path).read_text()))
    try:
        report.plot_stage(run_dir, chart)  # saves report/<chart>.png, shown as the image itself (any backend)
        display(Image(filename=str(run_dir / "report" / f"{chart}.png")))
    except ValueError as e:  # no metrics for this chart yet: say so, it is not an error of the run
        print(f"(no chart: {e})")


# %% [markdown]
# `run_stage` puts it together: skip what is done (unless forced), run the rest, time it, show the result. Nodes other
# than node 0 take part only in the training stages; node 0 does everything else on the shared run directory.

# %%
timings = {}


def run_stage(stage):
    "Run one stage of the speedrun (or say why not), then show its section and chart."
    if stage not in run["stages"]:
        return print(f"{stage}: not in stages={run['stages']}, left out")
    if run["node_rank"] > 0 and stage not in TRAINING:
        return print(f"{stage}: done by node 0 (this is node {run['node_rank']})")
    steps = plan(stage)
    if isinstance(steps, str):
        return print(f"note: {steps}")
    todo = [s for s in steps if run["force"] or not s[2]]
    if not todo:
        print(f"{stage}: already done in {run_dir}, skipped (force=True re-runs it)")
    t0 = time.perf_counter()
    for args, distributed, _ in todo:
        stream(args, distributed)
    if todo:
        timings[stage] = time.perf_counter() - t0
        print(f"{stage}: {timings[stage]:.1f}s")
    if run["node_rank"] == 0:
        show_stage(stage)


# %% [markdown]
# ## The run
#
# A new run directory starts with the report card's header (git commit, hardware, software, "Run started"), as
# nanochat's `report reset` does; a run that continues keeps the header and the sections it has.

# %%
fresh_report = run["force"] and run["stages"] == STAGES or not (run_dir / "report" / "header.md").is_file()
if run["node_rank"] == 0 and fresh_report:
    stream(["report", "reset", "--run-dir", run_dir])
speedrun_t0 = time.perf_counter()

# %% [markdown]
# ### 1. Tokenizer: train, then evaluate

# %%
run_stage("tokenizer")

# %% [markdown]
# ### 2. Data: the shards to pretrain on

# %%
run_stage("data")

# %% [markdown]
# ### 3. Base pretraining

# %%
run_stage("pretrain")

# %% [markdown]
# ### 4. Base evaluation: bits per byte and CORE

# %%
run_stage("base_eval")

# %% [markdown]
# ### 5. Midtraining, then the chat evaluation

# %%
run_stage("midtrain")

# %%
run_stage("mid_eval")

# %% [markdown]
# ### 6. Supervised fine-tuning, then the chat evaluation

# %%
run_stage("sft")

# %%
run_stage("sft_eval")

# %% [markdown]
# ### 7. Reinforcement learning, then the chat evaluation

# %%
run_stage("rl")

# %%
run_stage("rl_eval")

# %% [markdown]
# ### 8. The report card

# %%
run_stage("report")
card = run_dir / "report" / "report.md"
if run["node_rank"] == 0 and card.is_file():
    display(Markdown(card.read_text()))
print(f"this session: {time.perf_counter() - speedrun_t0:.1f}s;",
      ", ".join(f"{k} {v:.1f}s" for k, v in timings.items()) or "every stage was already done")

# %% [markdown]
# ## Chat with it
#
# The last model trained (RL if it ran, else SFT, ...), in the chat widget of chapter 08: type, send, regenerate,
# or switch stages to compare what each one learned.

# %%
from nanochat_nb.chat import ChatWidget, trained_stages

if run["node_rank"] == 0 and trained_stages(run_dir):
    widget = ChatWidget.from_run(run_dir)
    display(widget)

# %% [markdown]
# ## At scale
#
# - `d20` on 8×H100 is nanochat's "$100 ChatGPT": `-p preset d20 -p nproc 8 -p data fineweb:240`, about four hours
#   (tokenizer a minute, pretraining about three hours, mid and SFT minutes each; RL, optional in nanochat, about
#   1.5 hours more). `d26` needs about 12 hours on the same box.
# - Several machines: run this notebook on each with the same `nnodes` and `rdzv_endpoint` and its own `node_rank`,
#   `run_dir` on a shared filesystem. Node 0 prepares the tokenizer and data while the others wait in the rendezvous.
# - An interrupted run (a lost spot instance, a full disk) is continued by running the same command again.
#
# ## Summary
#
# One notebook, eleven stages, each a `nanochat-nb` process: its output in the notebook, its results on disk, its
# section in the report card. Run it again and it continues where it stopped.
#
# **Exercises**
#
# 1. Run `papermill speedrun.ipynb out.ipynb -p preset micro -p nproc 2` and compare the report card with a
#    one-process run: which numbers differ, and why are they close?
# 2. Interrupt `make speedrun` during pretraining (Ctrl-C), run it again, and find in the output where it resumed.
# 3. Point `data` at a folder of your own text files: which stages re-run when you change it, and which do you have
#    to force?
