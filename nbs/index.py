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
# Each stage reads what the one before it wrote into a run directory (`run_dir`) and adds its own artefact. The figure
# and the table below are built from the chapters that exist in this checkout, so they never point at a chapter that
# has not been written yet.

# %%
#| echo: false
from pathlib import Path

import matplotlib.pyplot as plt
from IPython.display import Markdown, display

nbs = Path.cwd() if (Path.cwd() / "index.ipynb").exists() else Path("nbs")
chapters = {p.stem: p.name for p in sorted(nbs.glob("[0-9]*.ipynb"))}
# (stage, artefact it writes under run_dir, chapter that builds it)
pipeline = [("tokenizer", "tokenizer/", "01_tokenizer"), ("data", "data/shard_*.parquet", "04_data"),
            ("pretrain", "checkpoints/base/", "06_pretrain"), ("midtrain", "checkpoints/mid/", "11_midtrain"),
            ("SFT", "checkpoints/sft/", "12_sft"), ("RL", "checkpoints/rl/", "13_rl"),
            ("eval", "bpb, CORE, ChatCORE", "10_eval"), ("report", "report/report.md, *.png", "14_report"),
            ("chat", "terminal and web chat", "08_chat")]
stages = [st for st in pipeline if st[2] in chapters]

# %%
#| fig-alt: "The pipeline as a row of boxes joined by arrows; each box names a stage, the chapter that builds it and the artefact it writes."
fig, ax = plt.subplots(figsize=(2.1 * len(stages), 2.2))
for i, (stage, artefact, chapter) in enumerate(stages):
    ax.add_patch(plt.Rectangle((i * 2.1, 0), 1.8, 1.2, facecolor="#dbe8f6", edgecolor="#2a5a8a"))
    ax.text(i * 2.1 + 0.9, 0.8, stage, ha="center", va="center", fontsize=11, weight="bold")
    ax.text(i * 2.1 + 0.9, 0.42, f"ch. {chapter.split('_')[0]}", ha="center", va="center", fontsize=9)
    ax.text(i * 2.1 + 0.9, -0.3, artefact, ha="center", va="center", fontsize=8, family="monospace", wrap=True)
    if i:
        ax.annotate("", xy=(i * 2.1, 0.6), xytext=(i * 2.1 - 0.3, 0.6), arrowprops=dict(arrowstyle="->"))
ax.set_xlim(-0.2, 2.1 * len(stages)), ax.set_ylim(-0.7, 1.4), ax.axis("off")
ax.set_title("The nanochat pipeline: stage, chapter, and what it writes into run_dir")
plt.show()


# %% [markdown]
# The model, the optimizer and checkpoints (chapters 02, 03, 05) are the parts the training stages share; the
# engine (07) generates text for evaluation and chat. Every chapter in this checkout:

# %%
#| echo: false
def title(name):
    "The `# Title` line of a chapter's .py twin."
    for line in (nbs / f"{name}.py").read_text(encoding="utf-8").splitlines():
        if line.startswith("# # "):
            return line[4:]
    return name

display(Markdown("\n".join(["| chapter | title |", "|---|---|"] +
                            [f"| {n.split('_')[0]} | [{title(n)}]({f}) |" for n, f in chapters.items()])))

# %% [markdown]
# Dependencies only point down the book order: a chapter uses what earlier chapters built, never what later ones do
# (the command line, chapter 99, sits on top of them all).

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
