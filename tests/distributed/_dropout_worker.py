"""Dropout under tensor and sequence parallelism (2 processes, gloo): run by `torchrun` for test_dropout_parallel.py.

A tiny GPT with dropout on (attention and hidden), eager attention (so the dropped attention probabilities are
visible in the returned weights), one training forward and backward per setting:

* tp2: the residual stream is replicated: every layer's output must be bitwise identical on both ranks (the hidden
  dropout draws the same mask everywhere), while the attention-probability masks of the heads each rank holds must
  differ (each rank's own stream).
* tp2-sp: the hidden dropout acts on sequence shards: its masks must differ between the ranks.
* tp2-sp with recompute selective and full: every gradient equals the run without recomputation (the recomputed
  dropout draws the masks of the first forward pass, the model-parallel stream included); without the tracker put
  back for the recomputation they differ (the check can fail);
* a 15-token sequence under sequence parallelism at TP=2 is refused with the fix.

Rank 0 writes the findings as JSON to --out.
"""

from __future__ import annotations

import argparse
import json

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor
from transformers.distributed import DistributedConfig

from megahf import MegatronGPTConfig, MegatronGPTForCausalLM
from megahf.parallel import distribute_model
from megahf.parallel.rng import checkpoint_context, get_rng_tracker

SEQ, BATCH, DROPOUT = 16, 2, 0.3


def build(sp: bool, recompute: str = "none"):
    config = MegatronGPTConfig.from_preset("gpt-tiny", num_layers=2, hidden_size=64, hidden_dropout=DROPOUT,
                                           attention_dropout=DROPOUT, attn_implementation="eager",
                                           recompute_granularity="selective" if recompute == "selective" else None)
    torch.manual_seed(7)
    model = distribute_model(MegatronGPTForCausalLM(config), DistributedConfig(tp_size=2, enable_sequence_parallel=sp))
    if recompute.startswith("full"):
        kwargs = {"use_reentrant": False}
        if recompute == "full":
            kwargs["context_fn"] = checkpoint_context
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    return model.train()


def step(model, batch) -> dict[str, torch.Tensor]:
    """One forward and backward from the same RNG states on every rank (default stream alike, own stream per rank);
    returns every gradient (full tensors)."""
    torch.manual_seed(11)
    get_rng_tracker().seed(11, dist.get_rank())
    model(**batch).loss.backward()
    return {n: (p.grad.full_tensor() if isinstance(p.grad, DTensor) else p.grad).clone()
            for n, p in model.named_parameters()}


def gathered(value):
    values = [None] * dist.get_world_size()
    dist.all_gather_object(values, value)
    return values


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    dist.init_process_group("gloo")
    torch.set_num_threads(1)
    generator = torch.Generator().manual_seed(3)
    input_ids = torch.randint(0, 50257, (BATCH, SEQ), generator=generator)
    batch = {"input_ids": input_ids, "labels": input_ids}
    report = {}

    # Plain TP: replicated layer outputs, per-rank attention masks.
    model = build(sp=False)
    layer_outputs, attention_drops = [], []
    for layer in model.model.decoder.layers:
        layer.register_forward_hook(lambda m, i, o: layer_outputs.append(o.detach().clone()))
        # attention weights after dropout: a dropped probability is exactly 0; a kept one never is (no padding)
        layer.self_attention.register_forward_hook(lambda m, i, o: attention_drops.append(o[1].detach() == 0))
    step(model, batch)
    causal = torch.ones(SEQ, SEQ).tril().bool()
    drops = [d[..., causal] for d in attention_drops]
    outputs = gathered([o.tolist() for o in layer_outputs])
    masks = gathered([d.tolist() for d in drops])
    report["tp2"] = {
        "layer_outputs_identical": all(torch.equal(torch.tensor(outputs[0][i]), torch.tensor(outputs[1][i]))
                                       for i in range(len(layer_outputs))),
        "attention_drop_fraction": sum(d.float().mean().item() for d in drops) / len(drops),
        "attention_masks_differ": all(masks[0][i] != masks[1][i] for i in range(len(drops))),
    }

    # Sequence parallel: per-rank masks on the shards; recomputation replays them.
    model = build(sp=True)
    hidden_drops = []
    for layer in model.model.decoder.layers:
        layer.hidden_dropout.register_forward_hook(
            lambda m, i, o: hidden_drops.append(((o == 0) & (i[0] != 0)).tolist()))
    grads = step(model, batch)
    masks = gathered(hidden_drops)
    report["tp2-sp"] = {
        "hidden_shard_rows": len(hidden_drops[0][0]),
        "hidden_drop_fraction": sum(torch.tensor(m).float().mean().item() for m in hidden_drops) / len(hidden_drops),
        "hidden_masks_differ": all(masks[0][i] != masks[1][i] for i in range(len(hidden_drops))),
    }
    scale = max(g.abs().max().item() for g in grads.values())
    for recompute in ("selective", "full"):
        other = step(build(sp=True, recompute=recompute), batch)
        report["tp2-sp"][f"recompute_{recompute}_grads"] = max(
            (other[n] - g).abs().max().item() / scale for n, g in grads.items())
    # The same recomputation without putting the model-parallel stream back draws other masks: the check can fail.
    other = step(build(sp=True, recompute="full-without-rng-context"), batch)
    report["tp2-sp"]["recompute_full_without_rng_context_grads"] = max(
        (other[n] - g).abs().max().item() / scale for n, g in grads.items())
    # A sequence the TP ranks cannot split is refused with the fix, on every rank alike (no rank left waiting).
    odd = input_ids[:, :-1]
    try:
        model(input_ids=odd, labels=odd)
        report["odd_sequence_error"] = None
    except ValueError as error:
        report["odd_sequence_error"] = str(error)
    if dist.get_rank() == 0:
        with open(args.out, "w") as f:
            json.dump(report, f, indent=2)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
