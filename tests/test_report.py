"""The report card (chapter 14): atomic sections that survive a crash mid-write, the summary table from eval.jsonl,
`nanochat-nb report reset/generate` around a real (tiny) midtraining, charts as PNG files, damaged metrics files."""
import os, shutil, time

import pytest

from conftest import make_tiny_run
from nanochat_nb import report
from nanochat_nb.cli import main
from nanochat_nb.eval import append_records, eval_record
from nanochat_nb.pretrain import MetricsError, MetricsLog
from test_midtrain import TINY

PNG = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    "A tokenizer and a base checkpoint (no metrics yet); tests copy it before writing."
    return make_tiny_run(tmp_path_factory.mktemp("report_base"))


@pytest.fixture
def run(tiny, tmp_path):
    return shutil.copytree(tiny, tmp_path / "run")


def write_metrics(run, stage, records):
    "A metrics file written by the stages' own writer."
    log = MetricsLog(run / "metrics" / report.METRICS_FILES[stage])
    for r in records:
        log.write(r)
    return log.path


def base_records(steps=6):
    return [{"step": s, "loss": 8.0 - s * 0.5, "smooth_loss": 8.2 - s * 0.5, "lr_mult": 1.0 - s / steps,
             "tokens_per_s": 1000.0 + s, "mfu": 20.0 + s, "dt": 0.5, "elapsed": 0.5 * s,
             **({"val_bpb": 3.0 - s * 0.1} if s % 3 == 0 else {})} for s in range(steps)]


class Unprintable:
    def __str__(self):
        raise RuntimeError("crash inside the write")


def test_section_crash_mid_write_keeps_previous_file(run):
    first = report.write_section(run, "base")
    assert first == run / "report" / "base-model-training.md"
    before = first.read_bytes()
    assert before.startswith(b"## Base model training\ntimestamp: ") and b"- Number of parameters: " in before
    tokenizer = report.write_section(run, "tokenizer")
    with pytest.raises(RuntimeError, match="crash inside the write"):
        report.write_section(run, "base", data=[{"ok": 1}, {"bad": Unprintable()}])
    assert first.read_bytes() == before  # the old section, not a half-written new one
    assert sorted(p.name for p in (run / "report").iterdir()) == ["base-model-training.md", "tokenizer-training.md"]
    assert "- Vocabulary size: 512" in tokenizer.read_text()
    # a stage that has not run writes nothing; an unknown section is one clear error
    assert report.write_section(run, "mid") is None and report.write_section(run, "rl-eval") is None
    with pytest.raises(ValueError, match="unknown report section 'midtrain'.*mid-eval"):
        report.write_section(run, "midtrain")


def test_section_timestamp_is_the_stage_time_and_values_are_formatted(run):
    path = write_metrics(run, "base", base_records())
    stamp = time.mktime((2025, 10, 13, 9, 30, 0, 0, 0, -1))
    for p in [path, *(run / "checkpoints" / "base").iterdir()]:
        os.utime(p, (stamp, stamp))
    text = report.write_section(run, "base", data=[{"Peak memory": 12345.678, "note": "added by the caller"}]).read_text()
    assert "timestamp: 2025-10-13 09:30:00\n" in text
    assert "- Steps trained: 6\n" in text and "- Final train loss (smoothed): 5.7000\n" in text
    assert "- Minimum validation bpb: 2.7000\n- Final validation bpb: 2.7000\n" in text
    assert "- Mean MFU %: 23.0000\n" in text and "- Mean tokens/s: 1003\n" in text  # step 0 (warm-up) left out
    assert "- Peak memory: 12345.6780\n- note: added by the caller\n" in text
    assert report.format_value(1234567) == "1,234,567" and report.format_value(9999) == "9999"


def test_summary_table_from_eval_jsonl(run):
    records = [eval_record("base", "CORE", "core", 0.2219, 100, 21400),
               eval_record("base", "val", "bpb", 0.8100, 10_485_760, 21400),
               eval_record("mid", "arc-easy", "accuracy", 0.30, 50, 800),
               eval_record("mid", "arc-easy", "accuracy", 0.3561, 50, 800),  # a re-run replaces the first
               eval_record("sft", "gsm8k", "accuracy", 0.0455, 50, 700),
               eval_record("sft", "arithmetic", "accuracy", 0.13, 200, 700),
               eval_record("sft", "ChatCORE", "chatcore", 0.2734, 100, 700),
               eval_record("sft", "val", "bpb", 0.9000, 4096, 700),
               eval_record("rl", "gsm8k", "accuracy", 0.0758, 50, 400)]
    append_records(run / "metrics" / "eval.jsonl", records)
    with open(run / "metrics" / "eval.jsonl", "a") as f:
        f.write('{"stage": "sft", "task": "mmlu", "met')  # a torn append at the end
    notes = []
    report.reset(run)
    text = report.generate(run, charts=False, log=notes.append).read_text()
    table = text[text.index("| Metric | BASE | MID | SFT | RL |"):].split("\n\n")[0].splitlines()
    assert table == ["| Metric | BASE | MID | SFT | RL |", "|---|---|---|---|---|",
                     "| CORE | 0.2219 | - | - | - |",
                     "| ARC-Challenge | - | - | - | - |",
                     "| ARC-Easy | - | 0.3561 | - | - |",
                     "| GSM8K | - | - | 0.0455 | 0.0758 |",
                     "| HumanEval | - | - | - | - |",
                     "| MMLU | - | - | - | - |",
                     "| Arithmetic | - | - | 0.1300 | - |",
                     "| Val BPB | 0.8100 | - | 0.9000 | - |",
                     "| ChatCORE | - | - | 0.2734 | - |"]
    assert any("skipped 1 line(s)" in n for n in notes)
    assert "## Base model evaluation" in text and "- CORE: 0.2219" in text
    assert "## Base model loss" in text and "- val bpb: 0.8100" in text and "- Evaluated tokens: 10,485,760" in text
    sft = text[text.index("## Chat evaluation sft"):text.index("## Chat evaluation rl")]
    assert "- gsm8k: 0.0455\n" in sft and "- val bpb: 0.9000\n" in sft and "- ChatCORE: 0.2734\n" in sft
    assert "## Chat evaluation rl" in text and "## Midtraining" not in text  # no mid checkpoint: no section
    # sections in nanochat's order, then the summary
    order = [text.index(f"## {t}") for t in ("Tokenizer training", "Base model training", "Base model loss",
                                              "Chat evaluation mid", "Chat evaluation sft", "Summary")]
    assert order == sorted(order)


def test_wall_clock_from_run_started_to_last_non_rl_section():
    header = "Run started: 2025-10-13 09:00:00\n"
    sections = {"base": "## B\ntimestamp: 2025-10-13 12:00:00\n", "sft-eval": "## S\ntimestamp: 2025-10-13 12:51:30\n",
                "rl": "## R\ntimestamp: 2025-10-13 14:00:00\n"}
    assert report.wall_clock(header, sections) == (3 * 3600 + 51 * 60 + 30, "3h51m")
    assert report.wall_clock("Run started: 2025-10-13 11:57:30\n", {"base": sections["base"]}) == (150.0, "0h2m (150 s)")
    assert report.wall_clock("Run started: unknown\n", sections)[0] is None


def test_cli_reset_midtrain_generate(run, capsys):
    """The CLI's entry point (in this process, to save two interpreter start-ups): a report reset, a tiny midtraining
    whose command writes its section, then generate."""
    cli = lambda *args: (main([*map(str, args)]), capsys.readouterr())[1]
    out = cli("report", "reset", "--run-dir", run)
    header = (run / "report" / "header.md").read_text()
    assert out.out.strip().endswith("header.md")
    for line in ("# nanochat-nb training report", "### Git Information", "- Commit: ", "- Hourly Rate: ",
                 "- PyTorch: ", "- Tokens (approx): ", "Run started: 20"):
        assert line in header
    out = cli("midtrain", "--run-dir", run, *TINY)
    assert "report section: " in out.out
    mid = (run / "report" / "midtraining.md").read_text()
    assert "- Steps trained: 4" in mid and "- Started from: base step 0" in mid and "- Final validation loss: " in mid
    assert not (run / "report" / "chat-evaluation-mid.md").exists()
    out = cli("eval", "chat", "--tasks", "arithmetic", "--max-problems", 2, "--max-tokens", 4, "--stage", "mid",
              "--device", "cpu", "--run-dir", run)
    assert "report section: " in out.out and "- arithmetic: " in (run / "report" / "chat-evaluation-mid.md").read_text()
    cli("report", "generate", "--run-dir", run)
    text = (run / "report" / "report.md").read_text()
    assert text.startswith("# nanochat-nb training report") and "## Midtraining" in text
    assert "| Arithmetic | - | " in text and "Total wall clock time: 0h" in text
    for name in ("tokenizer", "mid", "eval"):
        assert (run / "report" / f"{name}.png").read_bytes()[:8] == PNG
        assert f"![{name}]({name}.png)" in text
    assert not (run / "report" / "base.png").exists()  # the tiny base has no metrics: no chart, no error


def test_charts_are_png_files_and_tolerate_missing_keys(run):
    write_metrics(run, "base", base_records())
    rl = [{"step": 0, "reward": 0.1}, {"step": 1, "reward": 0.2, "pass@1": 0.05, "pass@4": 0.15},
          {"step": 2}, {"step": 3, "pass@1": 0.1}]
    write_metrics(run, "rl", rl)
    append_records(run / "metrics" / "eval.jsonl", [eval_record("sft", "arithmetic", "accuracy", 0.1, 8, 4)])
    for stage in ("base", "rl", "eval", "tokenizer"):
        fig = report.plot_stage(run, stage)
        assert (run / "report" / f"{stage}.png").read_bytes()[:8] == PNG
        assert fig._suptitle.get_text()
        for ax in fig.axes:
            if (ax.lines or ax.patches) and ax.get_ylabel() != "MFU %":  # MFU: a twin of the throughput axis
                assert ax.get_xlabel() and ax.get_ylabel() and ax.get_title()
    rl_fig = report.plot_stage(run, "rl")
    assert [l.get_label() for l in rl_fig.axes[1].lines] == ["pass@1", "pass@4"]
    assert list(rl_fig.axes[0].lines[0].get_ydata()) == [0.1, 0.2]
    rl_section = report.write_section(run, "rl").read_text()  # no rl checkpoint yet: the metrics alone
    assert "- Mean reward (last 10 steps): 0.1500\n" in rl_section and "- Final pass@1: 0.1000\n" in rl_section
    with pytest.raises(ValueError, match="mid.jsonl is missing or empty; fix: run `nanochat-nb midtrain"):
        report.plot_stage(run, "mid")
    with pytest.raises(ValueError, match="no chart for 'loss'"):
        report.plot_stage(run, "loss")


def test_damaged_metrics_give_a_clear_message(run):
    path = write_metrics(run, "base", base_records())
    with open(path, "a") as f:
        f.write('{"step": 6, "loss": 2.')  # torn: the stage died during an append
    notes = []
    fig = report.plot_stage(run, "base", log=notes.append)
    assert fig.axes[0].lines and any("dropped a torn last line" in n for n in notes)
    lines = path.read_text().splitlines()
    lines[2] = "garbage"
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(MetricsError, match=r"pretrain.jsonl:3 is not a JSON record.*fix: delete that line"):
        report.plot_stage(run, "base")
    section = report.write_section(run, "base", log=notes.append).read_text()
    assert "- Metrics: unreadable (" in section and "- Number of parameters: " in section
    text = report.generate(run, log=notes.append).read_text()  # the rest of the report is still written
    assert "## Base model training" in text and "| Metric | BASE | MID | SFT | RL |" in text
    assert any("chart 'base' not drawn" in n for n in notes)
    # no `report reset` ran: the run is dated by its first section (the tokenizer's), and the wall clock still counts
    assert "(estimated: the end of the first stage" in text and "Total wall clock time: 0h" in text
