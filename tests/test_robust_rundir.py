"""Issue 10, "runs that mix", "a run that never ends" and "leaks": a run directory owns its stages.

Real `nanochat-nb pretrain` processes on tiny models: fresh runs over earlier ones, resumes past the end, two
processes on one run directory, a killed holder's lock, data and tokenizers that changed under a checkpoint, and the
disk that stale temp files and old checkpoints would eat.
"""
import os, re, signal, subprocess, time

from nanochat_nb.checkpoint import checkpoint_dir, latest_step, load_checkpoint

from test_robust_common import (ENV, TINY, cli, cli_batch, cli_cmd, fresh, metric_steps, ok,  # noqa: F401
                                one_line_error, snapshot, trained)


def step_files(run):
    return sorted(p.name for p in checkpoint_dir(run).iterdir() if not p.name.startswith("."))


def test_a_fresh_run_never_lands_on_an_earlier_one(trained):
    before = snapshot(trained)
    args = ["pretrain", "--run-dir", trained, *TINY]
    fresh_start, past_end, at_end = cli_batch([*args, "--num-iterations", 4],
                                              [*args, "--num-iterations", 3, "--resume"],
                                              [*args, "--num-iterations", 4, "--resume"], timeout=240)
    # no --resume: refused, nothing emptied (it used to empty the metrics and keep the old checkpoints)
    one_line_error(fresh_start, "already holds a base run (checkpoints up to step 4)", "--resume", "--overwrite")
    # a resume that asks for fewer steps than the checkpoint has: it used to train forever ("step 00074/5")
    one_line_error(past_end, "meta_000004.json is at step 4, past --num-iterations 3", "--num-iterations 4 or more")
    # exactly at the end: nothing to do, said so, exit 0
    assert ok(at_end) and "already reached step 4 of 4" in at_end.stdout
    assert snapshot(trained) == before
    # --overwrite: the earlier run goes as a whole, checkpoints and metrics alike; a later resume continues the new
    # run, not the old one (the metrics once read 0 1 2 3 10 11 12)
    overwrite, resume = cli_batch([*args, "--num-iterations", 2, "--overwrite"], [*args, "--num-iterations", 4])
    ok(overwrite)
    one_line_error(resume, "already holds a base run (checkpoints up to step 2)")
    assert step_files(trained) == ["meta_000002.json", "model_000002.pt", "optim_000002_rank0.pt"]
    assert metric_steps(trained) == [0, 1, 2]
    ok(cli(*args, "--num-iterations", 4, "--resume"))
    assert metric_steps(trained) == [0, 1, 2, 3, 4] and latest_step(checkpoint_dir(trained)) == 4


def wait_for(predicate, proc, timeout=120):
    deadline = time.monotonic() + timeout
    while not predicate():
        assert proc.poll() is None, f"the run ended early:\n{proc.stderr.read()[-2000:]}"
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


def test_one_process_per_run_dir_and_a_killed_holder_lets_go(fresh, tmp_path):
    # a long run, saving every 5 steps
    first = subprocess.Popen(cli_cmd("pretrain", "--run-dir", fresh, *TINY, "--num-iterations", 100_000,
                                     "--save-every", 5), env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                             text=True)
    try:
        wait_for(lambda: latest_step(checkpoint_dir(fresh)) is not None, first)
        # a second pretraining, and writers of what the first one reads: one line each, naming the holder
        source = tmp_path / "texts"
        source.mkdir()
        (source / "a.txt").write_text("some text " * 100)
        (source / "b.txt").write_text("more text " * 100)
        second, prepare, tokenizer = cli_batch(["pretrain", "--run-dir", fresh, *TINY, "--resume"],
                                               ["data", "prepare", "--source", source, "--run-dir", fresh],
                                               ["tokenizer", "train", "--vocab-size", 512, "--run-dir", fresh])
        one_line_error(second, "its base is in use by pid", str(first.pid))
        one_line_error(prepare, "its data is in use by pid", str(first.pid))
        one_line_error(tokenizer, "its tokenizer is in use by pid", str(first.pid))
        assert first.poll() is None  # the first run never noticed
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait()
    # the killed run's lock went with it; its half-written save (a temp file, as a kill mid-save leaves) goes too
    ckpt = checkpoint_dir(fresh)
    stale = ckpt / f".model_{latest_step(ckpt) + 5:06d}.pt.{first.pid}.tmp"
    stale.write_bytes(os.urandom(3_000_000))
    step = latest_step(ckpt)
    r = ok(cli("pretrain", "--run-dir", fresh, *TINY, "--num-iterations", step + 3, "--resume"))
    # (sometimes the kill also caught a real save half-way: then two temp files go)
    assert re.search(r"removed [12] stale temporary file\(s\) \([3-9]\.\d MB\)", r.stdout), r.stdout
    assert not list(ckpt.glob("*.tmp"))
    steps = metric_steps(fresh)
    assert steps == list(range(step + 4)), "each step once, in order: nothing interleaved or lost"


def test_resume_refuses_other_data_or_tokenizer_unless_allowed(fresh, tmp_path):
    corpus = {name: tmp_path / name for name in ("one", "two")}
    for i, folder in enumerate(corpus.values()):
        folder.mkdir()
        for j in range(40):  # two corpora that differ in one character per document
            (folder / f"{j}.txt").write_text(f"corpus {i}, document {j}: " + "lorem ipsum dolor sit amet " * (20 + j))
    args = ["pretrain", "--run-dir", fresh, *TINY]
    prepare = {name: ["data", "prepare", "--source", folder, "--run-dir", fresh] for name, folder in corpus.items()}
    results = cli_batch(
        prepare["one"], [*args, "--num-iterations", 4, "--save-every", 1],
        prepare["one"], [*args, "--num-iterations", 5, "--resume"],  # the same corpus again: the same shards
        prepare["two"], [*args, "--num-iterations", 6, "--resume"],  # another corpus: it used to carry on silently
        [*args, "--num-iterations", 6, "--resume", "--allow-data-change"],
        # a tokenizer of the same size trained on other text: every id would silently change its meaning
        ["tokenizer", "train", "--vocab-size", 512, "--max-chars", 300_000, "--run-dir", fresh],
        [*args, "--num-iterations", 7, "--resume"])
    for r in results[:5] + results[6:8]:
        ok(r)
    one_line_error(results[5], "meta_000005.json was trained on another data", "--allow-data-change")
    one_line_error(results[8], "meta_000006.json was trained on another tokenizer", "--allow-tokenizer-change")
    meta = load_checkpoint(checkpoint_dir(fresh))[2]
    assert meta["step"] == 6 and set(meta["fingerprints"]) == {"tokenizer", "data"}
    assert metric_steps(fresh) == list(range(7))
    # --keep-checkpoints (default 2): six saves, the newest two on disk, no orphan files of the others
    assert step_files(fresh) == ["meta_000005.json", "meta_000006.json", "model_000005.pt", "model_000006.pt",
                                 "optim_000005_rank0.pt", "optim_000006_rank0.pt"]
