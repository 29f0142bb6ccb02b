"""Publishing to the Hugging Face Hub: `megahf push` and `megahf card`.

    folder.py        what FOLDER holds (run folder, model folder, peft adapter folder) and the files the card reads
    remote_code.py   megahf's model code flattened into Hub remote code, and config.json's auto_map
    shards.py        safetensors headers (parameter count) and re-sharding of large files
    model_index.py   evaluate / finetune results -> the card's model-index
    card.py          the model card (README.md)
    stage.py         path in repo -> local file, megahf's own files written to a temporary folder
    push.py          the commit, with bounded retries; the token never printed

Nothing here imports torch (re-sharding a file larger than --max-shard-size does, when it happens).
"""

from .card import CardOptions, render_card
from .folder import HubError, PublishSource, read_folder
from .push import PushResult, push_folder
from .stage import StageOptions, staged

__all__ = ["CardOptions", "HubError", "PublishSource", "PushResult", "StageOptions", "push_folder", "read_folder",
           "render_card", "staged"]
