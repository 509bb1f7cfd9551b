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
# # The command line
# > `nanochat-nb`: every stage of the pipeline as a subcommand.

# %% [markdown]
# The chapters build the pipeline one piece at a time; this one puts a command line on top of them, so that a run
# can go from a terminal (or from `torchrun`, or from `make speedrun`) without a notebook. Nothing imports this
# module: it sits on top of everything, and each subcommand's handler imports the chapter it runs only when it
# runs.
#
# Every artefact of a run lives under one **run directory** (`--run-dir`, default `$NANOCHAT_NB_RUN_DIR` or
# `~/.cache/nanochat_nb/default`):
#
# | path | written by |
# |---|---|
# | `tokenizer/` | `nanochat-nb tokenizer train` |
# | `data/` | `nanochat-nb data prepare` or `data download` |
# | `checkpoints/<stage>/` | `nanochat-nb pretrain` (and later stages) |
# | `metrics/<stage>.jsonl` | every training stage, one line per step |
# | `metrics/eval.jsonl` | `nanochat-nb eval`, one line per result |
# | `cache/eval_bundle/` | `nanochat-nb eval core`, downloaded once |

# %%
#| default_exp cli

# %%
#| export
import argparse, os, sys
from dataclasses import fields
from pathlib import Path


# %%
#| export
def default_run_dir():
    "The run directory when `--run-dir` is not given."
    return Path(os.environ.get("NANOCHAT_NB_RUN_DIR", Path.home() / ".cache" / "nanochat_nb" / "default"))


# %% [markdown]
# ## The subcommands
#
# Each handler takes the parsed arguments and calls the chapter's own function: the command line adds no logic of
# its own, so what the book shows is what the command runs. The handlers come first, one family to a cell; the
# parser that picks among them comes after.
#
# A stage that writes into the run directory first takes the directory's lock for the part it writes (chapter 05),
# so two commands started by mistake on one run cannot interleave their files, and a crashed run's stale temporary
# files are swept before the new one starts.

# %%
#| export
def _holding(args, part):
    "Check the run directory, then hold `part` of it for writing (one writer at a time; stale temp files swept)."
    from nanochat_nb.checkpoint import RunLock, check_run_dir
    return RunLock(check_run_dir(args.run_dir), writes=[part], log=print)


# %% [markdown]
# The tokenizer's handlers: train one (chapter 01), measure it, and convert a pickled tokenizer (nanochat's own
# format) to the text files this book writes. Each prints what it did, so a terminal run shows its result.

# %%
#| export
def _tokenizer_train(args):
    from nanochat_nb.tokenizer import train_tokenizer
    with _holding(args, "tokenizer"):
        stats = train_tokenizer(args.run_dir, vocab_size=args.vocab_size, max_chars=args.max_chars)
    for k, v in stats.items():
        print(f"{k}: {v}")
    return stats


def _tokenizer_eval(args):
    from nanochat_nb.tokenizer import eval_report
    text = eval_report(args.run_dir)
    print(text)
    return text


def _tokenizer_convert(args):
    from nanochat_nb.tokenizer import Tokenizer
    directory = Path(args.run_dir) / "tokenizer"
    with _holding(args, "tokenizer"):
        tokenizer = Tokenizer.load(directory, allow_pickle=True)  # asking for the conversion is the opt-in
        tokenizer.save(directory)
    print(f"converted {directory / 'tokenizer.pkl'} to tokenizer.tiktoken + tokenizer.json "
          f"(vocab_size {tokenizer.vocab_size}, fingerprint {tokenizer.fingerprint}); the pickle can be deleted")


# %% [markdown]
# The data handlers pack a local corpus into shards, or fetch FineWeb-edu's (chapter 04); both hold `data/` while
# they write.

# %%
#| export
def _data_prepare(args):
    from nanochat_nb.data import prepare_data
    with _holding(args, "data"):
        stats = prepare_data(args.run_dir, source=args.source)
    for k, v in stats.items():
        print(f"{k}: {v}")


def _data_download(args):
    from nanochat_nb.data import FINEWEB_BASE_URL, download_data
    with _holding(args, "data"):
        stats = download_data(args.run_dir, args.shards, base_url=args.base_url or FINEWEB_BASE_URL,
                              workers=args.workers, verbose=True)
    for k, v in stats.items():
        print(f"{k}: {v}")


# %% [markdown]
# The training stages share one shape: the options the user set (those not None) override the preset's settings,
# the chapter's training function runs, and its summary is printed on one line. Midtraining and SFT share a config
# class and differ only in their module, so one handler serves both.

# %%
#| export
def _pretrain(args):
    from nanochat_nb.pretrain import TrainConfig, make_config, pretrain
    overrides = {f.name: getattr(args, f.name) for f in fields(TrainConfig) if getattr(args, f.name) is not None}
    summary = pretrain(args.run_dir, make_config(args.preset, **overrides), resume=args.resume,
                       overwrite=args.overwrite, allow_data_change=args.allow_data_change,
                       allow_tokenizer_change=args.allow_tokenizer_change)
    print("summary: " + ", ".join(f"{k}={v}" for k, v in summary.items()))


def _chat_stage(args):
    "midtrain or sft: the stage's presets and settings from chapters 11 and 12."
    import importlib
    from nanochat_nb.midtrain import ChatTrainConfig, make_chat_config
    module = importlib.import_module(f"nanochat_nb.{args.command}")
    overrides = {f.name: getattr(args, f.name) for f in fields(ChatTrainConfig) if getattr(args, f.name) is not None}
    train = getattr(module, args.command)
    summary = train(args.run_dir, make_chat_config(module.PRESETS, args.preset, **overrides), resume=args.resume,
                    overwrite=args.overwrite)
    print("summary: " + ", ".join(f"{k}={v}" for k, v in summary.items()))


def _rl(args):
    "rl: chapter 13's presets and settings."
    from nanochat_nb.rl import RLConfig, make_rl_config, rl
    overrides = {f.name: getattr(args, f.name) for f in fields(RLConfig) if getattr(args, f.name) is not None}
    summary = rl(args.run_dir, make_rl_config(args.preset, **overrides), resume=args.resume, overwrite=args.overwrite)
    print("summary: " + ", ".join(f"{k}={v}" for k, v in summary.items()))


# %% [markdown]
# Talking to a model, in the terminal (chapter 08) or over HTTP (chapter 08b), only reads the run directory, so
# these two handlers take no lock.

# %%
#| export
def _chat(args):
    from nanochat_nb.chat import chat_cli
    chat_cli(args.run_dir, args.stage, args.step, args.prompt, args.temperature, args.top_k, args.max_tokens,
             args.device)


def _serve(args):
    from nanochat_nb.serve import serve
    serve(args.model or args.run_dir, args.stage, args.step, args.host, args.port, args.workers, args.device,
          args.seed)


# %% [markdown]
# `eval` passes on only the options its action defines (and the user set), so one handler serves `bpb`, `core` and
# `chat`; `report` resets, writes one section or assembles the report card (chapter 14).

# %%
#| export
def _eval(args):
    from nanochat_nb.eval import run_eval
    options = ("tasks", "max_problems", "num_samples", "max_tokens", "temperature", "top_k", "batch_size",
               "data_root", "max_per_task", "bundle_url", "bundle_sha256", "eval_tokens")
    return run_eval(args.action, args.run_dir, args.stage, args.step, args.device,
                    **{k: getattr(args, k) for k in options if getattr(args, k, None) is not None})


def _report(args):
    from nanochat_nb import report
    if args.action == "section":
        path = report.write_section(args.run_dir, args.section)
        print(path or f"section {args.section!r}: its stage left nothing in {args.run_dir} yet; nothing written")
    else:
        print(report.reset(args.run_dir) if args.action == "reset" else report.generate(args.run_dir))


# %% [markdown]
# After a stage succeeds, its section of the report card is written at once, so a run that stops halfway still has
# a report of what it did. The section is named by the command (and, for `eval`, by the stage it evaluated). Only
# rank 0 writes it under `torchrun`, and a failure here never turns a finished stage into an error.

# %%
#| export
def _report_after(args, result):
    "After a stage command succeeded (rank 0): write its report section (chapter 14); a failure here is only a note."
    stage = (result[0]["stage"] if result else None) if args.command == "eval" else None
    section = {("tokenizer", "train"): "tokenizer", ("tokenizer", "eval"): "tokenizer-eval", ("pretrain", None): "base",
               ("midtrain", None): "mid", ("sft", None): "sft", ("rl", None): "rl"}.get(
                   (args.command, getattr(args, "action", None)))
    if stage in ("base", "mid", "sft", "rl"):
        section = "base-loss" if (stage, args.action) == ("base", "bpb") else f"{stage}-eval"
    if section is None or int(os.environ.get("RANK", "0")) != 0:
        return
    data = {"tokenizer": [result] if isinstance(result, dict) else None,
            "tokenizer-eval": [result] if isinstance(result, str) else None}.get(section)
    try:
        from nanochat_nb.report import write_section
        path = write_section(args.run_dir, section, data, log=print)
        if path:
            print(f"report section: {path}")
    except Exception as e:  # the stage itself succeeded; the section can be written later with `report section`
        print(f"note: report section {section!r} not written ({type(e).__name__}: {e}); "
              f"fix: nanochat-nb report section {section} --run-dir {args.run_dir}", file=sys.stderr)


# %% [markdown]
# ## The parser
#
# A few option kinds recur across subcommands. `--run-dir` is checked as it is parsed: an empty value (an unset
# shell variable, say) would otherwise mean the current folder. `--tasks` is a comma-separated list, also checked at
# parse time, so a typo fails with a usage line rather than after a model has loaded.

# %%
#| export
def _run_dir_arg(text):
    "An argparse type for --run-dir: a Path, never an empty string (which would mean the current folder)."
    if not text.strip():
        raise argparse.ArgumentTypeError("an empty --run-dir would write into the current folder; name a folder")
    return Path(text)


def _common_options():
    "The parent parser every stage subcommand shares: `--run-dir`."
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--run-dir", type=_run_dir_arg, default=default_run_dir(),
                        help="where every artefact of the run lives (default: %(default)s)")
    return common


def _task_list(text):
    "An argparse type for --tasks: comma-separated task names."
    names = [t.strip() for t in text.split(",") if t.strip()]
    if not names:
        raise argparse.ArgumentTypeError("name at least one task, e.g. --tasks arithmetic,spelling")
    return names


# %% [markdown]
# The commands that load a model (`chat`, `serve`, `eval`) all pick it the same way; and the training stages expose
# every field of their config dataclass as an option, read off the dataclass, so a new knob in chapter 06 (or 11, 12,
# 13) shows up here without touching this file.

# %%
#| export
def _add_model_options(parser):
    "--stage, --step and --device: which checkpoint of the run to load, and where (chat and serve)."
    parser.add_argument("--stage", choices=["base", "mid", "sft", "rl"], default=None,
                        help="which stage's model (default: the last one trained)")
    parser.add_argument("--step", type=int, default=None, help="which step's checkpoint (default: the latest)")
    parser.add_argument("--device", default=None, help="cpu, cuda, cuda:1, mps (default: the best available)")


def _add_config_options(parser, config_cls):
    "One `--field-name` option per dataclass field, typed like its default; unset options stay None."
    for f in fields(config_cls):
        kind = type(f.default)
        parser.add_argument("--" + f.name.replace("_", "-"), dest=f.name, type=kind, default=None,
                            help=f"(default: from the preset, else {f.default!r})")


# %% [markdown]
# On a toy dataclass, `_add_config_options` gives one typed option per field, and leaves unset ones at None so the
# preset's value wins:

# %%
from dataclasses import dataclass


@dataclass
class Toy:
    depth: int = 4
    matrix_lr: float = 0.02


toy = argparse.ArgumentParser(prog="toy")
_add_config_options(toy, Toy)
toy_args = toy.parse_args(["--matrix-lr", "0.05"])
print(toy_args)
assert toy_args.matrix_lr == 0.05 and toy_args.depth is None


# %% [markdown]
# Each family of subcommands is added by its own function, taking the subparsers and the shared `--run-dir` parent.
# `set_defaults(func=...)` ties each subcommand to its handler, so `main` needs no table of its own. Each one can be
# tried alone on a bare parser:

# %%
def try_family(add, argv):
    "Parse `argv` with a parser holding only the family that `add` defines; show the options set and the handler."
    parser = argparse.ArgumentParser(prog="nanochat-nb")
    add(parser.add_subparsers(dest="command", required=True, metavar="COMMAND"), _common_options())
    args = parser.parse_args([*argv, "--run-dir", "/tmp/run"])
    print({k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items() if k != "func" and v is not None},
          "->", args.func.__name__)
    return args


# %% [markdown]
# The tokenizer and the data come first in a run:

# %%
#| export
def _add_tokenizer_parser(stages, common):
    "`tokenizer train|eval|convert`."
    tok = stages.add_parser("tokenizer", help="train or evaluate the BPE tokenizer").add_subparsers(
        dest="action", required=True, metavar="ACTION")
    p = tok.add_parser("train", parents=[common], help="train a tokenizer on the run's corpus (chapter 01)")
    p.add_argument("--vocab-size", type=int, default=4096, help="vocabulary size incl. 9 special tokens (%(default)s)")
    p.add_argument("--max-chars", type=int, default=2_000_000_000, help="stop after this many characters")
    p.set_defaults(func=_tokenizer_train)
    p = tok.add_parser("eval", parents=[common], help="bytes per token on several kinds of text")
    p.set_defaults(func=_tokenizer_eval)
    p = tok.add_parser("convert", parents=[common], help="convert a trusted pickled tokenizer.pkl (nanochat's, or "
                       "an older run's) to the text format")
    p.set_defaults(func=_tokenizer_convert)


# %%
args = try_family(_add_tokenizer_parser, ["tokenizer", "train", "--vocab-size", "512"])
assert args.vocab_size == 512 and args.func is _tokenizer_train


# %%
#| export
def _add_data_parser(stages, common):
    "`data prepare|download`."
    data = stages.add_parser("data", help="prepare or download pretraining shards").add_subparsers(
        dest="action", required=True, metavar="ACTION")
    p = data.add_parser("prepare", parents=[common], help="pack a corpus into parquet shards (chapter 04)")
    p.add_argument("--source", default=None, help="a folder of .txt/.md/.py/.jsonl/.parquet files "
                   "(default: the Python standard library's sources)")
    p.set_defaults(func=_data_prepare)
    p = data.add_parser("download", parents=[common], help="download FineWeb-edu shards (needs the network)")
    p.add_argument("--shards", type=int, required=True, help="number of training shards (plus the validation one)")
    p.add_argument("--workers", type=int, default=4)
    p.add_argument("--base-url", default=None, help="mirror to download from (default: the Hugging Face dataset)")
    p.set_defaults(func=_data_download)


# %%
args = try_family(_add_data_parser, ["data", "download", "--shards", "8"])
assert args.shards == 8 and args.workers == 4 and args.func is _data_download


# %% [markdown]
# The training stages: pretraining with its own presets and safety switches, then midtraining, SFT and RL, which
# share the same three stage options and differ in their config class.

# %%
#| export
def _add_pretrain_parser(stages, common):
    "`pretrain`, with one option per `TrainConfig` field."
    from nanochat_nb.pretrain import PRESETS, TrainConfig
    p = stages.add_parser("pretrain", parents=[common], help="train the base model (chapter 06); works under torchrun")
    p.add_argument("--preset", choices=sorted(PRESETS), default=None, help="a starting point for the settings")
    p.add_argument("--resume", action="store_true", help="continue from the latest base checkpoint")
    p.add_argument("--overwrite", action="store_true", help="delete this run directory's base checkpoints and "
                   "metrics, and start over")
    p.add_argument("--allow-data-change", action="store_true", help="resume even though the data shards differ "
                   "from those the checkpoint was trained on")
    p.add_argument("--allow-tokenizer-change", action="store_true", help="resume even though the tokenizer differs "
                   "from the one the checkpoint was trained on")
    _add_config_options(p, TrainConfig)
    p.set_defaults(func=_pretrain)


# %%
args = try_family(_add_pretrain_parser, ["pretrain", "--preset", "micro", "--num-iterations", "6"])
assert args.num_iterations == 6 and args.depth is None


# %%
#| export
def _add_chat_stage_parsers(stages, common):
    "`midtrain`, `sft` and `rl`: one option per field of their config classes."
    from nanochat_nb.midtrain import ChatTrainConfig
    for name, chapter in (("midtrain", 11), ("sft", 12)):
        p = stages.add_parser(name, parents=[common], help=f"{name} from the previous stage (chapter {chapter}); "
                              "works under torchrun")
        p.add_argument("--preset", choices=["micro", "d20", "d26"], default=None, help="a starting point")
        p.add_argument("--resume", action="store_true", help=f"continue from the latest {name} checkpoint")
        p.add_argument("--overwrite", action="store_true", help="delete this stage's checkpoints and metrics first")
        _add_config_options(p, ChatTrainConfig)
        p.set_defaults(func=_chat_stage)
    from nanochat_nb.rl import RLConfig
    p = stages.add_parser("rl", parents=[common], help="reinforcement learning on arithmetic (or GSM8K) from the SFT "
                          "model (chapter 13); works under torchrun")
    p.add_argument("--preset", choices=["micro", "d20", "d26"], default=None, help="a starting point")
    p.add_argument("--resume", action="store_true", help="continue from the latest rl checkpoint")
    p.add_argument("--overwrite", action="store_true", help="delete this stage's checkpoints and metrics first")
    _add_config_options(p, RLConfig)
    p.set_defaults(func=_rl)


# %%
args = try_family(_add_chat_stage_parsers, ["sft", "--preset", "micro", "--resume"])
assert args.resume and args.func is _chat_stage


# %% [markdown]
# Then the ways to use a model: talk to it in the terminal, or serve it.

# %%
#| export
def _add_chat_parsers(stages, common):
    "`chat` and `serve`."
    p = stages.add_parser("chat", parents=[common], help="chat with the model in the terminal (chapter 08)")
    p.add_argument("-p", "--prompt", default=None, help="answer this one message and exit")
    p.add_argument("--temperature", type=float, default=0.6, help="0 = always the likeliest token (%(default)s)")
    p.add_argument("--top-k", type=int, default=50, help="sample among the k likeliest tokens (%(default)s)")
    p.add_argument("--max-tokens", type=int, default=256, help="longest reply, in tokens (%(default)s)")
    _add_model_options(p)
    p.set_defaults(func=_chat)
    p = stages.add_parser("serve", parents=[common], help="chat page, nanochat's API and an OpenAI-compatible API "
                          "(chapter 08b)")
    p.add_argument("--model", type=Path, default=None, help="a run or checkpoint directory to serve instead of "
                   "--run-dir (e.g. nanochat's base_checkpoints/d20)")
    p.add_argument("--host", default="127.0.0.1", help="0.0.0.0 to accept other machines (%(default)s)")
    p.add_argument("--port", type=int, default=8000, help="%(default)s")
    p.add_argument("--workers", type=int, default=None, help="model workers (default: one per GPU, else 1)")
    p.add_argument("--seed", type=int, default=None, help="seed the sampling of requests that send no seed, "
                   "for replayable answers (default: random)")
    _add_model_options(p)
    p.set_defaults(func=_serve)


# %%
args = try_family(_add_chat_parsers, ["chat", "-p", "What is 2+2?", "--stage", "sft"])
assert args.prompt == "What is 2+2?" and args.temperature == 0.6


# %% [markdown]
# `eval` has one action per kind of measurement (chapter 10), each with the options that kind needs:

# %%
#| export
def _add_eval_parser(stages, common):
    "`eval bpb|core|chat`."
    ev = stages.add_parser("eval", help="evaluate a checkpoint: bits per byte, CORE or the chat tasks (chapter 10); "
                           "works under torchrun").add_subparsers(dest="action", required=True, metavar="ACTION")
    p = ev.add_parser("bpb", parents=[common], help="bits per byte on the run's validation shard")
    p.add_argument("--eval-tokens", type=int, default=None, help="tokens to evaluate (default: as in training)")
    _add_model_options(p)
    p.set_defaults(func=_eval)
    p = ev.add_parser("core", parents=[common], help="CORE on the DCLM eval bundle (downloaded once into the "
                      "run's cache/)")
    p.add_argument("--bundle-url", default=None, help="where to get eval_bundle.zip (default: nanochat's URL); "
                   "file:///path/eval_bundle.zip works offline")
    p.add_argument("--bundle-sha256", default=None, help="the zip's SHA-256, checked when given")
    p.add_argument("--max-per-task", type=int, default=-1, help="items per task, -1 for all (%(default)s)")
    _add_model_options(p)
    p.set_defaults(func=_eval)
    p = ev.add_parser("chat", parents=[common], help="chat tasks, categorical and generative, and ChatCORE")
    p.add_argument("--tasks", type=_task_list, required=True, help="comma-separated, from arc-easy, arc-challenge, "
                   "mmlu, gsm8k, humaneval, arithmetic, spelling, simple-spelling, identity")
    p.add_argument("--max-problems", type=int, default=None, help="the first N problems of each task (default: all)")
    p.add_argument("--num-samples", type=int, default=1, help="samples per generative problem (pass@k) (%(default)s)")
    p.add_argument("--max-tokens", type=int, default=512, help="longest reply, in tokens (%(default)s)")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (%(default)s)")
    p.add_argument("--top-k", type=int, default=50, help="%(default)s")
    p.add_argument("--batch-size", type=int, default=8, help="questions per forward pass, categorical tasks "
                   "(%(default)s)")
    p.add_argument("--data-root", type=Path, default=None, help="a local copy of the hub datasets (allenai/ai2_arc, "
                   "cais/mmlu, openai/gsm8k folders) for offline runs")
    _add_model_options(p)
    p.set_defaults(func=_eval)


# %%
args = try_family(_add_eval_parser, ["eval", "chat", "--tasks", "arithmetic, spelling", "--max-problems", "20"])
assert args.tasks == ["arithmetic", "spelling"] and args.action == "chat"


# %% [markdown]
# And the report card, whose `section` action takes the section's name as a positional argument:

# %%
#| export
def _add_report_parser(stages, common):
    "`report reset|section|generate`."
    from nanochat_nb.report import SECTIONS
    rep = stages.add_parser("report", help="the report card (chapter 14): reset, one section, or generate "
                            "report/report.md").add_subparsers(dest="action", required=True, metavar="ACTION")
    p = rep.add_parser("reset", parents=[common], help="start a report: delete old sections, write the header")
    p.set_defaults(func=_report)
    p = rep.add_parser("section", parents=[common], help="(re)write one stage's section from the run's files")
    p.add_argument("section", choices=list(SECTIONS), help="which section")
    p.set_defaults(func=_report)
    p = rep.add_parser("generate", parents=[common], help="report/report.md with the summary table, and the charts")
    p.set_defaults(func=_report)


# %%
args = try_family(_add_report_parser, ["report", "section", "base"])
assert args.section == "base" and args.func is _report


# %% [markdown]
# `build_parser` puts the families together, in the order a run goes through them (the order `--help` lists them):

# %%
#| export
def build_parser():
    "The argparse parser of `nanochat-nb`."
    parser = argparse.ArgumentParser(prog="nanochat-nb", description="Train and chat with a nanochat, stage by stage.")
    common = _common_options()
    stages = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add in (_add_tokenizer_parser, _add_data_parser, _add_pretrain_parser, _add_chat_stage_parsers,
                _add_chat_parsers, _add_eval_parser, _add_report_parser):
        add(stages, common)
    return parser


# %% [markdown]
# `main` parses, runs the handler, then writes the stage's report section. Errors the user can fix (bad input, a
# missing earlier stage, a damaged file, a busy run directory, a full disk) end the process with one line naming
# the problem and the fix, and exit status 1; usage errors are argparse's, with status 2; anything else is a bug and
# keeps its traceback.

# %%
#| export
def main(argv=None):
    "Entry point of the `nanochat-nb` console command."
    args = build_parser().parse_args(argv)
    try:
        _report_after(args, args.func(args))
    except KeyboardInterrupt:
        sys.exit(f"nanochat-nb {args.command}: interrupted (what was saved is intact; `--resume` continues a run)")
    except Exception as e:
        # bad input, a missing earlier stage, a damaged file, a busy run directory, a full or read-only disk: the
        # message says what and how to fix it, and a traceback would bury it; anything else is a bug and keeps its
        # traceback (as does everything under NANOCHAT_NB_DEBUG=1)
        from nanochat_nb.checkpoint import CheckpointError, RunDirError, explain_os_error
        expected = (OSError, ValueError, CheckpointError, RunDirError)
        if not isinstance(e, expected) or os.environ.get("NANOCHAT_NB_DEBUG"):
            raise
        plain_os_error = isinstance(e, OSError) and e.errno is not None and not isinstance(e, CheckpointError)
        message = explain_os_error(e) if plain_os_error else e
        sys.exit(f"nanochat-nb {args.command}: error: {message}")


# %%
#| export
# `python -m nanochat_nb.cli` and `torchrun -m nanochat_nb.cli`; the __file__ check keeps a notebook from running it
if __name__ == "__main__" and "__file__" in globals():
    main()

# %% [markdown]
# Every subcommand answers `--help`:

# %%
parser = build_parser()
usage = parser.format_help()
print(usage)
assert all(c in usage for c in ["tokenizer", "data", "pretrain", "chat", "serve"])

# %%
import contextlib, io

for argv in (["tokenizer", "train", "--help"], ["pretrain", "--help"]):
    out = io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.suppress(SystemExit):
        main(argv)
    assert "--run-dir" in out.getvalue()
print(out.getvalue()[:600])

# %% [markdown]
# ## A tour
#
# The whole pipeline's first stages, as a reader would type them, on a throwaway run directory: a small tokenizer,
# its evaluation, the default corpus as shards, and a few pretraining steps. Each line below is a real process
# (`python -m nanochat_nb.cli` is what the `nanochat-nb` script runs), and its output is shown as it came.

# %%
import subprocess, tempfile

tour_dir = Path(tempfile.mkdtemp(prefix="nanochat-nb-tour-"))


def nanochat_nb(*args, tail=12, expect=0):
    "Run `nanochat-nb ARGS` in a fresh process on the tour's run directory; show its output's end and exit status."
    argv = [*args, "--run-dir", str(tour_dir)]
    print("$ nanochat-nb " + " ".join(args) + " --run-dir $RUN")
    done = subprocess.run([sys.executable, "-m", "nanochat_nb.cli", *argv], capture_output=True, text=True,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    print("\n".join((done.stdout + done.stderr).strip().splitlines()[-tail:]))
    print(f"(exit status {done.returncode})\n")
    assert done.returncode == expect, done.stderr[-2000:]
    return done.stdout


# %% [markdown]
# A stage run before the one it needs stops at once, with one line that says what is missing and the command that
# makes it, and exit status 1; a mistyped option is argparse's usage error, status 2:

# %%
nanochat_nb("pretrain", "--preset", "micro", expect=1)
nanochat_nb("eval", "chat", "--tasks", ",", tail=1, expect=2)

# %% [markdown]
# Now in order: a tokenizer, then its bytes-per-token table.

# %%
nanochat_nb("tokenizer", "train", "--vocab-size", "512", "--max-chars", "2000000")
out = nanochat_nb("tokenizer", "eval", tail=14)
assert "| news |" in out

# %%
nanochat_nb("data", "prepare", tail=8)
out = nanochat_nb("pretrain", "--preset", "micro", "--num-iterations", "6", tail=6)
assert (tour_dir / "checkpoints" / "base").is_dir()
print(sorted(p.relative_to(tour_dir).as_posix() for p in tour_dir.rglob("*") if p.is_file())[:12])

# %% [markdown]
# Each stage command that succeeded also wrote its section of the report card (chapter 14) into `report/`;
# `report generate` assembles them into `report/report.md` with the summary table and draws the charts:

# %%
out = nanochat_nb("report", "generate", tail=2)
assert "## Base model training" in (tour_dir / "report" / "report.md").read_text()

# %%
import shutil

shutil.rmtree(tour_dir, ignore_errors=True)

# %% [markdown]
# ## Summary
#
# `nanochat-nb` is a thin layer: `build_parser` maps each subcommand to a handler that calls the chapter's own
# function on one run directory, so a run can move between the notebook, the terminal and `torchrun` without
# changing what it computes. Every artefact lands under `--run-dir`, and a stage finds what the previous one wrote
# there. The parser is built one family of subcommands at a time, and each option's type checks its value as it is
# parsed. A run ends with status 0 when it worked, 1 with one line naming the problem and its fix when the input or
# the run directory is wrong, and 2 on a usage error.
#
# **Exercises**
#
# 1. Run `nanochat-nb pretrain --preset micro --num-iterations 6 --run-dir $RUN` twice, the second time with
#    `--resume`. What does the second run print, and why does it not train again?
# 2. Add a `tokenizer show` subcommand that prints the 20 longest tokens of a run's tokenizer: a handler of three
#    lines and one `add_parser` call.
# 3. Point `data prepare --source` at a folder of your own `.txt` files and retrain the tokenizer on it: does its
#    `tokenizer eval` table change where you expect?
