"""Chat server speed through the whole stack (HTTP, worker pool, generation thread, engine): time to the first token
and tokens/s, one request at a time and 16 at once.

    python bench/serve.py --run-dir runs/speedrun                 # 1 and 2 CPU workers
    python bench/serve.py --run-dir runs/d20 --stage sft --workers 8

Each request asks for --max-tokens at temperature 0 (so that it runs to the limit, whatever the model), through
nanochat's streaming /chat/completions on a server on 127.0.0.1 started in this process. Time to first token is from
sending the request to the first `token` event; tokens are counted by the server's /stats. The last line is JSON.
"""
import argparse, asyncio, json, statistics, time

import httpx

from nanochat_nb.serve import ServerThread, create_app, load_pool


async def one(client, i, max_tokens):
    "(seconds to the first token event, seconds in all) of one streamed request."
    body = {"messages": [{"role": "user", "content": f"Question {i}: tell me about Python."}],
            "max_tokens": max_tokens, "temperature": 0.0}
    t0, first = time.perf_counter(), None
    async with client.stream("POST", "/chat/completions", json=body) as r:
        async for line in r.aiter_lines():
            if first is None and line.startswith('data: {"token"'):
                first = time.perf_counter() - t0
    return first, time.perf_counter() - t0


async def measure(url, pool, requests, concurrent, max_tokens):
    "Median TTFT, worst TTFT and tokens/s over `requests` requests, `concurrent` at a time."
    async with httpx.AsyncClient(base_url=url, timeout=600) as client:
        await one(client, -1, 8)  # warm-up
        tokens, t0, results = sum(w.tokens for w in pool.workers), time.perf_counter(), []
        for start in range(0, requests, concurrent):
            results += await asyncio.gather(*(one(client, i, max_tokens)
                                              for i in range(start, min(start + concurrent, requests))))
        seconds, tokens = time.perf_counter() - t0, sum(w.tokens for w in pool.workers) - tokens
    ttft = [r[0] for r in results]
    return {"requests": requests, "concurrent": concurrent, "ttft_ms_median": round(statistics.median(ttft) * 1e3, 1),
            "ttft_ms_max": round(max(ttft) * 1e3, 1), "tokens": tokens, "tokens_per_s": round(tokens / seconds, 1)}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--run-dir", required=True, help="a run (or checkpoint) directory")
    p.add_argument("--stage", default=None)
    p.add_argument("--workers", type=int, nargs="+", default=[1, 2], help="worker counts to try (%(default)s)")
    p.add_argument("--max-tokens", type=int, default=128, help="%(default)s")
    p.add_argument("--requests", type=int, default=4, help="sequential requests (%(default)s)")
    args = p.parse_args(argv)
    rows = []
    for n in args.workers:
        pool = load_pool(args.run_dir, args.stage, workers=n)
        with ServerThread(create_app(pool)) as url:
            for requests, concurrent in [(args.requests, 1), (16, 16)]:
                row = {"workers": n, **asyncio.run(measure(url, pool, requests, concurrent, args.max_tokens))}
                print(f"workers {n}, {concurrent:2d} at once: first token {row['ttft_ms_median']:.0f} ms median "
                      f"({row['ttft_ms_max']:.0f} ms worst), {row['tokens_per_s']:.0f} tokens/s in all", flush=True)
                rows.append(row)
    print(json.dumps({"model": pool.model_id, "max_tokens": args.max_tokens, "results": rows}))


if __name__ == "__main__":
    main()
