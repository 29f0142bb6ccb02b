"""The recipes of `megahf evaluate lambada|wikitext`: one flat section each, whose keys are the command's flags with
underscores (`seq_length` for `--seq-length`). A flag given on the command line wins over the recipe's key."""

from __future__ import annotations

from dataclasses import dataclass, field

from .errors import RecipeError
from .help import arg
from .parsing import parse_recipe


@dataclass
class EvaluationSection:
    """What both zero-shot evaluations read."""

    model: str | None = arg("Saved causal LM folder (config.json and weights), e.g. a pretrain run's final/.",
                            default=None)
    data: str | None = arg("Local data (see the task); null: the Hub dataset, which needs the network.",
                           default=None)
    seq_length: int | None = arg("Tokens per forward; null: the model's max_position_embeddings.", default=None)
    micro_batch_size: int = arg("Sequences per forward (right-padded, with an attention mask).", default=8)
    tokenizer: str | None = arg("A shipped tokenizer (gpt2) or a folder; null: the model folder's own, else the "
                                "shipped one of its family.", default=None)
    output_json: str | None = arg("Also write the figures to this JSON file.", default=None)
    device: str | None = arg("torch device; null: cuda if available, else cpu (under a launcher: this rank's GPU).",
                             default=None)
    tensor_parallel_size: int = arg("Ranks holding one model replica (tensor parallel); the rest of the launched "
                                    "processes are data parallel.", default=1)

    def validate(self) -> None:
        if self.micro_batch_size < 1:
            raise RecipeError(f"micro_batch_size={self.micro_batch_size} (--micro-batch-size): must be at least 1")
        if self.tensor_parallel_size < 1:
            raise RecipeError(f"tensor_parallel_size={self.tensor_parallel_size} (--tensor-parallel-size): must be "
                              "at least 1")
        if self.seq_length is not None and self.seq_length < 1:
            raise RecipeError(f"seq_length={self.seq_length} (--seq-length): must be at least 1 (or null for the "
                              "model's maximum)")


@dataclass
class LambadaSection(EvaluationSection):
    strict: bool = arg("Score every token of the last word (Megatron's --strict-lambada), not only the last BPE "
                       "token.", default=False)


@dataclass
class WikiTextSection(EvaluationSection):
    overlapping_eval: int = arg("Tokens scored per window after the first (Megatron's --overlapping-eval).",
                                default=32)

    def validate(self) -> None:
        super().validate()
        if self.overlapping_eval < 1:
            raise RecipeError(f"overlapping_eval={self.overlapping_eval} (--overlapping-eval): must be at least 1")


@dataclass
class LambadaRecipe:
    evaluation: LambadaSection = field(default_factory=LambadaSection)

    def validate(self) -> None:
        self.evaluation.validate()


@dataclass
class WikiTextRecipe:
    evaluation: WikiTextSection = field(default_factory=WikiTextSection)

    def validate(self) -> None:
        self.evaluation.validate()


EVALUATE_RECIPES = {"lambada": LambadaRecipe, "wikitext": WikiTextRecipe}

def evaluation_settings(task: str, recipe_path: str | None, given: dict) -> EvaluationSection:
    """The settings of `megahf evaluate TASK`: the section's defaults, then the recipe file's keys (if any), then the
    flags given on the command line (`given`: flag name with underscores -> value, None where not given)."""
    recipe_class = EVALUATE_RECIPES[task]
    section = (parse_recipe(recipe_class, recipe_path) if recipe_path is not None else recipe_class()).evaluation
    for key, value in given.items():
        if value is not None:
            setattr(section, key, value)
    section.validate()
    if section.model is None:
        raise RecipeError("no model to evaluate: pass --model DIR (or set model: in the recipe)")
    return section


__all__ = ["EVALUATE_RECIPES", "EvaluationSection", "LambadaRecipe", "LambadaSection", "WikiTextRecipe",
           "WikiTextSection", "evaluation_settings"]
