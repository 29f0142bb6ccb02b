"""nanotron 0.4 (PyPI, a test-only dependency) on the CPU: the oracle for megahf's nanotron converter.

Four things stand between that wheel and a CPU; each is sidestepped here, and nowhere else:
1. an import cycle in the wheel (nanotron.logging imports nanotron.config.config, whose imports come back to
   nanotron.logging): nanotron.logging is loaded against a placeholder nanotron.config.config that holds the one name
   it takes (LoggingArgs, a type annotation), then the real nanotron.config is imported;
2. its flash_attn imports (a CUDA package): stand-ins of our own (below) for the three calls the forward of its Llama
   makes (rotary embedding, RMSNorm, causal attention over grouped key/value heads), present in sys.modules only while
   nanotron imports; the inference-only calls raise;
3. ParallelContext.set_device calls torch.cuda.set_device: a no-op;
4. LlamaModel gives its P2P the CUDA device for its buffers: it gets the CPU.
ParallelContext then runs on a one-process gloo group (it takes the backend of an existing default group). One more
placeholder only saves time: the trainer's data loading module (datasets, pandas) while nanotron.trainer imports.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import sys
import types
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode

from required import missing, oracle

# ---------------------------------------------------------------------------------------------------- flash_attn


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, interleaved: bool) -> torch.Tensor:
    """x [batch, seq, heads, dim] rotated by the angles whose cos/sin are [seq, dim / 2]: pairs (0, 1), (2, 3), ...
    when interleaved (GPT-J), else (i, i + dim / 2) (GPT-NeoX); computed in float32, returned in x's dtype."""
    if interleaved:
        first, second = x[..., 0::2].float(), x[..., 1::2].float()
    else:
        first, second = x.float().chunk(2, dim=-1)
    cos, sin = cos.float()[None, :, None, :], sin.float()[None, :, None, :]
    rotated = (first * cos - second * sin, first * sin + second * cos)
    out = torch.stack(rotated, dim=-1).flatten(-2) if interleaved else torch.cat(rotated, dim=-1)
    return out.to(x.dtype)


class FlashRotaryEmbedding(nn.Module):
    """flash_attn.layers.rotary.RotaryEmbedding as nanotron calls it: forward(q, kv=kv) with q [batch, seq, heads, dim]
    and kv [batch, seq, 2, kv heads, dim] rotates q and the keys by position (from seqlen_offset) times
    base^(-2i/dim); flash_attn keeps its cos/sin cache in the input's dtype, so bf16 inputs get bf16 cos/sin."""

    def __init__(self, dim: int, base: float = 10000.0, interleaved: bool = False, scale_base=None,
                 pos_idx_in_fp32: bool = True, device=None):
        super().__init__()
        if scale_base is not None:
            raise NotImplementedError("the stand-in has no xPos scaling (scale_base)")
        self.dim, self.base, self.interleaved = dim, float(base), interleaved

    def forward(self, qkv, kv=None, seqlen_offset=0, max_seqlen=None):
        if kv is None or not isinstance(seqlen_offset, int):
            raise NotImplementedError("the stand-in takes forward(q, kv=kv) with an integer seqlen_offset")
        seq = qkv.shape[1]
        positions = torch.arange(seqlen_offset, seqlen_offset + seq, dtype=torch.float32)
        inv_freq = 1.0 / (self.base ** (torch.arange(0, self.dim, 2, dtype=torch.float32) / self.dim))
        angles = torch.outer(positions, inv_freq)
        cos, sin = angles.cos().to(qkv.dtype), angles.sin().to(qkv.dtype)
        q = _rotate(qkv, cos, sin, self.interleaved)
        k = _rotate(kv[:, :, 0], cos, sin, self.interleaved)
        return q, torch.stack([k, kv[:, :, 1]], dim=2)


def flash_attn_varlen_func(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p=0.0,
                           softmax_scale=None, causal=False, return_attn_probs=False, **unsupported):
    """Attention over packed sequences (q [tokens, heads, dim], k/v [tokens, kv heads, dim], sequence i the rows
    cu_seqlens[i]:cu_seqlens[i+1]), query head h reading key/value head h // (heads / kv heads), as flash_attn does."""
    if dropout_p or return_attn_probs or unsupported or not torch.equal(cu_seqlens_q, cu_seqlens_k):
        raise NotImplementedError("the stand-in computes equal-length query/key sequences without dropout")
    out = torch.empty_like(q)
    bounds = cu_seqlens_q.tolist()
    for start, end in zip(bounds[:-1], bounds[1:]):
        query, key, value = (t[start:end].transpose(0, 1) for t in (q, k, v))  # [heads, tokens, dim]
        out[start:end] = F.scaled_dot_product_attention(query, key, value, is_causal=causal, scale=softmax_scale,
                                                        enable_gqa=True).transpose(0, 1)
    return out


def layer_norm_fn(x, weight, bias, residual=None, eps=1e-6, dropout_p=0.0, prenorm=False, residual_in_fp32=False,
                  is_rms_norm=False, return_dropout_mask=False):
    """flash_attn's fused (RMS)LayerNorm without residual or dropout: normalised in float32, returned in x's dtype."""
    if residual is not None or dropout_p or prenorm or return_dropout_mask:
        raise NotImplementedError("the stand-in normalises without residual, dropout or prenorm")
    xf = x.float()
    if not is_rms_norm:
        xf = xf - xf.mean(-1, keepdim=True)
    y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps) * weight.float()
    return (y if bias is None else y + bias.float()).to(x.dtype)


def _inference_only(*args, **kwargs):
    raise NotImplementedError("nanotron's inference path (flash_attn_with_kvcache, bert_padding) and data loading "
                              "have no CPU stand-in")


def _flash_attn_modules() -> dict[str, types.ModuleType]:
    modules = {name: types.ModuleType(name) for name in (
        "flash_attn", "flash_attn.bert_padding", "flash_attn.flash_attn_interface", "flash_attn.layers",
        "flash_attn.layers.rotary", "flash_attn.ops", "flash_attn.ops.triton", "flash_attn.ops.triton.layer_norm")}
    modules["flash_attn"].bert_padding = modules["flash_attn.bert_padding"]
    modules["flash_attn.bert_padding"].unpad_input = modules["flash_attn.bert_padding"].pad_input = _inference_only
    interface = modules["flash_attn.flash_attn_interface"]
    interface.flash_attn_varlen_func, interface.flash_attn_with_kvcache = flash_attn_varlen_func, _inference_only
    modules["flash_attn.layers.rotary"].RotaryEmbedding = FlashRotaryEmbedding
    modules["flash_attn.ops.triton.layer_norm"].layer_norm_fn = layer_norm_fn
    return modules


# ---------------------------------------------------------------------------------------------------- importing


def import_nanotron() -> types.SimpleNamespace:
    """nanotron 0.4's modules that build, save, load and run its Llama (or skip/fail as tests/required.py says)."""
    if "nanotron.models.llama" not in sys.modules:
        oracle("dacite")
        if oracle("nanotron").__version__ != "0.4":
            missing(f"nanotron 0.4 (found {sys.modules['nanotron'].__version__}; the work-arounds here are 0.4's)",
                    "bash scripts/setup_env.sh installs the pin in scripts/requirements-test.txt")
        placeholder = types.ModuleType("nanotron.config.config")
        placeholder.LoggingArgs = type("LoggingArgs", (), {})
        # the trainer's data loading (it imports datasets and pandas: seconds) plays no part in building, tying and
        # saving a model; a placeholder stands in while the trainer imports
        no_dataloader = types.ModuleType("nanotron.dataloader")
        no_dataloader.sanity_check_dataloader = _inference_only
        stand_ins = {**_flash_attn_modules(), no_dataloader.__name__: no_dataloader}
        saved = {name: sys.modules.get(name) for name in [*stand_ins, placeholder.__name__]}
        try:
            sys.modules[placeholder.__name__] = placeholder
            import nanotron.logging  # noqa: F401  (the cycle's first half, against the placeholder)
            del sys.modules[placeholder.__name__]
            sys.modules.update(stand_ins)
            import nanotron.config  # noqa: F401  (before the models: the wheel's import order, as its trainer's)
            import nanotron.trainer  # noqa: F401  (mark_tied_parameters, as the trainer ties and syncs)
        finally:
            for name, module in saved.items():
                if module is None:
                    sys.modules.pop(name, None)
                else:
                    sys.modules[name] = module
    import nanotron
    from nanotron.config import LlamaConfig, ModelArgs, RandomInit
    from nanotron.models import build_model
    from nanotron.models.llama import LlamaForTraining, RotaryEmbedding
    from nanotron.parallel import ParallelContext
    from nanotron.serialize import load_weights, save_weights
    from nanotron.trainer import mark_tied_parameters

    return types.SimpleNamespace(
        version=nanotron.__version__, LlamaConfig=LlamaConfig, ModelArgs=ModelArgs, RandomInit=RandomInit,
        build_model=build_model, LlamaForTraining=LlamaForTraining, RotaryEmbedding=RotaryEmbedding,
        ParallelContext=ParallelContext, load_weights=load_weights, save_weights=save_weights,
        mark_tied_parameters=mark_tied_parameters)


@contextlib.contextmanager
def cpu_parallel_context(nt: types.SimpleNamespace, patch, tensor_parallel_size: int = 1):
    """nanotron's ParallelContext at TP = `tensor_parallel_size`, PP = DP = 1, with its two CUDA calls sidestepped
    (`patch` is a pytest MonkeyPatch): on the gloo group of a torchrun launch (RANK, WORLD_SIZE, ... set), else on a
    one-process gloo group of its own."""
    import torch.distributed as dist
    from nanotron.parallel.pipeline_parallel.p2p import P2P

    cpu_p2p_init = P2P.__init__
    patch.setattr(nt.ParallelContext, "set_device", lambda self: None)
    patch.setattr(P2P, "__init__", lambda self, pg, device: cpu_p2p_init(self, pg, torch.device("cpu")))
    owns_group = not dist.is_initialized()
    if owns_group:
        for key, value in {"WORLD_SIZE": "1", "RANK": "0", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1",
                           "MASTER_PORT": str(29000 + os.getpid() % 2000)}.items():
            patch.setenv(key, value)
        dist.init_process_group("gloo", rank=0, world_size=1)
    try:
        yield nt.ParallelContext(tensor_parallel_size=tensor_parallel_size, pipeline_parallel_size=1,
                                 data_parallel_size=1)
    finally:
        if owns_group:
            dist.destroy_process_group()


class _CpuAnswersAsCuda(TorchFunctionMode):
    """Tensors made for "cuda" are made on the CPU, and every tensor says it is on "cuda": for nanotron's own
    RotaryEmbedding.init_rotary_embeddings, which allocates on CUDA and asserts it did."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        if func == torch.Tensor.device.__get__:
            return torch.device("cuda")
        if str(kwargs.get("device", "")).startswith("cuda"):
            kwargs["device"] = "cpu"
        return func(*args, **kwargs)


def nanotron_rotary(nt, dim: int, end: int, theta: float = 10000.0) -> nn.Module:
    """nanotron's own RotaryEmbedding (the one its inference path applies), its frequencies computed by its own code
    on the CPU."""
    rotary = nt.RotaryEmbedding(dim=dim, end=end, theta=theta)
    with _CpuAnswersAsCuda():
        rotary.init_rotary_embeddings()
    return rotary


# ---------------------------------------------------------------------------------------------------- models


def build_llama(nt, parallel_context, config, dtype: torch.dtype, seed: int):
    """nanotron's Llama as its trainer builds it (build_model, tied and replicated parameters marked) and
    initialised by its own init_model_randomly; then the norms moved off 1, so that a swapped norm cannot pass."""
    model = nt.build_model(
        model_builder=lambda: nt.LlamaForTraining(config=config, parallel_context=parallel_context,
                                                  parallel_config=None, random_states=None),
        parallel_context=parallel_context, dtype=dtype, device=torch.device("cpu"))
    nt.mark_tied_parameters(model=model, parallel_context=parallel_context, parallel_config=None)
    torch.manual_seed(seed)
    args = types.SimpleNamespace(model=nt.ModelArgs(model_config=config, init_method=nt.RandomInit(std=0.02),
                                                    dtype=dtype))
    model.init_model_randomly(config=args)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "layernorm" in name or "final_layer_norm" in name:
                param.add_(torch.randn_like(param) * 0.1)
    return model.eval()


def save_llama(nt, parallel_context, model, config, root: Path) -> Path:
    """The checkpoint folder nanotron writes: save_weights (model/...) and model_config.json as its trainer writes it
    (json of the dataclass)."""
    nt.save_weights(model=model, parallel_context=parallel_context, root_folder=root)
    (root / "model_config.json").write_text(json.dumps(dataclasses.asdict(config)))
    return root


@torch.no_grad()
def llama_logits(model, input_ids: torch.Tensor, tp_group=None) -> torch.Tensor:
    """nanotron's forward: [batch, seq] ids -> [batch, seq, vocab] float32 logits (its model returns [seq, batch,
    vocab] and casts them to float32 itself; under TP each rank holds a slice of the vocabulary, gathered here)."""
    mask = torch.ones_like(input_ids, dtype=torch.bool)
    logits = model.model(input_ids=input_ids, input_mask=mask).transpose(0, 1).contiguous()
    if tp_group is not None and tp_group.size() > 1:
        import torch.distributed as dist

        slices = [torch.empty_like(logits) for _ in range(tp_group.size())]
        dist.all_gather(slices, logits, group=tp_group)
        logits = torch.cat(slices, dim=-1)
    return logits
