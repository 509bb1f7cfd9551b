"""Tasks: hub datasets through the real `datasets` path on offline fixtures in the upstream layouts and schemas,
prompt formats, GSM8K annotations, HumanEval, the synthetic tasks (seeded, disjoint splits, self-consistent
references) and mixtures."""
import json
import os
import random
import socket
import warnings

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import datasets
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import given, settings, strategies as st

from nanochat_nb.tasks import (ARC, GSM8K, MMLU, Arithmetic, HumanEval, Identity, SimpleSpelling, SmolTalk,
                               SpellingBee, Task, TaskMixture, extract_answer, extract_program,
                               gsm8k_parts, humaneval_program, load_hub_split, load_task, reply_text, split_of)
from nanochat_nb.sandbox import run_python

datasets.disable_progress_bars()


@pytest.fixture(autouse=True)
def no_network(monkeypatch, tmp_path):
    "Any connection off the loopback fails the test; datasets' cache goes to tmp."
    real_connect = socket.socket.connect

    def connect(self, address):
        host = address[0] if isinstance(address, tuple) else address
        if isinstance(host, str) and not (host.startswith("127.") or host in ("localhost", "::1")) \
                and self.family in (socket.AF_INET, socket.AF_INET6):
            raise AssertionError(f"a test tried to reach the network: {address}")
        return real_connect(self, address)

    monkeypatch.setattr(socket.socket, "connect", connect)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf_cache")


# ---------------------------------------------------------------------------------------------------------------
# Fixture repositories, written with pyarrow in the upstream files' exact column schemas and paths.

def _value(dtype="string"):
    return {"dtype": dtype, "_type": "Value"}


ARC_SCHEMA = pa.schema([("id", pa.string()), ("question", pa.string()),
                        ("choices", pa.struct([("text", pa.list_(pa.string())), ("label", pa.list_(pa.string()))])),
                        ("answerKey", pa.string())])
MMLU_FEATURES = {"question": _value(), "subject": _value(), "choices": {"feature": _value(), "_type": "Sequence"},
                 "answer": {"names": ["A", "B", "C", "D"], "_type": "ClassLabel"}}
MMLU_SCHEMA = pa.schema([("question", pa.string()), ("subject", pa.string()), ("choices", pa.list_(pa.string())),
                         ("answer", pa.int64())],
                        metadata={"huggingface": json.dumps({"info": {"features": MMLU_FEATURES}})})
MMLU_AUX_SCHEMA = pa.schema([("train", pa.struct([("answer", pa.int64()), ("choices", pa.list_(pa.string())),
                                                  ("question", pa.string()), ("subject", pa.string())]))])
GSM8K_SCHEMA = pa.schema([("question", pa.string()), ("answer", pa.string())])
SMOL_SCHEMA = pa.schema([("messages", pa.list_(pa.struct([("content", pa.string()), ("role", pa.string())]))),
                         ("source", pa.string())])


def _write(root, relpath, rows, schema):
    path = root / relpath
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows, schema=schema), path)


def _arc_row(i, labels="ABCD", answer=None):
    return {"id": f"Mercury_{i}", "question": f"Question {i}?",
            "choices": {"text": [f"choice {i}.{j}" for j in range(len(labels))], "label": list(labels)},
            "answerKey": answer or labels[i % len(labels)]}


@pytest.fixture
def hub(tmp_path):
    "A folder holding local copies of the four hub repositories, a handful of rows each."
    root = tmp_path / "hub"
    arc = root / "allenai/ai2_arc"
    _write(arc, "ARC-Easy/test-00000-of-00001.parquet",
           [_arc_row(i) for i in range(5)] + [_arc_row(5, "1234", "3"), _arc_row(6, "ABC", "B")], ARC_SCHEMA)
    _write(arc, "ARC-Easy/train-00000-of-00001.parquet", [_arc_row(100 + i) for i in range(3)], ARC_SCHEMA)
    _write(arc, "ARC-Challenge/test-00000-of-00001.parquet", [_arc_row(200 + i) for i in range(4)], ARC_SCHEMA)
    mmlu = root / "cais/mmlu"
    mmlu_rows = [{"question": f"MMLU question {i}?", "subject": ["anatomy", "virology"][i % 2],
                  "choices": [f"option {i}.{j}" for j in range(4)], "answer": i % 4} for i in range(6)]
    _write(mmlu, "all/test-00000-of-00001.parquet", mmlu_rows, MMLU_SCHEMA)
    _write(mmlu, "all/dev-00000-of-00001.parquet", mmlu_rows[:2], MMLU_SCHEMA)
    _write(mmlu, "auxiliary_train/train-00000-of-00001.parquet",
           [{"train": {"answer": 3 - i % 4, "choices": [f"aux {i}.{j}" for j in range(4)],
                       "question": f"Aux question {i}?", "subject": ""}} for i in range(4)], MMLU_AUX_SCHEMA)
    gsm = root / "openai/gsm8k"
    _write(gsm, "main/test-00000-of-00001.parquet", [
        {"question": "Weng earns $12 an hour. She works 50 minutes. How much does she earn?",
         "answer": "Weng earns 12/60 = $<<12/60=0.2>>0.2 per minute.\nShe earns 0.2 x 50 = $<<0.2*50=10>>10.\n#### 10"},
        {"question": "A shop sells 1,200 pens a day. How many in 3 days?",
         "answer": "It sells 1200*3 = <<1200*3=3600>>3600 pens.\n#### 3,600"},
    ], GSM8K_SCHEMA)
    _write(gsm, "main/train-00000-of-00001.parquet",
           [{"question": "What is 2+2?", "answer": "2+2 = <<2+2=4>>4\n#### 4"}], GSM8K_SCHEMA)
    smol = root / "HuggingFaceTB/smol-smoltalk"
    chat = lambda i, system=False: {"messages": ([{"content": "Be brief.", "role": "system"}] if system else []) + [
        {"content": f"hello {i}", "role": "user"}, {"content": f"hi {i}", "role": "assistant"},
        {"content": "bye", "role": "user"}, {"content": "bye!", "role": "assistant"}], "source": "smol-magpie-ultra"}
    _write(smol, "data/train-00000-of-00002.parquet", [chat(0, True), chat(1)], SMOL_SCHEMA)
    _write(smol, "data/train-00001-of-00002.parquet", [chat(2)], SMOL_SCHEMA)
    _write(smol, "data/test-00000-of-00001.parquet", [chat(3, True)], SMOL_SCHEMA)
    return root


# ---------------------------------------------------------------------------------------------------------------
# Hub datasets through the real datasets code path

def test_load_hub_split_reads_the_repository_layout(hub):
    ds = load_hub_split("allenai/ai2_arc", "ARC-Easy", "test", data_dir=hub / "allenai/ai2_arc")
    assert isinstance(ds, datasets.Dataset) and len(ds) == 7
    assert ds.column_names == ["id", "question", "choices", "answerKey"]
    mmlu = load_hub_split("cais/mmlu", "all", "test", data_dir=hub / "cais/mmlu")
    assert isinstance(mmlu.features["answer"], datasets.ClassLabel)  # the upstream feature metadata is honoured
    train = load_hub_split("HuggingFaceTB/smol-smoltalk", None, "train", data_dir=hub / "HuggingFaceTB/smol-smoltalk")
    assert len(train) == 3  # both shards of the split


def test_load_hub_split_errors_name_the_fix(hub):
    with pytest.raises(FileNotFoundError, match="laid out like the hub repository allenai/ai2_arc"):
        load_hub_split("allenai/ai2_arc", "ARC-Challenge", "validation", data_dir=hub / "allenai/ai2_arc")
    with pytest.raises(ValueError, match="no known file layout"):
        load_hub_split("someone/else", "x", "test", data_dir=hub)
    with pytest.raises(RuntimeError, match="data_dir="):  # offline and not cached: one clear line, no network
        load_hub_split("allenai/ai2_arc", "ARC-Easy", "test")


def test_arc_prompt_format_letters_and_shuffle(hub):
    task = ARC("ARC-Easy", "test", data_dir=hub / "allenai/ai2_arc")
    assert task.eval_type == "categorical" and len(task) == 7
    rows = pq.read_table(hub / "allenai/ai2_arc/ARC-Easy/test-00000-of-00001.parquet").to_pylist()
    order = np.random.default_rng(42).permutation(len(rows))  # datasets' shuffle(seed=42), as nanochat shuffles
    for i, conv in enumerate(task):
        row = rows[order[i]]
        expected = (f"Multiple Choice question: {row['question']}\n"
                    + "".join(f"- {c}={l}\n" for c, l in zip(row["choices"]["text"], row["choices"]["label"]))
                    + "\nRespond only with the letter of the correct answer.")
        assert conv["messages"] == [{"role": "user", "content": expected},
                                    {"role": "assistant", "content": row["answerKey"]}]
        assert conv["letters"] == row["choices"]["label"]
        assert task.evaluate(conv, row["answerKey"]) and not task.evaluate(conv, "Z")
    numbered = next(c for c in task if c["letters"] == ["1", "2", "3", "4"])
    assert numbered["messages"][1]["content"] == "3" and "- choice 5.2=3\n" in numbered["messages"][0]["content"]
    other = ARC("ARC-Easy", "test", data_dir=hub / "allenai/ai2_arc", seed=1)
    assert [c["messages"][0]["content"] for c in other] != [c["messages"][0]["content"] for c in task]
    assert len(ARC("ARC-Challenge", "test", data_dir=hub / "allenai/ai2_arc")) == 4
    with pytest.raises(ValueError, match="ARC-Easy|ARC-Challenge"):
        ARC("ARC-Medium", "test", data_dir=hub / "allenai/ai2_arc")


def test_arc_rejects_an_answer_outside_its_labels(tmp_path):
    _write(tmp_path, "ARC-Easy/test-00000-of-00001.parquet", [_arc_row(0, "ABC", "D")], ARC_SCHEMA)
    with pytest.raises(ValueError, match="not one of its labels"):
        ARC("ARC-Easy", "test", data_dir=tmp_path)[0]


def test_mmlu_all_and_auxiliary_train(hub):
    task = MMLU("all", "test", data_dir=hub / "cais/mmlu")
    assert len(task) == 6 and task.eval_type == "categorical"
    for conv in task:
        i = int(conv["messages"][0]["content"].split("MMLU question ")[1].split("?")[0])
        assert conv["messages"][1]["content"] == "ABCD"[i % 4]
        assert conv["subject"] == ["anatomy", "virology"][i % 2] and conv["letters"] == ["A", "B", "C", "D"]
        assert conv["messages"][0]["content"].endswith(f"- option {i}.3=D\n\nRespond only with the letter of the "
                                                       "correct answer.")
    aux = MMLU("auxiliary_train", "train", data_dir=hub / "cais/mmlu")
    assert len(aux) == 4
    for conv in aux:
        i = int(conv["messages"][0]["content"].split("Aux question ")[1].split("?")[0])
        assert conv["messages"][1]["content"] == "ABCD"[3 - i % 4]
    assert len(MMLU("all", "dev", data_dir=hub / "cais/mmlu")) == 2
    with pytest.raises(ValueError, match="auxiliary_train"):
        MMLU("auxiliary_train", "test", data_dir=hub / "cais/mmlu")


def test_gsm8k_tool_calls_and_scoring(hub):
    task = GSM8K("main", "test", data_dir=hub / "openai/gsm8k")
    assert task.eval_type == "generative" and len(task) == 2
    weng = next(c for c in task if c["messages"][0]["content"].startswith("Weng"))
    assert weng["messages"][1]["content"] == [
        {"type": "text", "text": "Weng earns 12/60 = $"}, {"type": "python", "text": "12/60"},
        {"type": "python_output", "text": "0.2"}, {"type": "text", "text": "0.2 per minute.\nShe earns 0.2 x 50 = $"},
        {"type": "python", "text": "0.2*50"}, {"type": "python_output", "text": "10"},
        {"type": "text", "text": "10.\n#### 10"}]
    assert task.evaluate(weng, "... so #### 10") and task.reward(weng, "#### 10") == 1.0
    assert not task.evaluate(weng, "#### 10.0") and not task.evaluate(weng, "10") and task.reward(weng, "") == 0.0
    pens = next(c for c in task if "pens" in c["messages"][0]["content"])
    assert task.evaluate(pens, "#### 3600") and task.evaluate(pens, "#### 3,600")
    assert task.evaluate(weng, reply_text(weng["messages"][1]["content"]))
    assert len(GSM8K("main", "train", data_dir=hub / "openai/gsm8k")) == 1


def test_smoltalk_keeps_system_messages_and_checks_turns(hub, tmp_path):
    task = SmolTalk("train", data_dir=hub / "HuggingFaceTB/smol-smoltalk")
    assert len(task) == 3 and task.eval_type is None
    roles = sorted(tuple(m["role"] for m in c["messages"]) for c in task)
    assert roles == [("system", "user", "assistant", "user", "assistant")] + [("user", "assistant") * 2] * 2
    with pytest.raises(NotImplementedError, match="no automatic score"):
        task.evaluate(task[0], "hi")
    bad = tmp_path / "bad"
    _write(bad, "data/test-00000-of-00001.parquet",
           [{"messages": [{"content": "hi", "role": "assistant"}, {"content": "?", "role": "user"}],
             "source": "x"}], SMOL_SCHEMA)
    with pytest.raises(ValueError, match="alternate"):
        SmolTalk("test", data_dir=bad)[0]


def test_load_task_by_name_with_a_data_root(hub):
    assert len(load_task("arc-easy", data_root=hub)) == 7
    assert len(load_task("arc-challenge", data_root=hub)) == 4
    assert len(load_task("mmlu", data_root=hub)) == 6 and len(load_task("mmlu-aux", data_root=hub)) == 4
    assert len(load_task("gsm8k", "train", data_root=hub)) == 1
    assert len(load_task("smoltalk", "test", data_root=hub)) == 1
    assert len(load_task("humaneval", stop=10)) == 10
    with pytest.raises(ValueError, match="unknown task 'hellaswag'"):
        load_task("hellaswag")


# ---------------------------------------------------------------------------------------------------------------
# GSM8K annotations and answers

text = st.text(alphabet=st.characters(blacklist_characters="<>"), max_size=20)
mark = st.tuples(st.text(alphabet="0123456789+-*/.= ", min_size=1, max_size=12),
                 st.text(alphabet="0123456789.", max_size=6))


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(text, mark), max_size=5), text)
def test_gsm8k_parts_round_trip(pieces, tail):
    answer = "".join(f"{t}<<{e}={r}>>" for t, (e, r) in pieces) + tail
    parts = gsm8k_parts(answer)
    rebuilt = "".join(p["text"] if p["type"] == "text" else
                      f"<<{p['text']}=" if p["type"] == "python" else f"{p['text']}>>" for p in parts)
    assert rebuilt == answer
    assert [p["text"] for p in parts if p["type"] == "python_output"] == [r for _, (_, r) in pieces]
    assert all(p["text"] for p in parts if p["type"] == "text")  # no empty text parts


def test_gsm8k_parts_edge_cases():
    assert gsm8k_parts("x <<a=b=7>>7") == [{"type": "text", "text": "x "}, {"type": "python", "text": "a=b"},
                                         {"type": "python_output", "text": "7"}, {"type": "text", "text": "7"}]
    assert gsm8k_parts("<<12>>") == [{"type": "python", "text": "12"}, {"type": "python_output", "text": ""}]
    assert gsm8k_parts("no marks\n#### 5") == [{"type": "text", "text": "no marks\n#### 5"}]


def test_extract_answer():
    assert extract_answer("#### 1,234,567") == "1234567"
    assert extract_answer("x\n#### -12.50\n#### 3") == "-12.50"
    assert extract_answer("####12") is None and extract_answer("# 12") is None and extract_answer("") is None


# ---------------------------------------------------------------------------------------------------------------
# HumanEval

def test_humaneval_problems_and_conversations():
    task = HumanEval()
    assert len(task) == 164 and task.eval_type == "generative"
    ids = [c["task_id"] for c in task]
    assert sorted(ids, key=lambda s: int(s.split("/")[1])) == [f"HumanEval/{i}" for i in range(164)]
    assert ids != sorted(ids, key=lambda s: int(s.split("/")[1]))  # shuffled, seed 42
    conv = next(c for c in task if c["task_id"] == "HumanEval/0")
    prompt = conv["messages"][0]["content"]
    assert prompt.startswith("from typing import List") and conv["entry_point"] == "has_close_elements"
    assert conv["messages"][1]["content"].startswith(prompt + "\n") and "def check(candidate)" in conv["test"]
    program = humaneval_program(conv, "```python\ndef has_close_elements(numbers, threshold):\n    return 1\n```")
    assert program.startswith("from typing import List\n\ndef has_close_elements(")
    assert program.endswith("\ncheck(has_close_elements)")


def test_humaneval_scores_in_the_sandbox():
    task = HumanEval(stop=4)
    for conv in task:
        entry = conv["entry_point"]
        assert task.evaluate(conv, reply_text(conv["messages"][1]["content"]))
        assert task.reward(conv, f"Sure:\n```python\n{conv['messages'][1]['content']}\n```\nDone.") == 1.0
        assert not task.evaluate(conv, f"```python\ndef {entry}(*args):\n    return None\n```")
        assert not task.evaluate(conv, "import sys\nsys.exit(0)")  # exiting before the checks is no pass


def test_humaneval_takes_another_runner():
    programs = []

    def execute(program):
        programs.append(program)
        return run_python(program, timeout=2.0)

    task = HumanEval(execute=execute, stop=1)
    conv = task[0]
    reference = reply_text(conv["messages"][1]["content"])
    assert task.evaluate(conv, reference) and programs == [humaneval_program(conv, reference)]
    assert not task.evaluate(conv, "while True:\n    pass")  # stopped at the runner's 2 s, scored 0


def test_extract_program():
    assert extract_program("text\n```python\na = 1\n```\n```python\nb = 2\n```") == "a = 1"
    assert extract_program("```\nc = 3\n```") == "c = 3"
    assert extract_program("  plain = 1  ") == "plain = 1"


# ---------------------------------------------------------------------------------------------------------------
# The Task base class and mixtures

class Numbers(Task):
    def __init__(self, n, **kwargs):
        super().__init__(**kwargs)
        self.n = n

    def num_examples(self):
        return self.n

    def get_example(self, i):
        return {"messages": [{"role": "user", "content": str(i)}, {"role": "assistant", "content": str(i)}], "i": i}


@settings(max_examples=300, deadline=None)
@given(st.integers(0, 30), st.integers(0, 40), st.one_of(st.none(), st.integers(0, 40)), st.integers(1, 7))
def test_slicing_matches_range(n, start, stop, step):
    if stop is not None and stop < start:
        with pytest.raises(ValueError, match="stop"):
            Numbers(n, start=start, stop=stop, step=step)
        return
    task = Numbers(n, start=start, stop=stop, step=step)
    expected = list(range(start, n if stop is None else min(stop, n), step))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert [c["i"] for c in task] == expected and len(task) == len(expected)
        with pytest.raises(IndexError):
            task[len(expected)]
    assert bool(caught) == (stop is not None and stop > n)  # nanochat warns when stop is past the end


def test_mixture_sizes_epochs_and_shuffle():
    a, b, c = Numbers(10), Numbers(4), Numbers(6)
    mix = TaskMixture([a, b, c], epochs=[1, 2.5, 0.5], seed=3)
    assert mix.sizes == [10, 10, 3] and len(mix) == 23
    sources = [mix.source(i) for i in range(len(mix))]
    assert sorted(sources) == ([(0, j) for j in range(10)] + sorted((1, j % 4) for j in range(10))
                               + [(2, j) for j in range(3)])
    assert [mix[i]["i"] for i in range(len(mix))] == [j for _, j in sources]
    assert sources != sorted(sources)  # shuffled
    assert [TaskMixture([a, b, c], epochs=[1, 2.5, 0.5], seed=3).source(i) for i in range(23)] == sources
    assert [TaskMixture([a, b, c], epochs=[1, 2.5, 0.5], seed=4).source(i) for i in range(23)] != sources
    view = TaskMixture([a, b, c], epochs=[1, 2.5, 0.5], seed=3, start=1, stop=20, step=4)
    assert [x["i"] for x in view] == [mix[i]["i"] for i in range(1, 20, 4)]


def test_mixture_is_nanochats_with_one_epoch():
    tasks = [Numbers(7), Numbers(5), Numbers(5)]
    pairs = [(t, j) for t, task in enumerate(tasks) for j in range(len(task))]
    random.Random(42).shuffle(pairs)
    assert [TaskMixture(tasks).source(i) for i in range(17)] == pairs


def test_mixture_errors():
    with pytest.raises(ValueError, match="one epochs value"):
        TaskMixture([Numbers(3)], epochs=[1, 1])
    with pytest.raises(ValueError, match="> 0"):
        TaskMixture([Numbers(3)], epochs=[0])
    with pytest.raises(ValueError, match="non-empty"):
        TaskMixture([])


# ---------------------------------------------------------------------------------------------------------------
# Synthetic tasks

def _synthetic(split, seed=0, size=150):
    return [Arithmetic(size, split, seed, digits=1, steps=1), Arithmetic(size, split, seed, digits=3, steps=5),
            SpellingBee(size, split, seed), SimpleSpelling(size, split, seed),
            Identity(size, split, seed, n_params=1_234_567, n_layer=6, stage="mid")]


def _key(task, conv):
    "The text that decides a synthetic example's split."
    if isinstance(task, SimpleSpelling):
        return conv["messages"][1]["content"].split(":")[0]  # the word
    if isinstance(task, SpellingBee):
        return conv["messages"][1]["content"][2]["text"].split("'")[1]  # the word in 'word'.count('x')
    return "\n".join(m["content"] for m in conv["messages"][::2])


def test_synthetic_tasks_are_deterministic_by_seed():
    for a, b, c in zip(_synthetic("train"), _synthetic("train"), _synthetic("train", seed=1)):
        first = [a[i] for i in range(20)]
        assert first == [b[i] for i in range(20)]
        assert first != [c[i] for i in range(20)]


def test_synthetic_splits_are_disjoint():
    for train, test in zip(_synthetic("train", size=400), _synthetic("test", size=100)):
        train_keys = {_key(train, c) for c in train}
        test_keys = {_key(test, c) for c in test}
        assert all(split_of(k) == "train" for k in train_keys) and all(split_of(k) == "test" for k in test_keys)
        assert not train_keys & test_keys
        assert len(test_keys) > 5


def test_reference_solutions_score_one_and_wrong_answers_zero():
    for task in _synthetic("train") + _synthetic("test", size=50):
        for conv in task:
            reference = reply_text(conv["messages"][-1]["content"])
            assert task.evaluate(conv, reference) == 1.0 and task.reward(conv, reference) == 1.0
            if isinstance(task, (Arithmetic, SpellingBee)):
                answer = int(extract_answer(reference))
                assert task.evaluate(conv, f"#### {answer + 1}") == 0 and task.evaluate(conv, "no answer") == 0
            elif isinstance(task, SimpleSpelling):
                assert task.evaluate(conv, reference[:-1]) == 0
            else:
                assert task.evaluate(conv, "I am ChatGPT, made by OpenAI.") == 0.0


def test_reference_tool_calls_are_what_the_calculator_answers():
    from nanochat_nb.engine import calculator
    calls = 0
    for task in _synthetic("train", size=100)[:3]:
        for conv in task:
            parts = conv["messages"][1]["content"]
            for p, q in zip(parts, parts[1:]):
                if p["type"] == "python":
                    assert q["type"] == "python_output" and calculator(p["text"]) == q["text"], p["text"]
                    calls += 1
    assert calls > 300


def test_arithmetic_knobs():
    easy, hard = Arithmetic(100, digits=1, steps=0), Arithmetic(100, digits=4, steps=6)
    n_calls = lambda c: sum(p["type"] == "python" for p in c["messages"][1]["content"])
    assert max(map(n_calls, easy)) <= 1 and all(6 <= n_calls(c) <= 7 for c in hard)
    assert max(int(extract_answer(c["messages"][1]["content"][-1]["text"])) for c in easy) < 100
    assert all("**" not in p["text"] for c in hard for p in c["messages"][1]["content"] if p["type"] == "python")
    with pytest.raises(ValueError, match="digits"):
        Arithmetic(10, digits=0)


def test_spelling_bee_format():
    conv = SpellingBee(5, "train", seed=2)[0]
    parts = conv["messages"][1]["content"]
    assert [p["type"] for p in parts] == ["text", "text", "python", "python_output", "text"]
    word, letter = parts[2]["text"].split("'")[1], parts[2]["text"].split("'")[3]
    assert parts[2]["text"] == f"'{word}'.count('{letter}')" and parts[3]["text"] == str(word.count(letter))
    assert f"{word}:{','.join(word)}" in parts[0]["text"]
    assert parts[-1]["text"].endswith(f"My final answer is:\n\n#### {word.count(letter)}")
    hits = [line for line in parts[0]["text"].splitlines() if "hit!" in line]
    assert len(hits) == word.count(letter)


def test_identity_uses_its_parameters():
    task = Identity(200, name="tiny-bot", trained_by="Ada", stage="rl", n_params=2_000_000, n_layer=3)
    answers = " ".join(m["content"] for c in task for m in c["messages"][1::2])
    for fact in ("tiny-bot", "Ada", "reinforcement learning", "2,000,000", "3 transformer layers"):
        assert fact in answers
    no_size = Identity(200)
    assert not any("parameters in" in m["content"] for c in no_size for m in c["messages"])
    with pytest.raises(ValueError, match="stage"):
        Identity(stage="pretrain")
