"""Memory of a sharded model on each rank, for `megahf plan`'s figures (tests/test_plan.py), run by torchrun (gloo).

    torchrun --nproc_per_node 2 tests/distributed/_plan_memory_worker.py --tp 2 --fsdp 1 --out result.json

Builds a GPT of `--layers` layers (eager attention, dropout off, fp32) sharded as asked, and measures on every rank:
the bytes of its own weights (DTensor shards: `to_local()`), of their gradients after a backward pass, of Adam's two
moments after a step, and the bytes of the distinct storages autograd saves for the backward (parameters aside), as
they stand when the forward pass has ended. Rank 0 writes each rank's figures as JSON.
"""

from __future__ import annotations

import argparse
import json

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor
from transformers.distributed import DistributedConfig

from megahf import MegatronGPTConfig
from megahf.models.gpt.modeling_megatron_gpt import MegatronGPTForCausalLM
from megahf.parallel import distribute_model


def local(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.to_local() if isinstance(tensor, DTensor) else tensor


def nbytes(tensor: torch.Tensor) -> int:
    tensor = local(tensor)
    return tensor.numel() * tensor.element_size()


def measure(args, layers: int) -> dict:
    config = MegatronGPTConfig.from_preset("gpt-tiny", num_layers=layers, hidden_size=args.hidden,
                                           num_attention_heads=args.heads, hidden_dropout=0.0, attention_dropout=0.0,
                                           max_position_embeddings=256)
    config._attn_implementation = "eager"
    torch.manual_seed(0)
    model = distribute_model(MegatronGPTForCausalLM(config), DistributedConfig(tp_size=args.tp, fsdp_size=args.fsdp))
    model.train()
    params = {local(p).untyped_storage()._cdata for p in model.parameters()}
    # Every storage autograd saves, held (so that no address is reused) and keyed by the storage itself; its size is
    # read after the forward pass, when the backward is about to start. FSDP2 all-gathers a layer's weights for its
    # forward, and its linears save them, but it frees them (resizes their storage to 0 bytes) right after the
    # layer's forward and gathers them again for the backward: read at that point, they count 0, as they take
    # nothing while the activations wait for the backward.
    saved: dict[int, torch.UntypedStorage] = {}

    def pack(tensor):
        storage = local(tensor).untyped_storage()
        if storage._cdata not in params:
            saved[storage._cdata] = storage
        return tensor

    ids = torch.randint(0, 50257, (args.micro, args.seq), generator=torch.Generator().manual_seed(0))
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        loss = model(input_ids=ids, labels=ids).loss
    saved_bytes = sum(storage.nbytes() for storage in saved.values())
    loss.backward()
    optimizer = torch.optim.AdamW(model.parameters())
    optimizer.step()
    return {
        "weights": sum(nbytes(p) for p in model.parameters()),
        "gradients": sum(nbytes(p.grad) for p in model.parameters() if p.grad is not None),
        "optimizer": sum(nbytes(t) for state in optimizer.state.values() for key, t in state.items() if key != "step"),
        "saved": saved_bytes,
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    for name, default in (("tp", 1), ("fsdp", 1), ("hidden", 64), ("heads", 4), ("seq", 64), ("micro", 2)):
        parser.add_argument(f"--{name}", type=int, default=default)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    dist.init_process_group("gloo")
    two, one = measure(args, 2), measure(args, 1)
    mine = {**two, "activations_per_layer": two["saved"] - one["saved"]}
    everyone = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, mine)
    if dist.get_rank() == 0:
        with open(args.out, "w", encoding="utf-8") as f:
            json.dump(everyone, f)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
