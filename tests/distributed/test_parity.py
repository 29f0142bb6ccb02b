"""Tensor parallelism, TP x FSDP2 and sequence parallelism against one process, on gloo under torchrun.

One torchrun per process count (2: tp2, tp2-sp, fsdp2; 4: tp4, tp2xfsdp2, tp2xfsdp2-sp) runs every case (GPT presets,
BERT heads, the chunked loss); each (case, layout) test reads its part of the result. The worker (`_worker.py`) documents what is compared.
TP=4 (the GPT cases) and the BERT task heads at TP=2 x FSDP2=2 are the extended tier: TP=2 and TP=2 x FSDP2=2 prove
the same sharding on two ranks per group, the heads' TP=2 x FSDP2=2 repeats what their TP=2 and BERT pretraining's
TP=2 x FSDP2=2 prove, and four processes on two cores are the default tier's costliest launch.
"""

from __future__ import annotations

import math
import os

import pytest
import torch
from transformers.distributed import DistributedConfig

from megahf import MegatronGPTConfig, MegatronGPTForCausalLM
from megahf.parallel import clip_grad_norm_

GPT_CASES = ("gpt-tiny", "llama-tiny")
BERT_CASES = ("bert-pretraining", "bert-mlm", "bert-classification", "bert-multiple-choice", "bert-qa",
              "bert-token-classification")
LAYOUTS = {"tp2": 2, "tp4": 4, "tp2xfsdp2": 4, "tp2-sp": 2, "tp2xfsdp2-sp": 4,
           "fsdp2": 2}  # layout -> processes (fsdp2: chunked-loss cases only)
BERT_LAYOUTS = ("tp2", "tp2xfsdp2")
# Sequence parallelism (the worker also checks that the norms saw a shard of the sequence).
BERT_SP_CASES = (("bert-pretraining", "tp2-sp"), ("bert-pretraining", "tp2xfsdp2-sp"), ("bert-qa", "tp2-sp"))
# The chunked training loss (loss_chunk_size) on the vocabulary shards: tied and untied output layer. With it the
# forward returns no logits, so "labelled_logits" is replaced by the worker's check that the output layer never ran.
# Under sequence parallelism the loss reads the output layer's weight itself, so the sequence is gathered after the
# final norm instead of inside the output layer: the -sp layouts check that route.
CHUNKED_CASES = ("gpt-chunked-loss", "llama-chunked-loss")
CHUNKED_LAYOUTS = ("tp2", "tp2xfsdp2", "fsdp2", "tp2-sp", "tp2xfsdp2-sp")
TOLERANCE = 1e-5  # relative: max |distributed - single process| / max |single process|
# What the worker compares (the worst over ranks, parameters and tensors of each).
COMPARED = (
    "logits",  # forward without labels (gathered): every output tensor
    "labelled_logits",  # forward with labels (LM heads): plain [..., vocab_size] logits, the loss from the shards
    "loss",  # vocabulary-parallel cross entropy
    "grads",  # every parameter's gradient
    "grad_norm_3",  # megahf's clip_grad_norm_ on the distributed model vs torch's, 3-norm
    "grad_norm_inf",  # ... inf-norm
    "grad_norm",  # ... 2-norm, clipping active
    "clipped_grads",
    "params",  # after one AdamW step
    "step_logits",  # the distributed model after the step
    "saved_tensors",  # save_pretrained on all ranks vs a single-process save
    "reload_logits",  # that checkpoint reloaded in one process
    "auto_load_logits",  # a single-process checkpoint loaded by its Auto class with distributed_config
)
VOCAB_PARALLEL_CASES = ("gpt-tiny", "llama-tiny", "gpt-padded-softmax", "bert-pretraining", "bert-mlm")
# Megatron-LM's padded-vocabulary softmax (padded_vocab_softmax=True): the masking of the padded columns is the only
# difference on the shards, so one layout is enough.
PADDED_SOFTMAX_LAYOUTS = ("tp2",)
EXTENDED_LAYOUTS = ("tp4",)
EXTENDED_PAIRS = {(case, "tp2xfsdp2") for case in BERT_CASES if case != "bert-pretraining"}
RUN_EXTENDED = os.environ.get("MEGAHF_EXTENDED_TESTS") == "1"


@pytest.fixture(scope="module")
def layout_report(torchrun, tmp_path_factory):
    """The worker's results for a layout. One launch runs every layout of the same process count and every case
    (process start-up dominates on two cores); it is run once and cached."""
    launches: dict[int, dict] = {}

    def get(layout: str) -> dict:
        nproc = LAYOUTS[layout]
        if nproc not in launches:
            layouts = [name for name, n in LAYOUTS.items()
                       if n == nproc and (RUN_EXTENDED or name not in EXTENDED_LAYOUTS)]
            workdir = tmp_path_factory.mktemp(f"parity-{nproc}procs")
            skip = [] if RUN_EXTENDED else ["--skip", ",".join(f"{case}:{name}" for case, name in EXTENDED_PAIRS)]
            launches[nproc] = torchrun(
                nproc,
                [*skip, "--layouts", ",".join(layouts),
                 "--cases", ",".join(GPT_CASES + ("gpt-padded-softmax",) + BERT_CASES + CHUNKED_CASES),
                 "--workdir", str(workdir)],
                workdir / "result.json",
            )
        assert launches[nproc]["world_size"] == nproc
        return launches[nproc]["layouts"][layout]

    return get


@pytest.mark.parametrize(
    "case, layout",
    [pytest.param(case, layout, marks=[pytest.mark.extended] if layout in EXTENDED_LAYOUTS else [])
     for case in GPT_CASES for layout in LAYOUTS if layout != "fsdp2"]
    + [("gpt-padded-softmax", layout) for layout in PADDED_SOFTMAX_LAYOUTS]
    + [pytest.param(case, layout, marks=[pytest.mark.extended] if (case, layout) in EXTENDED_PAIRS else [])
       for case in BERT_CASES for layout in BERT_LAYOUTS]
    + list(BERT_SP_CASES)
    + [(case, layout) for case in CHUNKED_CASES for layout in CHUNKED_LAYOUTS],
)
def test_parity(case, layout, layout_report):
    result = layout_report(layout)[case]
    compared = [k for k in COMPARED if k != "labelled_logits" or case in VOCAB_PARALLEL_CASES]
    errors = {key: result[key] for key in compared}
    bad = {key: value for key, value in errors.items() if not value <= TOLERANCE}
    assert not bad, f"{case} {layout}: relative errors above {TOLERANCE}: {bad} (all: {result})"
    # The step was a real one: clipping was active, and the checkpoint held every tensor once.
    assert result["grad_norm_value"] > 0.05
    assert result["saved_keys"] == result["num_params"]
    if case in CHUNKED_CASES:
        # the untied Llama head is an FSDP2 unit of its own under FSDP2, which the chunked loss gathers itself
        assert result["head_is_fsdp_unit"] == (case == "llama-chunked-loss" and "fsdp" in layout)
    if case == "gpt-padded-softmax":
        # The same model and batch as gpt-tiny; the 47 padded rows add about ln(50304 / 50257) = 9e-4 to a fresh
        # model's loss, so this is the padded loss indeed.
        assert abs(result["loss_value"] - layout_report(layout)["gpt-tiny"]["loss_value"]) > 1e-4


# In-process checks: no torchrun needed.


def test_tp_size_that_does_not_divide_the_heads_is_refused():
    config = MegatronGPTConfig.from_preset("llama-tiny", num_layers=2)  # 8 heads, 4 query groups
    with pytest.raises(ValueError, match=r"num_attention_heads=8 .*tp_size=3"):
        config.check_tensor_parallel(3)
    # The model's distribution hook refuses it before any process group or mesh is touched.
    model = MegatronGPTForCausalLM(MegatronGPTConfig.from_preset("llama-tiny", num_layers=1, hidden_size=64))
    with pytest.raises(ValueError, match=r"num_attention_heads=8 .*tp_size=3"):
        MegatronGPTForCausalLM.maybe_distribute_model(model, DistributedConfig(tp_size=3), None)


def test_padded_vocab_that_does_not_divide_is_refused():
    # 4 heads and an ffn of 512 divide by 4; 50257 padded to a multiple of 2 (50258) does not.
    config = MegatronGPTConfig.from_preset("gpt-tiny", num_layers=2, make_vocab_size_divisible_by=2)
    assert config.padded_vocab_size == 50258
    with pytest.raises(ValueError, match=r"padded_vocab_size=50258 .*tp_size=4"):
        config.check_tensor_parallel(4)
    config.check_tensor_parallel(2)  # 50258 = 2 x 25129


def _grads(seed: int, scale: float) -> list[torch.nn.Parameter]:
    generator = torch.Generator().manual_seed(seed)
    params = [torch.nn.Parameter(torch.zeros(shape)) for shape in ((7, 5), (5,), (3, 4, 2))]
    for param in params:
        param.grad = torch.randn(param.shape, generator=generator) * scale
    params.append(torch.nn.Parameter(torch.zeros(2)))  # no gradient: ignored
    return params


@pytest.mark.parametrize("norm_type", [2.0, 1.0, math.inf, 3.0])
@pytest.mark.parametrize("max_norm", [0.05, 1e3])
def test_clip_grad_norm_single_process_equals_torch(norm_type, max_norm):
    ours, theirs = _grads(0, 2.0), _grads(0, 2.0)
    norm = clip_grad_norm_(ours, max_norm, norm_type=norm_type)
    expected = torch.nn.utils.clip_grad_norm_(theirs, max_norm, norm_type=norm_type)
    assert torch.equal(norm, expected)
    for a, b in zip(ours, theirs):
        assert (a.grad is None and b.grad is None) or torch.equal(a.grad, b.grad)


def test_clip_grad_norm_edge_cases():
    assert clip_grad_norm_([torch.nn.Parameter(torch.ones(3))], 1.0).item() == 0.0  # no gradients at all
    param = torch.nn.Parameter(torch.ones(2))
    param.grad = torch.tensor([3.0, 4.0])
    assert clip_grad_norm_(param, 1.0).item() == 5.0  # a single tensor is accepted
    assert torch.allclose(param.grad, torch.tensor([0.6, 0.8]), rtol=1e-5)
    param.grad = torch.tensor([float("nan"), 1.0])
    with pytest.raises(RuntimeError, match="error_if_nonfinite"):
        clip_grad_norm_([param], 1.0, error_if_nonfinite=True)
