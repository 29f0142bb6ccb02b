"""`megahf <verb>` (also `python -m megahf <verb>`).

    megahf pretrain recipes/gpt/tiny.yaml [--key value ...]
    megahf preprocess --input corpus.jsonl --tokenizer gpt2 --output-prefix data/my --append-eod
    megahf evaluate lambada --model runs/gpt/final --data lambada_test.jsonl [--strict]
    megahf evaluate wikitext --model runs/gpt/final --data wiki.test.raw [--overlapping-eval 32]
    megahf plan --model gpt-8.3b --gpus 512 --gpu v100 --gpu-memory 32GB --nodes 32 [--write DIR]

A recipe that cannot run (unknown key, wrong type, missing corpus, ...) is reported as one line on stderr with exit
status 2, before anything is computed or written. So is every other megahf error a verb meets later (a damaged
dataset file or checkpoint, a NaN loss, a full disk: `megahf.errors.MegahfError`): one line,
`megahf VERB: error: MESSAGE`, exit status 2 (argparse's), no traceback. Anything else is a bug and keeps its
traceback. Parsing and `--help` import neither torch nor transformers: what a verb runs is imported when it runs
(`run_verb`).
"""

from __future__ import annotations

import argparse
import importlib
import sys

from . import __version__
from .data import preprocess_arguments
from .errors import MegahfError, one_line
from .recipe import PretrainRecipe, recipe_help

PRETRAIN_EPILOG = """\
Every recipe key can be overridden after the recipe path, as --key value or --key=value; model fields go through
--model_overrides.FIELD value (or --model_overrides '{num_layers: 2, hidden_size: 64}'); a bare --flag sets a
boolean key to true. Examples:

  megahf pretrain recipes/gpt/tiny.yaml --train_steps 50 --output_dir runs/quick
  megahf pretrain recipes/gpt/llama-tiny.yaml --model_overrides.num_layers 2 --lr_schedule linear

Recipe keys, by section (the defaults of megahf.recipe's dataclasses; a recipe file sets its own):
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

    preprocess_arguments.add_arguments(
        verbs.add_parser(
            "preprocess",
            help="tokenize a corpus into Megatron's indexed dataset (.bin/.idx)",
            description="Tokenize a corpus (jsonl, json, parquet, txt, or a cached Hugging Face dataset) into "
            "Megatron-Core's indexed dataset format, {prefix}_{key}_{document|sentence}.bin/.idx.",
        )
    )
    add_evaluate_parser(verbs)
    add_plan_parser(verbs)
    return parser


def add_plan_parser(verbs) -> None:
    """`megahf plan`: which layouts fit a model on N GPUs, ranked by predicted step time (megahf/plan.py)."""
    plan = verbs.add_parser(
        "plan",
        help="every parallel layout that fits a model on N GPUs, ranked by predicted step time",
        description="Every layout (tensor parallel, FSDP, data parallel, sequence parallel, recompute, micro batch) "
        "of a model on N GPUs: memory per GPU by kind, predicted step time, model FLOPs per step; for the others, "
        "why not. --write DIR writes the first as a recipe and an accelerate launch config. The memory and time "
        "models and their constants: megahf/plan.py.",
    )
    plan.add_argument("--model", required=True, metavar="PRESET_OR_CONFIG",
                      help="a preset (gpt-8.3b), a recipe YAML (its model and model_overrides) or a config.json")
    plan.add_argument("--gpus", type=int, required=True, metavar="N", help="GPUs in all")
    plan.add_argument("--gpu-memory", default="80GB", metavar="SIZE", help="memory per GPU, e.g. 80GB (default)")
    plan.add_argument("--seq", "--seq_length", "--seq-length", dest="seq", type=int, default=1024, metavar="S",
                      help="tokens per sample (recipe key seq_length; default 1024)")
    plan.add_argument("--global-batch", "--global_batch_size", "--global-batch-size", dest="global_batch", type=int,
                      default=512, metavar="B", help="samples per optimizer step (recipe key global_batch_size; "
                      "default 512)")
    plan.add_argument("--gpu", default="h100", choices=("h100", "a100", "v100", "h200"),
                      help="peak FLOP/s, efficiency and bandwidths of this GPU (default h100)")
    plan.add_argument("--nodes", type=int, default=0, metavar="K", help="nodes (default: 8 GPUs per node)")
    plan.add_argument("--top", type=int, default=10, metavar="K", help="fitting layouts printed (default 10)")
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
    recipe = run_verb("megahf.training.setup", "load_recipe", recipe_path, overrides)
    run_verb("megahf.training.pretrain", "pretrain", recipe)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, rest = parser.parse_known_args(argv)
    if args.verb in ("preprocess", "evaluate", "plan") and rest:
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    try:
        if args.verb == "pretrain":
            return run_pretrain_verb(args.recipe, rest)
        if args.verb == "preprocess":
            return run_verb("megahf.data.preprocess", "run", args)
        if args.verb == "evaluate":
            return run_verb("megahf.tasks.run", "run", args)
        if args.verb == "plan":
            return run_verb("megahf.plan", "run", args)
    except MegahfError as error:
        print(f"megahf {args.verb}: error: {one_line(error)}", file=sys.stderr)
        return 2
    parser.error(f"unknown verb {args.verb!r}")  # unreachable: argparse checks the verb
    return 2


if __name__ == "__main__":
    sys.exit(main())
