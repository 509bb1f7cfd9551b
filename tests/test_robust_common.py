"""Helpers for the robustness tests (tests/test_robust_*.py): real `nanochat-nb` processes on real run directories.

Each robustness test meets one class of failure from issue 10 the way a user meets it: through the command line
(`python -m nanochat_nb.cli`), on files on disk, with processes that are really killed. This module holds no tests.
"""
import contextlib, hashlib, json, os, resource, shutil, signal, subprocess, sys, time
from pathlib import Path

import pytest

# one thread per process: several processes share the test machine's two cores
ENV = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", OMP_NUM_THREADS="1", PYTHONHASHSEED="0")

# a tiny pretraining run: depth 2, 64-token rows, a few steps in a few seconds, on the CPU even where a GPU is (the
# memory limits below are for a process without a CUDA context)
TINY = ["--depth", 2, "--sequence-len", 64, "--device-batch-size", 4, "--eval-every", -1, "--eval-tokens", 512,
        "--sample-every", -1, "--packing", "stream", "--device", "cpu"]


def cli_cmd(*args):
    return [sys.executable, "-m", "nanochat_nb.cli", *map(str, args)]


def cli(*args, timeout=300, preexec_fn=None):
    "Run `python -m nanochat_nb.cli ARGS`; returns the completed process (text output)."
    return subprocess.run(cli_cmd(*args), env=ENV, capture_output=True, text=True, timeout=timeout,
                          preexec_fn=preexec_fn)


def ok(r):
    "Assert that a CLI run (or a `cli_batch` result) succeeded; returns it."
    assert r.returncode == 0, f"{r.args}\nstdout:\n{r.stdout[-3000:]}\nstderr:\n{r.stderr[-3000:]}"
    return r


def one_line_error(r, *needles):
    "Assert a failed run whose stderr ends in one `nanochat-nb ...: error: ...` line holding every needle."
    assert r.returncode not in (0, None), f"expected a failure:\n{r.stdout[-2000:]}"
    assert "Traceback" not in r.stderr, r.stderr[-3000:]
    last = r.stderr.strip().splitlines()[-1] if r.stderr.strip() else ""
    assert last.startswith("nanochat-nb ") and ": error: " in last, r.stderr[-2000:]
    for needle in needles:
        assert needle in last, f"{needle!r} not in {last!r}"
    return last


BATCH = r"""
import contextlib, io, json, sys
from nanochat_nb.cli import main
results = []
for argv in json.loads(sys.argv[1]):
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            main(argv)
            code = 0
        except SystemExit as e:  # main's sys.exit(message), or argparse's exit(2)
            code = e.code if isinstance(e.code, int) else 1
            if isinstance(e.code, str):
                print(e.code, file=sys.stderr)
    results.append({"argv": argv, "code": code, "stdout": out.getvalue(), "stderr": err.getvalue()})
print(json.dumps(results), file=sys.__stdout__)
"""


class Result:
    "A CompletedProcess look-alike for one command of `cli_batch`."
    def __init__(self, d):
        self.args, self.returncode, self.stdout, self.stderr = d["argv"], d["code"], d["stdout"], d["stderr"]


def cli_batch(*argvs, preexec_fn=None, timeout=600):
    """Run the CLI's entry point `main(argv)` for each argv in turn in ONE child interpreter (saving torch's start-up
    per command), each with its own stdout and stderr; one Result per argv. A traceback fails the whole child."""
    r = subprocess.run([sys.executable, "-c", BATCH, json.dumps([list(map(str, a)) for a in argvs])], env=ENV,
                       capture_output=True, text=True, timeout=timeout, preexec_fn=preexec_fn)
    assert r.returncode == 0, f"the batch child crashed:\n{r.stderr[-4000:]}"
    return [Result(d) for d in json.loads(r.stdout.strip().splitlines()[-1])]


def snapshot(directory):
    "{relative path: sha256} of every file under `directory` (to check that nothing was touched)."
    directory = Path(directory)
    return {str(p.relative_to(directory)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(directory.rglob("*")) if p.is_file() and ".locks" not in p.parts}


def metric_steps(run, kind=None):
    "The `step` of every record in the run's pretrain metrics (only records holding `kind`, if given)."
    lines = (run / "metrics" / "pretrain.jsonl").read_text().splitlines()
    return [r["step"] for r in map(json.loads, lines) if kind is None or kind in r]


def limit_file_size(nbytes):
    "A preexec_fn: the child may not write files past `nbytes` (Python ignores SIGXFSZ, so writes fail with EFBIG)."
    def apply():
        resource.setrlimit(resource.RLIMIT_FSIZE, (nbytes, nbytes))
    return apply


def run_measuring_rss(cmd, cap_bytes, timeout=300):
    "Run `cmd`, killing it above `cap_bytes` of resident memory; returns (returncode, peak RSS in bytes, stderr)."
    proc = subprocess.Popen(cmd, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline, killed = time.monotonic() + timeout, False
    while True:
        pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
        if pid:
            break
        with contextlib.suppress(OSError, ValueError), open(f"/proc/{proc.pid}/status") as f:
            rss_kb = int(next((l for l in f if l.startswith("VmRSS")), "VmRSS: 0 kB").split()[1])  # 0: exiting
            if rss_kb * 1024 > cap_bytes or time.monotonic() > deadline:  # do not let a regression take the machine
                os.kill(proc.pid, signal.SIGKILL)
                killed = True
        time.sleep(0.05)
    proc.returncode = os.waitstatus_to_exitcode(status)
    stderr = proc.stderr.read()
    assert not killed, f"killed above {cap_bytes / 1e9:.1f} GB of memory (or after {timeout} s):\n{stderr[-2000:]}"
    return proc.returncode, usage.ru_maxrss * 1024, stderr  # ru_maxrss is in kilobytes on Linux


_PREPARED = {}


def prepared_run(tmp_path_factory):
    "A run directory with a tokenizer (vocab 512) and shards of 300 stdlib files, made once per test session."
    if "run" not in _PREPARED:
        from nanochat_nb.data import prepare_data
        from nanochat_nb.tokenizer import train_tokenizer
        run = tmp_path_factory.mktemp("robust_prepared")
        train_tokenizer(run, vocab_size=512, max_chars=1_000_000)
        prepare_data(run, max_docs=300, chars_per_shard=400_000, docs_per_row_group=16)
        _PREPARED["run"] = run
    return _PREPARED["run"]


def trained_run(tmp_path_factory):
    "A copy-me run directory that also holds base checkpoints at steps 2 and 4 and their metrics."
    if "trained" not in _PREPARED:
        run = tmp_path_factory.mktemp("robust_trained") / "run"
        shutil.copytree(prepared_run(tmp_path_factory), run)
        ok(cli("pretrain", "--run-dir", run, *TINY, "--num-iterations", 4, "--save-every", 2))
        _PREPARED["trained"] = run
    return _PREPARED["trained"]


def copy_run(src, tmp_path, name="run"):
    "A private copy of a run directory (without its lock files)."
    dst = tmp_path / name
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns(".locks"))
    return dst


@pytest.fixture
def fresh(tmp_path_factory, tmp_path):
    "A private run directory with a tokenizer and data, and no run yet."
    return copy_run(prepared_run(tmp_path_factory), tmp_path)


@pytest.fixture
def trained(tmp_path_factory, tmp_path):
    "A private run directory holding a finished 4-step base run (checkpoints 2 and 4, metrics 0..4)."
    return copy_run(trained_run(tmp_path_factory), tmp_path)
