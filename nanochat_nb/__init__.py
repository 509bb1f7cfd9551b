"""A notebook-first course book that rebuilds the nanochat pipeline, from tokenizer to chat, for real.

Modules:

- `nanochat_nb.chat`: A conversation with the model, token by token: in the notebook, in a terminal, and (next chapter) in a browser or any OpenAI client.
- `nanochat_nb.checkpoint`: Save a run so that a crash, a kill or a full disk never costs more than the last save: atomic files, a commit marker, and strict loading.
- `nanochat_nb.data`: Text in parquet shards on disk, and a loader that streams them as `(B, T)` batches of tokens: packed best-fit, split across ranks, and resumable exactly.
- `nanochat_nb.eval`: Put numbers on a model: bits per byte, CORE for base models, the chat benchmarks and ChatCORE, each computed exactly as nanochat computes it.
- `nanochat_nb.pretrain`: The base training loop, built in steps: twenty lines that learn, then the loop that runs on one process or many, on a laptop or on 8×H100, and survives being killed.
- `nanochat_nb.report`: One Markdown file that says what was trained, on what, for how long, at what cost, and how good it got; and a chart for every stage.
- `nanochat_nb.sandbox`: Run code that a model wrote without trusting it: a separate process under kernel limits, as another user, in a private directory with a clean environment, its output capped, and a verdict for every run.
- `nanochat_nb.serve`: One web server for everyone who wants to talk to the model: a chat page in the browser, nanochat's streaming API, and the OpenAI chat-completions protocol that existing tools already speak.
- `nanochat_nb.tasks`: The benchmarks and the synthetic exercises as conversations, each with its own scorer; mixtures of them for training."""

__version__ = "0.0.1"
