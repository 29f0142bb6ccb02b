"""One line of progress from rank 0, tagged so it stands out from Trainer's own output."""

from __future__ import annotations

from ..parallel.ranks import is_rank_zero


def say(message: str) -> None:
    if is_rank_zero():
        print(f"[megahf] {message}", flush=True)


__all__ = ["say"]
