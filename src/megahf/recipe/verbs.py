"""Which recipe sections each verb reads. A verb's recipe is a dataclass of section dataclasses; its YAML file and
its command line stay flat (`train_steps: 50`, `--train_steps 50`), and `parsing` routes each key to its section.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from typing import Any

from .data import DataRecipe
from .hub import HubRecipe
from .model import ModelRecipe
from .optimizer import OptimizerRecipe
from .parallel import ParallelRecipe
from .run import RunRecipe


@dataclass
class PretrainRecipe:
    """Everything one pretraining run needs. Key names follow Megatron-LM's arguments where one exists
    (`--seq-length`, `--micro-batch-size`, `--train-iters`, `--lr`, `--min-lr`, `--lr-warmup-iters`,
    `--lr-decay-style`, `--clip-grad`, `--eval-interval`, `--log-interval`)."""

    model: ModelRecipe = field(default_factory=ModelRecipe)
    data: DataRecipe = field(default_factory=DataRecipe)
    parallel: ParallelRecipe = field(default_factory=ParallelRecipe)
    optim: OptimizerRecipe = field(default_factory=OptimizerRecipe)
    run: RunRecipe = field(default_factory=RunRecipe)
    hub: HubRecipe = field(default_factory=HubRecipe)

    def validate(self) -> None:
        """Each section's own checks (the checks that need the model config are `megahf.training.setup`'s)."""
        for section in self.sections():
            section.validate()

    def sections(self) -> list[Any]:
        return [getattr(self, f.name) for f in fields(self)]

    def to_dict(self) -> dict[str, Any]:
        """The flat mapping a recipe file holds."""
        return {key: value for section in self.sections() for key, value in asdict(section).items()}


__all__ = ["PretrainRecipe"]
