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
# | `report/` | the report card (chapter 14) |

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
# its own, so what the book shows is what the command runs.

# %%
#| export
def _tokenizer_train(args):
    from nanochat_nb.tokenizer import train_tokenizer
    stats = train_tokenizer(args.run_dir, vocab_size=args.vocab_size, max_chars=args.max_chars)
    for k, v in stats.items():
        print(f"{k}: {v}")


def _tokenizer_eval(args):
    from nanochat_nb.tokenizer import eval_report
    print(eval_report(args.run_dir))


def _data_prepare(args):
    from nanochat_nb.data import prepare_data
    stats = prepare_data(args.run_dir, source=args.source)
    for k, v in stats.items():
        print(f"{k}: {v}")


def _data_download(args):
    from nanochat_nb.data import FINEWEB_BASE_URL, download_data
    stats = download_data(args.run_dir, args.shards, base_url=args.base_url or FINEWEB_BASE_URL,
                          workers=args.workers, verbose=True)
    for k, v in stats.items():
        print(f"{k}: {v}")


def _pretrain(args):
    from nanochat_nb.pretrain import TrainConfig, make_config, pretrain
    overrides = {f.name: getattr(args, f.name) for f in fields(TrainConfig) if getattr(args, f.name) is not None}
    summary = pretrain(args.run_dir, make_config(args.preset, **overrides), resume=args.resume)
    print("summary: " + ", ".join(f"{k}={v}" for k, v in summary.items()))


# %% [markdown]
# `pretrain` exposes every field of `TrainConfig` as an option, read off the dataclass, so a new knob in chapter 06
# shows up here without touching this file.

# %%
#| export
def _add_config_options(parser, config_cls):
    "One `--field-name` option per dataclass field, typed like its default; unset options stay None."
    for f in fields(config_cls):
        kind = type(f.default)
        parser.add_argument("--" + f.name.replace("_", "-"), dest=f.name, type=kind, default=None,
                            help=f"(default: from the preset, else {f.default!r})")


def build_parser():
    "The argparse parser of `nanochat-nb`."
    from nanochat_nb.pretrain import PRESETS, TrainConfig
    parser = argparse.ArgumentParser(prog="nanochat-nb", description="Train and chat with a nanochat, stage by stage.")
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--run-dir", type=Path, default=default_run_dir(),
                        help="where every artefact of the run lives (default: %(default)s)")
    stages = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    tok = stages.add_parser("tokenizer", help="train or evaluate the BPE tokenizer").add_subparsers(
        dest="action", required=True, metavar="ACTION")
    p = tok.add_parser("train", parents=[common], help="train a tokenizer on the run's corpus (chapter 01)")
    p.add_argument("--vocab-size", type=int, default=4096, help="vocabulary size incl. 9 special tokens (%(default)s)")
    p.add_argument("--max-chars", type=int, default=2_000_000_000, help="stop after this many characters")
    p.set_defaults(func=_tokenizer_train)
    p = tok.add_parser("eval", parents=[common], help="bytes per token on several kinds of text")
    p.set_defaults(func=_tokenizer_eval)

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

    p = stages.add_parser("pretrain", parents=[common], help="train the base model (chapter 06); works under torchrun")
    p.add_argument("--preset", choices=sorted(PRESETS), default=None, help="a starting point for the settings")
    p.add_argument("--resume", action="store_true", help="continue from the latest base checkpoint")
    _add_config_options(p, TrainConfig)
    p.set_defaults(func=_pretrain)
    return parser


def main(argv=None):
    "Entry point of the `nanochat-nb` console command."
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except Exception as e:
        # bad input, a missing earlier stage or a damaged checkpoint: the message says what and how to fix it, and a
        # traceback would bury it; anything else is a bug and keeps its traceback
        from nanochat_nb.checkpoint import CheckpointError
        if not isinstance(e, (FileNotFoundError, ValueError, CheckpointError)) or os.environ.get("NANOCHAT_NB_DEBUG"):
            raise
        sys.exit(f"nanochat-nb {args.command}: error: {e}")


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
assert all(c in usage for c in ["tokenizer", "data", "pretrain"])

# %%
import contextlib, io

for argv in (["tokenizer", "train", "--help"], ["pretrain", "--help"]):
    out = io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.suppress(SystemExit):
        main(argv)
    assert "--run-dir" in out.getvalue()
print(out.getvalue()[:600])
