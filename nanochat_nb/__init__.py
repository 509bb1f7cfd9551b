"""A notebook-first course book that rebuilds the nanochat pipeline, from tokenizer to chat, for real.

Modules:

- `nanochat_nb.checkpoint`: Save a run so that a crash, a kill or a full disk never costs more than the last save: atomic files, a commit marker, and strict loading.
- `nanochat_nb.data`: Text in parquet shards on disk, and a loader that streams them as `(B, T)` batches of tokens: packed best-fit, split across ranks, and resumable exactly."""

__version__ = "0.0.1"
