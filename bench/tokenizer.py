"""Benchmark the tokenizer: rustbpe training time and chars/s on the default corpus, tiktoken encode MB/s.

Usage: python bench/tokenizer.py [--vocab-size 4096] [--max-chars N] [--doc-cap 10000] [--threads 4]
The last line printed is a JSON object with every number.
"""
import argparse
import json
import os
import time

from nanochat_nb.tokenizer import Tokenizer, tokenizer_corpus


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--vocab-size", type=int, default=4096)
    parser.add_argument("--max-chars", type=int, default=2_000_000_000)
    parser.add_argument("--doc-cap", type=int, default=10_000, help="crop each document to this many chars")
    parser.add_argument("--threads", type=int, default=4, help="threads for batch encoding")
    args = parser.parse_args()

    # read and crop the corpus first, so the training time is rustbpe's alone
    t0 = time.perf_counter()
    texts, num_chars = [], 0
    for doc in tokenizer_corpus("train"):
        doc = doc[:min(args.doc_cap, args.max_chars - num_chars)]
        texts.append(doc)
        num_chars += len(doc)
        if num_chars >= args.max_chars:
            break
    read_s = time.perf_counter() - t0

    t0 = time.perf_counter()
    tok = Tokenizer.train(texts, args.vocab_size)
    train_s = time.perf_counter() - t0
    print(f"read {len(texts):,} docs ({num_chars:,} chars) in {read_s:.2f} s")
    print(f"rustbpe: vocab {args.vocab_size} in {train_s:.2f} s = {num_chars / train_s / 1e6:.2f} M chars/s "
          f"on {os.cpu_count()} cores")

    text = "".join(texts)
    n_bytes = len(text.encode("utf-8"))
    t0 = time.perf_counter()
    n_tokens = len(tok.encode(text))
    single_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    batch = tok.encode(texts, num_threads=args.threads)
    batch_s = time.perf_counter() - t0
    assert sum(map(len, batch)) > 0
    print(f"tiktoken encode: one text {n_bytes / single_s / 1e6:.1f} MB/s, "
          f"batch of {len(texts):,} docs ({args.threads} threads) {n_bytes / batch_s / 1e6:.1f} MB/s, "
          f"{n_bytes / n_tokens:.2f} bytes/token")
    print(json.dumps({
        "vocab_size": args.vocab_size, "num_docs": len(texts), "num_chars": num_chars, "num_bytes": n_bytes,
        "read_seconds": round(read_s, 3), "train_seconds": round(train_s, 3),
        "train_chars_per_second": round(num_chars / train_s), "encode_single_mb_per_s": round(n_bytes / single_s / 1e6, 2),
        "encode_batch_mb_per_s": round(n_bytes / batch_s / 1e6, 2), "encode_threads": args.threads,
        "bytes_per_token": round(n_bytes / n_tokens, 3), "cpu_count": os.cpu_count()}))


if __name__ == "__main__":
    main()
