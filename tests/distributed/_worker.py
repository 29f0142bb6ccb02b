"""Parity worker, run by `torchrun` (gloo, CPU): a tensor-parallel / FSDP2 model against one process.

For each case (a GPT preset, or a BERT head), every rank builds the single-process reference model and the
distributed model from the same seed, and compares them on one batch: the logits, the loss (computed on the vocabulary shards under TP), every
gradient, the gradient norm clipped by `megahf.parallel.clip_grad_norm_` against torch's, and the parameters after
one AdamW step taken from the same gradients. It then saves the distributed model (all ranks), reloads it in a plain
single process, and loads a single-process checkpoint with
`AutoModelForCausalLM.from_pretrained(..., distributed_config=...)`.

`--cases` picks them: `gpt-tiny`, `llama-tiny`, and `bert-<head>` for the BERT pretraining model and every head
(pairs of segments of different lengths, right padding, token types 0 and 1).

Numbers are relative errors, max |a - b| / max |b|, the worst over all ranks; rank 0 writes them as JSON to --out.
Structural problems (a missing gradient, gathered logits under TP, an incomplete checkpoint) raise, which makes
torchrun exit non-zero.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import time

import torch
import torch.distributed as dist
from safetensors.torch import load_file
from torch.distributed.fsdp import FSDPModule
from torch.distributed.tensor import DTensor, Shard
import transformers
from transformers.distributed import DistributedConfig

import megahf
from megahf import MegatronBertConfig, MegatronGPTConfig
from megahf.parallel import clip_grad_norm_, distribute_model

LAYOUTS = {
    "tp2": {"tp_size": 2},
    "tp4": {"tp_size": 4},
    "tp2xfsdp2": {"tp_size": 2, "fsdp_size": 2},
    # Megatron's sequence parallelism: norms, dropouts and the residual stream on sequence shards
    "tp2-sp": {"tp_size": 2, "enable_sequence_parallel": True},
    "tp2xfsdp2-sp": {"tp_size": 2, "fsdp_size": 2, "enable_sequence_parallel": True},
    "fsdp2": {"tp_size": 1, "fsdp_size": 2},  # chunked-loss cases only: an untied head as an FSDP2 unit of its own
}
SP_LAYOUTS = ("tp2-sp", "tp2xfsdp2-sp")
# Small enough for four processes on two cores; the vocabularies stay GPT-2's (50257, padded to 50304) and BERT's
# (30522, padded to 30592), so the padded columns are exercised.
OVERRIDES = {
    "gpt-tiny": {"hidden_size": 64},
    "llama-tiny": {"hidden_size": 64},
    "bert-tiny": {"hidden_size": 64, "num_labels": 3},
}
LENGTHS = (16, 11)  # two sequences, the second right-padded
SEGMENT_A = (9, 4)  # BERT: tokens of segment A (token type 0) in each sequence, the rest is segment B (type 1)
CHOICES = 3  # BERT multiple choice
MAX_NORM = 0.05  # small enough that clipping is active
LR, WEIGHT_DECAY = 1e-3, 0.01

# case -> (preset, model class, Auto class, output holding vocabulary logits (None: not vocabulary-parallel))
CASES = {
    "gpt-tiny": ("gpt-tiny", "MegatronGPTForCausalLM", "AutoModelForCausalLM", "logits"),
    "llama-tiny": ("llama-tiny", "MegatronGPTForCausalLM", "AutoModelForCausalLM", "logits"),
    # Megatron-LM's loss, whose softmax also covers the padded vocabulary rows (on the shards under TP)
    "gpt-padded-softmax": ("gpt-tiny", "MegatronGPTForCausalLM", "AutoModelForCausalLM", "logits"),
    # The chunked training loss (loss_chunk_size): tied head (GPT-2 style, in FSDP2's root unit) and untied (Llama
    # style, an FSDP2 unit of its own); 12 tokens per chunk do not divide the batch's 32.
    "gpt-chunked-loss": ("gpt-tiny", "MegatronGPTForCausalLM", "AutoModelForCausalLM", "logits"),
    "llama-chunked-loss": ("llama-tiny", "MegatronGPTForCausalLM", "AutoModelForCausalLM", "logits"),
    "bert-pretraining": ("bert-tiny", "MegatronBertForPreTraining", "AutoModelForPreTraining", "prediction_logits"),
    "bert-mlm": ("bert-tiny", "MegatronBertForMaskedLM", "AutoModelForMaskedLM", "logits"),
    "bert-classification": ("bert-tiny", "MegatronBertForSequenceClassification",
                            "AutoModelForSequenceClassification", None),
    "bert-multiple-choice": ("bert-tiny", "MegatronBertForMultipleChoice", "AutoModelForMultipleChoice", None),
    "bert-qa": ("bert-tiny", "MegatronBertForQuestionAnswering", "AutoModelForQuestionAnswering", None),
    "bert-token-classification": ("bert-tiny", "MegatronBertForTokenClassification",
                                  "AutoModelForTokenClassification", None),
}

# The BERT heads run at TP=2 and TP=2 x FSDP2=2 (TP=4 adds nothing the GPT cases do not already cover).
CASE_LAYOUTS = {case: ("tp2", "tp2xfsdp2") for case in CASES if case.startswith("bert")}
CASE_LAYOUTS["gpt-padded-softmax"] = ("tp2",)
# Sequence parallelism: both GPT shapes (output layer fed from shards), BERT pretraining (the body gathers the
# sequence for the pooler and the masked-LM head) and a per-token head; the other heads read the same gathered body.
CASE_LAYOUTS["bert-pretraining"] += SP_LAYOUTS
CASE_LAYOUTS["bert-qa"] += ("tp2-sp",)
for _case in ("gpt-tiny", "llama-tiny"):
    CASE_LAYOUTS[_case] = ("tp2", "tp4", "tp2xfsdp2") + SP_LAYOUTS
# The chunked loss reads the output layer's weight itself: under sequence parallelism the sequence is gathered after
# the final norm for it (sequence_parallel.sequence_parallel_plan), checked with a tied and an untied head.
CASE_LAYOUTS["gpt-chunked-loss"] = CASE_LAYOUTS["llama-chunked-loss"] = ("tp2", "tp2xfsdp2", "fsdp2") + SP_LAYOUTS
CASE_OVERRIDES = {"gpt-padded-softmax": {"padded_vocab_softmax": True},
                  "gpt-chunked-loss": {"loss_chunk_size": 12}, "llama-chunked-loss": {"loss_chunk_size": 12}}


def make_config(case: str):
    preset = CASES[case][0]
    config_class = MegatronBertConfig if preset.startswith("bert") else MegatronGPTConfig
    return config_class.from_preset(
        preset, num_layers=2, hidden_dropout=0.0, attention_dropout=0.0, **OVERRIDES.get(preset, {}),
        **CASE_OVERRIDES.get(case, {}),
    )


def full(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.full_tensor() if isinstance(tensor, DTensor) else tensor


def rel_err(actual: torch.Tensor, expected: torch.Tensor, floor: float = 1e-30) -> float:
    """max |actual - expected| / max |expected|, the scale never below `floor`."""
    actual, expected = full(actual).detach().float(), full(expected).detach().float()
    if actual.shape != expected.shape:
        raise AssertionError(f"shape {tuple(actual.shape)} != expected {tuple(expected.shape)}")
    scale = expected.abs().max().clamp_min(floor)
    return ((actual - expected).abs().max() / scale).item()


def make_batch(case: str, config, seed: int) -> dict[str, torch.Tensor]:
    """Inputs and the labels the case's head trains on (GPT: next tokens; BERT: its task's labels)."""
    generator = torch.Generator().manual_seed(seed + 1)
    seq = max(LENGTHS)
    input_ids = torch.randint(0, config.vocab_size, (len(LENGTHS), seq), generator=generator)
    attention_mask = torch.zeros_like(input_ids)
    for row, length in enumerate(LENGTHS):
        attention_mask[row, :length] = 1
    input_ids = input_ids.masked_fill(attention_mask == 0, 0)
    if not case.startswith("bert"):
        return {"input_ids": input_ids, "attention_mask": attention_mask,
                "labels": input_ids.masked_fill(attention_mask == 0, -100)}
    token_type_ids = torch.zeros_like(input_ids)
    for row, a in enumerate(SEGMENT_A):
        token_type_ids[row, a:LENGTHS[row]] = 1
    batch = {"input_ids": input_ids, "attention_mask": attention_mask, "token_type_ids": token_type_ids}
    masked = (torch.rand(input_ids.shape, generator=generator) < 0.3) & (attention_mask == 1)
    if case in ("bert-pretraining", "bert-mlm"):
        batch["labels"] = input_ids.masked_fill(~masked, -100)
        if case == "bert-pretraining":
            batch["next_sentence_label"] = torch.tensor([0, 1])
    elif case == "bert-classification":
        batch["labels"] = torch.tensor([2, 0])
    elif case == "bert-token-classification":
        batch["labels"] = torch.randint(0, config.num_labels, input_ids.shape, generator=generator).masked_fill(
            attention_mask == 0, -100)
    elif case == "bert-qa":
        batch["start_positions"], batch["end_positions"] = torch.tensor([3, 5]), torch.tensor([7, 9])
    elif case == "bert-multiple-choice":
        # each example's choices: the same pair with different tokens (and lengths), as RACE's options differ
        batch = {k: v[:, None].repeat(1, CHOICES, 1) for k, v in batch.items()}
        batch["input_ids"] = torch.randint(1, config.vocab_size, batch["input_ids"].shape, generator=generator)
        batch["attention_mask"][:, 1, -2:] = 0
        batch["input_ids"] = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, 0)
        batch["labels"] = torch.tensor([1, 2])
    return batch


INPUT_KEYS = ("input_ids", "attention_mask", "token_type_ids")


def predictions(model, batch) -> dict[str, torch.Tensor]:
    """Every output tensor of a forward pass without labels (full tensors), by name."""
    with torch.no_grad():
        out = model(**{k: v for k, v in batch.items() if k in INPUT_KEYS})
    return {k: v for k, v in out.items() if torch.is_tensor(v)}


def compare_predictions(actual: dict, expected: dict) -> float:
    if actual.keys() != expected.keys():
        raise AssertionError(f"outputs differ: {sorted(actual)} != {sorted(expected)}")
    return max(rel_err(actual[k], expected[k]) for k in expected)


def worst(errors: dict[str, float]) -> tuple[float, str]:
    name = max(errors, key=errors.get)
    return errors[name], name


def run_case(case: str, layout: str, seed: int, workdir: str) -> dict:
    rank, world = dist.get_rank(), dist.get_world_size()
    layout_kwargs = LAYOUTS[layout]
    tp_size = layout_kwargs["tp_size"]
    _, class_name, auto_name, vocab_output = CASES[case]
    model_class, auto_class = getattr(megahf, class_name), getattr(transformers, auto_name)
    config = make_config(case)
    result: dict = {"world_size": world, "padded_vocab_size": config.padded_vocab_size}
    started = time.perf_counter()
    seconds = result["seconds"] = {}

    def lap(name: str) -> None:
        seconds[name] = round(time.perf_counter() - started - sum(seconds.values()), 2)

    torch.manual_seed(seed)
    reference = model_class(copy.deepcopy(config))
    torch.manual_seed(seed)
    model = distribute_model(model_class(copy.deepcopy(config)), DistributedConfig(**layout_kwargs))
    reference.train()
    model.train()
    batch = make_batch(case, config, seed)

    lap("build")
    # 1. Outputs without labels: gathered; vocabulary logits over the real vocabulary.
    ref_predictions = predictions(reference, batch)
    with torch.no_grad():
        out = model(**{k: v for k, v in batch.items() if k in INPUT_KEYS})
    for name, value in out.items():
        if isinstance(value, DTensor):
            raise AssertionError(f"{name} without labels should be gathered, got a DTensor {value.placements}")
    if vocab_output and out[vocab_output].shape[-1] != config.vocab_size:
        raise AssertionError(f"{vocab_output} width {out[vocab_output].shape[-1]} != vocab_size {config.vocab_size}")
    result["logits"] = compare_predictions({k: v for k, v in out.items() if torch.is_tensor(v)}, ref_predictions)

    lap("logits")
    # 2. Loss with labels: under TP computed on the vocabulary shards of the output layer (which are never gathered
    #    for it); the returned logits are the same plain [..., vocab_size] tensor as in one process.
    seen = []
    hook = model.get_output_embeddings().register_forward_hook(lambda m, i, o: seen.append(o)) if vocab_output else None
    # Under sequence parallelism the norms see this rank's shard of the sequence (and plain TP the whole of it).
    norm_inputs = []
    first_layer = model.base_model.get_submodule("decoder" if hasattr(model.base_model, "decoder") else "encoder")
    norm_hook = first_layer.layers[0].input_layernorm.register_forward_hook(
        lambda m, i, o: norm_inputs.append(i[0].shape[1]))
    ref_out = reference(**batch)
    out = model(**batch)
    norm_hook.remove()
    seq = batch["input_ids"].shape[-1]
    expected_rows = seq // tp_size if layout_kwargs.get("enable_sequence_parallel") else seq
    if norm_inputs != [expected_rows]:
        raise AssertionError(f"{layout}: the first norm saw {norm_inputs} positions, expected {expected_rows}")
    if hook is not None:
        hook.remove()
    if config.to_dict().get("loss_chunk_size"):
        # the chunked loss never runs the output layer, and returns no logits when training with labels; an untied
        # head under FSDP2 is a unit of its own, which the loss must gather itself
        result["head_is_fsdp_unit"] = isinstance(model.get_output_embeddings(), FSDPModule)
        if seen or out.logits is not None or ref_out.logits is not None:
            raise AssertionError(f"with loss_chunk_size the output layer ran {len(seen)} times and returned logits")
    elif hook is not None:
        if tp_size > 1 and not (isinstance(seen[0], DTensor) and seen[0].placements[0] == Shard(seen[0].ndim - 1)):
            raise AssertionError(f"under TP the output layer must return vocabulary shards, got {type(seen[0])}")
        logits = out[vocab_output]
        if isinstance(logits, DTensor) or logits.shape[-1] != config.vocab_size:
            raise AssertionError(f"{vocab_output} with labels must be a plain [..., {config.vocab_size}] tensor, got "
                                 f"{type(logits).__name__} {tuple(logits.shape)}")
        result["labelled_logits"] = rel_err(logits, ref_out[vocab_output])
    result["loss"] = rel_err(out.loss, ref_out.loss)
    result["loss_value"] = ref_out.loss.item()
    ref_out.loss.backward()
    out.loss.backward()

    lap("loss_backward")
    # 3. Every gradient.
    ref_params = dict(reference.named_parameters())
    params = dict(model.named_parameters())
    if ref_params.keys() != params.keys():
        raise AssertionError(f"parameter names differ: {sorted(ref_params.keys() ^ params.keys())}")
    # Every gradient is measured against the model's gradient scale (its largest gradient element), not its own:
    # a gradient that is zero in exact arithmetic (the QA head's bias: the softmax over positions sums to one, so its
    # bias gradient is sum(p - onehot) = 0) is roundoff on both sides, and roundoff divided by roundoff depends on the
    # CPU's kernels. Float32 roundoff of a gradient element is ~1e-7 of the terms summed into it, which are bounded by
    # the model's gradient scale times the reduction length (<= 64 here): <= ~1e-6 of the scale. A wrong layout
    # (a wrong style, a missing reduction) is off by the gradient's own size, ~1e-2 of the scale and more, and is
    # still caught for any tensor whose gradient is above 1e-5 of the scale.
    grad_floor = max(p.grad.abs().max().item() for p in ref_params.values())
    grad_errors = {}
    for name, ref_param in ref_params.items():
        if params[name].grad is None:
            raise AssertionError(f"{name} has no gradient in the distributed model")
        grad_errors[name] = rel_err(params[name].grad, ref_param.grad, grad_floor)
    result["grads"], result["grads_worst_param"] = worst(grad_errors)
    result["num_params"] = len(ref_params)

    lap("grads")
    # 4. Clipping (active) and one AdamW step, on identical gradients: the reference takes the gathered distributed
    #    gradients (equal to its own up to roundoff, checked above). AdamW's first step moves each element by
    #    lr * g / (|g| + eps), which multiplies the roundoff of a gradient element near eps by up to lr / eps = 1e5
    #    (a zero-initialised bias then shows a 1e-4 relative difference), so own gradients would test AdamW's
    #    conditioning rather than the parallel clip and update.
    for name, ref_param in ref_params.items():
        ref_param.grad = full(params[name].grad).detach().clone()
    # Other orders, with a bound that does not clip (scales by exactly 1). Not the 1-norm: torch's float32 1-norm of
    # the 50304 x 64 embedding gradient (mostly tiny softmax terms) is itself off by ~0.5% on CPU.
    for norm_type in (3.0, float("inf")):
        expected = torch.nn.utils.clip_grad_norm_(reference.parameters(), 1e9, norm_type=norm_type)
        result[f"grad_norm_{norm_type:g}"] = rel_err(clip_grad_norm_(model.parameters(), 1e9, norm_type), expected)
    ref_norm = torch.nn.utils.clip_grad_norm_(reference.parameters(), MAX_NORM)
    norm = clip_grad_norm_(model.parameters(), MAX_NORM)
    if isinstance(norm, DTensor):
        raise AssertionError("clip_grad_norm_ must return a plain tensor")
    if not ref_norm.item() > MAX_NORM:
        raise AssertionError(f"clipping is inactive: grad norm {ref_norm.item()} <= {MAX_NORM}")
    norms = [None] * world
    dist.all_gather_object(norms, norm.item())
    if len(set(norms)) != 1:
        raise AssertionError(f"the grad norm differs between ranks: {norms}")
    result["grad_norm"] = rel_err(norm, ref_norm)
    result["grad_norm_value"] = ref_norm.item()
    grad_floor *= min(1.0, MAX_NORM / ref_norm.item())
    result["clipped_grads"], _ = worst(
        {n: rel_err(params[n].grad, p.grad, grad_floor) for n, p in ref_params.items()}
    )

    ref_opt = torch.optim.AdamW(reference.parameters(), lr=LR, weight_decay=WEIGHT_DECAY)
    opt = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=WEIGHT_DECAY)
    ref_opt.step()
    opt.step()
    ref_opt.zero_grad()
    opt.zero_grad()
    result["params"], result["params_worst_param"] = worst(
        {n: rel_err(params[n], p) for n, p in ref_params.items()}
    )
    ref_predictions = predictions(reference, batch)
    result["step_logits"] = compare_predictions(predictions(model, batch), ref_predictions)

    lap("clip_step")
    # 5. save_pretrained on all ranks gathers the full model; rank 0 checks it against a single-process save and
    #    reloads it in this process without any parallelism.
    saved_dir = os.path.join(workdir, f"{case}-{layout}-distributed")
    reference_dir = os.path.join(workdir, f"{case}-{layout}-reference")
    model.save_pretrained(saved_dir)
    if rank == 0:
        reference.save_pretrained(reference_dir)
    dist.barrier()
    if rank == 0:
        saved = load_file(os.path.join(saved_dir, "model.safetensors"))
        expected = load_file(os.path.join(reference_dir, "model.safetensors"))
        if saved.keys() != expected.keys():
            differ = sorted(saved.keys() ^ expected.keys())
            raise AssertionError(f"saved keys differ from a single-process save: {differ}")
        for key, tensor in expected.items():
            if saved[key].shape != tensor.shape:
                raise AssertionError(f"{key}: saved shape {tuple(saved[key].shape)} != {tuple(tensor.shape)}")
        result["saved_tensors"], _ = worst({k: rel_err(saved[k], t) for k, t in expected.items()})
        result["saved_keys"] = len(saved)
        reloaded = model_class.from_pretrained(saved_dir)
        result["reload_logits"] = compare_predictions(predictions(reloaded, batch), ref_predictions)
    dist.barrier()

    lap("save_reload")
    # 6. A single-process checkpoint loaded straight into the layout by transformers.
    loaded = auto_class.from_pretrained(reference_dir, distributed_config=DistributedConfig(**layout_kwargs))
    if not isinstance(loaded, model_class):
        raise AssertionError(f"{auto_name} built {type(loaded).__name__}")
    sharded = [n for n, p in loaded.named_parameters() if isinstance(p, DTensor)]
    if not sharded:
        raise AssertionError("from_pretrained(distributed_config=...) left every parameter unsharded")
    result["auto_load_logits"] = compare_predictions(predictions(loaded, batch), ref_predictions)
    dist.barrier()
    lap("auto_load")
    return result


def merge(results: list[dict]) -> dict:
    """The worst value of each error over the ranks (rank 0's for the rest)."""
    merged = dict(results[0])
    for other in results[1:]:
        for key, value in other.items():
            if isinstance(value, float) and key in merged and not key.endswith("_value"):
                merged[key] = max(merged[key], value)
            merged.setdefault(key, value)
    return merged


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--layouts", required=True, help="comma-separated, all for the same number of processes")
    parser.add_argument("--cases", default="gpt-tiny,llama-tiny", help=f"comma-separated, of {', '.join(CASES)}")
    parser.add_argument("--skip", default="", help="comma-separated case:layout pairs not to run (the extended tier's)")
    parser.add_argument("--seed", type=int, default=1234)
    parser.add_argument("--workdir", required=True)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()

    dist.init_process_group("gloo")
    world = dist.get_world_size()
    layouts = args.layouts.split(",")
    for layout in layouts:
        needed = LAYOUTS[layout]["tp_size"] * LAYOUTS[layout].get("fsdp_size", 1)
        if world != needed:
            raise SystemExit(f"layout {layout} needs {needed} processes, got {world}")
    torch.set_num_threads(1)
    # Several layouts share one launch: starting four processes costs more than everything they compute.
    report = {"world_size": world, "layouts": {}}
    for layout in layouts:
        report["layouts"][layout] = {}
        for case in args.cases.split(","):
            if layout not in CASE_LAYOUTS.get(case, LAYOUTS) or f"{case}:{layout}" in args.skip.split(","):
                continue
            result = run_case(case, layout, args.seed, args.workdir)
            gathered = [None] * world
            dist.all_gather_object(gathered, result)
            report["layouts"][layout][case] = merge(gathered)
    if dist.get_rank() == 0:
        with open(args.out, "w") as f:
            json.dump(report, f, indent=2)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
