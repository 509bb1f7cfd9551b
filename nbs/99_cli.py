# ---
# jupyter:
#   jupytext:
#     cell_metadata_filter: tags,-all
#     formats: ipynb,py:percent
#     text_representation:
#       extension: .py
#       format_name: percent
#       format_version: '1.3'
#       jupytext_version: 1.19.6
#   kernelspec:
#     display_name: python3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # The command line
# > `nanochat-nb`: every stage of the pipeline as a subcommand.

# %%
#| default_exp cli

# %%
#| export
import argparse


# %%
#| export
def main(argv=None):
    "Entry point of the `nanochat-nb` console command."
    parser = argparse.ArgumentParser(prog="nanochat-nb")
    parser.parse_args(argv)
