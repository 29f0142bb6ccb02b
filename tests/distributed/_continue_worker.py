"""Continued-pretraining load worker, run by `torchrun` (gloo, CPU): each rank builds the run's model from a checkpoint
folder exactly as `megahf pretrain --model FOLDER` does (`build_model`), under the layout of the recipe keys given, and
checks what it holds and what it read.

For each folder (`--kinds`, made by tests/continue_helpers.py under `--root`):
* every local shard equals, bit for bit, its block of the folder's tensor as `megahf convert` reads it whole;
* what the rank read from the safetensors files is exactly its shards (the element count of every block read equals
  the elements its shards hold, less the zero rows of the padded vocabulary, which are made, not read) and it never
  read a whole tensor;
* the sharded model's logits on a fixed batch equal those of the folder's own model run by transformers.

Rank 0 writes, per folder, the worst numbers over the ranks as JSON to --out; a structural problem raises, which makes
torchrun exit non-zero.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from continue_helpers import RUN_KEYS, reference_logits  # noqa: E402

from megahf.convert import safetensors_stream  # noqa: E402
from megahf.convert.detect import read_model_folder  # noqa: E402
from megahf.parallel.load_shards import local_block  # noqa: E402
from megahf.training import load_recipe  # noqa: E402
from megahf.training.setup import build_layout, build_model, load_tokenizer  # noqa: E402

READ = {"elements": 0, "whole": 0}


def count_reads() -> None:
    """Count what the safetensors readers hand out from now on: elements of blocks, and whole-tensor reads."""
    block_loader, loader = safetensors_stream._block_loader, safetensors_stream._loader

    def counting_block_loader(path, name):
        load_block = block_loader(path, name)

        def counted(block):
            part = load_block(block)
            READ["elements"] += part.numel()
            return part
        return counted

    def counting_loader(path, name):
        load = loader(path, name)

        def counted():
            READ["whole"] += 1
            return load()
        return counted

    safetensors_stream._block_loader, safetensors_stream._loader = counting_block_loader, counting_loader


def padding_elements(name: str, block: tuple[slice, ...], config, kind: str) -> int:
    """Elements of the block that lie in the padded rows of the vocabulary, which the transformers folders do not
    hold (the converter makes them: zeros); a megahf folder holds them."""
    if kind == "megahf" or not name.endswith(("word_embeddings.weight", "output_layer.weight", "output_layer.bias")):
        return 0
    rows = max(0, block[0].stop - max(block[0].start, config.vocab_size))
    for s in block[1:]:
        rows *= s.stop - s.start
    return rows


def check(kind: str, folder: Path, keys: list[str], out_dir: Path) -> dict:
    values = {"model": folder, "tokenizer": folder, "output_dir": out_dir, "seq_length": 32, "warmup_steps": 1,
              **RUN_KEYS[kind]}
    recipe = load_recipe(None, [t for k, v in values.items() for t in (f"--{k}", str(v))] + keys)
    tokenizer = load_tokenizer(recipe)
    READ.update(elements=0, whole=0)
    model = build_model(recipe, tokenizer, build_layout(recipe)).eval()
    read, whole_reads = READ["elements"], READ["whole"]
    loaded = read_model_folder(folder)
    kept, unequal = 0, []
    for name, param in model.named_parameters():
        local, block = local_block(param)
        kept += local.numel() - padding_elements(name, block, model.config, kind)
        if not torch.equal(local, loaded.tensors[name].load()[block].float()):
            unequal.append(name)
    ids = torch.randint(0, len(tokenizer), (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        output = model(input_ids=ids, attention_mask=torch.ones_like(ids))
    logits = output.logits if getattr(output, "logits", None) is not None else output.prediction_logits
    logits = (logits.full_tensor() if isinstance(logits, DTensor) else logits)[..., :len(tokenizer)]
    expected = reference_logits(folder, ids)[..., :len(tokenizer)]
    error = ((logits - expected).abs().max() / expected.abs().max()).item()
    numbers = torch.tensor([read, kept, whole_reads, len(unequal), error], dtype=torch.float64)
    worst = numbers.clone()
    dist.all_reduce(worst, op=dist.ReduceOp.MAX)
    mismatched = torch.tensor([float(read != kept)], dtype=torch.float64)
    dist.all_reduce(mismatched, op=dist.ReduceOp.SUM)
    if unequal:
        print(f"rank {dist.get_rank()} {kind}: shards unequal to the folder: {unequal[:5]}", flush=True)
    return {"ranks_reading_other_than_they_keep": int(mismatched.item()), "max_read_elements": int(worst[0]),
            "max_kept_elements": int(worst[1]), "whole_tensor_reads": int(worst[2]),
            "unequal_shards": int(worst[3]), "logit_error": worst[4].item(),
            "layout": build_layout(recipe).describe()}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--root", required=True)
    parser.add_argument("--kinds", required=True)
    parser.add_argument("--out", required=True)
    args, keys = parser.parse_known_args()
    dist.init_process_group("gloo")
    count_reads()
    report = {kind: check(kind, Path(args.root) / kind, keys, Path(args.out).parent / f"out-{kind}")
              for kind in args.kinds.split(",")}
    if dist.get_rank() == 0:
        Path(args.out).write_text(json.dumps(report, indent=2))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
