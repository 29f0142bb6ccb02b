"""Parity worker, run by `torchrun` (gloo, CPU): a tensor-parallel / FSDP2 model against one process.

For each preset, every rank builds the single-process reference model and the distributed model from the same
seed, and compares them on one batch: the logits, the loss (computed on vocabulary-sharded logits under TP), every
gradient, the gradient norm clipped by `megahf.parallel.clip_grad_norm_` against torch's, and the parameters after
one AdamW step taken from the same gradients. It then saves the distributed model (all ranks), reloads it in a plain
single process, and loads a single-process checkpoint with
`AutoModelForCausalLM.from_pretrained(..., distributed_config=...)`.

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
from torch.distributed.tensor import DTensor, Shard
from transformers import AutoModelForCausalLM
from transformers.distributed import DistributedConfig

import megahf  # noqa: F401  (registers the Auto classes)
from megahf import MegatronGPTConfig, MegatronGPTForCausalLM
from megahf.parallel import clip_grad_norm_, distribute_model

LAYOUTS = {
    "tp2": {"tp_size": 2},
    "tp4": {"tp_size": 4},
    "tp2xfsdp2": {"tp_size": 2, "fsdp_size": 2},
}
# Small enough for four processes on two cores; the vocabulary stays GPT-2's (50257, padded to 50304), so the
# padded columns are exercised.
OVERRIDES = {
    "gpt-tiny": {"hidden_size": 64},
    "llama-tiny": {"hidden_size": 64},
}
LENGTHS = (16, 11)  # two sequences, the second right-padded
MAX_NORM = 0.05  # small enough that clipping is active
LR, WEIGHT_DECAY = 1e-3, 0.01


def make_config(preset: str) -> MegatronGPTConfig:
    return MegatronGPTConfig.from_preset(
        preset, num_layers=2, hidden_dropout=0.0, attention_dropout=0.0, **OVERRIDES.get(preset, {})
    )


def full(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.full_tensor() if isinstance(tensor, DTensor) else tensor


def rel_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    actual, expected = full(actual).detach().float(), full(expected).detach().float()
    if actual.shape != expected.shape:
        raise AssertionError(f"shape {tuple(actual.shape)} != expected {tuple(expected.shape)}")
    scale = expected.abs().max().clamp_min(1e-30)
    return ((actual - expected).abs().max() / scale).item()


def make_batch(vocab_size: int, seed: int) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed + 1)
    seq = max(LENGTHS)
    input_ids = torch.randint(0, vocab_size, (len(LENGTHS), seq), generator=generator)
    attention_mask = torch.zeros_like(input_ids)
    for row, length in enumerate(LENGTHS):
        attention_mask[row, :length] = 1
    input_ids = input_ids.masked_fill(attention_mask == 0, 0)
    labels = input_ids.masked_fill(attention_mask == 0, -100)
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


def eval_logits(model, batch) -> torch.Tensor:
    with torch.no_grad():
        out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    return full(out.logits)


def worst(errors: dict[str, float]) -> tuple[float, str]:
    name = max(errors, key=errors.get)
    return errors[name], name


def run_preset(preset: str, layout: str, seed: int, workdir: str) -> dict:
    rank, world = dist.get_rank(), dist.get_world_size()
    layout_kwargs = LAYOUTS[layout]
    tp_size = layout_kwargs["tp_size"]
    config = make_config(preset)
    result: dict = {"world_size": world, "padded_vocab_size": config.padded_vocab_size}
    started = time.perf_counter()
    seconds = result["seconds"] = {}

    def lap(name: str) -> None:
        seconds[name] = round(time.perf_counter() - started - sum(seconds.values()), 2)

    torch.manual_seed(seed)
    reference = MegatronGPTForCausalLM(copy.deepcopy(config))
    torch.manual_seed(seed)
    model = distribute_model(MegatronGPTForCausalLM(copy.deepcopy(config)), DistributedConfig(**layout_kwargs))
    reference.train()
    model.train()
    batch = make_batch(config.vocab_size, seed)

    lap("build")
    # 1. Logits without labels: gathered, over the real vocabulary.
    ref_logits = eval_logits(reference, batch)
    with torch.no_grad():
        out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    if isinstance(out.logits, DTensor):
        raise AssertionError(f"logits without labels should be gathered, got a DTensor {out.logits.placements}")
    if out.logits.shape[-1] != config.vocab_size:
        raise AssertionError(f"logits width {out.logits.shape[-1]} != vocab_size {config.vocab_size}")
    result["logits"] = rel_err(out.logits, ref_logits)

    lap("logits")
    # 2. Loss with labels: computed on vocabulary-sharded logits, which are returned as they are.
    ref_out = reference(**batch)
    out = model(**batch)
    if tp_size > 1:
        logits = out.logits
        if not (isinstance(logits, DTensor) and any(isinstance(p, Shard) for p in logits.placements)):
            raise AssertionError(f"under TP the training logits must stay vocabulary-sharded, got {type(logits)}")
        local_width = logits.to_local().shape[-1]
        if local_width * tp_size != config.padded_vocab_size:
            raise AssertionError(f"local logits width {local_width} is not padded_vocab_size / tp_size")
        result["sharded_logits"] = rel_err(logits.full_tensor()[..., : config.vocab_size], ref_out.logits)
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
    grad_errors = {}
    for name, ref_param in ref_params.items():
        if params[name].grad is None:
            raise AssertionError(f"{name} has no gradient in the distributed model")
        grad_errors[name] = rel_err(params[name].grad, ref_param.grad)
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
    result["clipped_grads"], _ = worst({n: rel_err(params[n].grad, p.grad) for n, p in ref_params.items()})

    ref_opt = torch.optim.AdamW(reference.parameters(), lr=LR, weight_decay=WEIGHT_DECAY)
    opt = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=WEIGHT_DECAY)
    ref_opt.step()
    opt.step()
    ref_opt.zero_grad()
    opt.zero_grad()
    result["params"], result["params_worst_param"] = worst(
        {n: rel_err(params[n], p) for n, p in ref_params.items()}
    )
    ref_logits = eval_logits(reference, batch)
    result["step_logits"] = rel_err(eval_logits(model, batch), ref_logits)

    lap("clip_step")
    # 5. save_pretrained on all ranks gathers the full model; rank 0 checks it against a single-process save and
    #    reloads it in this process without any parallelism.
    saved_dir = os.path.join(workdir, f"{preset}-{layout}-distributed")
    reference_dir = os.path.join(workdir, f"{preset}-{layout}-reference")
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
        reloaded = MegatronGPTForCausalLM.from_pretrained(saved_dir)
        result["reload_logits"] = rel_err(eval_logits(reloaded, batch), ref_logits)
    dist.barrier()

    lap("save_reload")
    # 6. A single-process checkpoint loaded straight into the layout by transformers.
    loaded = AutoModelForCausalLM.from_pretrained(
        reference_dir, distributed_config=DistributedConfig(**layout_kwargs)
    )
    if not isinstance(loaded, MegatronGPTForCausalLM):
        raise AssertionError(f"AutoModelForCausalLM built {type(loaded).__name__}")
    sharded = [n for n, p in loaded.named_parameters() if isinstance(p, DTensor)]
    if not sharded:
        raise AssertionError("from_pretrained(distributed_config=...) left every parameter unsharded")
    result["auto_load_logits"] = rel_err(eval_logits(loaded, batch), ref_logits)
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
    parser.add_argument("--presets", default="gpt-tiny,llama-tiny")
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
        for preset in args.presets.split(","):
            result = run_preset(preset, layout, args.seed, args.workdir)
            gathered = [None] * world
            dist.all_gather_object(gathered, result)
            report["layouts"][layout][preset] = merge(gathered)
    if dist.get_rank() == 0:
        with open(args.out, "w") as f:
            json.dump(report, f, indent=2)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
