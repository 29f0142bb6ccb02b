"""Continued-pretraining worker, run by `torchrun` (gloo, CPU) as `_continue_worker.py RECIPE --report FILE --key
value ...`: `megahf pretrain RECIPE --model FOLDER ...` as the CLI runs it (`run_pretrain`), with a callback that
checks, before the first step, the model the run loaded:

* every local shard equals, bit for bit, its block of the folder's tensor as `megahf convert` reads it whole;
* what the rank read from the safetensors files while the model was built is exactly its shards (the element count of
  every block read equals the elements its shards hold, less the zero rows of the padded vocabulary, which are made,
  not read) and it never read a whole tensor;
* the sharded model's logits on a fixed batch equal those of the folder's own model run by transformers.

Rank 0 writes the worst numbers over the ranks as JSON to --report; the run's outputs are the recipe's output_dir.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor
from transformers import TrainerCallback

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from continue_helpers import reference_logits  # noqa: E402

from megahf.convert import safetensors_stream  # noqa: E402
from megahf.convert.detect import detect_format, read_model_folder  # noqa: E402
from megahf.parallel.load_shards import local_block  # noqa: E402
from megahf.training import load_recipe  # noqa: E402
from megahf.training.pretrain import run_pretrain  # noqa: E402

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


def padding_elements(name: str, block: tuple[slice, ...], config, padded_in_file: bool) -> int:
    """Elements of the block that lie in the padded rows of the vocabulary, which the transformers folders do not
    hold (the converter makes them: zeros); a megahf folder holds them."""
    if padded_in_file or not name.endswith(("word_embeddings.weight", "output_layer.weight", "output_layer.bias")):
        return 0
    rows = max(0, block[0].stop - max(block[0].start, config.vocab_size))
    for s in block[1:]:
        rows *= s.stop - s.start
    return rows


class CheckLoaded(TrainerCallback):
    def __init__(self, folder: Path, report: Path):
        self.folder, self.report = folder, report

    @torch.no_grad()
    def on_train_begin(self, args, state, control, model=None, processing_class=None, **kwargs):
        read, whole_reads = READ["elements"], READ["whole"]  # what building the model read
        loaded = read_model_folder(self.folder)
        padded_in_file = detect_format(self.folder) == "megahf"
        kept, unequal = 0, []
        for name, param in model.named_parameters():
            local, block = local_block(param)
            kept += local.numel() - padding_elements(name, block, model.config, padded_in_file)
            if not torch.equal(local, loaded.tensors[name].load()[block].float()):
                unequal.append(name)
        vocab = len(processing_class)
        ids = torch.randint(0, vocab, (2, 24), generator=torch.Generator().manual_seed(0))
        model.eval()
        output = model(input_ids=ids, attention_mask=torch.ones_like(ids))
        model.train()
        logits = output.logits if getattr(output, "logits", None) is not None else output.prediction_logits
        logits = (logits.full_tensor() if isinstance(logits, DTensor) else logits)[..., :vocab]
        expected = reference_logits(self.folder, ids)[..., :vocab]
        error = ((logits - expected).abs().max() / expected.abs().max()).item()
        worst = torch.tensor([read, kept, whole_reads, len(unequal), error], dtype=torch.float64)
        dist.all_reduce(worst, op=dist.ReduceOp.MAX)
        mismatched = torch.tensor([float(read != kept)], dtype=torch.float64)
        dist.all_reduce(mismatched, op=dist.ReduceOp.SUM)
        if unequal:
            print(f"rank {dist.get_rank()}: shards unequal to the folder: {unequal[:5]}", flush=True)
        if dist.get_rank() == 0:
            self.report.write_text(json.dumps({
                "ranks_reading_other_than_they_keep": int(mismatched.item()), "max_read_elements": int(worst[0]),
                "max_kept_elements": int(worst[1]), "whole_tensor_reads": int(worst[2]),
                "unequal_shards": int(worst[3]), "logit_error": worst[4].item()}, indent=2))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("recipe")
    parser.add_argument("--report", required=True)
    args, keys = parser.parse_known_args()
    recipe = load_recipe(args.recipe, keys)
    count_reads()
    run_pretrain(recipe, callbacks=[CheckLoaded(Path(recipe.model.model), Path(args.report))])


if __name__ == "__main__":
    main()
