"""Beyond one machine: two torchrun "nodes" of one process each, joined by a c10d rendezvous on loopback, train
exactly as one process with two micro-steps (gradient accumulation), as test_pretrain checks for two processes.

The nodes share the run directory, as nodes share a filesystem in a real multi-node run (speedrun.ipynb's `nnodes`,
`node_rank` and `rdzv_endpoint` parameters launch exactly these commands).
"""
import socket, subprocess, sys

import pytest
import torch

from test_pretrain import ENV, TINY, final_weights, fresh_run, losses, prepared, pretrain_cmd, run_ok  # noqa: F401


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def node_cmd(run, node_rank, port, *args):
    "The command line of one node of a two-node pretraining run (one process per node, c10d rendezvous)."
    return [sys.executable, "-m", "torch.distributed.run", "--nnodes=2", f"--node_rank={node_rank}",
            "--nproc_per_node=1", "--rdzv_backend=c10d", f"--rdzv_endpoint=127.0.0.1:{port}",
            "--rdzv_id=test-multinode", "-m", "nanochat_nb.cli", "pretrain", "--run-dir", str(run), *map(str, args)]


def test_two_nodes_equal_one_process_with_accumulation(prepared, tmp_path):
    one, nodes = fresh_run(prepared, tmp_path, "one"), fresh_run(prepared, tmp_path, "nodes")
    run_ok(pretrain_cmd(one, *TINY, "--total-batch-size", 512))
    port = free_port()
    procs = [subprocess.Popen(node_cmd(nodes, r, port, *TINY, "--total-batch-size", 512), env=ENV, text=True,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT) for r in (0, 1)]
    try:
        outs = [p.communicate(timeout=300)[0] for p in procs]
    finally:
        for p in procs:
            p.kill()
    for p, out in zip(procs, outs):
        assert p.returncode == 0, out[-3000:]
    assert any("2 rank(s)" in out for out in outs)  # one world of two ranks, not two runs of one
    l1, l2 = losses(one), losses(nodes)
    assert len(l1) == len(l2) == 6
    assert l1 == pytest.approx(l2, rel=1e-5)
    w1, w2 = final_weights(one, 6), final_weights(nodes, 6)
    assert w1.keys() == w2.keys()
    for k in w1:
        torch.testing.assert_close(w1[k], w2[k], rtol=0, atol=1e-5, msg=k)
    # each node wrote its own optimizer shard next to the shared model file
    assert sorted(p.name for p in (nodes / "checkpoints" / "base").glob("optim_000006_rank*.pt")) == \
        ["optim_000006_rank0.pt", "optim_000006_rank1.pt"]
