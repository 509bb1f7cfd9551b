"""Shared fixtures: a small run directory with a tokenizer and a base checkpoint, made in seconds, for the tests of the
engine, the chat surfaces and evaluation (anything that needs "a model to talk to", not a good one)."""
import os
from dataclasses import asdict

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")


def make_tiny_run(run_dir, depth=2, vocab_size=512, sequence_len=256, step=0, seed=0):
    "A run directory holding a tokenizer and a base checkpoint of a small GPT with random (non-zero) weights."
    from nanochat_nb.checkpoint import checkpoint_dir, save_checkpoint
    from nanochat_nb.model import GPTConfig, build_model
    from nanochat_nb.tokenizer import train_tokenizer
    train_tokenizer(run_dir, vocab_size=vocab_size, max_chars=400_000)
    torch.manual_seed(seed)
    config = GPTConfig.from_depth(depth, vocab_size=vocab_size, sequence_len=sequence_len)
    model = build_model(config, "cpu")
    with torch.no_grad():
        for p in model.parameters():  # lm_head and projections start at zero: give every token a real logit
            if p.dim() == 2:
                p.normal_(0, p.size(1) ** -0.5)
    save_checkpoint(checkpoint_dir(run_dir, "base"), step, model.state_dict(), None,
                    {"model_config": asdict(config), "val_bpb": None})
    return run_dir


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory):
    "A run directory with a tokenizer (vocab 512) and a depth-2 base checkpoint; shared, do not modify it."
    return make_tiny_run(tmp_path_factory.mktemp("tiny_run"))
