"""`compile: true` (torch.compile of each transformer layer) in one process: the same losses as the eager run.

SLOW-ish by nature: inductor compiles the layer's forward and backward on the first step (about 20-40 s on two
CPU cores the first time; inductor's on-disk cache makes later runs fast). Kept to one layer and 3 steps; dropout
is off, since a compiled layer draws its dropout masks from inductor's generator. Compiled layers under torchrun are
in tests/distributed/test_training_layouts.py: FSDP2=2 ("fsdp2-compile") in the default tier; TP=2 with sequence
parallelism, DDP=2, TP=2 and TP=2 x FSDP2=2 ("tp2-sp-compile", "ddp2-compile", "tp2-compile", "tp2xfsdp2-compile")
in the extended tier (MEGAHF_EXTENDED_TESTS=1).

Tolerance 1e-5 relative on each step's loss: inductor may fuse and reorder float32 sums inside the layer (~1e-7
relative each), and three AdamW steps at lr 3e-3 carry that into the next losses well below 1e-5; a layer computed
wrongly (a missed residual, wrong dropout) is off by 1e-2 and more."""

from __future__ import annotations

import pytest

from megahf.training import load_recipe, run_pretrain
from megahf.training.compile import is_compiled
from test_pretrain import tiny_overrides, write_corpus

TOLERANCE = 1e-5


def _losses(tmp_path, name: str, **keys):
    corpus = tmp_path / "corpus.jsonl"
    if not corpus.exists():
        write_corpus(corpus)
    overrides = tiny_overrides(corpus, tmp_path / name, train_steps=3, eval_interval=0, sample_tokens=0,
                               **{"model_overrides.hidden_dropout": 0.0, "model_overrides.attention_dropout": 0.0},
                               **keys)
    result = run_pretrain(load_recipe(None, overrides))
    return result, [e["loss"] for e in result.trainer.state.log_history if "loss" in e]


def test_compiled_layers_train_like_eager(tmp_path):
    _, eager = _losses(tmp_path, "eager")
    compiled_run, compiled = _losses(tmp_path, "compiled", compile=True)
    layers = compiled_run.trainer.model.model.decoder.layers
    assert all(is_compiled(layer) for layer in layers)  # the compiled path was in place
    assert len(eager) == len(compiled) == 3
    errors = [abs(c - e) / abs(e) for c, e in zip(compiled, eager)]
    assert max(errors) <= TOLERANCE, (compiled, eager)
    assert eager[-1] < eager[0]  # it trained: the steps were real
