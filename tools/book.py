"""Build the book: `index`, the chapters and `speedrun.ipynb`, with their outputs, into `book/` (`make book`).

The chapter list, the title and the output folder come from `_quarto.yml`, the one description of the book.

1. Every notebook is copied into a build folder (`build/book/src/`), its cells' `#|` options turned into what the
   renderer understands: `#| hide` and `#| include: false` drop the cell, `#| echo: false` drops the code,
   `#| output: false` drops the output, `#| eval: false` and the test flags of pyproject's `tst_flags`
   (`#| slow`, `#| gpu`: the cells nbdev-test skips) are not executed, `#| fig-alt:` becomes the figure's alt text.
2. The copies are executed in book order with nbclient, in `nbs/` as nbdev-test runs them, and cached in
   `build/book/cache/` under a hash of their code: a rebuild re-executes only the chapters whose code changed.
   A chapter that stops with an error is rendered up to the error, not cached, and fails the build at the end.
   `speedrun.ipynb` (the whole pipeline) is not run here: it shows the outputs `make speedrun` left in its run dir.
3. A renderer turns the executed copies into HTML. With Quarto on PATH, Quarto renders a copy of `_quarto.yml`
   pointing at them (keeping the `#|` options, which Quarto reads itself; it also honours the remove-* tags).
   Elsewhere (Quarto is not installable on these machines) Jupyter Book 1 does: its `_config.yml`
   and `_toc.yml` are generated from `_quarto.yml`, never written by hand. It gives a sidebar of chapters,
   previous/next links, a search page, figures with alt text, and it runs offline: its theme ships its fonts and
   scripts, and math is drawn by the KaTeX files that Debian's `libjs-katex` installs (copied into the book).

Why Jupyter Book 1 (`jupyter-book<2`): it builds a book from notebooks offline with navigation, previous/next and
search out of the box, renders stored outputs as they are (images, tables, markdown), maps cell tags to hidden
input/output/cells, and takes alt text per cell. Also weighed: `jupyter nbconvert --to html` (one page per notebook,
no navigation, prev/next or search: a book would have to be hand-assembled), Jupyter Book 2.1 / mystmd (tried: the
build stops offline, fetching its site theme), and Quarto (not installable offline; used when on PATH).

Time (2026-12-02, 2 cores shared with other jobs, load 5-12, so noisy): executing a chapter took 4-115 s (index 6,
00 11, 01 31-66, 02 93-106, 03 27-115, 04 62, 05 37-43), 07 took 860 s at load 10; rendering 8 pages takes ~30 s, and
5 s when nothing changed. The whole book executes what nbdev-test runs in `make test` (~10 min on a quiet machine),
so the browser test builds a small book (index + 00, 02, 05): the test file took 2 min with nothing cached (load
4-7), 30 s cached; `make book` builds and tests the whole book.

    python tools/book.py                        # the whole book into book/
    python tools/book.py --only 00_common ...   # a smaller book (the chapters named, with index) -- the tests use it
"""
import argparse, hashlib, json, os, shutil, subprocess, sys, time
from pathlib import Path

import nbformat
import yaml
from nbdev.config import get_config

ROOT = Path(__file__).resolve().parents[1]
KATEX = Path("/usr/share/javascript/katex")  # Debian's libjs-katex
FAVICON = """<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 16 16">
<rect width="16" height="16" rx="3" fill="#2a5a8a"/>
<text x="8" y="12" font-size="10" text-anchor="middle" fill="#fff" font-family="sans-serif">n</text></svg>
"""
KATEX_INIT = """document.addEventListener("DOMContentLoaded", () => renderMathInElement(document.body, {
  throwOnError: false,
  delimiters: [{left: "\\\\[", right: "\\\\]", display: true}, {left: "\\\\(", right: "\\\\)", display: false}]}));
"""


def book_spec(root=ROOT):
    "Title, author, output folder and the notebooks of the book, read from `_quarto.yml`."
    q = yaml.safe_load((root / "_quarto.yml").read_text(encoding="utf-8"))
    chapters = [root / c for c in q["book"]["chapters"]]
    missing = [str(c) for c in chapters if not c.exists()]
    if missing:
        sys.exit(f"book: _quarto.yml lists missing notebooks: {', '.join(missing)} "
                 "(fix: remove them from book.chapters)")
    return dict(title=q["book"].get("title", "book"), author=q["book"].get("author", ""),
                output=root / q["project"].get("output-dir", "book"), chapters=chapters)


def cell_options(source):
    "The `#|` options at the top of a cell, as a dict (`#| slow` -> {'slow': True}), and the code below them."
    lines, opts = source.splitlines(), {}
    n = 0
    while n < len(lines) and lines[n].startswith("#|"):
        text = lines[n][2:].strip()
        if ":" in text:
            key, value = text.split(":", 1)
            try:
                parsed = yaml.safe_load(value) if value.strip() else True
            except yaml.YAMLError:
                parsed = None
            # an unquoted `fig-alt: Left: a plot` is not a YAML scalar: keep the text as written
            opts[key.strip()] = parsed if isinstance(parsed, (str, bool, int, float)) else value.strip()
        elif text:
            opts[text] = True
        n += 1
    return opts, "\n".join(lines[n:])


def prepare(nb, flags, keep_options=False):
    "A copy of `nb` for the renderer: `#|` options mapped to cell tags and metadata, flagged cells set not to run."
    nb = nbformat.from_dict(json.loads(json.dumps(nb)))
    for cell in nb.cells:
        if cell.cell_type != "code":
            continue
        opts, body = cell_options(cell.source)
        tags = set(cell.metadata.get("tags", []))
        if opts.get("hide") or opts.get("include") is False or not body.strip():  # nothing to show: `#| default_exp`
            tags.add("remove-cell")
        if opts.get("echo") is False:
            tags.add("remove-input")
        if opts.get("output") is False:
            tags.add("remove-output")
        if opts.get("eval") is False or any(opts.get(f) for f in flags):
            tags.add("skip-execution")
        if "fig-alt" in opts:
            cell.metadata["mystnb"] = {"image": {"alt": str(opts["fig-alt"])}}
        cell.metadata["tags"] = sorted(tags)
        cell.outputs, cell.execution_count = [], None
        if not keep_options:  # Quarto reads the options itself; Jupyter Book would show them as code
            cell.source = body.strip("\n")
    return nb


def code_hash(nb):
    "What decides a chapter's outputs: its code cells, with their tags."
    key = [(c.source, c.metadata.get("tags", [])) for c in nb.cells if c.cell_type == "code"]
    return hashlib.sha256(json.dumps(key).encode()).hexdigest()[:16]


def execute(nb, name, cwd, cache, timeout=600):
    """Run `nb` in `cwd` (skipping cells tagged skip-execution), or take it from `cache` if its code is unchanged.
    Returns the executed notebook, the seconds it took (None: cached) and the error that stopped it (None: ran)."""
    from nbclient import NotebookClient
    from nbclient.exceptions import CellExecutionError
    hit = cache / f"{name}-{code_hash(nb)}.ipynb"
    if hit.exists():  # the outputs come from the cache; the prose and cell metadata (alt text) from the chapter now
        done = [c for c in nbformat.read(hit, as_version=4).cells if c.cell_type == "code"]
        for cell, old in zip((c for c in nb.cells if c.cell_type == "code"), done):
            cell.outputs, cell.execution_count = old.outputs, old.get("execution_count")
        return nb, None, None
    t0 = time.perf_counter()
    client = NotebookClient(nb, timeout=timeout, kernel_name="python3", resources={"metadata": {"path": str(cwd)}},
                            store_widget_state=False, skip_cells_with_tag="skip-execution")
    try:
        client.execute()
    except CellExecutionError as e:  # the page keeps the outputs up to the error; nothing is cached
        return nb, time.perf_counter() - t0, f"{e.ename}: {e.evalue}"
    cache.mkdir(parents=True, exist_ok=True)
    for old in cache.glob(f"{name}-*.ipynb"):
        old.unlink()
    nbformat.write(nb, hit)
    return nb, time.perf_counter() - t0, None


def toc_yaml(names):
    "Jupyter Book's `_toc.yml`: the first notebook is the landing page, the rest are chapters in order."
    return {"format": "jb-book", "root": names[0], "chapters": [{"file": n} for n in names[1:]]}


def config_yaml(spec):
    "Jupyter Book's `_config.yml`: outputs are stored already, nothing reaches the network."
    sphinx = {"html_show_copyright": False, "nb_ipywidgets_js": {}, "html_last_updated_fmt": None,
              "nb_render_markdown_format": "myst",  # markdown outputs as MyST: their links to chapters resolve
              "html_context": {"default_mode": "light"},  # the theme's mode, else it complains in the console
              "myst_dmath_allow_digits": False}  # "$92 or $24" is money, not math (as in Quarto/pandoc)
    # math offline: KaTeX's own files in _static/katex, started by Sphinx's math loader (deferred, on pages with math);
    # without Debian's libjs-katex the loader does nothing and math stays as LaTeX source
    sphinx.update(html_static_path=["_assets"], mathjax_path="katex-init.js")
    if KATEX.exists():
        sphinx.update(html_css_files=["katex/katex.min.css"],
                      html_js_files=["katex/katex.min.js", "katex/contrib/auto-render.js"])
    return {"title": spec["title"], "author": spec["author"], "only_build_toc_files": True,
            "exclude_patterns": ["_build"], "execute": {"execute_notebooks": "off"},
            "parse": {"myst_enable_extensions": ["dollarmath", "amsmath", "colon_fence", "linkify"]},
            "html": {"favicon": "_assets/favicon.svg", "use_repository_button": False, "use_issues_button": False,
                     "use_edit_page_button": False},
            "launch_buttons": {"notebook_interface": "", "binderhub_url": "", "thebe": False},
            "sphinx": {"config": sphinx}}


def write_if_changed(path, text):
    "Write `text` to `path` unless it holds it already (Sphinx re-reads only the sources whose time changed)."
    if not path.exists() or path.read_text(encoding="utf-8") != text:
        path.write_text(text, encoding="utf-8")


def render_jupyter_book(spec, src, work, out):
    "Generate `_config.yml` + `_toc.yml` from the spec, then Jupyter Book's `conf.py` from them; build; copy to `out`."
    names = [p.stem for p in spec["chapters"]]
    write_if_changed(src / "_toc.yml", yaml.safe_dump(toc_yaml(names), sort_keys=False))
    write_if_changed(src / "_config.yml", yaml.safe_dump(config_yaml(spec), sort_keys=False))
    (src / "_assets").mkdir(exist_ok=True)  # not _static: Jupyter Book loads every script in _static on every page
    write_if_changed(src / "_assets" / "katex-init.js", KATEX_INIT if KATEX.exists() else "// no KaTeX\n")
    write_if_changed(src / "_assets" / "favicon.svg", FAVICON)  # else the browser asks for /favicon.ico, a 404
    if KATEX.exists():
        shutil.copytree(KATEX, src / "_assets" / "katex", dirs_exist_ok=True)
    bin_dir = Path(sys.executable).parent
    jb = str(bin_dir / "jupyter-book") if (bin_dir / "jupyter-book").exists() else "jupyter-book"
    subprocess.run([jb, "config", "sphinx", str(src)], check=True, capture_output=True)
    # Thebe (live code through a remote Binder) is of no use offline, and its script is put in each page twice
    conf = (src / "conf.py").read_text(encoding="utf-8")
    write_if_changed(src / "conf.py", conf + '\nextensions = [e for e in extensions if e not in ("sphinx_thebe", '
                                              '"sphinx_comments")]\n')
    html = work / "html"
    subprocess.run([sys.executable, "-m", "sphinx", "-b", "html", str(src), str(html), "-d", str(work / "doctrees"),
                    "--keep-going", "-q"], check=True)
    if out.resolve() != html.resolve():
        shutil.rmtree(out, ignore_errors=True)
        shutil.copytree(html, out)


def render_quarto(spec, src, out):
    "With Quarto on PATH: a copy of `_quarto.yml` in `src` that lists the executed copies, rendered without executing."
    q = yaml.safe_load((ROOT / "_quarto.yml").read_text(encoding="utf-8"))
    q["project"].update({"output-dir": os.path.relpath(out.resolve(), src.resolve()),
                         "render": [f"{p.stem}.ipynb" for p in spec["chapters"]]})
    q["book"]["chapters"] = [f"{p.stem}.ipynb" for p in spec["chapters"]]
    q["execute"] = {"enabled": False}
    (src / "_quarto.yml").write_text(yaml.safe_dump(q, sort_keys=False), encoding="utf-8")
    subprocess.run(["quarto", "render", str(src)], check=True)


def build(out=None, work=ROOT / "build" / "book", only=None, renderer=None, quiet=True):
    "Prepare, execute (cached) and render the book; returns {chapter: seconds executed, or None when cached}."
    spec = book_spec()
    if only:
        spec["chapters"] = [p for p in spec["chapters"] if p.stem == "index" or p.stem in only]
    out = Path(out or spec["output"])
    renderer = renderer or ("quarto" if shutil.which("quarto") else "jupyter-book")
    flags = get_config(path=ROOT).get("tst_flags", "").split()  # nbdev's own reading of pyproject.toml
    src, cache = work / "src", ROOT / "build" / "book" / "cache"
    src.mkdir(parents=True, exist_ok=True)
    for stale in set(src.glob("*.ipynb")) - {src / p.name for p in spec["chapters"]}:
        stale.unlink()  # a chapter left out of this build
    timings, failed = {}, []
    for path in spec["chapters"]:
        nb = prepare(nbformat.read(path, as_version=4), flags, keep_options=renderer == "quarto")
        if path.name == "speedrun.ipynb":  # the whole pipeline: shown as `make speedrun` last ran it, not re-run here
            nb, timings[path.stem], error = speedrun_outputs(nb), None, None
        else:
            nb, timings[path.stem], error = execute(nb, path.stem, path.parent, cache)
        if error:
            failed.append(f"{path.relative_to(ROOT)}: {error}")
        for i, cell in enumerate(nb.cells):  # a figure needs words for readers who cannot see it
            if any("image/png" in o.get("data", {}) for o in cell.get("outputs", [])) and "mystnb" not in cell.metadata:
                print(f"book: warning: {path.relative_to(ROOT)} cell {i} draws a figure without alt text "
                      f"(fix: add `#| fig-alt: \"what it shows\"` to the cell)", flush=True)
        if not quiet:
            t = timings[path.stem]
            how = "not run (outputs of the last make speedrun)" if path.name == "speedrun.ipynb" else "cached"
            print(f"book: {path.stem}: " + (how if t is None else f"executed in {t:.0f}s") +
                  (f", FAILED ({error})" if error else ""), flush=True)
        write_if_changed(src / path.name, nbformat.writes(nb))
    if renderer == "quarto":
        render_quarto(spec, src, out)
    else:
        render_jupyter_book(spec, src, work, out)
    if failed:
        sys.exit("book: built, but these chapters stopped with an error (shown on their pages):\n  " +
                 "\n  ".join(failed) + "\nfix: run `nbdev-test nbs/NAME.ipynb --do-print` and fix the chapter")
    return timings


def speedrun_outputs(nb, executed=ROOT / "runs" / "speedrun" / "speedrun.ipynb"):
    "The outputs `make speedrun` left in its run directory, when that run used this notebook's code."
    if executed.exists():
        ran = nbformat.read(executed, as_version=4)
        body = lambda c: cell_options(c.source)[1].strip()
        by_source = {body(c): c for c in ran.cells if c.cell_type == "code"}
        for cell in nb.cells:
            if cell.cell_type == "code" and body(cell) in by_source:
                cell.outputs = by_source[body(cell)].get("outputs", [])
    return nb


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", help="output folder (default: _quarto.yml's output-dir, book/)")
    ap.add_argument("--work", default=str(ROOT / "build" / "book"), help="build folder (generated sources)")
    ap.add_argument("--only", nargs="*", help="build only these chapters (and index), by file stem")
    ap.add_argument("--renderer", choices=["quarto", "jupyter-book"], help="default: quarto when on PATH")
    args = ap.parse_args(argv)
    t0 = time.perf_counter()
    timings = build(args.out, Path(args.work), args.only, args.renderer, quiet=False)
    ran = sum(t for t in timings.values() if t)
    print(f"book: {len(timings)} notebooks, {ran:.0f}s executing, {time.perf_counter() - t0:.0f}s in all")


if __name__ == "__main__":
    main()
