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
# # nanochat-nb
# > Build a ChatGPT from scratch, one notebook at a time.

# %% [markdown]
# This book rebuilds [nanochat](https://github.com/karpathy/nanochat), Andrej Karpathy's end-to-end ChatGPT clone,
# as a sequence of runnable chapters. Every chapter is a notebook that explains one piece, builds it in small cells,
# and checks it as it goes; together the notebooks export the Python package `nanochat_nb`, which runs the whole
# pipeline from the command line or from one papermill notebook.
#
# Two promises shape every chapter:
#
# - **It runs on your laptop.** Each chapter runs top to bottom on a CPU in about a minute at its default small
#   config, on a corpus that is already on your machine: the source files of Python's own standard library, which
#   hold plenty of real English (docstrings and comments) next to real code. No download is needed.
# - **It scales to the real thing.** The same code, with bigger settings, trains nanochat's d20 on an 8×H100 box
#   on FineWeb-edu and should land on nanochat's numbers.

# %% [markdown]
# ## The pipeline
#
# | stage | chapter | what it makes |
# |---|---|---|
# | tokenizer | 01 | a byte-level BPE vocabulary, trained with rustbpe, served by tiktoken |
# | model | 02 | nanochat's GPT: rotary embeddings, QK norm, ReLU², untied embeddings, a KV cache |
# | optimizer | 03 | Muon for matrices, AdamW for embeddings, sharded across processes |
# | data | 04 | parquet shards and a streaming, exactly resumable, packing loader |
# | checkpoints | 05 | atomic save and load of model, optimizer shards and loader state |
# | pretraining | 06 | the base training loop, on one process or many under `torchrun` |
# | … | 07–14 | inference engine, chat, tasks, evaluation, midtraining, SFT, RL, report |
#
# Dependencies only point down this table: a chapter uses what earlier chapters built, never what later ones do.

# %% [markdown]
# ## How to read it
#
# Read the chapters in order; each starts with why the piece exists and ends with exercises you can run on a CPU.
# Every exported cell (marked `#| export`) lands in the package, so what you read is exactly what runs. To run a
# chapter yourself, open it in Jupyter from a checkout after `make install` (or any `make` target, which installs
# first), or run the whole pipeline with `make speedrun`.

# %%
import nanochat_nb

print("nanochat_nb", nanochat_nb.__version__)
