"""`megahf plan`: the paper's layouts come out first, what rules the others out is said, the memory figures match
what megahf's tensors take on this machine, and `--write` writes files that `megahf pretrain` runs as written."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

from megahf import MegatronGPTConfig
from megahf.models.gpt.modeling_megatron_gpt import MegatronGPTForCausalLM
from megahf.plan import (GPUS, Layout, Shape, activation_bytes_per_layer, bubble_fraction, format_plan,
                         in_flight_layers, load_model_config, memory_breakdown, plan, recipe_refuses_pipeline,
                         step_time, why_not_pp, why_not_tp, write_layout)

sys.path.insert(0, str(Path(__file__).parent / "distributed"))
from _launch import REPO_ROOT, free_port, launch, tiny_args, torchrun_command, write_corpus  # noqa: E402

# Shoeybi et al. 2019, Table 1: weak scaling on 32 DGX-2H (16 V100 32GB each), global batch 512, seq 1024; the
# tensor-parallel degree grows with the model so that each replica's weights and Adam state fit.
PAPER = {"gpt-1.2b": (64, 1), "gpt-2.5b": (128, 2), "gpt-4.2b": (256, 4), "gpt-8.3b": (512, 8)}


def paper_plan(model: str) -> dict:
    gpus = PAPER[model][0]
    # the paper's attention kept every head's [s, s] scores and softmax (no fused kernel in 2019)
    return plan(load_model_config(model), gpus=gpus, gpu_memory_gb=32, seq=1024, global_batch=512, gpu="v100",
                nodes=gpus // 16, attention="eager")


@pytest.mark.parametrize("model", list(PAPER))
def test_the_papers_tensor_parallel_degree_comes_first(model):
    result = paper_plan(model)
    first = result["fitting"][0].layout
    assert (first.tp, first.fsdp) == (PAPER[model][1], 1), first


def test_what_rules_the_other_layouts_out_for_gpt_8_3b():
    result = paper_plan("gpt-8.3b")
    # Below TP 8 the weights, gradients and Adam state of a replica (16 bytes per parameter) overflow 32 GB unless
    # FSDP shards them, and FSDP's all-gathers over the network cost more than TP 8's all-reduces over NVSwitch.
    for tp in (1, 2, 4):
        reason = why_not_tp(result, tp)
        assert "without FSDP nothing fits (needs" in reason and "> 32 GB" in reason, reason
        assert "s of fsdp" in reason, reason
    assert "would span nodes (16 GPUs per node)" in why_not_tp(result, 32)
    assert why_not_tp(result, 8) == "TP 8: the best layout"
    assert "tensor parallel" in why_not_tp(result, 16)  # fits, but more all-reduces for the same compute
    assert all("needs" in c.why_not and "GB > 32 GB" in c.why_not for c in result["not_fitting"])


# ---------------------------------------------------------------------- memory, planned against measured

SHAPES = {"tiny": dict(hidden_size=64, num_attention_heads=4, seq=64, micro=2),
          "small": dict(hidden_size=256, num_attention_heads=8, seq=128, micro=2)}


def _model(shape: dict, layers: int, recompute: bool, attention: str = "eager",
           selective: bool = False) -> MegatronGPTForCausalLM:
    config = MegatronGPTConfig.from_preset("gpt-tiny", num_layers=layers, hidden_size=shape["hidden_size"],
                                           num_attention_heads=shape["num_attention_heads"], hidden_dropout=0.0,
                                           attention_dropout=0.0, max_position_embeddings=256,
                                           recompute_granularity="selective" if selective else None)
    config._attn_implementation = attention  # eager: the paper's count keeps the softmax output
    model = MegatronGPTForCausalLM(config)
    if recompute:
        model.gradient_checkpointing_enable()
    return model.train()


def _saved_bytes(model, shape: dict) -> int:
    """Bytes of the distinct storages autograd keeps for the backward, parameters aside, when the forward has ended
    (each storage held and keyed by itself, so that no freed address is reused and counted twice or not at all)."""
    params = {p.untyped_storage()._cdata for p in model.parameters()}
    saved: dict[int, torch.UntypedStorage] = {}

    def pack(tensor):
        storage = tensor.untyped_storage()
        if storage._cdata not in params:
            saved[storage._cdata] = storage
        return tensor

    ids = torch.randint(0, 50257, (shape["micro"], shape["seq"]), generator=torch.Generator().manual_seed(0))
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        loss = model(input_ids=ids, labels=ids).loss
    total = sum(storage.nbytes() for storage in saved.values())
    loss.backward()
    return total


def _norm_statistics_bytes(shape: dict, recompute: str) -> int:
    """What the paper's count leaves out and megahf's layer keeps: each of its two LayerNorms saves its mean and
    reciprocal standard deviation, one fp32 value each per token (not split by TP: the norms are replicated), so
    2 x 2 x 4 = 16 bytes per token; full recompute keeps only the layer's input. Byte counts are integers that do not
    depend on the machine: measured and planned must then be equal, not close."""
    return 0 if recompute == "full" else 16 * shape["seq"] * shape["micro"]


@pytest.mark.parametrize("recompute", ["none", "full"])
@pytest.mark.parametrize("name", list(SHAPES))
def test_activation_memory_per_layer_matches_the_saved_tensors(name, recompute):
    """The saved tensors of a 2-layer model minus those of a 1-layer one: one layer's activations, fp32 on CPU
    without dropout, against the plan's formula for the same shape (element bytes 4, no masks): equal to the byte
    once the norms' statistics, which the formula leaves out, are added (0.3% of the tiny shape's layer, 0.08% of the
    small one's)."""
    shape = SHAPES[name]
    per_layer = (_saved_bytes(_model(shape, 2, recompute == "full"), shape)
                 - _saved_bytes(_model(shape, 1, recompute == "full"), shape))
    planned = activation_bytes_per_layer(Shape.of(_model(shape, 1, False).config), shape["seq"], shape["micro"], 1,
                                         False, recompute, element_bytes=4, dropout=False)
    print(f"{name} recompute {recompute}: measured {per_layer} bytes per layer, planned {planned:.0f}")
    assert per_layer == planned + _norm_statistics_bytes(shape, recompute), (per_layer, planned)


@pytest.mark.parametrize("recompute", ["none", "selective"])
@pytest.mark.parametrize("name", ["tiny", pytest.param("small", marks=pytest.mark.extended)])  # small: CPU SDPA's slow
def test_sdpa_activation_memory_per_layer_matches_the_saved_tensors(name, recompute):
    """megahf's default attention (SDPA; on CPU torch's flash kernel for a causal mask without padding, as GPUs run
    their fused kernels) keeps no [s, s] tensor: one layer's saved tensors equal the plan's `attention="sdpa"` count
    (the paper's layer without its attention term, plus the kernel's output and the query copy, plus the log-sum-exp
    without selective recompute) once the norms' statistics are added, to the byte, as the eager count above."""
    shape = SHAPES[name]

    def model(layers):
        return _model(shape, layers, False, attention="sdpa", selective=recompute == "selective")

    per_layer = _saved_bytes(model(2), shape) - _saved_bytes(model(1), shape)
    planned = activation_bytes_per_layer(Shape.of(model(1).config), shape["seq"], shape["micro"], 1, False,
                                         recompute, element_bytes=4, dropout=False, attention="sdpa")
    assert per_layer == planned + _norm_statistics_bytes(shape, recompute), (per_layer, planned)


def test_a_long_sequence_needs_no_recompute_with_sdpa_where_the_papers_count_recomputes():
    """Sequence 4096, Llama-8B's shape on 8 H100s (no dropout, as Llama): per layer the paper's count keeps the [s, s]
    softmax of each head, 2 a s / h = 64 bytes per token and hidden unit in bf16, over twice the rest of the layer;
    SDPA's kernel keeps 4 + 4 a / h. The plan with megahf's attention then fits more layouts and its first keeps
    every activation, where the paper's count must recompute the attention (a slower step)."""
    config = load_model_config("llama-8b")
    sdpa = plan(config, gpus=8, gpu_memory_gb=80, seq=4096, global_batch=64)
    eager = plan(config, gpus=8, gpu_memory_gb=80, seq=4096, global_batch=64, attention="eager")
    assert sdpa["attention"] == "sdpa" and len(sdpa["fitting"]) > len(eager["fitting"]) > 0
    per_layer = {attention: activation_bytes_per_layer(sdpa["shape"], 4096, 1, 1, False, "none", attention=attention)
                 for attention in ("eager", "sdpa")}
    sbh = 4096 * 4096
    assert per_layer["eager"] / sbh == 32 + 64 and per_layer["sdpa"] / sbh == 32 + 4 + 4 * 32 / 4096
    assert sdpa["fitting"][0].layout.recompute == "none" and eager["fitting"][0].layout.recompute != "none"
    assert sdpa["fitting"][0].time["total"] < eager["fitting"][0].time["total"]


@pytest.mark.parametrize("name", list(SHAPES))
def test_weights_gradients_and_optimizer_state_match_the_tensors(name):
    shape = SHAPES[name]
    model = _model(shape, 2, False)
    optimizer = torch.optim.AdamW(model.parameters())
    ids = torch.randint(0, 1000, (1, 8))
    model(input_ids=ids, labels=ids).loss.backward()
    optimizer.step()
    measured = {
        "weights": sum(p.numel() * p.element_size() for p in model.parameters()),
        "gradients": sum(p.grad.numel() * p.grad.element_size() for p in model.parameters()),
        "optimizer": sum(t.numel() * t.element_size() for state in optimizer.state.values()
                         for key, t in state.items() if key != "step"),
    }
    layout = Layout(tp=1, fsdp=1, dp=1, sequence_parallel=False, recompute="none", micro_batch=1, accumulation=1)
    planned = memory_breakdown(Shape.of(model.config), layout, shape["seq"])
    for key, value in measured.items():
        print(f"{name} {key}: measured {value}, planned {planned[key]:.0f}")
        # byte counts: exact (the fp32 bytes per parameter are megahf's: weights 4, gradients 4, Adam 8)
        assert planned[key] == value, key


@pytest.mark.parametrize("chunk", [256, 0])
def test_the_loss_memory_matches_the_allocator(chunk):
    """The output layer and loss under bf16 autocast with fp32 weights (how megahf trains on GPUs), forward and
    backward: the peak of torch's allocator, measured as `scripts/bench/loss_memory.py` does (every allocation and
    free, from the profiler), against the plan's term, chunked (`loss_chunk_size`) and plain, for 2048 tokens of a
    4096-row vocabulary at hidden 128."""
    sys.path.insert(0, str(REPO_ROOT / "scripts" / "bench"))
    from loss_memory import measure

    from megahf.models.chunked_loss import chunked_causal_lm_loss
    from megahf.models.padded_vocab import causal_lm_loss

    tokens, vocab, hidden = 2048, 4096, 128
    generator = torch.Generator().manual_seed(0)
    states = torch.randn(1, tokens, hidden, generator=generator, requires_grad=True)
    layer = torch.nn.Linear(hidden, vocab, bias=False)
    labels = torch.randint(0, vocab, (1, tokens), generator=generator)

    def loss_fn(states, layer, labels):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            if chunk:
                return chunked_causal_lm_loss(states, layer, labels, vocab_size=vocab, chunk_size=chunk)
            return causal_lm_loss(layer(states), labels, vocab_size=vocab)

    peak = measure(loss_fn, states, layer, labels)["peak_bytes"]
    config = MegatronGPTConfig.from_preset("gpt-tiny", vocab_size=vocab, hidden_size=hidden,
                                           make_vocab_size_divisible_by=1)
    layout = Layout(tp=1, fsdp=1, dp=1, sequence_parallel=False, recompute="none", micro_batch=1, accumulation=1)
    planned = memory_breakdown(Shape.of(config), layout, tokens, loss_chunk_size=chunk)["logits"]
    print(f"loss chunk {chunk}: measured peak {peak} bytes, planned {planned:.0f}")
    assert abs(peak - planned) <= 0.15 * planned, (peak, planned)


@pytest.mark.parametrize("tp, fsdp", [(2, 1), (1, 2)], ids=["tp2", "fsdp2"])
def test_sharded_memory_per_rank_matches_the_plan(tp, fsdp, tmp_path):
    """On 2 processes (torchrun, gloo): each rank's weight, gradient and Adam bytes, and its activations per layer
    (saved tensors of a 2-layer minus a 1-layer model, read when the forward has ended), against the plan for the same
    shape and layout: byte counts, hence equal, the activations once the norms' statistics are added as in one
    process. FSDP2's linears save a layer's all-gathered weights too, but FSDP2 frees them after the layer's forward
    (and gathers them again for the backward), so they count 0 bytes while the activations wait."""
    out = tmp_path / "memory.json"
    worker = Path(__file__).parent / "distributed" / "_plan_memory_worker.py"
    launch(torchrun_command(2, str(worker), "--tp", str(tp), "--fsdp", str(fsdp), "--out", str(out)),
           f"memory worker at TP {tp} x FSDP {fsdp}")
    shape = SHAPES["tiny"]
    config = _model(shape, 2, False).config
    layout = Layout(tp=tp, fsdp=fsdp, dp=2 // tp, sequence_parallel=False, recompute="none", micro_batch=2,
                    accumulation=1)
    planned = memory_breakdown(Shape.of(config), layout, shape["seq"])
    per_layer = activation_bytes_per_layer(Shape.of(config), shape["seq"], shape["micro"], tp, False, "none",
                                           element_bytes=4, dropout=False)
    for rank, measured in enumerate(json.loads(out.read_text())):
        print(f"TP {tp} x FSDP {fsdp} rank {rank}: {measured}; planned activations per layer {per_layer:.0f}")
        for key in ("weights", "gradients", "optimizer"):
            assert measured[key] == planned[key], (rank, key, measured[key], planned[key])
        assert measured["activations_per_layer"] == per_layer + _norm_statistics_bytes(shape, "none"), (rank, measured)


# ---------------------------------------------------------------------- pipeline parallelism


def v100_16gb_plan(model: str = "gpt-8.3b", **kwargs) -> dict:
    """DGX-1 nodes of 8 V100 16GB: gpt-8.3b's 16 bytes per parameter / 8 = 16.6 GB do not fit one node's TP 8."""
    return plan(load_model_config(model), gpus=64, gpu_memory_gb=16, seq=1024, global_batch=512, gpu="v100", nodes=8,
                **kwargs)


def test_pipeline_is_proposed_where_tensor_parallelism_and_fsdp_within_a_node_do_not_fit():
    """gpt-8.3b on 8 nodes of 8 V100 16GB: no layout fits with TP x FSDP inside a node (TP 16 would cross it), so the
    plan adds pipeline stages at TP 8, the whole node (Megatron's advice), and the fewest the model needs: PP 2, whose
    1F1B step is faster than sharding the weights over the network with FSDP (the best layout without a pipeline)."""
    result = v100_16gb_plan()
    first = result["fitting"][0]
    lay = first.layout
    assert (lay.pp, lay.tp, lay.schedule, lay.sequence_parallel) == (2, 8, "1f1b", False), lay
    assert lay.accumulation == 512 // (lay.micro_batch * lay.dp) >= lay.pp  # m from the global batch
    assert result["pipeline"].startswith("considered at TP 8"), result["pipeline"]
    assert why_not_pp(result, 2) == "PP 2: the best layout"
    assert why_not_pp(result, 1).startswith("PP 1: fits (TP 8, DP 8, FSDP 4") and "s of fsdp)" in why_not_pp(result, 1)
    assert "does not divide the 72 layers" in why_not_pp(result, 16)
    assert "s of compute" in why_not_pp(result, 4)  # more stages: the last one's output layer weighs more
    unpipelined = [c for c in result["fitting"] if c.layout.pp == 1]
    assert unpipelined and all(c.layout.tp * c.layout.fsdp > 8 for c in unpipelined)
    assert first.time["total"] < unpipelined[0].time["total"] and unpipelined[0].time["fsdp"] > 0
    # sequence parallelism inside the stages is one more pipelined layout
    assert any(c.layout.sequence_parallel for c in result["fitting"] + result["not_fitting"] if c.layout.pp > 1)
    assert first.stage == 0 and first.stage_why.startswith("stage 0 of 2 is the largest")
    assert "72 layer forwards awaiting their backward (1F1B: 2 micro-batches x 36 layers)" in first.stage_why
    text = format_plan(result, "gpt-8.3b", top=1)
    assert f"= 1 / ({lay.accumulation} + 1) = {1 / (lay.accumulation + 1):.1%} of the step" in text, text
    assert "stage 0 of 2 is the largest" in text


def test_no_pipeline_where_a_node_holds_the_model_nor_for_bert_or_a_compiled_recipe(tmp_path):
    paper = paper_plan("gpt-8.3b")  # TP 8 fits within a 16-GPU node
    assert paper["pipeline"].startswith("not needed: TP 8, DP 64") and not paper["ruled_out_pp"]
    assert all(c.layout.pp == 1 for c in paper["fitting"] + paper["not_fitting"])
    bert = plan(load_model_config("bert-3.9b"), gpus=64, gpu_memory_gb=8, seq=512, global_batch=512, gpu="v100")
    assert bert["pipeline"] == "not considered: megahf pipelines GPT models only (BERT's heads read the first and " \
                               "the masked tokens)"
    assert all(c.layout.pp == 1 for c in bert["fitting"] + bert["not_fitting"])
    recipe = tmp_path / "compiled.yaml"
    recipe.write_text("model: gpt-8.3b\ncompile: true\n")
    compiled = v100_16gb_plan(pipeline=recipe_refuses_pipeline(str(recipe)))
    assert compiled["pipeline"].startswith("not considered: the recipe sets compile: true")
    assert all(c.layout.pp == 1 for c in compiled["fitting"])


def _fake_stages(pp: int, virtual: int, rank: int) -> list:
    """What torch.distributed.pipelining's schedules read of their stages to lay out their order (no process group)."""
    from types import SimpleNamespace

    stages = pp * virtual
    return [SimpleNamespace(num_stages=stages, group_size=pp, group_rank=rank, stage_index=rank + i * pp,
                            is_first=rank + i * pp == 0, is_last=rank + i * pp == stages - 1) for i in range(virtual)]


def _peak_forwards_in_flight(actions) -> int:
    """The most chunk forwards a rank has run whose backward has not (each holds its chunk's activations)."""
    from torch.distributed.pipelining.schedules import _ComputationType

    held = peak = 0
    for action in actions:
        if action is not None and action.computation_type == _ComputationType.FORWARD:
            held += 1
        elif action is not None and action.computation_type == _ComputationType.FULL_BACKWARD:
            held -= 1
        peak = max(peak, held)
    return peak


@pytest.mark.parametrize("pp, micro_batches", [(2, 4), (4, 4), (4, 8), (3, 6)])
def test_activations_in_flight_are_those_of_torchs_schedules(pp, micro_batches):
    """The plan's layers in flight per pipeline rank against the order torch.distributed.pipelining's own schedules
    (what megahf's pipeline runs) give each rank: GPipe, 1F1B, and interleaved 1F1B with 2 and 3 chunks, including
    where there are fewer micro-batches than the warm-up would take. Counts of forwards: equal."""
    from torch.distributed.pipelining.schedules import Schedule1F1B, ScheduleGPipe, ScheduleInterleaved1F1B

    def loss(output, target):
        return output

    for rank in range(pp):
        for schedule, cls in (("1f1b", Schedule1F1B), ("gpipe", ScheduleGPipe)):
            order = cls(_fake_stages(pp, 1, rank)[0], micro_batches, loss_fn=loss).pipeline_order[rank]
            layers = 2 * pp  # 2 layers per stage
            assert in_flight_layers(layers, pp, 1, schedule, micro_batches, rank) == \
                2 * _peak_forwards_in_flight(order), (schedule, rank)
        for virtual in (2, 3):
            order = ScheduleInterleaved1F1B(_fake_stages(pp, virtual, rank), micro_batches,
                                            loss_fn=loss).pipeline_order[rank]
            layers = 2 * pp * virtual  # 2 layers per chunk
            assert in_flight_layers(layers, pp, virtual, "interleaved-1f1b", micro_batches, rank) == \
                2 * _peak_forwards_in_flight(order), (virtual, rank)


def test_the_first_stage_keeps_megatrons_activations_and_the_bubble_is_narayanans():
    """Korthikanti et al. 2022, section 4.2.3: under 1F1B the first stage keeps num_layers' worth of activations
    whatever p is (p micro-batches of layers / p), interleaved (1 + (p - 1) / (p v)) times that; the bubble is
    (p - 1) / (v m + p - 1) of the step (Narayanan et al. 2021), and the step time's bubble is that share of the
    pipeline's busy time. Sums of a few float terms: relative 1e-12."""
    shape = Shape.of(load_model_config("gpt-8.3b"))
    alone = memory_breakdown(shape, Layout(8, 1, 8, False, "none", 1, 16), 1024)["activations"]
    for pp, virtual in ((2, 1), (4, 1), (8, 1), (4, 2), (4, 3), (2, 6)):
        layout = Layout(8, 1, 64 // (8 * pp), False, "none", 1, 16, pp, virtual,
                        "interleaved-1f1b" if virtual > 1 else "1f1b")
        first = memory_breakdown(shape, layout, 1024, rank=0)["activations"]
        assert first == pytest.approx(alone * (1 + (pp - 1) / (pp * virtual) if virtual > 1 else 1), rel=1e-12)
        assert memory_breakdown(shape, layout, 1024, rank=pp - 1)["activations"] < first
        time = step_time(shape, layout, 1024, 512, GPUS["v100"], 64, 8)
        busy = time["total"] - time["bubble"] - time["data_parallel"]
        assert time["bubble"] / (busy + time["bubble"]) == pytest.approx(bubble_fraction(pp, virtual, 16), rel=1e-12)
    assert bubble_fraction(4, 1, 8) == 3 / 11 and bubble_fraction(4, 2, 8) == 3 / 19 and bubble_fraction(1, 1, 8) == 0
    gpipe = Layout(8, 1, 2, False, "none", 1, 16, 4, 1, "gpipe")
    assert memory_breakdown(shape, gpipe, 1024, rank=0)["activations"] == pytest.approx(alone * 16 / 4, rel=1e-12)


def test_the_plan_names_the_last_stage_where_the_output_layer_outweighs_the_activations_in_flight():
    """Llama-8B's 128,256-row untied output layer and its logits against full recompute's small activations: at PP 2
    the last stage holds more than the first, and the plan says so and why; without recompute the first again."""
    from megahf.plan import largest_stage_why, stage_memory

    shape = Shape.of(load_model_config("llama-8b"))
    recomputed = Layout(8, 1, 4, False, "full", 1, 128, 2)
    stages = stage_memory(shape, recomputed, 4096)
    assert sum(stages[1].values()) > sum(stages[0].values()) and stages[0]["logits"] == 0 < stages[1]["logits"]
    stage, why = largest_stage_why(shape, recomputed, stages)
    assert stage == 1 and why.startswith("stage 1 of 2 is the largest") and "the output layer, the final norm" in why
    kept = Layout(8, 1, 4, False, "none", 1, 128, 2)
    assert largest_stage_why(shape, kept, stage_memory(shape, kept, 4096))[0] == 0


@pytest.mark.parametrize("preset, tied", [("gpt-tiny", True), ("gpt-tiny", False), ("llama-tiny", False)])
def test_stage_parameters_match_the_tensors_each_stage_holds(preset, tied):
    """Each pipeline rank's parameters, planned, against the model's own tensors split as the config's pp plan
    splits them (the embedding first, layers in order, the final norm and output layer last): the state dict's keys,
    in which a tied output layer is the word embedding again, the copy the last stage keeps. Counts: equal."""
    config = MegatronGPTConfig.from_preset(preset, num_layers=4, tie_word_embeddings=tied)
    state = MegatronGPTForCausalLM(config).state_dict()
    for pp in (1, 2, 4):
        held = [0] * pp
        seen = set()
        for name, tensor in state.items():
            if name.startswith("model.embedding."):
                rank = 0
            elif name.startswith("model.decoder.layers."):
                rank = int(name.split(".")[3]) // (4 // pp)
            else:
                assert name.startswith(("model.decoder.final_layernorm.", "output_layer.")), name
                rank = pp - 1
            if (rank, tensor.data_ptr()) not in seen:  # one rank holds one copy of a tied tensor
                seen.add((rank, tensor.data_ptr()))
                held[rank] += tensor.numel()
        planned = [sum(Shape.of(config).stage_parameters(pp, rank)) for rank in range(pp)]
        assert planned == held, (pp, planned, held)


def test_written_pipeline_recipe_is_accepted_by_the_recipe_parser(tmp_path):
    """--write for a pipelined layout: the recipe megahf's parser loads (load_recipe checks it whole, the pipeline's
    refusals included) and whose layout on the planned world size is the plan's; the same for an interleaved one."""
    from megahf.cli import main
    from megahf.training.setup import build_layout, load_recipe

    out = tmp_path / "plan"
    assert main(["plan", "--model", "gpt-8.3b", "--gpus", "64", "--gpu", "v100", "--gpu-memory", "16GB",
                 "--nodes", "8", "--top", "1", "--write", str(out)]) == 0
    result = v100_16gb_plan()
    interleaved = next(c for c in result["fitting"] if c.layout.virtual > 1)
    result_interleaved = dict(result, fitting=[interleaved])
    write_layout(result_interleaved, tmp_path / "interleaved", "gpt-8.3b")
    for folder, lay in ((out, result["fitting"][0].layout), (tmp_path / "interleaved", interleaved.layout)):
        layout = build_layout(load_recipe(folder / "recipe.yaml"), world_size=64)
        assert (layout.pipeline_parallel_size, layout.virtual_pipeline_size, layout.pipeline_schedule) == \
            (lay.pp, lay.virtual, lay.schedule)
        assert (layout.tensor_parallel_size, layout.fsdp_size, layout.data_parallel_size, layout.micro_batch_size,
                layout.gradient_accumulation_steps) == (lay.tp, lay.fsdp, lay.dp, lay.micro_batch, lay.accumulation)
        assert "num_processes: 64" in (folder / "launch.yaml").read_text()


# ---------------------------------------------------------------------- --write, run as written


def test_written_recipe_and_launch_config_run_as_written(tmp_path):
    recipe = tmp_path / "model.yaml"
    recipe.write_text("model: gpt-tiny\nmodel_overrides: {num_layers: 2, hidden_size: 64}\n")
    out = tmp_path / "plan"
    from megahf.cli import main

    assert main(["plan", "--model", str(recipe), "--gpus", "2", "--gpu-memory", "80GB", "--seq_length", "32",
                 "--global_batch_size", "8", "--write", str(out)]) == 0
    written = (out / "recipe.yaml").read_text()
    assert "tensor_parallel_size:" in written and "global_batch_size: 8" in written and "seq_length: 32" in written
    corpus = write_corpus(tmp_path / "corpus.jsonl")
    run = tmp_path / "run"
    extra = tiny_args(corpus, run, train_steps=2, warmup_steps=1)
    drop = {"--model_overrides.num_layers", "--model_overrides.hidden_size", "--seq_length", "--micro_batch_size"}
    extra = [tok for i, tok in enumerate(extra) if tok not in drop and (i == 0 or extra[i - 1] not in drop)]
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(out / "launch.yaml"),
           "--main_process_port", str(free_port()), "-m", "megahf", "pretrain", str(out / "recipe.yaml"), *extra]
    launch(cmd, "megahf pretrain with the written files")
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["steps"] == 2 and "2 processes" in metrics["layout"] and "global batch 8" in metrics["layout"]


@pytest.mark.parametrize("argv, message", [
    (["--model", "gpt-345m", "--gpus", "8", "--gpu-memory", "lots"],
     "--gpu-memory='lots' is not a size; write e.g. 80GB"),
    (["--model", "gpt-345m", "--gpus", "12", "--nodes", "5"], "--gpus=12 is not a multiple of --nodes=5"),
    (["--model", "gpt-nano", "--gpus", "8"], "--model='gpt-nano': unknown model preset"),
    (["--model", "gpt-345m", "--gpus", "8", "--seq", "4096"], "--seq=4096 exceeds the model's max_position_embeddings"),
])
def test_bad_input_is_one_line_naming_the_flag(argv, message, capsys):
    from megahf.cli import main

    assert main(["plan", *argv]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1, err
