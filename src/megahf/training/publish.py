"""`push_to_hub: true` in a recipe (megahf.recipe.hub.HubRecipe): publish the run's output_dir when it ends, as
`megahf push` does. Any verb whose recipe has the `hub` section calls `check_hub_push` before training and
`push_to_hub` once its outputs are written."""

from __future__ import annotations

from pathlib import Path

from ..parallel.ranks import is_rank_zero
from .log import say


def check_hub_push(recipe) -> None:
    """With `push_to_hub: true`, refuse a missing token or offline mode now rather than after training."""
    if recipe.hub.push_to_hub and is_rank_zero():
        from ..hub.push import check_can_push

        check_can_push()


def push_to_hub(recipe, output_dir: Path) -> None:
    """Publish output_dir from rank 0, once final/ and the figures are written. A failed push raises after
    everything local is saved, saying how to push again."""
    if not recipe.hub.push_to_hub or not is_rank_zero():
        return
    from ..hub import HubError, push_folder

    try:
        push_folder(output_dir, recipe.hub.hub_model_id, private=recipe.hub.hub_private,
                    revision=recipe.hub.hub_revision or None, say=say)
    except HubError as error:
        raise HubError(f"{error} (the run's outputs are saved in {output_dir}: push them with `megahf push "
                       f"{output_dir} --repo-id {recipe.hub.hub_model_id}`)") from None


__all__ = ["check_hub_push", "push_to_hub"]
