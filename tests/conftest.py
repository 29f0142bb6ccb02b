"""Test-wide settings: never touch the Hub, and one CPU thread so that numbers and timings are repeatable (the
test models are tiny: more threads mostly add synchronisation, and they oversubscribe a shared machine)."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

torch.set_num_threads(1)
