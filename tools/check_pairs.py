"""Check that every notebook in nbs/ (and speedrun.ipynb) and its jupytext percent `.py` pair hold the same cells.

Compares cell types, sources and tags after parsing both files with jupytext, so the result
does not depend on file timestamps (which a fresh clone scrambles).
"""
import sys
from pathlib import Path

import jupytext


def cells(path: Path) -> list:
    nb = jupytext.read(path)
    return [(c.cell_type, c.source.strip(), tuple(c.metadata.get("tags", ()))) for c in nb.cells]


def main():
    root = Path(__file__).resolve().parent.parent
    bad = []
    for ipynb in sorted((root / "nbs").glob("*.ipynb")) + [root / "speedrun.ipynb"]:  # the chapters, the speedrun
        py = ipynb.with_suffix(".py")
        if not py.exists():
            bad.append(f"{ipynb.name}: no paired {py.name} (fix: jupytext --set-formats ipynb,py:percent {ipynb})")
            continue
        a, b = cells(ipynb), cells(py)
        if a != b:
            first = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
            bad.append(f"{ipynb.name} and {py.name} differ from cell {first} on ({len(a)} vs {len(b)} cells)")
    for py in sorted((root / "nbs").glob("*.py")):
        if not py.with_suffix(".ipynb").exists():
            bad.append(f"{py.name}: no paired notebook (fix: jupytext --sync {py})")
    if bad:
        print("FAIL: notebook pairs out of sync:", *bad, sep="\n  ")
        print("Fix: run `make sync` and commit both files of each pair.")
        sys.exit(1)
    print("ok: every notebook matches its .py pair")


if __name__ == "__main__":
    main()
