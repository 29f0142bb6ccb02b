"""The `megahf push` and `megahf card` verbs: their arguments and what they run."""

from __future__ import annotations

import argparse
import sys

from .stage import DEFAULT_MAX_SHARD_SIZE


def add_hub_parsers(verbs) -> None:
    folder_help = ("a run's output_dir (its final/ is published with loss.png, metrics.json / results.json, "
                   "recipe.yaml, eval/*.json), a model folder (config.json + *.safetensors) or a peft adapter folder")
    push = verbs.add_parser(
        "push", help="publish a run, a model or a LoRA adapter to the Hugging Face Hub, with a model card",
        description="Publish FOLDER to the Hub in one commit: safetensors weights (re-sharded above "
        "--max-shard-size), config.json with auto_map and megahf's modeling code (loads with trust_remote_code=True, "
        "without megahf), the tokenizer, the run's figures and results, and a model card (README.md). Unchanged "
        "files are not uploaded again. Needs a token: HF_TOKEN or `hf auth login`; HF_ENDPOINT picks the Hub.")
    push.add_argument("folder", metavar="FOLDER", help=folder_help)
    push.add_argument("--repo-id", required=True, metavar="USER/NAME", help="the Hub repo (created if missing)")
    push.add_argument("--private", action="store_true", help="create the repo private (an existing repo keeps its "
                                                             "visibility)")
    push.add_argument("--revision", default=None, metavar="BRANCH",
                      help="push to this branch (created from main if missing); default main")
    push.add_argument("--commit-message", default=None, metavar="TEXT", help="default: 'megahf push FOLDER-NAME'")
    card = verbs.add_parser(
        "card", help="render the model card `megahf push` would upload, for review",
        description="Render FOLDER's model card (README.md) from whatever files it has, without pushing anything.")
    card.add_argument("folder", metavar="FOLDER", help=folder_help)
    card.add_argument("--output", default=None, metavar="FILE", help="write the card here (default: print it)")
    card.add_argument("--repo-id", default=None, metavar="USER/NAME", help="the repo the usage snippet loads")
    card.add_argument("--revision", default=None, metavar="BRANCH", help="the branch the usage snippet loads")
    for parser in (push, card):
        parser.add_argument("--max-shard-size", default=DEFAULT_MAX_SHARD_SIZE, metavar="SIZE",
                            help=f"re-shard safetensors files larger than this (default {DEFAULT_MAX_SHARD_SIZE})")
        parser.add_argument("--license", default="apache-2.0", help="the card's license (default apache-2.0)")
        parser.add_argument("--base-model", default=None, metavar="USER/NAME",
                            help="the Hub id of the model this one was fine-tuned or converted from, or of an "
                                 "adapter's base (default: what the folder names, if it is a Hub id)")


def run_push(args: argparse.Namespace) -> int:
    from .push import push_folder

    push_folder(args.folder, args.repo_id, private=args.private, revision=args.revision,
                commit_message=args.commit_message, license=args.license, base_model=args.base_model,
                max_shard_size=args.max_shard_size, say=lambda text: print(text, file=sys.stderr, flush=True))
    return 0


def run_card(args: argparse.Namespace) -> int:
    from ..atomic import atomic_write_text
    from ..errors import explain_write_errors
    from .folder import read_folder
    from .push import check_repo_id
    from .shards import parse_size
    from .stage import StageOptions, staged

    for value, flag in ((args.repo_id, "--repo-id"), (args.base_model, "--base-model")):
        if value is not None:
            check_repo_id(value, flag)
    source = read_folder(args.folder)
    options = StageOptions(repo_id=args.repo_id, revision=args.revision, license=args.license,
                           base_model=args.base_model, max_shard_bytes=parse_size(args.max_shard_size),
                           write_weights=False)
    with staged(source, options) as stage:
        card = stage.card
    if args.output is None:
        sys.stdout.write(card)
    else:
        with explain_write_errors(args.output, intact="nothing was written"):
            atomic_write_text(args.output, card)
        print(f"wrote {args.output}", file=sys.stderr)
    return 0


__all__ = ["add_hub_parsers", "run_card", "run_push"]
