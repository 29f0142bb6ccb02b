"""Dropout under tensor and sequence parallelism: Megatron's model-parallel RNG tracker.

Dropout must draw the same mask on every tensor-parallel rank where the ranks hold the same activations (the
replicated residual stream under plain TP: otherwise the replicas drift apart), and different masks where they hold
different ones (the attention probabilities of the heads a rank owns; the sequence shards under sequence
parallelism: otherwise every rank would drop the same positions of its own heads or shard). The default generator
serves the first kind: it is seeded alike on every rank. The tracker holds one more generator state per rank,
seeded `seed + 2718 + tp_rank` (Megatron's offset), and `fork()` swaps it in for the dropout of the second kind.

    tracker = get_rng_tracker()
    tracker.seed(1234, tp_rank=1)
    with tracker.fork():
        probs = F.dropout(probs, 0.1)   # this rank's own mask

Recomputation must replay the same masks: a checkpoint taken inside `fork()` stashes the swapped-in state with the
default one (torch's `preserve_rng_state`), and a checkpoint around a whole layer gets `checkpoint_context` as its
`context_fn`, which puts the tracker back where it was when the layer first ran (Megatron's CheckpointFunction does
the same). The states go into every training checkpoint (`megahf.training.checkpoint.rng_state`).
"""

from __future__ import annotations

import contextlib

import torch

MODEL_PARALLEL_RNG = "model-parallel-rng"
SEED_OFFSET = 2718  # Megatron's model_parallel_cuda_manual_seed offset, kept so seeds mean the same thing


def _device_type() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"  # where megahf trains (training_arguments: use_cpu)


def _get_state(device_type: str) -> torch.Tensor:
    return torch.cuda.get_rng_state() if device_type == "cuda" else torch.get_rng_state()


def _set_state(device_type: str, state: torch.Tensor) -> None:
    if device_type == "cuda":
        torch.cuda.set_rng_state(state)
    else:
        torch.set_rng_state(state)


class RNGStatesTracker:
    """Named generator states, swapped into the default generator of the device (CPU or the current GPU) by
    `fork`. One process-wide instance: `get_rng_tracker()`."""

    def __init__(self):
        self.states: dict[str, torch.Tensor] = {}
        self.device_type = "cpu"

    def reset(self) -> None:
        self.states = {}

    def seed(self, seed: int, tp_rank: int, device_type: str | None = None) -> None:
        """(Re)seed the per-rank stream: `seed + 2718 + tp_rank` (the default generator is left alone)."""
        self.device_type = device_type or _device_type()
        generator = torch.Generator(device=self.device_type if self.device_type == "cuda" else "cpu")
        generator.manual_seed(seed + SEED_OFFSET + tp_rank)
        self.states = {MODEL_PARALLEL_RNG: generator.get_state()}

    def is_seeded(self) -> bool:
        return MODEL_PARALLEL_RNG in self.states

    def get_states(self) -> dict[str, torch.Tensor]:
        return {name: state.clone() for name, state in self.states.items()}

    def set_states(self, states: dict[str, torch.Tensor]) -> None:
        self.states = {name: state.clone() for name, state in states.items()}

    @contextlib.contextmanager
    def fork(self, name: str = MODEL_PARALLEL_RNG):
        """Draw from this rank's stream inside the block; the default stream is untouched by it."""
        if name not in self.states:
            raise RuntimeError(
                f"the RNG tracker has no state {name!r}: call megahf.parallel.rng.get_rng_tracker().seed(seed, "
                "tp_rank) once the model is distributed (megahf.parallel.distribute_model does it)."
            )
        default = _get_state(self.device_type)
        _set_state(self.device_type, self.states[name])
        try:
            yield
        finally:
            self.states[name] = _get_state(self.device_type)
            _set_state(self.device_type, default)

    # JSON-able form for training checkpoints (no pickle)
    def state_dict(self) -> dict:
        return {"device_type": self.device_type,
                "states": {name: state.tolist() for name, state in self.states.items()}}

    def load_state_dict(self, state: dict) -> None:
        self.device_type = state["device_type"]
        self.states = {name: torch.tensor(values, dtype=torch.uint8) for name, values in state["states"].items()}


_TRACKER = RNGStatesTracker()


def get_rng_tracker() -> RNGStatesTracker:
    return _TRACKER


def checkpoint_context():
    """`context_fn` for `torch.utils.checkpoint.checkpoint(..., use_reentrant=False)`: the recomputation starts from
    the tracker states of the original forward pass, and the tracker continues from where it was afterwards."""
    tracker = get_rng_tracker()
    at_forward: dict[str, torch.Tensor] = {}

    @contextlib.contextmanager
    def forward():
        at_forward.update(tracker.get_states())
        yield

    @contextlib.contextmanager
    def recompute():
        now = tracker.get_states()
        tracker.set_states(at_forward)
        try:
            yield
        finally:
            tracker.set_states(now)

    return forward(), recompute()


__all__ = ["MODEL_PARALLEL_RNG", "RNGStatesTracker", "SEED_OFFSET", "checkpoint_context", "get_rng_tracker"]
