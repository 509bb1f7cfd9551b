"""Evaluation: CORE's prompts, spans and verdicts against an independent by-hand scorer, the bundle's download path on
a loopback server (checksum, truncation, atomic unpacking), categorical and generative chat evaluation, pass@k,
bits per byte against training's own number, eval.jsonl under concurrent writers, the command line end to end, and
two torchrun processes against one."""
import hashlib, http.server, itertools, math, multiprocessing, os, random, shutil, subprocess, sys, threading
import zipfile
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from nanochat_nb.cli import main
from nanochat_nb.data import prepare_data
from nanochat_nb.engine import Engine, ScriptedModel, calculator, load_for_inference
from nanochat_nb.eval import (BundleError, append_records, core_prompts, demo_core_tasks, eval_record,
                              evaluate_chat_task, evaluate_core, fetch_core_bundle, format_table, item_sequences,
                              judge, letter_ids, load_core_tasks, pass_at_k, predict_letter, predict_letters,
                              read_records, run_eval, sample_replies, sample_replies_many, answer_stop, score_item, score_items, val_bpb,
                              write_core_bundle, zip_core_bundle)
from nanochat_nb.pretrain import make_config, pretrain
from nanochat_nb.tasks import load_task

ENV = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", OMP_NUM_THREADS="1")
FIELDS = {"stage", "task", "metric", "value", "n", "step"}
METRIC_NAMES = {"accuracy", "centered", "bpb", "core", "chatcore", "pass@1"}


@pytest.fixture(scope="module")
def loaded(tiny_run):
    model, tokenizer, _ = load_for_inference(tiny_run, device="cpu")
    return model, tokenizer


def bundle_tasks():
    "The demo tasks plus items that probe the edges: a choice that prefixes another, shots beyond the items."
    tasks = demo_core_tasks()
    tasks[0]["items"].append({"query": "x =", "choices": ["1", "12", "123"], "gold": 2})
    tasks.append(dict(label="many_shots", type="language_modeling", shots=10, baseline=0, delimiter=" ",
                      items=[{"context": f"x{i} =", "continuation": str(i)} for i in range(4)]))
    return tasks


@pytest.fixture(scope="module")
def bundle_zip(tmp_path_factory):
    root = tmp_path_factory.mktemp("bundle")
    zip_core_bundle(write_core_bundle(root / "src", bundle_tasks()), root / "www" / "eval_bundle.zip")
    return root / "www" / "eval_bundle.zip"


class Server:
    "A loopback HTTP server in a thread that serves one file, counts requests, and can misbehave on purpose."

    def __init__(self, path):
        self.data, self.requests, self.mode = Path(path).read_bytes(), 0, "ok"
        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):
                outer.requests += 1
                if outer.mode == "missing":
                    self.send_error(404)
                    return
                body = self.data_for(outer.mode)
                self.send_response(200)
                if outer.mode != "no-length":
                    self.send_header("Content-Length", str(len(outer.data)))  # the full size, even when cut
                self.end_headers()
                self.wfile.write(body)

            def data_for(self, mode):
                return outer.data[:len(outer.data) // 2] if mode in ("truncated", "no-length") else outer.data

            def log_message(self, *args):
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()
        self.url = f"http://127.0.0.1:{self.httpd.server_port}/eval_bundle.zip"


@pytest.fixture(scope="module")
def server(bundle_zip):
    s = Server(bundle_zip)
    yield s
    s.httpd.shutdown()


@pytest.fixture(scope="module")
def arc_root(tmp_path_factory):
    "A local copy of allenai/ai2_arc's layout holding a few ARC-Easy test questions (one with 3 choices)."
    root = tmp_path_factory.mktemp("hub")
    schema = pa.schema([("id", pa.string()), ("question", pa.string()),
                        ("choices", pa.struct([("text", pa.list_(pa.string())), ("label", pa.list_(pa.string()))])),
                        ("answerKey", pa.string())])
    rows = [{"id": f"q{i}", "question": f"Which number is {i}?",
             "choices": {"text": [str(i + j) for j in range(4 - (i == 3))], "label": list("ABCD")[:4 - (i == 3)]},
             "answerKey": "A"} for i in range(7)]
    path = root / "allenai/ai2_arc/ARC-Easy/test-00000-of-00001.parquet"
    path.parent.mkdir(parents=True)
    pq.write_table(pa.Table.from_pylist(rows, schema=schema), path)
    return root


# --- CORE: prompts, spans, verdicts

def test_prompts_are_laid_out_as_nanochat_renders_them():
    shots = [{"query": "Q1", "choices": ["a", "b"], "gold": 1}, {"query": "Q2", "choices": ["c", "d"], "gold": 0}]
    assert core_prompts({"query": "Q", "choices": ["x", "y"], "gold": 0}, "multiple_choice", "\nAnswer: ", shots) == [
        "Q1\nAnswer: b\n\nQ2\nAnswer: c\n\nQ\nAnswer: x", "Q1\nAnswer: b\n\nQ2\nAnswer: c\n\nQ\nAnswer: y"]
    shots = [{"context_options": ["A1", "A2"], "continuation": "c1", "gold": 1}]
    assert core_prompts({"context_options": ["X", "Y"], "continuation": "z", "gold": 0}, "schema", " ", shots) == [
        "A2 c1\n\nX z", "A2 c1\n\nY z"]
    shots = [{"context": "  s1 \n", "continuation": "t1"}, {"context": "s2", "continuation": " t2"}]
    assert core_prompts({"context": "ctx  ", "continuation": "ans"}, "language_modeling", " ", shots) == [
        "s1 t1\n\ns2  t2\n\nctx", "s1 t1\n\ns2  t2\n\nctx ans"]
    assert core_prompts({"context": "ctx", "continuation": "ans"}, "language_modeling", "\n\n") == ["ctx", "ctx\n\nans"]


def test_judge_follows_nanochat_on_ties_and_empty_spans():
    nan, ids = float("nan"), torch.zeros(3, 4, dtype=torch.long)
    losses = torch.tensor([[1.0, 2.0, 3.0, nan], [5.0, 5.0, 5.0, nan], [1.0, 2.0, 3.0, nan]])
    assert judge("multiple_choice", losses, ids, ids, [1, 1, 1], [3, 3, 3], gold=0)        # a tie: the first wins
    assert not judge("multiple_choice", losses, ids, ids, [1, 1, 1], [3, 3, 3], gold=2)
    assert judge("schema", losses, ids, ids, [2, 1, 1], [3, 3, 2], gold=2)                 # means 2, 5, 1
    assert judge("multiple_choice", losses, ids, ids, [3, 1, 1], [3, 3, 3], gold=0)        # empty span first: NaN wins
    assert judge("multiple_choice", losses, ids, ids, [1, 1, 3], [3, 3, 3], gold=0)        # NaN later: never picked
    assert judge("language_modeling", losses, ids, ids, [1], [4])                          # argmax 0 == token 0


def by_hand(model, tokenizer, task, idx):
    "An independent scorer: each text alone through the model, spans found on token lists, sums in float64."
    items, k = task.items, min(task.num_fewshot, len(task.items) - 1)
    others = [i for i in range(len(items)) if i != idx]
    shots = [items[i] for i in random.Random(1234 + idx).sample(others, k)] if k else []
    item, d = items[idx], task.delimiter
    if task.task_type == "language_modeling":
        head = "".join(f"{s['context'].strip()}{d}{s['continuation']}\n\n" for s in shots)
        prefix = (head + item["context"].strip() + d)
        full = tokenizer.encode(prefix + item["continuation"], prepend=tokenizer.bos_id)
        start = len(tokenizer.encode(prefix.strip(), prepend=tokenizer.bos_id))
        with torch.no_grad():
            greedy = model(torch.tensor([full]))[0].argmax(-1).tolist()
        return all(greedy[t - 1] == full[t] for t in range(start, len(full)))
    if task.task_type == "multiple_choice":
        head = "".join(f"{s['query']}{d}{s['choices'][s['gold']]}\n\n" for s in shots)
        texts = [f"{head}{item['query']}{d}{c}" for c in item["choices"]]
    else:
        head = "".join(f"{s['context_options'][s['gold']]}{d}{s['continuation']}\n\n" for s in shots)
        texts = [f"{head}{o}{d}{item['continuation']}" for o in item["context_options"]]
    rows = [tokenizer.encode(t, prepend=tokenizer.bos_id) for t in texts]
    if task.task_type == "multiple_choice":
        shared = next((i for i in range(min(map(len, rows))) if len({r[i] for r in rows}) > 1), min(map(len, rows)))
        spans = [(shared, len(r)) for r in rows]
    else:
        shared = next((i for i in range(min(map(len, rows))) if len({r[-1 - i] for r in rows}) > 1),
                      min(map(len, rows)))
        spans = [(len(r) - shared, len(r)) for r in rows]
    means = []
    for r, (s, e) in zip(rows, spans):
        with torch.no_grad():
            logp = torch.log_softmax(model(torch.tensor([r]))[0].double(), -1)
        nll = [-logp[t - 1, r[t]].item() for t in range(s, e)]
        means.append(sum(nll) / len(nll) if nll else math.nan)
    best = min(range(len(means)), key=lambda i: (math.isnan(means[i]) and i != 0, means[i]))
    return best == item["gold"]


def test_scores_match_a_scorer_written_by_hand(loaded, tmp_path):
    model, tokenizer = loaded
    tasks = load_core_tasks(write_core_bundle(tmp_path, bundle_tasks()))
    seen = set()
    for task in tasks:
        want = [by_hand(model, tokenizer, task, i) for i in range(len(task.items))]
        assert [score_item(model, tokenizer, task, i) for i in range(len(task.items))] == want, task.label
        for budget in (1, 200, 10**6):  # one item per pass, a few, all of them
            assert score_items(model, tokenizer, task, range(len(task.items)), budget) == want, (task.label, budget)
        seen |= set(want)
    assert seen == {True, False}  # the model gets some right and some wrong: the comparison is not vacuous


def test_shuffle_cut_and_shots_follow_nanochat_seeds(tmp_path, loaded):
    _, tokenizer = loaded
    bundle = write_core_bundle(tmp_path, bundle_tasks())
    full = {t.label: t for t in load_core_tasks(bundle)}
    cut = {t.label: t for t in load_core_tasks(bundle, max_per_task=3)}
    for spec in bundle_tasks():
        items = list(spec["items"])
        random.Random(1337).shuffle(items)
        assert full[spec["label"]].items == items and cut[spec["label"]].items == items[:3]
    qa = cut["python_qa"]  # 2 shots, drawn from the 3 items that the cut left
    rows, _, _ = item_sequences(tokenizer, qa, 1)
    shots = [qa.items[i] for i in random.Random(1235).sample([0, 2], 2)]
    assert tokenizer.decode(rows[0][1:]).startswith(f"{shots[0]['query']}\nAnswer: "
                                                   f"{shots[0]['choices'][shots[0]['gold']]}\n\n{shots[1]['query']}")
    many = full["many_shots"]  # 10 shots asked, 3 other items exist: it gets those 3
    text = tokenizer.decode(item_sequences(tokenizer, many, 0)[0][0][1:])
    assert text.count("\n\n") == 3


def test_a_malformed_bundle_is_named(tmp_path):
    bundle = write_core_bundle(tmp_path, demo_core_tasks())
    (bundle / "eval_meta_data.csv").write_text("Eval Task,Random baseline\npython_mc,25\n")
    with pytest.raises(BundleError, match="eval_meta_data.csv.*python_qa"):
        load_core_tasks(bundle)
    (bundle / "core.yaml").unlink()
    with pytest.raises(BundleError, match="core.yaml"):
        load_core_tasks(bundle)


# --- CORE: the download path

def test_bundle_download_is_checked_and_unpacked_atomically(server, bundle_zip, tmp_path):
    cache, sha = tmp_path / "cache", hashlib.sha256(bundle_zip.read_bytes()).hexdigest()
    leftovers = lambda: sorted(p.name for p in cache.iterdir()) if cache.exists() else []
    cases = [("ok", "0" * 64, "expected 0000"), ("truncated", None, "stopped after"),
             ("no-length", None, "not a zip archive"), ("missing", None, "cannot download")]
    for mode, want_sha, message in cases:
        server.mode = mode
        with pytest.raises(BundleError, match=message):
            fetch_core_bundle(cache, server.url, want_sha, log=lambda *a: None)
        assert leftovers() == [], mode  # no zip, no temp folder, no half bundle
    server.mode, before = "ok", server.requests
    bundle = fetch_core_bundle(cache, server.url, sha.upper(), log=lambda *a: None)
    assert leftovers() == ["eval_bundle"] and server.requests == before + 1
    assert sorted(p.name for p in bundle.iterdir()) == ["core.yaml", "eval_data", "eval_meta_data.csv"]
    assert fetch_core_bundle(cache, server.url, log=lambda *a: None) == bundle and server.requests == before + 1


def test_a_zip_that_is_not_a_bundle_leaves_nothing(tmp_path):
    with zipfile.ZipFile(tmp_path / "eval_bundle.zip", "w") as z:
        z.writestr("eval_bundle/core.yaml", "icl_tasks:\n- {label: a, dataset_uri: a.jsonl, num_fewshot: [0], "
                   "icl_task_type: schema}\n")  # no eval_meta_data.csv, no items
    cache = tmp_path / "cache"
    with pytest.raises(BundleError, match=r"eval_bundle.zip is not a CORE bundle.*eval_bundle/eval_meta_data.csv"):
        fetch_core_bundle(cache, (tmp_path / "eval_bundle.zip").as_uri(), log=lambda *a: None)
    assert list(cache.iterdir()) == []


# --- chat evaluation

def test_letters_are_compared_among_themselves_batched(loaded, arc_root):
    model, tokenizer = loaded
    task = load_task("arc-easy", "test", arc_root)
    conversations = list(task)
    got = predict_letters(model, tokenizer, conversations, batch_size=3)
    assert got == [predict_letter(model, tokenizer, c) for c in conversations]
    for c, letter in zip(conversations, got):
        ids = tokenizer.render_for_completion(c)
        with torch.no_grad():
            logits = model(torch.tensor([ids]))[0, -1]
        allowed = {l: logits[tokenizer.encode(l)[0]].item() for l in c["letters"]}
        assert letter == max(allowed, key=allowed.get) and letter in c["letters"]
    with pytest.raises(ValueError, match="'AB' is 2 tokens"):
        letter_ids(tokenizer, ["A", "AB"])
    result = evaluate_chat_task(model, tokenizer, task)
    assert result == {"n": 7, "accuracy": sum(task.evaluate(c, l) for c, l in zip(conversations, got)) / 7}


def scripted_engine(tokenizer, config, text):
    script = tokenizer.encode(text)
    return Engine(ScriptedModel(script, config, tokenizer.encode_special("<|assistant_end|>")), tokenizer)


@pytest.mark.parametrize("name, reply", [
    ("arithmetic", "Adding them: 4 + 5 = 9.\n#### 9\nand then some more words #### 12"),
    ("spelling", "#### 3, or maybe #### 4"),
    ("humaneval", "Sure:\n```python\ndef f(x):\n    return x\n```\nMore text, and ```python\nother\n```"),
])
def test_stopping_at_the_answer_keeps_the_verdict(loaded, name, reply):
    model, tokenizer = loaded
    task = load_task(name)
    conversation = task[0]
    prompt = tokenizer.render_for_completion(conversation)
    engine = scripted_engine(tokenizer, model.config, reply)
    full = sample_replies(engine, prompt, max_tokens=200)[0]
    stopped = sample_replies(engine, prompt, max_tokens=200, stop=answer_stop(task))[0]
    assert full == reply and len(stopped) < len(full) and full.startswith(stopped)
    assert task.evaluate(conversation, stopped) == task.evaluate(conversation, full)
    rows, _ = engine.generate_batch(prompt, max_tokens=200)  # without a stop, the engine's own decoding
    assert tokenizer.decode(rows[0][len(prompt):]) == full


def test_generative_pass_at_k_counts_samples(loaded):
    model, tokenizer = loaded
    task = load_task("arithmetic")
    result = evaluate_chat_task(model, tokenizer, task, max_problems=3, num_samples=3, max_tokens=8,
                                temperature=1.0)
    assert set(result) == {"n", "accuracy", "pass@1", "pass@3"} and result["n"] == 3
    assert result["pass@1"] <= result["pass@3"] == result["accuracy"]



def test_batched_replies_equal_one_at_a_time_on_a_real_model(loaded):
    model, tokenizer = loaded
    task, engine = load_task("arithmetic"), Engine(model, tokenizer)
    prompts = [tokenizer.render_for_completion(task[i]) for i in range(10)]
    assert len({len(p) for p in prompts}) > 3  # prompts of several lengths share batches (left padding)
    for temperature, n in ((0.0, 1), (1.0, 2)):
        batched = sample_replies_many(engine, prompts, n, 32, temperature, stop=answer_stop(task), batch_size=4)
        assert batched == [sample_replies(engine, p, n, 32, temperature, stop=answer_stop(task)) for p in prompts]


def test_batched_evaluation_scores_each_problem_as_before(loaded):
    "A scripted model answers some problems right (after a tool call) and some wrong: the same verdicts either way."
    model, tokenizer = loaded
    task, sp = load_task("arithmetic"), tokenizer.encode_special
    end = sp("<|assistant_end|>")
    conversations = [task[i] for i in range(24)]
    scripts = {}
    for i, c in enumerate(conversations):
        parts = c["messages"][-1]["content"]
        expr, answer = next(p["text"] for p in parts if p["type"] == "python"), int(parts[-1]["text"].split("####")[-1])
        forced = [sp("<|output_start|>"), *tokenizer.encode(calculator(expr)), sp("<|output_end|>")]
        call = [sp("<|python_start|>"), *tokenizer.encode(expr), sp("<|python_end|>")] + tokenizer.encode("?") * len(forced)
        reply = f" so #### {answer if i % 3 else answer + 1}" + ("\nand more words" * (i % 4))
        scripts[tuple(tokenizer.render_for_completion(c))] = call * (i % 2) + tokenizer.encode(reply) + [end]
    scripted = ScriptedModel(scripts, model.config, end)
    engine, stop = Engine(scripted, tokenizer), answer_stop(task)
    prompts = [tokenizer.render_for_completion(c) for c in conversations]
    one_at_a_time = [sample_replies(engine, p, max_tokens=60, stop=stop) for p in prompts]
    assert sample_replies_many(engine, prompts, max_tokens=60, stop=stop, batch_size=8) == one_at_a_time
    by_hand = [task.evaluate(c, replies[0]) for c, replies in zip(conversations, one_at_a_time)]
    assert 0 < sum(by_hand) < len(by_hand) and sum("<|output_start|>" not in r[0] for r in one_at_a_time) < 24
    for batch_size in (1, 8):
        result = evaluate_chat_task(scripted, tokenizer, task, max_problems=24, max_tokens=60, batch_size=batch_size)
        assert result["accuracy"] == sum(by_hand) / 24 and result["n"] == 24

def test_pass_at_k_equals_counting_subsets():
    for n in range(1, 7):
        for c in range(n + 1):
            for k in range(1, n + 1):
                subsets = list(itertools.combinations([1] * c + [0] * (n - c), k))
                assert math.isclose(pass_at_k(n, c, k), sum(any(s) for s in subsets) / len(subsets))


# --- bits per byte

def test_bpb_equals_the_number_training_recorded(tiny_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(tiny_run / "tokenizer", run / "tokenizer")
    prepare_data(run, max_docs=80, chars_per_shard=200_000, docs_per_row_group=8)
    pretrain(run, make_config(depth=2, sequence_len=64, device_batch_size=2, num_iterations=3, eval_every=-1,
                              eval_tokens=1024, sample_every=-1, data_world_size=2, total_batch_size=256),
             log=lambda *a: None)
    model, tokenizer, meta = load_for_inference(run, device="cpu")
    bpb, n = val_bpb(model, tokenizer, run, meta)
    assert bpb == pytest.approx(meta["val_bpb"], abs=1e-6) and n == 1024
    assert val_bpb(model, tokenizer, run, meta, eval_tokens=256)[1] == 256


# --- eval.jsonl

def _append_many(path, who):
    for i in range(40):
        append_records(path, [eval_record("base", f"w{who}", "accuracy", i / 40, i, who) for _ in range(3)])


def test_concurrent_appends_lose_nothing_and_torn_lines_are_isolated(tmp_path):
    path = tmp_path / "metrics" / "eval.jsonl"
    append_records(path, [eval_record("base", "first", "core", 0.1, 1, 0)])
    with open(path, "a") as f:
        f.write('{"stage": "base", "task": "torn"')  # a writer killed mid-line
    ctx = multiprocessing.get_context("fork")
    procs = [ctx.Process(target=_append_many, args=(path, w)) for w in range(4)]
    for p in procs:
        p.start()
    for p in procs:
        p.join()
    records = read_records(path)
    assert len(records) == 1 + 4 * 40 * 3 and all(set(r) == FIELDS for r in records)
    assert sorted(sum(1 for r in records if r["task"] == f"w{w}") for w in range(4)) == [120] * 4
    with pytest.raises(ValueError, match="unknown metric"):
        eval_record("base", "x", "pass@0", 1, 1, 0)


# --- the command line

def cli_in_process(capsys, *argv):
    "Run `nanochat-nb ARGV` in this process: (exit code, stdout, stderr)."
    try:
        main([str(a) for a in argv])
        code = 0
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else 1
        if isinstance(e.code, str):
            print(e.code, file=sys.stderr)
    out = capsys.readouterr()
    return code, out.out, out.err


@pytest.fixture(scope="module")
def evaluated(tiny_run, server, tmp_path_factory):
    "A copy of the tiny run evaluated through the real console command: CORE from the server, then chat."
    run = tmp_path_factory.mktemp("cli") / "run"
    shutil.copytree(tiny_run, run)
    server.mode = "ok"
    cli = lambda *args: subprocess.run([sys.executable, "-m", "nanochat_nb.cli", "eval", *map(str, args)], env=ENV,
                                       capture_output=True, text=True, timeout=300)
    core = cli("core", "--run-dir", run, "--bundle-url", server.url)
    chat = cli("chat", "--run-dir", run, "--tasks", "humaneval,arithmetic,spelling", "--max-problems", 3,
               "--max-tokens", 24)
    return run, core, chat


def test_cli_eval_core_and_chat_print_tables_and_write_eval_jsonl(evaluated, loaded):
    run, core, chat = evaluated
    assert core.returncode == 0, core.stderr[-2000:]
    assert chat.returncode == 0, chat.stderr[-2000:]
    for out, last in ((core.stdout, "CORE"), (chat.stdout, "ChatCORE")):
        table = [line for line in out[out.index("stage  task"):].splitlines()
                 if not line.startswith("report section:")]  # the CLI then names the report section it wrote
        assert table[1].startswith("-----") and table[-1].split()[:2] == ["base", last]
    records = read_records(run / "metrics" / "eval.jsonl")
    assert all(set(r) == FIELDS and r["stage"] == "base" and r["step"] == 0 for r in records)
    assert {r["metric"] for r in records} == METRIC_NAMES - {"bpb"}
    chat_tasks = [r["task"] for r in records if r["metric"] == "accuracy" and r["n"] == 3]
    assert chat_tasks == ["humaneval", "arithmetic", "spelling"]
    model, tokenizer = loaded  # the CLI's CORE numbers are the library's
    direct = evaluate_core(model, tokenizer, run / "cache" / "eval_bundle", log=lambda *a: None)
    got = {r["task"]: r["value"] for r in records if r["metric"] == "centered" and r["task"] not in chat_tasks}
    assert got == {t["task"]: pytest.approx(t["centered"], abs=1e-12) for t in direct["tasks"]}
    assert next(r["value"] for r in records if r["metric"] == "core") == pytest.approx(direct["core"], abs=1e-12)


def test_cli_errors_are_one_line(tiny_run, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    cases = [(["chat", "--tasks", "arithmetic,nope"], "unknown task 'nope'"),
             (["bpb"], "no shard_*.parquet files"),
             (["core", "--bundle-url", "http://127.0.0.1:9/eval_bundle.zip"], "cannot download"),
             (["chat", "--tasks", "arithmetic", "--max-problems", "0"], "no problems to evaluate"),
             (["chat", "--tasks", "arithmetic", "--stage", "sft"], "sft"),
             (["chat", "--tasks", "gsm8k"], "--data-root")]  # no network, no local copy
    for argv, message in cases:
        code, out, err = cli_in_process(capsys, "eval", *argv, "--run-dir", run)
        lines = err.strip().splitlines()
        assert code == 1 and len(lines) == 1 and message in lines[0] and "Traceback" not in err, (argv, err)
    assert not (run / "metrics" / "eval.jsonl").exists()


def test_two_torchrun_processes_equal_one(tiny_run, evaluated, arc_root, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    shutil.copytree(evaluated[0] / "cache", run / "cache")  # the bundle, already fetched
    chat = ["--tasks", "arc-easy,arithmetic,spelling", "--max-problems", 5, "--max-tokens", 16, "--data-root",
            arc_root]
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m",
                "nanochat_nb.cli", "eval"]
    for argv in (["core"], ["chat", *chat]):
        r = subprocess.run([*torchrun, *map(str, argv), "--run-dir", run], env=ENV, capture_output=True, text=True,
                           timeout=300)
        assert r.returncode == 0, r.stderr[-3000:]
        assert r.stdout.count("stage  task") == 1  # rank 0 alone prints and writes
    two = read_records(run / "metrics" / "eval.jsonl")
    one = run_eval("core", run, log=lambda *a: None) + run_eval("chat", run, log=lambda *a: None,
                                                                **dict(tasks=["arc-easy", "arithmetic", "spelling"],
                                                                       max_problems=5, max_tokens=16,
                                                                       data_root=arc_root))
    assert [(r["task"], r["metric"], r["n"]) for r in two] == [(r["task"], r["metric"], r["n"]) for r in one]
    assert [r["value"] for r in two] == pytest.approx([r["value"] for r in one], abs=1e-12)
    assert format_table(two).count("\n") == len(two) + 1
