"""Publishing a run's model when it ends: the recipe keys `push_to_hub`, `hub_model_id`, `hub_private`,
`hub_revision` (the same in every verb's recipe that trains a model: add `hub: HubRecipe` to it)."""

from __future__ import annotations

import re
from dataclasses import dataclass

from .errors import need
from .help import arg

HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")  # the same rule as megahf.hub.folder.HUB_ID


@dataclass
class HubRecipe:
    push_to_hub: bool = arg("At the end of the run, publish output_dir (final/, loss.png, the metrics, the recipe "
                            "and a model card) to the Hub as `megahf push` does (needs HF_TOKEN or `hf auth login`).",
                            default=False)
    hub_model_id: str = arg("The Hub repo to push to, USER/NAME (created if missing); needed by push_to_hub.",
                            default="")
    hub_private: bool = arg("Create the repo private (an existing repo keeps its visibility).", default=False)
    hub_revision: str = arg("Push to this branch of the repo (created from main if missing); '' is main.",
                            default="")

    def validate(self) -> None:
        if self.push_to_hub or self.hub_model_id:
            need(self, bool(HUB_ID.match(self.hub_model_id)), "hub_model_id",
                 "push_to_hub needs the repo as USER/NAME, e.g. alice/gpt-tiny-shakespeare")
        need(self, self.hub_revision == "" or bool(re.fullmatch(r"[\w][\w.\-/]*", self.hub_revision)),
             "hub_revision", "name a branch, e.g. v1 or step-300, or '' for main")


__all__ = ["HubRecipe"]
