"""Megatron-LM's RoPE arguments <-> transformers' `rope_parameters`, for the megatron and megatron-dist formats.

The arguments a Megatron-LM checkpoint stores (megatron/training/arguments.py) and what Megatron-Core's GPTModel
computes from them:

    --rotary-base B                           rotary_base                     rope_theta B
    --use-rope-scaling [--rope-scaling-factor F]                              llama3: factor F (default 8); the low and
        use_rope_scaling, rope_scaling_factor                                 high frequency factors 1 and 4 and the
                                                                              original context 8192 are fixed in
                                                                              Megatron-Core's RotaryEmbedding
    --rotary-seq-len-interpolation-factor F   rotary_seq_len_interpolation_factor
                                                                              linear: factor F (positions divided by F)
    --position-embedding-type yarn            position_embedding_type         yarn, from YarnRotaryEmbedding's
        --rotary-scaling-factor F, --yarn-original-max-position-embeddings N, --yarn-beta-fast, --yarn-beta-slow,
        --mscale, --mscale-all-dim, --yarn-correction-range-round-to-int (Megatron's defaults 1, 4096, 32, 1, 1, 0,
        True): factor, original_max_position_embeddings, beta_fast, beta_slow, mscale, mscale_all_dim, truncate

Megatron-Core has no dynamic NTK and no LongRoPE: those are refused when writing.
"""

from __future__ import annotations

from .common import ConversionError
from .megatron_pickle import arg

MEGATRON_LLAMA3 = {"low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
# YarnRotaryEmbedding's defaults where Megatron-LM's arguments are unset (megatron/training/argument_utils.py)
YARN_DEFAULTS = {"rotary_scaling_factor": 1.0, "yarn_original_max_position_embeddings": 4096, "yarn_beta_fast": 32.0,
                 "yarn_beta_slow": 1.0, "mscale": 1.0, "mscale_all_dim": 0.0,
                 "yarn_correction_range_round_to_int": True}


def rope_parameters_from_args(args, position: str, notes: list) -> dict:
    """transformers' `rope_parameters` for a checkpoint whose args say `position` ("rope" or "yarn")."""

    def refuse(key, value, why):
        raise ConversionError(f"the checkpoint's args say {key}={value!r}: {why}")

    rope = {"rope_theta": arg(args, "rotary_base", 10000)}
    interpolation = arg(args, "rotary_seq_len_interpolation_factor")
    llama3 = arg(args, "use_rope_scaling", False)
    if position == "yarn":
        if interpolation or llama3:
            refuse("rotary_seq_len_interpolation_factor" if interpolation else "use_rope_scaling",
                   interpolation or llama3, "megahf applies one RoPE scaling, and this checkpoint is YaRN")
        yarn = {key: default if arg(args, key) is None else arg(args, key) for key, default in YARN_DEFAULTS.items()}
        rope.update(rope_type="yarn", factor=float(yarn["rotary_scaling_factor"]),
                    original_max_position_embeddings=yarn["yarn_original_max_position_embeddings"],
                    beta_fast=float(yarn["yarn_beta_fast"]), beta_slow=float(yarn["yarn_beta_slow"]),
                    truncate=bool(yarn["yarn_correction_range_round_to_int"]))
        mscale, all_dim = yarn["mscale"], yarn["mscale_all_dim"]
        # Megatron's attention factor is yarn_mscale(factor, mscale) / yarn_mscale(factor, mscale_all_dim); transformers
        # takes that ratio when both are non-zero and yarn_mscale(factor, 1) otherwise: equal in those two cases
        if mscale and all_dim:
            rope.update(mscale=float(mscale), mscale_all_dim=float(all_dim))
        elif (mscale, all_dim) != (1.0, 0.0):
            refuse("mscale", mscale, f"with mscale_all_dim={all_dim!r} Megatron's YaRN attention factor has no "
                   "transformers equivalent (it needs both non-zero, or mscale=1 and mscale_all_dim=0)")
        return rope
    if llama3 and interpolation:
        refuse("use_rope_scaling", True, f"with rotary_seq_len_interpolation_factor={interpolation!r} two RoPE "
               "scalings apply at once; megahf (as transformers) applies one")
    if llama3:
        factor = float(arg(args, "rope_scaling_factor", 8.0))
        rope.update(rope_type="llama3", factor=factor, **MEGATRON_LLAMA3)
        if factor != 8.0:
            notes.append(f"llama3 RoPE scaling read with the args' rope_scaling_factor={factor}; Megatron-LM's "
                         "pretrain_gpt.py builds its GPTModel without it (Megatron-Core's default factor 8.0)")
    elif interpolation:
        rope.update(rope_type="linear", factor=float(interpolation))
    else:
        rope["rope_type"] = "default"
    return rope


def rope_args(config) -> dict:
    """Megatron-LM's arguments for `config.rope_parameters` (a RoPE GPT); ConversionError for what Megatron-Core
    cannot compute, raised before anything is written."""
    rope = config.rope_parameters
    rope_type = rope["rope_type"]
    fields = dict(position_embedding_type="rope", use_rotary_position_embeddings=True,
                  rotary_base=rope["rope_theta"], rotary_percent=1.0, rotary_interleaved=False,
                  use_rope_scaling=False, rotary_seq_len_interpolation_factor=None)

    def refuse(why):
        raise ConversionError(f"rope_parameters={rope!r} cannot be written as a Megatron checkpoint: {why}")

    if rope_type == "linear":
        factor = rope["factor"]
        fields["rotary_seq_len_interpolation_factor"] = int(factor) if float(factor).is_integer() else factor
    elif rope_type == "llama3":
        fixed = {key: rope.get(key) for key in MEGATRON_LLAMA3}
        if fixed != MEGATRON_LLAMA3:
            refuse(f"Megatron-Core's llama3 scaling is fixed at {MEGATRON_LLAMA3}")
        fields.update(use_rope_scaling=True, rope_scaling_factor=float(rope["factor"]))
    elif rope_type == "yarn":
        if rope.get("attention_factor") is not None:
            refuse("Megatron-Core's YaRN takes mscale and mscale_all_dim, not an attention_factor")
        mscale, all_dim = rope.get("mscale"), rope.get("mscale_all_dim")
        if not (mscale and all_dim):  # transformers' yarn_mscale(factor, 1), which Megatron computes from (1, 0)
            mscale, all_dim = 1.0, 0.0
        fields.update(position_embedding_type="yarn", rotary_scaling_factor=float(rope["factor"]),
                      yarn_original_max_position_embeddings=rope["original_max_position_embeddings"],
                      yarn_beta_fast=float(rope.get("beta_fast") or 32.0),
                      yarn_beta_slow=float(rope.get("beta_slow") or 1.0),
                      yarn_correction_range_round_to_int=bool(rope.get("truncate", True)),
                      mscale=float(mscale), mscale_all_dim=float(all_dim))
    elif rope_type != "default":
        refuse(f"Megatron-Core has no {rope_type!r} RoPE (it has default, linear interpolation, llama3 and yarn); "
               "convert to megahf or hf-llama instead")
    return fields


__all__ = ["rope_args", "rope_parameters_from_args"]
