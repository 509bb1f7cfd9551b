"""The book (tools/book.py) built with its outputs and read in a real browser: Debian's Chromium, headless, through
Playwright, over loopback. Every page loads without console errors or requests off the machine, every figure a chapter
produced is on its page with alt text, relative links resolve, search finds a chapter, math is drawn, and a screenshot
of each chapter's first screen is saved into the book (`_screenshots/`).

By default the test builds a small book (index and three chapters: executing every chapter takes about as long as
the rest of `make test`); `make book` builds the whole book and runs this file on it (BOOK_DIR=book)."""
import functools, http.server, os, shutil, subprocess, sys, threading
from pathlib import Path
from urllib.parse import urljoin, urlparse

import httpx
import nbformat
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tools"))
import book as bk  # noqa: E402

# index (an `#| echo: false` cell, a figure) and three chapters that between them hold figures with alt text, math,
# `#| hide` cells, a `#| slow` cell (02) and the word the search test looks for (05)
SMALL = ["00_common", "02_model", "05_checkpoint"]
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"


# ---- the mapping of cell options, no browser needed ----

def nb_of(*sources):
    return nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell(s) for s in sources])


def test_cell_options_parse_quarto_and_nbdev_forms():
    assert bk.cell_options("#| echo: false\n#| fig-alt: \"A: b\"\nx = 1\n#| not an option") == (
        {"echo": False, "fig-alt": "A: b"}, "x = 1\n#| not an option")
    assert bk.cell_options("#|export\n#| slow\ny") == ({"export": True, "slow": True}, "y")
    assert bk.cell_options("#| fig-alt: Left: a plot: right\nz")[0] == {"fig-alt": "Left: a plot: right"}
    assert bk.cell_options("z = 2") == ({}, "z = 2")


def test_prepare_maps_options_to_tags_and_alt_text():
    nb = nb_of("#| hide\na", "#| include: false\nb", "#| echo: false\nc", "#| output: false\nd",
               "#| slow\ne", "#| eval: false\nf", "#| fig-alt: \"A plot of g\"\ng", "#| export\nh", "#| gpu\ni",
               "#| default_exp m")
    nb.cells[0].outputs = [nbformat.v4.new_output("stream", text="stale")]
    out = bk.prepare(nb, ["slow", "gpu"])
    assert [c.metadata["tags"] for c in out.cells] == [
        ["remove-cell"], ["remove-cell"], ["remove-input"], ["remove-output"], ["skip-execution"],
        ["skip-execution"], [], [], ["skip-execution"], ["remove-cell"]]
    assert [c.source for c in out.cells] == list("abcdefghi") + [""]  # the options are not shown as code
    assert out.cells[6].metadata["mystnb"] == {"image": {"alt": "A plot of g"}}
    assert out.cells[0].outputs == [] and nb.cells[0].outputs  # a copy, emptied for execution; the input untouched
    kept = bk.prepare(nb, ["slow"], keep_options=True)  # for Quarto, which reads the options itself
    assert kept.cells[2].source == "#| echo: false\nc"


def test_execute_skips_flagged_cells_and_caches(tmp_path):
    nb = bk.prepare(nb_of("x = 41", "#| slow\nraise SystemExit('a slow cell ran')", "#| echo: false\nprint(x + 1)"),
                    ["slow", "gpu"])
    ran, seconds, error = bk.execute(nb, "tiny", tmp_path, tmp_path / "cache")
    assert seconds is not None and [c.execution_count for c in ran.cells] == [1, None, 2]
    assert ran.cells[2].outputs[0]["text"] == "42\n" and not ran.cells[1].outputs
    again, seconds, error = bk.execute(bk.prepare(nb, ["slow"]), "tiny", tmp_path, tmp_path / "cache")
    assert seconds is None and again.cells[2].outputs == ran.cells[2].outputs  # unchanged code: from the cache
    edited = bk.prepare(nb_of("x = 41", "#| slow\nraise SystemExit('a slow cell ran')",
                              "#| echo: false\n#| fig-alt: \"new words\"\nprint(x + 1)"), ["slow", "gpu"])
    edited.cells.insert(0, nbformat.v4.new_markdown_cell("new prose"))
    again, seconds, error = bk.execute(edited, "tiny", tmp_path, tmp_path / "cache")  # only options and prose changed
    assert seconds is None and again.cells[3].outputs == ran.cells[2].outputs and again.cells[0].source == "new prose"
    assert again.cells[3].metadata["mystnb"] == {"image": {"alt": "new words"}}  # today's alt text, cached outputs
    nb.cells[2].source = "print(x + 2)"
    changed, seconds, error = bk.execute(nb, "tiny", tmp_path, tmp_path / "cache")
    assert seconds is not None and changed.cells[2].outputs[0]["text"] == "43\n"
    assert len(list((tmp_path / "cache").glob("tiny-*.ipynb"))) == 1  # the stale entry is gone
    broken, seconds, error = bk.execute(nb_of("print('before')", "1 / 0", "print('after')"), "bad", tmp_path,
                                        tmp_path / "cache")
    assert error.startswith("ZeroDivisionError") and broken.cells[0].outputs and not broken.cells[2].outputs
    assert not list((tmp_path / "cache").glob("bad-*"))  # a failed chapter is run again next time


def test_config_follows_quarto_yml():
    spec = bk.book_spec()
    quarto = yaml.safe_load((ROOT / "_quarto.yml").read_text())
    assert [str(p.relative_to(ROOT)) for p in spec["chapters"]] == quarto["book"]["chapters"]
    names = [p.stem for p in spec["chapters"]]
    toc = bk.toc_yaml(names)
    assert toc["root"] == "index" and [c["file"] for c in toc["chapters"]] == names[1:]
    config = bk.config_yaml(spec)
    assert config["title"] == quarto["book"]["title"] and config["execute"]["execute_notebooks"] == "off"


# ---- the built book in Chromium ----

@pytest.fixture(scope="module")
def built():
    "The book's HTML folder: BOOK_DIR when given (make book), else a small book built here."
    if os.environ.get("BOOK_DIR"):
        html = Path(os.environ["BOOK_DIR"]).resolve()
        assert (html / "index.html").exists(), f"no built book in {html} (fix: make book)"
        if not (html / "_sources").is_dir():
            pytest.skip(f"{html} was rendered by Quarto: these checks read Jupyter Book's _sources/")
    else:
        work = ROOT / "build" / "book_test"
        html = work / "book"
        subprocess.run([sys.executable, str(ROOT / "tools" / "book.py"), "--only", *SMALL, "--out", str(html),
                        "--work", str(work), "--renderer", "jupyter-book"], check=True, cwd=ROOT)
    return html


def test_build_skips_flagged_cells_and_keeps_outputs(built):
    executed = {p.stem: nbformat.read(p, as_version=4) for p in (built / "_sources").glob("*.ipynb")}
    assert "index" in executed and len(executed) >= 3
    for name, nb in executed.items():
        code = [c for c in nb.cells if c.cell_type == "code"]
        if name != "speedrun":  # the pipeline is not run by the book: it shows what `make speedrun` left, if anything
            assert any(c.outputs for c in code), f"{name} has no outputs: it was not executed"
        for c in code:
            assert not c.source.startswith("#|"), f"{name}: cell options left in the code shown"
            if "skip-execution" in c.metadata.get("tags", []):  # #| slow / #| gpu / #| eval: false
                assert c.execution_count is None and not c.outputs, f"{name}: a flagged cell ran"
            elif c.source.strip() and name != "speedrun":
                assert c.execution_count is not None, f"{name}: a cell did not run"
    if "02_model" in executed:  # its `#| slow` cell: a real flagged cell, not run
        assert any("skip-execution" in c.metadata.get("tags", []) for c in executed["02_model"].cells)


@pytest.fixture(scope="module")
def site(built):
    "The book served over loopback, and a headless Chromium tab."
    if not os.environ.get("CI") and not os.path.exists(CHROMIUM):
        pytest.skip("Debian's chromium is not installed (apt-get install chromium)")
    from playwright import sync_api
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(built))
    handler.log_message = lambda *a: None
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_address[1]}/"
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=[
            "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking"])
        tab = browser.new_page(viewport={"width": 1280, "height": 900})
        tab.set_default_timeout(30_000)
        yield tab, url, built
        browser.close()
    server.shutdown()


def chapters(html):
    toc = [p.stem for p in (html / "_sources").glob("*.ipynb")]
    order = [p.stem for p in bk.book_spec()["chapters"]]
    return sorted(toc, key=order.index)


def test_every_page_loads_cleanly_with_its_figures(site):
    tab, url, html = site
    pages = sorted(str(p.relative_to(html)) for p in html.glob("*.html"))
    assert {"index.html", "search.html"} <= set(pages)
    shots = html / "_screenshots"
    shots.mkdir(exist_ok=True)
    for page in pages:
        errors, outside = [], []
        tab.on("console", on_console := lambda m: m.type == "error" and errors.append(m.text))
        tab.on("pageerror", on_error := lambda e: errors.append(str(e)))
        tab.on("request", on_request := lambda r: urlparse(r.url).hostname != "127.0.0.1" and outside.append(r.url))
        tab.on("response", on_response := lambda r: r.status >= 400 and errors.append(f"{r.status} {r.url}"))
        response = tab.goto(url + page, wait_until="load")
        tab.wait_for_load_state("networkidle")
        for event, fn in [("console", on_console), ("pageerror", on_error), ("request", on_request),
                          ("response", on_response)]:
            tab.remove_listener(event, fn)
        assert response.status == 200, page
        assert not errors, f"{page}: console errors {errors}"
        assert not outside, f"{page}: requests off the machine {outside}"
        name = page[:-5]
        if name not in chapters(html):
            continue
        tab.screenshot(path=str(shots / f"{name}.png"))  # the first screen of each chapter
        assert (shots / f"{name}.png").stat().st_size > 10_000
        nb = nbformat.read(html / "_sources" / f"{name}.ipynb", as_version=4)
        want = sum("image/png" in o.get("data", {}) for c in nb.cells if c.cell_type == "code"
                   and not {"remove-cell", "remove-output"} & set(c.metadata.get("tags", [])) for o in c.outputs)
        imgs = tab.eval_on_selector_all(
            ".cell_output img", "els => els.map(e => [e.getAttribute('alt') || '', e.naturalWidth, e.src])")
        assert len(imgs) == want, f"{name}: {want} figures in the notebook, {len(imgs)} on the page"
        for alt, width, src in imgs:
            assert width > 0, f"{name}: figure {src} did not load"
            assert alt.strip() and not alt.endswith(".png"), f"{name}: figure {src} has no alt text (#| fig-alt:)"
        shown = [c for c in nb.cells if c.cell_type == "code" and c.source.strip()
                 and not {"remove-cell", "remove-input"} & set(c.metadata.get("tags", []))]
        code = tab.eval_on_selector_all(".cell_input pre", "els => els.map(e => e.textContent)")
        assert [c.source.strip() for c in shown] == [t.strip() for t in code], f"{name}: hidden code shown"


def test_navigation_links_resolve(site):
    tab, url, html = site
    names = chapters(html)
    seen = set()
    for name in names:
        tab.goto(url + f"{name}.html")
        nav = tab.eval_on_selector_all("nav.bd-links a.reference.internal",
                                       "els => els.map(e => e.getAttribute('href'))")
        listed = [f"{name}.html" if h.startswith("#") else h.split("#")[0] for h in nav]  # "#": the page itself
        assert list(dict.fromkeys(listed)) == [f"{n}.html" for n in names], f"{name}: sidebar {listed}"
        i = names.index(name)
        prev_next = tab.eval_on_selector_all(".prev-next-area a", "els => els.map(e => e.getAttribute('href'))")
        want = ([f"{names[i - 1]}.html"] if i else []) + ([f"{names[i + 1]}.html"] if i + 1 < len(names) else [])
        assert prev_next == want, f"{name}: previous/next links {prev_next}, expected {want}"
        hrefs = tab.eval_on_selector_all("a[href]", "els => els.map(e => e.getAttribute('href'))")
        for href in hrefs:
            target = urljoin(url + f"{name}.html", href).split("#")[0]
            if target.startswith(url) and target not in seen:
                seen.add(target)
                assert httpx.get(target).status_code == 200, f"{name}: broken link {href}"
    assert len(seen) > len(names)


def test_search_finds_a_chapter(site):
    tab, url, html = site
    tab.goto(url + "search.html?q=checkpoint")
    tab.wait_for_function("document.querySelectorAll('#search-results ul.search li').length > 0")
    found = tab.eval_on_selector_all("#search-results ul.search li a", "els => els.map(e => e.getAttribute('href'))")
    assert any(h.startswith("05_checkpoint.html") for h in found), found


def test_math_is_drawn_offline(site):
    if not os.environ.get("CI") and not bk.KATEX.exists():
        pytest.skip("Debian's libjs-katex is not installed (apt-get install libjs-katex)")
    tab, url, html = site
    with_math = [n for n in chapters(html) if 'class="math notranslate' in (html / f"{n}.html").read_text()]
    assert with_math, "no chapter with math in this book"
    for name in with_math:
        tab.goto(url + f"{name}.html")
        tab.wait_for_function("document.querySelectorAll('.katex').length > 0")
        undrawn = tab.evaluate("[...document.querySelectorAll('span.math, div.math')]"
                               ".filter(e => !e.querySelector('.katex') || e.querySelector('.katex-error'))"
                               ".map(e => e.textContent)")
        assert not undrawn, f"{name}: math KaTeX could not draw: {undrawn}"
