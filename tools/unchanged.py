"""Run a command and fail if it changed any file of the project's source tree.

CI uses this to prove that notebooks are clean and the package is exported: running
`nbdev-clean` or `nbdev-export` on a consistent tree must be a no-op. Works on a dirty
working tree too, because it compares file contents before and after, not against git.
"""
import hashlib, subprocess, sys
from pathlib import Path

WATCHED = ["nbs", "nanochat_nb"]
SKIP = {"__pycache__", ".ipynb_checkpoints"}


def snapshot(root: Path) -> dict:
    "Hash every file under the watched folders."
    out = {}
    for top in WATCHED:
        for p in sorted((root / top).rglob("*")):
            if p.is_file() and not SKIP & set(p.parts):
                out[str(p.relative_to(root))] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


def main(argv):
    if not argv:
        sys.exit("usage: python tools/unchanged.py CMD [ARGS...]")
    root = Path(__file__).resolve().parent.parent
    before = snapshot(root)
    subprocess.run(argv, cwd=root, check=True)
    after = snapshot(root)
    changed = sorted(k for k in before.keys() | after.keys() if before.get(k) != after.get(k))
    if changed:
        print(f"FAIL: `{' '.join(argv)}` changed {len(changed)} file(s):", *changed, sep="\n  ")
        print("Fix: run `make sync` (nbdev-clean, jupytext --sync, nbdev-export) and commit the result.")
        sys.exit(1)
    print(f"ok: `{' '.join(argv)}` changed nothing")


if __name__ == "__main__":
    main(sys.argv[1:])
