"""Gradient-norm clipping for a model whose parameters live on several device meshes.

A model under tensor parallelism x FSDP2 holds DTensors on the 2-D (fsdp, tp) mesh (sharded layers), on the 1-D
fsdp mesh (norms, position embeddings) and, under tensor parallelism alone, plain tensors next to DTensors on the tp
mesh. `torch.nn.utils.clip_grad_norm_` stacks the per-parameter norms and fails there ("must have the same mesh").
Here the gradients are grouped by mesh, each group's norm is made global (a DTensor norm is a partial result that
`full_tensor()` reduces over its mesh), the group norms are combined, and every gradient is scaled by the same
coefficient as PyTorch's.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor


def _inf_norm(grads: list[torch.Tensor]) -> torch.Tensor:
    """The largest |g| over every rank's local pieces. PyTorch's inf-norm of a DTensor fails when a rank's shard is
    empty (a parameter with fewer rows than FSDP ranks); a max needs no care for replicated copies, so one MAX
    all-reduce over the world gives the global value."""
    local = [g.to_local() if isinstance(g, DTensor) else g for g in grads]
    maxima = [t.detach().abs().max().float() for t in local if t.numel()]
    norm = torch.stack(maxima).max() if maxima else torch.zeros((), device=grads[0].device)
    dist.all_reduce(norm, op=dist.ReduceOp.MAX)
    return norm


def _group_norm(grads: list[torch.Tensor], norm_type: float, foreach: bool | None) -> torch.Tensor:
    norm = torch.nn.utils.get_total_norm(grads, norm_type, error_if_nonfinite=False, foreach=foreach)
    if isinstance(norm, DTensor):
        # Partial over the mesh (sharded gradients) or replicated: either way the global norm of this group.
        norm = norm.full_tensor()
    return norm


def _across_stages(norm: torch.Tensor, norm_type: float, group: dist.ProcessGroup) -> torch.Tensor:
    """The norm of every stage's gradients from each stage's norm (the stages hold disjoint parameters)."""
    norm = norm.float().clone()
    if norm_type == float("inf"):
        dist.all_reduce(norm, op=dist.ReduceOp.MAX, group=group)
        return norm
    powered = norm ** norm_type
    dist.all_reduce(powered, group=group)
    return powered ** (1.0 / norm_type)


@torch.no_grad()
def clip_grad_norm_(
    parameters: torch.Tensor | Iterable[torch.Tensor],
    max_norm: float,
    norm_type: float = 2.0,
    error_if_nonfinite: bool = False,
    foreach: bool | None = None,
    pipeline_group: dist.ProcessGroup | None = None,
    uncounted: Iterable[torch.Tensor] = (),
) -> torch.Tensor:
    """Clip the gradients of `parameters` (plain tensors and DTensors on any meshes) to a total `norm_type`-norm of
    at most `max_norm`, in place, and return the total norm before clipping as a plain tensor, identical on every
    rank.

    The gradients of one mesh must be complete on that mesh (as after a backward pass under TP / FSDP2); plain
    tensors count as one more group and are taken as they are (replicated: the same on every rank). Every rank must
    call it with the same parameters (the group norms are collectives). With plain tensors only, this is
    `torch.nn.utils.clip_grad_norm_` exactly. Under pipeline parallelism each rank passes its stages' parameters and
    `pipeline_group`: the norms of the stages are combined over it. `uncounted` parameters are scaled alike but left
    out of the norm (a copy of a tied weight, whose gradient the original already counts).
    """
    if isinstance(parameters, torch.Tensor):
        parameters = [parameters]
    grads = [p.grad for p in parameters if p.grad is not None]
    norm_type = float(norm_type)
    if not grads and pipeline_group is None:
        return torch.tensor(0.0)

    groups: dict[object, list[torch.Tensor]] = {}
    for grad in grads:
        key = grad.device_mesh if isinstance(grad, DTensor) else None
        groups.setdefault(key, []).append(grad)

    first_device = grads[0].device if grads else torch.device("cpu")
    if norm_type == float("inf") and any(isinstance(g, DTensor) for g in grads):
        norms = [_inf_norm(grads)]
    else:
        norms = [_group_norm(group, norm_type, foreach).to(first_device) for group in groups.values()]
    if not norms:
        total_norm = torch.zeros((), device=first_device)
    elif len(norms) == 1:
        total_norm = norms[0]
    elif norm_type == float("inf"):
        total_norm = torch.stack(norms).max()
    else:
        total_norm = torch.linalg.vector_norm(torch.stack(norms), norm_type)
    if pipeline_group is not None:
        total_norm = _across_stages(total_norm, norm_type, pipeline_group)

    if error_if_nonfinite and not torch.isfinite(total_norm):
        raise RuntimeError(
            f"clip_grad_norm_: the total {norm_type}-norm of the gradients is {total_norm.item()}; pass "
            "error_if_nonfinite=False to scale them anyway."
        )

    # PyTorch's coefficient: clamped rather than branched on, so that no rank synchronises on its value.
    clip_coef = torch.clamp(max_norm / (total_norm + 1e-6), max=1.0)
    for grad in grads + [p.grad for p in uncounted if p.grad is not None]:
        local = grad.to_local() if isinstance(grad, DTensor) else grad
        local.mul_(clip_coef.to(local.device))
    return total_norm


__all__ = ["clip_grad_norm_"]
