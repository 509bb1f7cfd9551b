"""The shard downloader against a local HTTP server that fails, truncates and stalls on purpose (no network)."""
import collections
import http.server
import os
import threading
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import pyarrow.parquet as pq
import pytest

from nanochat_nb import data
from nanochat_nb.data import FINEWEB_NUM_SHARDS, download_data, download_shards, list_shards, shard_name, write_shards

VAL = shard_name(FINEWEB_NUM_SHARDS - 1)


class Server:
    """Serves real parquet shards from `files`; `plan[name]` lists what the next requests get:
    "500", "truncate" (full Content-Length, half the body, then close), "cut" (no Content-Length, half the body),
    "stall" (wait longer than the client's timeout); after the plan runs out, the whole file."""

    def __init__(self, files):
        self.files, self.plan, self.requests = files, collections.defaultdict(list), collections.Counter()
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_GET(self):
                name = self.path.rsplit("/", 1)[-1]
                server.requests[name] += 1
                if name not in server.files:
                    self.send_error(404)
                    return
                body = server.files[name]
                what = server.plan[name].pop(0) if server.plan[name] else "ok"
                if what == "500":
                    self.send_error(500)
                    return
                if what == "stall":
                    time.sleep(1.0)
                self.send_response(200)
                if what != "cut":
                    self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body[:len(body) // 2] if what in ("truncate", "cut") else body)

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/datasets/x/resolve/main/"
        threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True).start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def served(tmp_path):
    "Five real shards (0-3 and the validation index) in the loader's format, served locally."
    src = tmp_path / "src"
    docs = [f"document number {i} " * (i % 17 + 1) for i in range(400)]
    paths = write_shards(docs, src, chars_per_shard=15_000, docs_per_row_group=16, seed=None)
    assert len(paths) >= 5
    files = {shard_name(i): paths[i].read_bytes() for i in range(4)}
    files[VAL] = paths[4].read_bytes()
    server = Server(files)
    yield server, tmp_path / "data"
    server.close()


class Watcher:
    "Polls the data dir while downloads run: a file under a final shard name must always be the whole shard."

    def __init__(self, data_dir, files):
        self.data_dir, self.files, self.bad, self.stop = data_dir, files, [], threading.Event()
        self.thread = threading.Thread(target=self.run, daemon=True)
        self.thread.start()

    def run(self):
        while not self.stop.is_set():
            for p in self.data_dir.glob("shard_*.parquet") if self.data_dir.exists() else []:
                try:
                    if p.read_bytes() != self.files[p.name]:
                        self.bad.append(p.name)
                except FileNotFoundError:
                    pass
            time.sleep(0.001)

    def close(self):
        self.stop.set()
        self.thread.join()
        return self.bad


def assert_clean(data_dir, files, names):
    "Exactly `names` are present, each byte-identical to the served shard, and no temp file is left."
    assert sorted(os.listdir(data_dir)) == sorted(names)
    for name in names:
        assert (data_dir / name).read_bytes() == files[name]
        pq.read_table(data_dir / name)


def test_retries_truncation_and_skipping(served):
    server, data_dir = served
    server.plan.update({shard_name(1): ["500", "500"], shard_name(2): ["truncate"], shard_name(3): ["cut"]})
    watcher = Watcher(data_dir, server.files)
    paths = download_shards(4, data_dir, base_url=server.url, workers=3, backoff=0.001)
    assert watcher.close() == []
    assert [p.name for p in paths] == [shard_name(i) for i in range(4)] + [VAL]
    assert_clean(data_dir, server.files, server.files)
    assert server.requests == {shard_name(0): 1, shard_name(1): 3, shard_name(2): 2, shard_name(3): 2, VAL: 1}
    assert list_shards(data_dir, "val") == [data_dir / VAL]
    # a second run finds every shard complete and asks the server for nothing
    before = dict(server.requests)
    assert download_shards(4, data_dir, base_url=server.url, backoff=0.001) == paths
    assert server.requests == before


def test_gives_up_with_a_clear_error_and_no_partial_files(served):
    server, data_dir = served
    server.plan.update({shard_name(1): ["500"] * 3, shard_name(2): ["truncate"] * 3})
    watcher = Watcher(data_dir, server.files)
    with pytest.raises(RuntimeError) as e:
        download_shards(4, data_dir, base_url=server.url, max_attempts=3, backoff=0.001)
    assert watcher.close() == []
    msg = str(e.value)
    assert "2 shard(s) failed after 3 attempts" in msg
    assert f"{shard_name(1)}: HTTPError" in msg and f"{shard_name(2)}:" in msg and "truncated" in msg
    assert shard_name(0) not in msg
    assert server.requests[shard_name(1)] == 3 and server.requests[shard_name(2)] == 3
    assert_clean(data_dir, server.files, [shard_name(0), shard_name(3), VAL])
    # the server recovers: a re-run fetches only the two missing shards
    download_shards(4, data_dir, base_url=server.url, backoff=0.001)
    assert server.requests[shard_name(0)] == 1 and server.requests[shard_name(1)] == 4
    assert_clean(data_dir, server.files, server.files)


def test_stall_times_out_then_succeeds(served):
    server, data_dir = served
    server.plan[shard_name(0)] = ["stall"]
    download_shards(1, data_dir, base_url=server.url, timeout=0.3, backoff=0.001)
    assert server.requests[shard_name(0)] == 2
    assert_clean(data_dir, server.files, [shard_name(0), VAL])


def test_damaged_final_file_is_fetched_again(served):
    server, data_dir = served
    data_dir.mkdir()
    (data_dir / shard_name(0)).write_bytes(server.files[shard_name(0)][:100])  # not a parquet file
    download_shards(1, data_dir, base_url=server.url, backoff=0.001)
    assert server.requests[shard_name(0)] == 1
    assert_clean(data_dir, server.files, [shard_name(0), VAL])


def test_backoff_is_exponential(served, monkeypatch):
    server, data_dir = served
    server.plan[shard_name(0)] = ["500", "500", "500"]
    sleeps = []
    monkeypatch.setattr(data.time, "sleep", sleeps.append)
    download_shards(1, data_dir, base_url=server.url, backoff=3.0, max_attempts=4)
    assert sleeps == [3.0, 9.0, 27.0]


def test_download_data_stats_and_bad_counts(served, tmp_path):
    server, _ = served
    run = tmp_path / "run"
    stats = download_data(run, 2, base_url=server.url, backoff=0.001)
    assert (stats["downloaded"], stats["skipped"], stats["val_shard"]) == (3, 0, VAL)
    stats = download_data(run, 3, base_url=server.url, backoff=0.001)
    assert (stats["downloaded"], stats["skipped"]) == (1, 3)
    assert len(list_shards(run / "data", "train")) == 3
    for n in (0, FINEWEB_NUM_SHARDS):
        with pytest.raises(ValueError, match="num_shards must be in"):
            download_shards(n, tmp_path / "x", base_url=server.url)
