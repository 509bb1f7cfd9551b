"""speedrun.ipynb under papermill: parameters checked before any work, every stage run on tiny settings, a second run
that skips them all, and a failing stage that stops the notebook with its error.

Each run is a real papermill execution of the notebook at the repository root, whose stages are real `nanochat-nb`
processes; `overrides` shrinks every stage to a few steps.
"""
import json, os, shutil, sysconfig
from pathlib import Path

import papermill as pm
import pytest
from papermill.exceptions import PapermillExecutionError

ROOT = Path(__file__).resolve().parent.parent
NOTEBOOK = ROOT / "speedrun.ipynb"
os.environ.update(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", OMP_NUM_THREADS="1")

CHAT = "--device-batch-size 2 --rows-per-step 4 --num-iterations 3 --eval-every 3 --eval-batches 1 " \
       "--eval-problems 4 --eval-max-tokens 12 --arithmetic 40 --spelling 10 --simple-spelling 10 --identity 10"
EVAL = "--tasks arithmetic,spelling --max-problems 4 --max-tokens 12"
TINY = {"tokenizer": "--vocab-size 512 --max-chars 300000",
        "pretrain": "--depth 2 --sequence-len 128 --device-batch-size 2 --total-batch-size 512 --num-iterations 4 "
                    "--eval-every 2 --eval-tokens 1024 --sample-every -1",
        "base_eval": "--eval-tokens 1024", "midtrain": CHAT, "mid_eval": EVAL, "sft": CHAT, "sft_eval": EVAL,
        "rl": "--num-iterations 2 --problems-per-step 2 --num-samples 2 --device-batch-size 2 --max-new-tokens 12 "
              "--passk-problems 2 --passk-samples 2 --eval-problems 4 --eval-max-tokens 12 --train-problems 20",
        "rl_eval": EVAL}


def execute(out, **parameters):
    "Run the notebook with papermill; the executed notebook (also written when a cell fails)."
    try:
        pm.execute_notebook(str(NOTEBOOK), str(out), parameters=parameters, kernel_name="python3", cwd=str(ROOT),
                            progress_bar=False)
    finally:
        nb = json.loads(Path(out).read_text())
    return nb


def text(nb):
    "Every stream and error output of the executed notebook, as one string."
    parts = []
    for cell in nb["cells"]:
        for o in cell.get("outputs", []):
            parts.append("".join(o.get("text", "")) + o.get("evalue", ""))
    return "\n".join(parts)


def small_corpus(folder):
    "A folder of 120 standard-library sources: shards with a few row groups for each of two ranks, quick to pack."
    folder.mkdir()
    for p in sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py"))[:120]:
        shutil.copy(p, folder / p.name)
    return folder


@pytest.mark.parametrize("bad, message", [
    (dict(preset="d99"), "parameter preset='d99'"),
    (dict(nnodes=2, rdzv_endpoint=""), "parameter rdzv_endpoint=''"),
])
def test_a_bad_parameter_stops_before_any_work(tmp_path, bad, message):
    run = tmp_path / "run"
    with pytest.raises(PapermillExecutionError) as e:
        execute(tmp_path / "out.ipynb", run_dir=str(run), **bad)
    assert e.value.ename == "ValueError" and message in e.value.evalue and "fix:" in e.value.evalue
    assert not run.exists()  # nothing was started


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    "A speedrun of every stage on tiny settings: the run directory and the executed notebook."
    tmp = tmp_path_factory.mktemp("speedrun")
    run = tmp / "run"
    nb = execute(tmp / "first.ipynb", run_dir=str(run), data=str(small_corpus(tmp / "corpus")), overrides=TINY,
                 nproc=2)
    return run, nb, tmp


def test_every_stage_runs_then_a_rerun_skips_them_all(finished):
    run, nb, tmp = finished
    out = text(nb)
    for stage in ("base", "mid", "sft"):
        assert list((run / "checkpoints" / stage).glob("model_*.pt")), stage
    records = [json.loads(line) for line in (run / "metrics" / "eval.jsonl").read_text().splitlines()]
    assert {(r["stage"], r["task"]) for r in records} >= {("base", "val"), ("mid", "spelling"), ("sft", "spelling")}
    # the training stages ran under torchrun as 2 processes, their output streamed into the notebook
    assert "$ torchrun --nproc_per_node=2 --standalone -m nanochat_nb.cli pretrain --preset micro --resume" in out
    assert "2 rank(s)" in out
    assert "$ nanochat-nb eval bpb --stage base" in out  # evaluations run as one process
    assert "note: CORE skipped" in out  # offline, no bundle: said, not faked
    # after the stages: their charts as images, the report card with nanochat's summary table, the chat widget
    kinds = [k for c in nb["cells"] for o in c.get("outputs", []) for k in o.get("data", {})]
    assert kinds.count("image/png") >= 5 and "application/vnd.jupyter.widget-view+json" in kinds
    assert "| Metric | BASE | MID | SFT | RL |" in (run / "report" / "report.md").read_text()
    assert any("| Metric | BASE | MID | SFT | RL |" in "".join(o.get("data", {}).get("text/markdown", ""))
               for c in nb["cells"] for o in c.get("outputs", []))
    again = text(execute(tmp / "second.ipynb", run_dir=str(run), data=str(tmp / "corpus"), overrides=TINY, nproc=2))
    assert "$ nanochat-nb" not in again.replace("$ nanochat-nb report reset", ""), again[-3000:]
    for stage in ("tokenizer", "data", "pretrain", "base_eval", "midtrain", "mid_eval", "sft", "sft_eval", "rl",
                  "rl_eval", "report"):
        assert f"{stage}: already done" in again, stage


def test_a_failing_stage_stops_the_notebook_with_its_error(finished):
    run, _, tmp = finished
    copy = tmp / "copy"
    shutil.copytree(run, copy)
    with pytest.raises(PapermillExecutionError) as e:
        execute(tmp / "failed.ipynb", run_dir=str(copy), stages="pretrain", force=True,
                overrides={"pretrain": "--depth 0"})
    # the stage's own one-line message, not a traceback
    assert e.value.ename == "StageFailed" and "nanochat-nb pretrain: error: " in e.value.evalue, e.value.evalue
    nb = json.loads((tmp / "failed.ipynb").read_text())
    assert nb["metadata"]["papermill"]["exception"]
    sources = ["".join(c["source"]) for c in nb["cells"]]
    later = next(i for i, s in enumerate(sources) if s.strip() == 'run_stage("midtrain")')
    assert nb["cells"][later].get("execution_count") is None  # the notebook stopped at the failing stage
