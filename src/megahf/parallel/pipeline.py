"""Pipeline parallelism, Megatron's third dimension, on `torch.distributed.pipelining` (its stages and schedules).

The decoder layers are split evenly into `pipeline_parallel_size x virtual_pipeline_size` stages, the pieces the
config's `base_model_pp_plan` names: the embedding opens the first stage, the final norm, the output layer and the
loss close the last. Every rank builds the whole model from the seed (as under tensor parallelism), then keeps the
modules of its own stages only, at their usual names (`model.decoder.layers.5...`): a checkpoint of a pipelined run
holds the same keys as one of a single process, and torch.distributed.checkpoint reshards between the two.

    mesh      pp (outermost) x dp_replicate x fsdp x tp (innermost), Megatron's order
    stages    rank r runs stages r, r + pp, ... (several with interleaved-1f1b and interleaved-zb)
    inside    tensor parallelism (transformers' plan), FSDP2 (the config's FSDP plan, each stage its own root) or,
              with replicas alone, an all-reduce of the gradients, on the ranks of the stage

A tied output layer is a copy of the word embeddings on the last stage; after every step the two gradients are
summed (Megatron's embedding group), so both copies stay equal to the tied weight of one process. The loss of a
micro-batch is its token sum divided by the tokens of the whole global batch, as transformers' Trainer computes it
with gradient accumulation: the gradients equal one process's.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.fsdp import fully_shard
from torch.distributed.pipelining import (
    PipelineStage,
    Schedule1F1B,
    ScheduleGPipe,
    ScheduleInterleaved1F1B,
    ScheduleInterleavedZeroBubble,
)
from torch.distributed.tensor import DTensor
from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors

from .clip import clip_grad_norm_
from .layout import ParallelLayout
from .model_hooks import use_parallel_chunked_loss
from .rng import get_rng_tracker

SCHEDULES = {"gpipe": ScheduleGPipe, "1f1b": Schedule1F1B, "interleaved-1f1b": ScheduleInterleaved1F1B,
             "interleaved-zb": ScheduleInterleavedZeroBubble}
ZERO_BUBBLE = {"interleaved-zb"}
IGNORE_INDEX = -100


def stage_layers(num_layers: int, num_stages: int) -> list[range]:
    """The decoder layers of each stage: equal, consecutive shares."""
    if num_layers % num_stages:
        raise ValueError(f"{num_stages} pipeline stages do not divide num_layers={num_layers}")
    per_stage = num_layers // num_stages
    return [range(s * per_stage, (s + 1) * per_stage) for s in range(num_stages)]


def stages_of_rank(pp_rank: int, pp_size: int, chunks: int) -> list[int]:
    """The stages a pipeline rank runs, looped as Megatron's interleaved schedule places them: r, r + pp, ... (the
    first stage on the first rank, the last on the last)."""
    return [pp_rank + k * pp_size for k in range(chunks)]


class _HeldElsewhere(nn.Module):
    """Stands in the layer list for a layer of another stage: the layers this rank holds keep their numbers."""

    def forward(self, *args, **kwargs):
        raise RuntimeError("this decoder layer lives on another pipeline stage")


@dataclass(frozen=True)
class PipelinePlan:
    """The model's pipeline plan (the config's `base_model_pp_plan` and the head's `_pp_plan`, transformers'
    `model.pp_plan`) read as the pieces of the stages: the modules before the layer list open the first stage, the
    layer list is divided, the modules after it (and the head's) close the last. For Megatron's GPT: the embedding;
    `model.decoder.layers`; the final norm and the output layer."""

    openers: tuple[str, ...]
    layers: str
    closers: tuple[str, ...]

    @classmethod
    def of(cls, model: nn.Module) -> PipelinePlan:
        names = list(model.pp_plan)
        body = [n for n in names if n.startswith(model.base_model_prefix + ".")]
        layers = next(n for n in body if isinstance(model.get_submodule(n), nn.ModuleList))
        cut = body.index(layers)
        return cls(tuple(body[:cut]), layers, tuple(body[cut + 1:] + [n for n in names if n not in body]))


class PipelineChunk(nn.Module):
    """One stage of a MegatronGPTForCausalLM: the input is the token ids (first stage) or the hidden states the
    previous stage sent; the output is the hidden states for the next stage or, on the last, the sum of the token
    losses of the micro-batch (`shift_labels` is passed to every stage, split like the input). Its modules are the
    model's own (shared, not copied), as the pipeline plan places them."""

    def __init__(self, model: nn.Module, plan: PipelinePlan, stage: int, num_stages: int, layers: range,
                 chunked_loss: bool = True):
        super().__init__()
        self.chunked_loss = chunked_loss
        self.is_first, self.is_last = stage == 0, stage == num_stages - 1
        self.openers = nn.ModuleList(model.get_submodule(n) for n in plan.openers) if self.is_first else None
        self.layers = nn.ModuleList(model.get_submodule(plan.layers)[i] for i in layers)
        # the last stage's norm(s) run here; its output layer runs in the model's head and loss
        self.closers = nn.ModuleList(model.get_submodule(n) for n in plan.closers) if self.is_last else None
        self._model = (model,)  # the whole model's methods (not a submodule: its parameters are other stages' too)

    def forward(self, inputs: torch.Tensor, shift_labels: torch.Tensor | None = None,
                position_ids: torch.Tensor | None = None, attention_mask: torch.Tensor | None = None):
        model = self._model[0]
        # [batch, sequence] of the micro-batch: the labels', since under sequence parallelism a stage receives the
        # hidden states of its rank's shard of the sequence
        batch_shape = tuple(shift_labels.shape[:2])
        if position_ids is None:
            position_ids = torch.arange(batch_shape[1], device=inputs.device)[None]
        hidden = inputs
        for opener in self.openers or ():  # input_ids -> inputs_embeds (the embedding adds the positions)
            hidden = opener(hidden, position_ids, None)
        mask, rotary = model.model.layer_inputs(hidden, batch_shape, attention_mask, position_ids)
        for layer in self.layers:
            hidden = layer(hidden, attention_mask=mask, position_embeddings=rotary, position_ids=position_ids)
        if not self.is_last:
            return hidden
        output_layer = model.get_output_embeddings()
        for closer in self.closers:
            if closer is not output_layer:
                hidden = closer(hidden)
        # the token sum (num_items_in_batch=1): the schedule's loss function divides by the global batch's tokens
        loss, _ = model.head_and_loss(hidden, shift_labels=shift_labels, num_items_in_batch=1,
                                      chunked=self.chunked_loss)
        return loss


@dataclass
class Pipeline:
    """This rank's part of a pipelined model and the schedule that runs it; `train_step` and `eval_loss` are what
    the Trainer calls instead of a forward and a backward."""

    model: nn.Module  # the whole model's class with this rank's modules only
    layout: ParallelLayout
    mesh: DeviceMesh
    stages: list[PipelineStage]
    schedule: object = None
    dp_group: object = None  # the data-parallel ranks of this stage and tensor-parallel rank (None: only this one)
    tied: list[nn.Parameter] = field(default_factory=list)  # this rank's copies of the tied embedding
    tied_group: object = None  # the ranks holding the first and the last stage of this (replica, shard, tp) slice
    excluded_from_norm: set = field(default_factory=set)  # the last stage's tied copy, counted once (on the first)
    # training: data-parallel size / the global batch's tokens; None: evaluating
    _train_scale: float | None = field(default=None, init=False, repr=False)
    _evaluation: object = field(default=None, init=False, repr=False)  # evaluation's schedule (sequence parallel)

    @property
    def pp_group(self):
        return self.mesh.get_group("pp")

    # ---- training and evaluation

    def _split(self, inputs: dict) -> tuple[tuple, dict, torch.Tensor]:
        """The schedule's arguments: the token ids for the first stage, what every stage takes (split into the
        micro-batches alike), and the labels for the loss (transformers' `labels` shifted as its loss shifts them)."""
        kwargs = {k: inputs[k] for k in ("position_ids", "attention_mask") if inputs.get(k) is not None}
        labels = inputs.get("shift_labels")
        if labels is None:
            labels = nn.functional.pad(inputs["labels"][:, 1:], (0, 1), value=IGNORE_INDEX)
        kwargs["shift_labels"] = labels
        first = any(stage.is_first for stage in self.stages)
        return ((inputs["input_ids"],) if first else ()), kwargs, labels

    def _data_parallel_sum(self, value: torch.Tensor) -> torch.Tensor:
        if self.layout.data_parallel_size > 1:
            dist.all_reduce(value, group=self.dp_group)
        return value

    def train_step(self, inputs: dict) -> torch.Tensor:
        """Forward and backward of every micro-batch of `inputs` (this data-parallel rank's share of the global batch)
        through the stages; the gradients are then complete on every rank (the tied copies summed). Returns the global
        batch's mean token loss, the same on every rank."""
        args, kwargs, labels = self._split(inputs)
        tokens = self._data_parallel_sum((labels != IGNORE_INDEX).sum().to(torch.float64))
        # DDP and FSDP2 average the gradients over the data-parallel ranks; the loss is a share of the global sum
        self._train_scale = float(self.layout.data_parallel_size) / tokens.item()
        losses: list[torch.Tensor] = []
        self.schedule.step(*args, target=labels, losses=losses, return_outputs=False, **kwargs)
        self._average_over_replicas()
        self._sum_tied_gradients()
        local = torch.stack(losses).sum() / self.layout.data_parallel_size if losses else torch.zeros(())
        return self._global_loss(local.detach().float(), reduce=True)

    @torch.no_grad()
    def eval_loss(self, inputs: dict) -> torch.Tensor:
        """The loss one process reports for these rows evaluated a micro-batch at a time (the mean over the rows of
        their micro-batch's mean token loss), the same on every rank of this data-parallel slice. A last batch with
        fewer rows is padded with ignored rows, which weigh nothing."""
        rows, micro = inputs["input_ids"].shape[0], self.layout.micro_batch_size
        inputs = _padded(inputs, micro * self.layout.gradient_accumulation_steps)
        args, kwargs, labels = self._split(inputs)
        losses: list[torch.Tensor] = []
        self._train_scale = None
        self._evaluation_schedule().eval(*args, target=labels, losses=losses, return_outputs=False, **kwargs)
        local = torch.zeros(())
        if losses:
            weights = [min(micro, max(0, rows - i * micro)) for i in range(len(losses))]  # real rows of each
            local = sum(w * loss.float() for w, loss in zip(weights, losses)) / rows
        return self._global_loss(local.float(), reduce=False)

    def loss_fn(self, summed: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """The schedule's loss of a micro-batch from the last stage's token sum: in training its share of the global
        batch's mean (scaled by the data-parallel size, which DDP and FSDP2 average over); in evaluation the
        micro-batch's own mean."""
        if self._train_scale is not None:
            return summed * self._train_scale
        return summed / (target != IGNORE_INDEX).sum().clamp(min=1)

    def _evaluation_schedule(self):
        """The schedule evaluation runs: under sequence parallelism the stages exchange whole sequences in eval mode
        (the sequence-parallel layers run as plain tensor parallelism there) and sequence shards in training, and a
        pipeline stage keeps the shapes it met first: evaluation gets stages of its own over the same modules."""
        if not self.layout.sequence_parallel:
            return self.schedule
        if self._evaluation is None:
            self._evaluation = self._schedule_of([
                PipelineStage(stage.submod, stage.stage_index, stage.num_stages, stage.device, group=self.pp_group)
                for stage in self.stages])
        return self._evaluation

    def _schedule_of(self, stages: list[PipelineStage]):
        # the gradients are the micro-batches' sum, as the loss is a share of the global mean: no division by m
        return SCHEDULES[self.layout.pipeline_schedule](
            stages[0] if len(stages) == 1 else stages, n_microbatches=self.layout.gradient_accumulation_steps,
            loss_fn=self.loss_fn, scale_grads=False)

    def _global_loss(self, local: torch.Tensor, reduce: bool) -> torch.Tensor:
        """The last stage's value on every rank of the pipeline (summed over the data-parallel ranks if `reduce`)."""
        last_rank = dist.get_global_rank(self.pp_group, self.layout.pipeline_parallel_size - 1)
        local = local.to(self._device()).reshape(())
        dist.broadcast(local, src=last_rank, group=self.pp_group)
        return self._data_parallel_sum(local) if reduce else local

    def _device(self) -> torch.device:
        return next(self.model.parameters()).device

    def _average_over_replicas(self) -> None:
        """Data parallelism without FSDP: average the gradients over the replicas, in one all-reduce (what DDP does
        in buckets; torch's pipeline stage and DDP's reducer disagree on a stage run several times per step)."""
        if self.layout.replicas == 1 or self.layout.fsdp_size > 1:
            return
        grads = [_local(p.grad) for p in self.model.parameters() if p.grad is not None]  # TP: each rank's part
        flat = _flatten_dense_tensors(grads)
        dist.all_reduce(flat, group=self.dp_group)
        flat /= self.layout.replicas
        for grad, reduced in zip(grads, _unflatten_dense_tensors(flat, grads)):
            grad.copy_(reduced)

    def _sum_tied_gradients(self) -> None:
        """Megatron's embedding group: the word embeddings (first stage) and the output layer (last stage) are one
        weight in the model, so each copy takes the sum of both gradients."""
        if not self.tied:
            return
        param = self.tied[0]
        if isinstance(param, DTensor) and param.grad.placements != param.placements:
            # the vocabulary-parallel lookup's gradient comes back whole (replicated): keep this rank's rows, as the
            # output layer's copy holds them
            param.grad = param.grad.redistribute(param.device_mesh, param.placements)
        dist.all_reduce(_local(param.grad), group=self.tied_group)

    def clip_grad_norm_(self, max_norm: float) -> torch.Tensor:
        """Clip by the norm of the whole model's gradients (every stage's, the tied weight once)."""
        named = dict(self.model.named_parameters())
        counted = [p for name, p in named.items() if name not in self.excluded_from_norm]
        return clip_grad_norm_(counted, max_norm, pipeline_group=self.pp_group,
                               uncounted=[named[name] for name in self.excluded_from_norm])


    def gather_model(self) -> nn.Module | None:
        """The whole model, assembled on global rank 0 from every stage's full tensors (None on the other ranks).
        Collective. Rank 0 builds it whole on the CPU: `final/` is one ordinary model folder."""
        from .distribute import gathered_state_dict

        state = {k: v.detach().cpu() for k, v in gathered_state_dict(self.model).items()}  # over tp and fsdp
        mesh = self.mesh
        first_of_slice = all(mesh.get_local_rank(dim) == 0 for dim in ("dp_replicate", "fsdp", "tp"))
        if not first_of_slice:
            return None
        stages: list[dict] = [{} for _ in range(self.layout.pipeline_parallel_size)] if dist.get_rank() == 0 else None
        dist.gather_object(state, stages, dst=dist.get_global_rank(self.pp_group, 0), group=self.pp_group)
        if dist.get_rank() != 0:
            return None
        merged = {k: v for stage in stages for k, v in stage.items()}
        whole = type(self.model)(self.model.config)
        whole.load_state_dict(merged, strict=True)
        whole.generation_config = self.model.generation_config
        return whole


def _padded(inputs: dict, rows: int) -> dict:
    """`inputs` with `rows` rows: the missing ones repeat the first, their labels ignored."""
    missing = rows - inputs["input_ids"].shape[0]
    if missing <= 0:
        return inputs
    padded = {}
    for key, value in inputs.items():
        if not isinstance(value, torch.Tensor) or value.ndim == 0:
            padded[key] = value
            continue
        filler = value[:1].expand(missing, *value.shape[1:])
        if key in ("shift_labels", "labels"):
            filler = torch.full_like(filler, IGNORE_INDEX)
        padded[key] = torch.cat([value, filler])
    return padded


def _local(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.to_local() if isinstance(tensor, DTensor) else tensor


def shard_data_like_pipeline(accelerator, pipeline: Pipeline) -> None:
    """accelerate shards a DataLoader over every process (or over a device mesh it knows); under pipeline
    parallelism all the ranks of one data-parallel index (each stage, each tensor-parallel rank) read the same
    batches. Replaces the accelerator's `prepare_data_loader` with one that shards over the data-parallel ranks."""
    from accelerate.data_loader import prepare_data_loader

    mesh, layout = pipeline.mesh, pipeline.layout
    index = mesh.get_local_rank("dp_replicate") * layout.fsdp_size + mesh.get_local_rank("fsdp")

    def prepare(data_loader, device_placement=None, slice_fn_for_dispatch=None):
        prepared = prepare_data_loader(
            data_loader, accelerator.device, num_processes=layout.data_parallel_size, process_index=index,
            split_batches=accelerator.split_batches,
            put_on_device=accelerator.device_placement if device_placement is None else device_placement,
            rng_types=accelerator.rng_types.copy(), dispatch_batches=accelerator.dispatch_batches,
            even_batches=accelerator.even_batches, slice_fn_for_dispatch=slice_fn_for_dispatch,
            use_seedable_sampler=accelerator.use_seedable_sampler, data_seed=accelerator.dataloader_config.data_seed,
            non_blocking=accelerator.non_blocking, use_stateful_dataloader=accelerator.use_stateful_dataloader,
        )
        accelerator._dataloaders.append(prepared)
        return prepared

    accelerator.prepare_data_loader = prepare


# ---------------------------------------------------------------------- building a rank's stages


def pipeline_mesh(layout: ParallelLayout, device_type: str) -> DeviceMesh:
    return init_device_mesh(device_type, (layout.pipeline_parallel_size, layout.replicas, layout.fsdp_size,
                                          layout.tensor_parallel_size),
                            mesh_dim_names=("pp", "dp_replicate", "fsdp", "tp"))


def build_pipeline(model: nn.Module, layout: ParallelLayout, device: torch.device) -> Pipeline:
    """Cut the fully built `model` (the same on every rank, from the seed) to this rank's stages, shard them as the
    layout says and put them on the layout's schedule. Collective: every rank calls it."""
    config = model.config
    mesh = pipeline_mesh(layout, device.type)
    pp, chunks = layout.pipeline_parallel_size, layout.virtual_pipeline_size
    num_stages = pp * chunks
    layers = stage_layers(config.num_layers, num_stages)
    pp_rank = mesh.get_local_rank("pp")
    mine = stages_of_rank(pp_rank, pp, chunks)
    plan = PipelinePlan.of(model)
    tied_names = _untie(model) if config.tie_word_embeddings else ()
    _keep_only(model, plan, sorted(i for s in mine for i in layers[s]), first=0 in mine, last=num_stages - 1 in mine)
    model.to(device)  # this rank's stages only
    if layout.tensor_parallel_size > 1 or layout.data_parallel_size > 1:
        use_parallel_chunked_loss(model)
    if layout.tensor_parallel_size > 1:
        _tensor_parallel(model, mesh["tp"], layout)
    # zero-bubble schedules run the backward of the input gradients and of the weight gradients apart, twice
    # through the loss: the chunked loss supports one backward, so their last stage holds its logits whole
    chunked_loss = layout.pipeline_schedule not in ZERO_BUBBLE
    pieces = [PipelineChunk(model, plan, s, num_stages, layers[s], chunked_loss) for s in mine]
    if layout.fsdp_size > 1:
        pieces = [_fully_shard(chunk, mesh, layout) for chunk in pieces]
    stages = [PipelineStage(chunk, s, num_stages, device, group=mesh.get_group("pp")) for chunk, s in zip(pieces, mine)]
    dp_group = mesh["dp_replicate", "fsdp"]._flatten().get_group() if layout.data_parallel_size > 1 else None
    pipeline = Pipeline(model=model, layout=layout, mesh=mesh, stages=stages, dp_group=dp_group)
    pipeline.schedule = pipeline._schedule_of(stages)
    if tied_names:
        _join_tied(pipeline, mesh, first=0 in mine, last=num_stages - 1 in mine, names=tied_names)
    model._megahf_pipeline = pipeline
    # the Trainer neither wraps it (DDP over every rank) nor moves it: the pipeline placed and reduces its stages
    model._is_distributed_loading_by_transformers = True
    return pipeline


def _untie(model: nn.Module) -> tuple[str, str]:
    """Give the output layer its own copy of the tied word embeddings (the stages holding them differ); returns
    (embedding name, output layer name), from the model's tied-weights table."""
    ((copy, source),) = model._tied_weights_keys.items()
    parent, _, name = copy.rpartition(".")
    setattr(model.get_submodule(parent), name, nn.Parameter(model.get_parameter(source).detach().clone()))
    return source, copy


def _keep_only(model: nn.Module, plan: PipelinePlan, layers: list[int], first: bool, last: bool) -> None:
    """Drop every module this rank's stages do not run; the kept ones keep their names."""
    layer_list = model.get_submodule(plan.layers)
    for i in range(len(layer_list)):
        if i not in layers:
            layer_list[i] = _HeldElsewhere()
    for names, kept in ((plan.openers, first), (plan.closers, last)):
        for name in names if not kept else ():
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent) if parent else model, child, None)


def _tensor_parallel(model: nn.Module, tp_mesh: DeviceMesh, layout: ParallelLayout) -> None:
    """transformers' tensor parallelism on the kept modules, with megahf's additions (vocabulary-parallel loss, the
    per-rank dropout stream): the same plan as without a pipeline."""
    from transformers.distributed.tensor_parallel import apply_tensor_parallelism

    from .model_hooks import tensor_parallel_plan

    plan = tensor_parallel_plan(model, layout.tensor_parallel_size, sequence_parallel=layout.sequence_parallel)
    # transformers' expansion lists the modules the model has: this rank's only
    apply_tensor_parallelism(model, tp_mesh, model._expand_parallel_plan(plan))
    get_rng_tracker().seed(torch.initial_seed(), tp_mesh.get_local_rank())


def _fully_shard(chunk: PipelineChunk, mesh: DeviceMesh, layout: ParallelLayout) -> PipelineChunk:
    """FSDP2 inside a stage, as the config's FSDP plan: each layer and the word embeddings a unit that frees its full
    weights after use, the last stage's closers (final norm, output layer) one unit kept whole until the backward,
    and the chunk the root, so that what is left (learned position embeddings) is gathered when the stage runs."""
    shard_mesh = mesh["dp_replicate", "fsdp"] if layout.replicas > 1 else mesh["fsdp"]
    if chunk.is_first:
        fully_shard(chunk._model[0].get_input_embeddings(), mesh=shard_mesh, reshard_after_forward=True)
    for layer in chunk.layers:
        fully_shard(layer, mesh=shard_mesh, reshard_after_forward=True)
    if chunk.is_last:
        fully_shard(list(chunk.closers), mesh=shard_mesh, reshard_after_forward=False)
    fully_shard(chunk, mesh=shard_mesh)
    return chunk


def _join_tied(pipeline: Pipeline, mesh: DeviceMesh, first: bool, last: bool, names: tuple[str, str]) -> None:
    """The process groups of the tied copies: for each (replica, shard, tp) slice, its first and last pipeline
    ranks (created by every rank, as torch requires)."""
    embedding_name, output_name = names
    model = pipeline.model
    if first:
        pipeline.tied.append(model.get_parameter(embedding_name))
    if last:
        pipeline.tied.append(model.get_parameter(output_name))
        pipeline.excluded_from_norm.add(output_name)
        # its optimizer state is checkpointed as the embedding's, as one process holds the tied weight
        model._megahf_checkpoint_aliases = {output_name: embedding_name}
    pp = pipeline.layout.pipeline_parallel_size
    ranks = mesh.mesh.reshape(pp, -1)  # [pp, every other coordinate]
    for column in range(ranks.shape[1]):
        pair = [int(ranks[0, column]), int(ranks[pp - 1, column])]
        group = dist.new_group(pair)
        if dist.get_rank() in pair:
            pipeline.tied_group = group


__all__ = ["Pipeline", "PipelineChunk", "PipelinePlan", "SCHEDULES", "build_pipeline", "shard_data_like_pipeline",
           "stage_layers", "stages_of_rank"]
