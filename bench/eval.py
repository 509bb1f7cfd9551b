"""Evaluation speed: categorical questions, CORE items and generative problems per second, plain and batched.

    python bench/eval.py                          # depth 4, vocab 4096 (the `micro` preset's model), fp32, CPU
    python bench/eval.py --depth 20 --vocab-size 65536 --device cuda

The model has random weights (speed does not depend on what they say), with the stop tokens' output rows zeroed so
that no reply ends early: a generative problem always costs --max-tokens tokens (the worst case, a model that never
stops; a trained one that stops at its answer is faster). Categorical questions are ARC-Easy-shaped (four choices,
read from a local copy of the hub layout through `datasets`); CORE items are the demo bundle's. Each setting is the best
of --repeats timed runs after a warm-up (the best, not the median: on a shared machine the slow runs are other
people's work). The last line is one JSON object.

The generative comparison (--gen-problems, default 256) answers the held-out arithmetic problems greedily with at most
--gen-max-tokens tokens, stopping at the answer as evaluation does: one problem at a time (`sample_replies`, the path
evaluation took before generate_many) against `sample_replies_many` with each of --gen-batch-sizes rows decoded
together, and counts the problems whose replies are identical. --run-dir uses that run's base checkpoint (read only)
instead of random weights; --only-generative skips the rest.

    python bench/eval.py --threads 1 --run-dir runs/speedrun --only-generative
"""
import argparse, json, sys, tempfile, time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import torch

sys.path.insert(0, str(Path(__file__).parent))
from decode import bench_model  # noqa: E402  (the same random-weight model as the decode benchmark)

from nanochat_nb.engine import Engine, load_for_inference  # noqa: E402
from nanochat_nb.eval import (answer_stop, chat_task, demo_core_tasks, evaluate_chat_task, load_core_tasks,  # noqa: E402
                              predict_letter, predict_letters, sample_replies, sample_replies_many, score_item,
                              score_items, write_core_bundle)
from nanochat_nb.tasks import load_task  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--depth", type=int, default=4, help="model depth (%(default)s)")
    p.add_argument("--vocab-size", type=int, default=4096, help="%(default)s")
    p.add_argument("--questions", type=int, default=64, help="categorical questions (%(default)s)")
    p.add_argument("--batch-size", type=int, default=8, help="questions per forward pass (%(default)s)")
    p.add_argument("--core-copies", type=int, default=4, help="copies of the demo bundle's items (%(default)s)")
    p.add_argument("--problems", type=int, default=8, help="generative problems (%(default)s)")
    p.add_argument("--max-tokens", type=int, default=64, help="tokens per generative reply (%(default)s)")
    p.add_argument("--repeats", type=int, default=3, help="timed runs per setting (%(default)s)")
    p.add_argument("--gen-problems", type=int, default=256, help="arithmetic problems, one at a time vs batched "
                   "(%(default)s; 0 skips)")
    p.add_argument("--gen-max-tokens", type=int, default=160, help="longest reply there (%(default)s)")
    p.add_argument("--gen-batch-sizes", default="8,32", help="rows decoded together, comma-separated (%(default)s)")
    p.add_argument("--run-dir", type=Path, default=None, help="use this run's base checkpoint (default: random weights)")
    p.add_argument("--only-generative", action="store_true", help="only the one-at-a-time vs batched comparison")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    p.add_argument("--device", default=None, help="cpu, cuda, ... (default: the best available)")
    return p.parse_args(argv)


def arc_questions(root, n):
    "An ARC-Easy test split of n four-choice questions in the hub's layout under root; the data_root to pass."
    schema = pa.schema([("id", pa.string()), ("question", pa.string()),
                        ("choices", pa.struct([("text", pa.list_(pa.string())), ("label", pa.list_(pa.string()))])),
                        ("answerKey", pa.string())])
    rows = [{"id": f"q{i}", "question": f"Which of these numbers is {i} more than {i * 7 % 50}?",
             "choices": {"text": [str(i * 7 % 50 + i + d) for d in (0, 1, -1, 10)], "label": list("ABCD")},
             "answerKey": "A"} for i in range(n)]
    path = Path(root) / "allenai/ai2_arc/ARC-Easy/test-00000-of-00001.parquet"
    path.parent.mkdir(parents=True)
    pq.write_table(pa.Table.from_pylist(rows, schema=schema), path)
    return Path(root)


def rate(n, fn, repeats=3):
    "Items per second of fn(), which handles n items: the best of `repeats` timed calls after a warm-up."
    fn()
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return round(n / best, 1)


def generative_comparison(model, tokenizer, args, out):
    "Problems/s answering arithmetic greedily one at a time, then batched; how many replies are identical."
    task = chat_task("arithmetic")  # evaluation's 256 held-out problems
    prompts = [tokenizer.render_for_completion(task[i]) for i in range(min(args.gen_problems, len(task)))]
    engine, kw = Engine(model, tokenizer), dict(max_tokens=args.gen_max_tokens, temperature=0.0, stop=answer_stop(task))
    out.update(gen_problems=len(prompts), gen_max_tokens=args.gen_max_tokens,
               gen_prompt_lengths=len({len(p) for p in prompts}))
    sample_replies_many(engine, prompts[:8], **kw)  # warm-up
    t0 = time.perf_counter()
    single = [sample_replies(engine, p, **kw) for p in prompts]
    out["gen_one_at_a_time_problems_s"] = round(len(prompts) / (time.perf_counter() - t0), 2)
    out["gen_reply_chars_mean"] = round(sum(len(r[0]) for r in single) / len(single), 1)
    print(f"generative, one problem at a time:      {out['gen_one_at_a_time_problems_s']:>8,.2f} problems/s "
          f"({len(prompts)} problems, {out['gen_prompt_lengths']} prompt lengths)")
    for batch_size in map(int, args.gen_batch_sizes.split(",")):
        t0 = time.perf_counter()
        many = sample_replies_many(engine, prompts, batch_size=batch_size, **kw)
        rate_b = out[f"gen_batch{batch_size}_problems_s"] = round(len(prompts) / (time.perf_counter() - t0), 2)
        same = out[f"gen_batch{batch_size}_same_replies"] = sum(a == b for a, b in zip(single, many))
        print(f"generative, {batch_size:>2} rows decoded together:   {rate_b:>8,.2f} problems/s "
              f"({rate_b / out['gen_one_at_a_time_problems_s']:.1f}x; {same}/{len(prompts)} replies identical)")


def main(argv=None):
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if args.run_dir is not None:  # read only; our own run, so its pickled tokenizer is trusted
        model, tokenizer, meta = load_for_inference(args.run_dir, "base", device=device, allow_pickle=True)
        args.depth, args.vocab_size = model.config.n_layer, model.config.vocab_size
    else:
        model, tokenizer = bench_model(args.depth, args.vocab_size, device)
    out = {"device": str(device), "threads": torch.get_num_threads(), "depth": args.depth,
           "vocab_size": args.vocab_size, "params": model.num_params(), "weights": str(args.run_dir or "random"),
           "questions": args.questions, "problems": args.problems, "max_tokens": args.max_tokens}
    if args.gen_problems:
        generative_comparison(model, tokenizer, args, out)
    if args.only_generative:
        print(json.dumps(out))
        return
    tmp = Path(tempfile.mkdtemp(prefix="bench_eval_"))

    arc = list(load_task("arc-easy", "test", arc_questions(tmp / "hub", args.questions)))
    out["categorical_plain_q_s"] = rate(len(arc), lambda: [predict_letter(model, tokenizer, c) for c in arc],
                                        args.repeats)
    out["categorical_batched_q_s"] = rate(len(arc), lambda: predict_letters(model, tokenizer, arc, args.batch_size),
                                          args.repeats)
    print(f"categorical, one question per forward:  {out['categorical_plain_q_s']:>8,.1f} questions/s")
    print(f"categorical, {args.batch_size} per forward:          {out['categorical_batched_q_s']:>8,.1f} questions/s")

    specs = demo_core_tasks()
    for spec in specs:
        spec["items"] = spec["items"] * args.core_copies
    tasks = load_core_tasks(write_core_bundle(tmp / "core", specs))
    n = out["core_items"] = sum(len(t.items) for t in tasks)
    out["core_plain_items_s"] = rate(n, lambda: [score_item(model, tokenizer, t, i) for t in tasks
                                                 for i in range(len(t.items))], args.repeats)
    out["core_batched_items_s"] = rate(n, lambda: [score_items(model, tokenizer, t, range(len(t.items)))
                                                   for t in tasks], args.repeats)
    print(f"CORE, one item per forward:             {out['core_plain_items_s']:>8,.1f} items/s")
    print(f"CORE, batched (8,192 tokens per pass):  {out['core_batched_items_s']:>8,.1f} items/s")

    task = load_task("arithmetic")
    out["generative_problems_s"] = rate(args.problems, lambda: evaluate_chat_task(
        model, tokenizer, task, max_problems=args.problems, max_tokens=args.max_tokens), args.repeats)
    out["generative_tok_s"] = round(out["generative_problems_s"] * args.max_tokens, 1)
    print(f"generative, {args.max_tokens} tokens per reply:      {out['generative_problems_s']:>8,.2f} problems/s "
          f"({out['generative_tok_s']:,.0f} tokens/s)")

    print(json.dumps(out))


if __name__ == "__main__":
    main()
