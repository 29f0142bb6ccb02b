"""`megahf <verb>` (also `python -m megahf <verb>`).

    megahf pretrain recipes/gpt/tiny.yaml [--key value ...]
    megahf finetune recipes/glue/mnli.yaml --model runs/bert-336m/final [--peft lora] [--key value ...]
    megahf preprocess --input corpus.jsonl --tokenizer gpt2 --output-prefix data/my --append-eod
    megahf evaluate lambada --model runs/gpt/final --data lambada_test.jsonl [--strict]
    megahf evaluate wikitext --model runs/gpt/final --data wiki.test.raw [--overlapping-eval 32]
    megahf push runs/gpt-tiny --repo-id USER/NAME [--private] [--revision BRANCH] [--commit-message TEXT]
    megahf card runs/gpt-tiny [--output README.md]
    megahf convert --from megatron --to megahf ckpts/gpt gpt-hf [--model-overrides vocab_size=50257]
    megahf plan --model gpt-8.3b --gpus 512 --gpu v100 --gpu-memory 32GB --nodes 32 [--write DIR]

A recipe that cannot run (unknown key, wrong type, missing corpus, ...) is reported as one line on stderr with exit
status 2, before anything is computed or written. So is every other megahf error a verb meets later (a damaged
dataset file or checkpoint, a NaN loss, a full disk: `megahf.errors.MegahfError`): one line,
`megahf VERB: error: MESSAGE`, exit status 2 (argparse's), no traceback. Under a launcher (torchrun, accelerate
launch) an error every process meets alike before any compute (the recipe, the layout, the launch config:
`megahf.errors.alike_on_every_rank`) is printed by the first process of each launcher only; the others exit 2
silently. An error met later, which may differ per rank, is printed by every process that meets it. Anything else is
a bug and keeps its traceback. Parsing and `--help` import neither torch nor transformers: what a verb runs is
imported when it runs (`run_verb`).
"""

from __future__ import annotations

import argparse
import importlib
import sys

from . import __version__
from .data import preprocess_arguments
from .errors import MegahfError, alike_on_every_rank, one_line, prints_here
from .hub.cli import add_hub_parsers
from .recipe import FinetuneRecipe, PretrainRecipe, recipe_help

PRETRAIN_EPILOG = """\
Every recipe key can be overridden after the recipe path, as --key value or --key=value; model fields go through
--model_overrides.FIELD value (or --model_overrides '{num_layers: 2, hidden_size: 64}'); a bare --flag sets a
boolean key to true. Examples:

  megahf pretrain recipes/gpt/tiny.yaml --train_steps 50 --output_dir runs/quick
  megahf pretrain recipes/gpt/llama-tiny.yaml --model_overrides.num_layers 2 --lr_schedule linear

Recipe keys, by section (the defaults of megahf.recipe's dataclasses; a recipe file sets its own):
"""


FINETUNE_EPILOG = """\
Every recipe key can be overridden after the recipe path, as --key value or --key=value (--key null for a key that
takes null); a bare --flag sets a boolean key to true. Examples:

  megahf finetune recipes/glue/mnli.yaml --model runs/bert-336m/final
  megahf finetune recipes/race/race.yaml --model runs/bert-336m/final --peft lora --lora_rank 16
  megahf finetune recipes/glue/sst2.yaml --model bert-tiny --smoke --output_dir runs/smoke   (the shipped fixture)
  torchrun --nproc_per_node 8 -m megahf finetune recipes/glue/qqp.yaml --model M --tensor_parallel_size 2

Recipe keys, by section (the defaults of megahf.recipe.finetune's dataclasses; a recipe file sets its own):
"""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="megahf",
        description="Megatron-LM's GPT and BERT on transformers and accelerate: recipes in YAML, one verb per job.",
    )
    parser.add_argument("--version", action="version", version=f"megahf {__version__}")
    verbs = parser.add_subparsers(dest="verb", metavar="VERB")
    verbs.required = True

    pretrain = verbs.add_parser(
        "pretrain",
        help="pretrain a MegatronGPT or MegatronBert from a YAML recipe",
        description="Pretrain a MegatronGPT or MegatronBert from scratch as a YAML recipe says: progress bar and log "
        "lines, validation perplexity, a sample, and OUTPUT_DIR/{final/, loss.png, metrics.json, recipe.yaml}.",
        epilog=PRETRAIN_EPILOG + recipe_help(PretrainRecipe),
        formatter_class=argparse.RawDescriptionHelpFormatter,
        usage="megahf pretrain [-h] RECIPE [--key value ...]",
    )
    pretrain.add_argument("recipe", metavar="RECIPE", help="YAML recipe, e.g. recipes/gpt/tiny.yaml")

    finetune = verbs.add_parser(
        "finetune",
        help="fine-tune a pretrained BERT on a GLUE task or RACE (full, LoRA, QLoRA; 8-bit AdamW)",
        description="Fine-tune a pretrained MegatronBert on a GLUE task or RACE as a YAML recipe says, as "
        "Megatron-LM's tasks/ did: dev metrics every eval_interval and at the end, test-split prediction files, and "
        "OUTPUT_DIR/{final/, results.json, results.md, predictions/, loss.png, recipe.yaml}.",
        epilog=FINETUNE_EPILOG + recipe_help(FinetuneRecipe),
        formatter_class=argparse.RawDescriptionHelpFormatter,
        usage="megahf finetune [-h] RECIPE [--key value ...]",
    )
    finetune.add_argument("recipe", metavar="RECIPE", help="YAML recipe, e.g. recipes/glue/mnli.yaml")

    preprocess_arguments.add_arguments(
        verbs.add_parser(
            "preprocess",
            help="tokenize a corpus into Megatron's indexed dataset (.bin/.idx)",
            description="Tokenize a corpus (jsonl, json, parquet, txt, or a cached Hugging Face dataset) into "
            "Megatron-Core's indexed dataset format, {prefix}_{key}_{document|sentence}.bin/.idx.",
        )
    )
    add_evaluate_parser(verbs)
    add_hub_parsers(verbs)
    add_convert_parser(verbs)
    add_plan_parser(verbs)
    return parser


CONVERT_FORMATS = ("megatron", "megatron-dist", "megahf", "hf-gpt2", "hf-llama", "hf-bert", "hf-megatron-bert",
                   "nanotron")  # megahf.convert.FORMATS


def add_convert_parser(verbs) -> None:
    """`megahf convert`: checkpoints between Megatron-LM, megahf and transformers, each conversion proven."""
    convert = verbs.add_parser(
        "convert",
        help="convert a checkpoint between Megatron-LM, megahf and transformers formats, with its proof",
        description="Convert SRC (a checkpoint in format --from) into the new folder DST (format --to), tensor by "
        "tensor into a temporary folder renamed when complete. Every conversion ends with its proof, printed and "
        "written as DST/conversion.json: the logits of a fixed probe batch from the source against the converted "
        "checkpoint's, and the bitwise result of converting DST back. Exit status 0 when proven, 1 when not.",
        epilog="Formats: megatron (Megatron-LM legacy torch checkpoint: iter_XXXXXXX/ or release/ with "
        "mp_rank_XX[_YYY]/model_optim_rng.pt, any TP x PP), megatron-dist (Megatron-Core's torch_dist: a PyTorch "
        "distributed checkpoint with metadata.json and common.pt), megahf (a megahf model folder, or a training "
        "checkpoint "
        "checkpoints/step_N/ as a source), hf-gpt2 (GPT2LMHeadModel), hf-llama (LlamaForCausalLM), hf-bert (BertFor*), "
        "hf-megatron-bert (MegatronBertFor*), nanotron (its Llama: model_config.json and "
        "model/**/*.safetensors, one file per tensor and shard); transformers folders are read from safetensors only.",
    )
    convert.add_argument("--from", dest="from_format", required=True, choices=CONVERT_FORMATS, metavar="FORMAT",
                         help=f"source format: {', '.join(CONVERT_FORMATS)}")
    convert.add_argument("--to", dest="to_format", required=True, choices=CONVERT_FORMATS, metavar="FORMAT",
                         help="target format (same choices)")
    convert.add_argument("src", metavar="SRC", help="the checkpoint to convert (a folder)")
    convert.add_argument("dst", metavar="DST", help="the new folder to write (must not exist)")
    convert.add_argument("--tp", type=int, default=1, metavar="N",
                         help="tensor-parallel size of a megatron target (megatron-dist: the TP whose vocabulary "
                              "padding it gets)")
    convert.add_argument("--pp", type=int, default=1, metavar="M", help="pipeline-parallel size of a megatron target")
    convert.add_argument("--megatron-names", choices=("core", "te", "legacy"), default="core",
                         help="parameter names of a megatron target: Megatron-Core local spec (default), Transformer "
                              "Engine's fused-norm names, or the legacy language_model.* names")
    convert.add_argument("--model-overrides", nargs="+", action="extend", default=None, metavar="KEY=VALUE",
                         help="config fields that replace what the source stores, e.g. vocab_size=50257 (a Megatron "
                              "checkpoint stores only the padded vocabulary) or '{num_attention_heads: 16}'; give it "
                              "after SRC DST (it takes every value that follows)")
    convert.add_argument("--trust-pickle", action="store_true",
                         help="load Megatron pickles that reference classes outside megahf's allow-list (this can run "
                              "code from the file: only for checkpoints whose origin you trust)")
    convert.add_argument("--no-progress", action="store_true", help="no progress bar")


def add_plan_parser(verbs) -> None:
    """`megahf plan`: which layouts fit a model on N GPUs, ranked by predicted step time (megahf/plan.py)."""
    plan = verbs.add_parser(
        "plan",
        help="every parallel layout that fits a model on N GPUs, ranked by predicted step time",
        description="Every layout (tensor parallel, FSDP, data parallel, sequence parallel, recompute, micro batch; "
        "pipeline parallel where TP x FSDP within a node do not hold the model) of a model on N GPUs: memory per GPU "
        "by kind (of the largest pipeline stage), predicted step time with the pipeline bubble, model FLOPs per step; "
        "for the others, why not. --write DIR writes the first as a recipe and an accelerate launch config. The "
        "memory and time models and their constants: megahf/plan.py.",
    )
    plan.add_argument("--model", required=True, metavar="PRESET_OR_CONFIG",
                      help="a preset (gpt-8.3b), a recipe YAML (its model and model_overrides; a checkpoint's config "
                      "when its model is one) or a config.json")
    plan.add_argument("--gpus", type=int, required=True, metavar="N", help="GPUs in all")
    plan.add_argument("--gpu-memory", default="80GB", metavar="SIZE", help="memory per GPU, e.g. 80GB (default)")
    plan.add_argument("--seq", "--seq_length", "--seq-length", dest="seq", type=int, default=None, metavar="S",
                      help="tokens per sample (recipe key seq_length; default: the --model recipe's, else 1024)")
    plan.add_argument("--global-batch", "--global_batch_size", "--global-batch-size", dest="global_batch", type=int,
                      default=None, metavar="B", help="samples per optimizer step (recipe key global_batch_size; "
                      "default: the --model recipe's, else 512)")
    plan.add_argument("--attention", default="sdpa", choices=("sdpa", "eager"),
                      help="sdpa (default, what megahf runs: the fused kernel keeps no [seq, seq] tensor) or eager "
                      "(the paper's count: scores, softmax and dropout of every head kept)")
    plan.add_argument("--gpu", default="h100", choices=("h100", "a100", "v100", "h200"),
                      help="peak FLOP/s, efficiency and bandwidths of this GPU (default h100)")
    plan.add_argument("--nodes", type=int, default=0, metavar="K", help="nodes (default: 8 GPUs per node)")
    plan.add_argument("--top", type=int, default=10, metavar="K", help="fitting layouts printed (default 10)")
    plan.add_argument("--loss-chunk-size", "--loss_chunk_size", dest="loss_chunk_size", type=int, default=1024,
                      metavar="C", help="the recipe key loss_chunk_size (default 1024, as the recipes; 0: the plain "
                      "loss, whose logits cost s x b x vocabulary x 12 bytes)")
    plan.add_argument("--write", default=None, metavar="DIR",
                      help="write the first layout as DIR/recipe.yaml and DIR/launch.yaml")


def add_evaluate_parser(verbs) -> None:
    """`megahf evaluate lambada|wikitext`: Megatron's zero-shot evaluations of a saved causal LM."""
    evaluate = verbs.add_parser(
        "evaluate",
        help="zero-shot evaluation of a saved GPT: LAMBADA accuracy, WikiText-103 perplexity",
        description="Zero-shot evaluations of a saved causal LM (a model folder, e.g. a pretrain run's final/), "
        "computed as Megatron-LM's tasks/zeroshot_gpt does. Prints one table; --output-json writes the same figures.",
    )
    tasks = evaluate.add_subparsers(dest="task", metavar="TASK")
    tasks.required = True
    lambada = tasks.add_parser(
        "lambada",
        help="LAMBADA last-word accuracy",
        description="LAMBADA accuracy: non-strict scores the last BPE token of each passage; --strict scores every "
        "token of the last whitespace-separated word (tokenized apart from its context). A passage counts only if "
        "the argmax is right at every label position.",
    )
    lambada.add_argument("--strict", action=argparse.BooleanOptionalAction, default=None,
                         help="score the whole last word (Megatron's --strict-lambada); --no-strict overrides a "
                              "recipe's strict: true")
    wikitext = tasks.add_parser(
        "wikitext",
        help="WikiText-103 perplexity (sliding window, adjusted perplexity)",
        description="WikiText-103 perplexity: the raw text is detokenized and BPE-tokenized, scored with windows of "
        "seq-length tokens sliding by --overlapping-eval; prints the loss, perplexity and the perplexity adjusted to "
        "WikiText's own token count.",
    )
    wikitext.add_argument("--overlapping-eval", type=int, default=None, metavar="N",
                          help="tokens scored per window after the first (default 32)")
    data_help = {
        "lambada": "a .jsonl file with a 'text' field per line, or a folder laid out like the Hub dataset "
                   "EleutherAI/lambada_openai (split test); default: that Hub dataset (needs the network)",
        "wikitext": "a raw text file (e.g. wiki.test.raw), or a folder laid out like the Hub dataset "
                    "Salesforce/wikitext wikitext-103-raw-v1 (split test); default: that Hub dataset (needs the "
                    "network)",
    }
    for name, task in (("lambada", lambada), ("wikitext", wikitext)):
        task.add_argument("--recipe", default=None, metavar="YAML",
                          help=f"read the settings from a recipe (e.g. recipes/{name}/gpt.yaml: keys are these flags "
                               "with underscores); flags given here win")
        task.add_argument("--model", default=None, metavar="DIR",
                          help="saved model folder (config.json and weights), e.g. a pretrain run's final/")
        task.add_argument("--data", default=None, metavar="PATH", help=data_help[name])
        task.add_argument("--seq-length", type=int, default=None, metavar="N",
                          help="tokens per forward (default: the model's max_position_embeddings)")
        task.add_argument("--micro-batch-size", type=int, default=None, metavar="B",
                          help="sequences per forward (default 8)")
        task.add_argument("--tokenizer", default=None, metavar="T",
                          help="a shipped tokenizer (gpt2) or a folder (default: the model folder's own, else the "
                               "shipped one of the model's family)")
        task.add_argument("--output-json", default=None, metavar="FILE", help="also write the figures as JSON")
        task.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
        task.add_argument("--tensor-parallel-size", type=int, default=None, metavar="N",
                          help="under torchrun / accelerate launch: ranks holding one model replica (default 1); "
                               "the rest of the processes are data parallel, each scoring a slice of the examples")
        task.add_argument("--no-progress", action="store_true", help="no progress bar")


def run_verb(module: str, function: str, *args) -> int:
    """Import a verb's implementation only when it runs (torch and transformers take seconds to import)."""
    return getattr(importlib.import_module(module), function)(*args)


def run_pretrain_verb(recipe_path: str, overrides: list[str]) -> int:
    with alike_on_every_rank():
        recipe = run_verb("megahf.training.setup", "load_recipe", recipe_path, overrides)
    run_verb("megahf.training.pretrain", "pretrain", recipe)
    return 0


def run_finetune_verb(recipe_path: str, overrides: list[str]) -> int:
    with alike_on_every_rank():
        recipe = run_verb("megahf.training.finetune", "load_finetune_recipe", recipe_path, overrides)
    run_verb("megahf.training.finetune", "finetune", recipe)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, rest = parser.parse_known_args(argv)
    if args.verb in ("preprocess", "evaluate", "push", "card", "convert", "plan") and rest:
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    try:
        if args.verb == "pretrain":
            return run_pretrain_verb(args.recipe, rest)
        if args.verb == "finetune":
            return run_finetune_verb(args.recipe, rest)
        if args.verb == "preprocess":
            return run_verb("megahf.data.preprocess", "run", args)
        if args.verb == "evaluate":
            return run_verb("megahf.tasks.run", "run", args)
        if args.verb == "push":
            return run_verb("megahf.hub.cli", "run_push", args)
        if args.verb == "card":
            return run_verb("megahf.hub.cli", "run_card", args)
        if args.verb == "convert":
            return run_verb("megahf.convert.api", "run", args)
        if args.verb == "plan":
            return run_verb("megahf.plan", "run", args)
    except MegahfError as error:
        if prints_here(error):
            print(f"megahf {args.verb}: error: {one_line(error)}", file=sys.stderr)
        return 2
    parser.error(f"unknown verb {args.verb!r}")  # unreachable: argparse checks the verb
    return 2


if __name__ == "__main__":
    sys.exit(main())
