"""`megahf convert` / `megahf.convert.convert`: any supported checkpoint format to any other, each conversion proven.

    convert("ckpts/gpt", "gpt-hf", from_format="megatron", to_format="megahf")
    convert("gpt-hf", "ckpts/tp2", from_format="megahf", to_format="megatron", tp=2, pp=1)

Every conversion: (1) reads the source lazily and checks every name and shape against the config before anything is
written; (2) writes the target tensor by tensor into a hidden temporary folder next to DST; (3) proves it: the logits
of a fixed probe batch from the source (run by transformers for transformers formats, by megahf's own model for
megahf folders, and by megahf's model on megahf's reading of the tensors for Megatron and nanotron, whose own code
does not run here: `source_ran_as_itself` says which, and the test suite checks those readers against that code)
against the logits of the written target read back, and the written target converted back to the source format
and compared with the source tensor for tensor, bit for bit; (4) writes the proof as DST/conversion.json and renames the folder to DST. A failure at any step
removes the temporary folder: DST appears complete or not at all.
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import sys
import time
from pathlib import Path

import torch

from ..atomic import atomic_write_json, publish_folder, temporary_name
from ..errors import explain_write_errors
from .common import ConversionError, LoadedCheckpoint, build_model

FORMATS = ("megatron", "megatron-dist", "megahf", "hf-gpt2", "hf-llama", "hf-bert", "hf-megatron-bert", "nanotron")
TRANSFORMERS_FORMATS = ("hf-gpt2", "hf-llama", "hf-bert", "hf-megatron-bert")
# The formats whose own code the proof cannot run (not a dependency of megahf, or GPU-only): their probe runs megahf's
# model on megahf's reading of the tensors, so it proves the target against that reading, not against the format's own
# numbers. Each reader is checked against the format's own code by the test suite instead (docs/conversion.md).
OWN_CODE = {"megatron": "Megatron-LM", "megatron-dist": "Megatron-Core", "nanotron": "nanotron"}
PROOF_FILE = "conversion.json"
PROBE_SEED, PROBE_BATCH, PROBE_LENGTH = 0, 2, 16


def read_checkpoint(fmt: str, path: str | os.PathLike, overrides: dict | None = None,
                    trust_pickle: bool = False) -> LoadedCheckpoint:
    """Any supported format, as megahf tensors (read lazily)."""
    _check_format(fmt, "--from")
    if fmt == "megatron":
        from .megatron_legacy import read_megatron
        return read_megatron(path, overrides, trust_pickle=trust_pickle)
    if fmt == "megatron-dist":
        from .megatron_dist import read_megatron_dist
        return read_megatron_dist(path, overrides, trust_pickle=trust_pickle)
    if fmt == "megahf":
        from .megahf_format import read_megahf
        return read_megahf(path, overrides)
    if fmt == "hf-gpt2":
        from .hf_causal import read_hf_gpt2
        return read_hf_gpt2(path, overrides)
    if fmt == "hf-llama":
        from .hf_causal import read_hf_llama
        return read_hf_llama(path, overrides)
    if fmt == "nanotron":
        from .nanotron import read_nanotron
        return read_nanotron(path, overrides)
    from .hf_bert_folder import read_hf_bert
    return read_hf_bert(path, fmt, overrides)


def write_checkpoint(fmt: str, loaded: LoadedCheckpoint, dst: Path, tp: int = 1, pp: int = 1,
                     megatron_names: str = "core", show_progress: bool = True) -> list[str]:
    """Write `loaded` as `fmt` into the folder `dst`; returns what the writer notes for the proof (what a reader
    of the written format must know)."""
    _check_format(fmt, "--to")
    if fmt == "megatron":
        from .megatron_legacy import write_megatron
        write_megatron(loaded, dst, tp=tp, pp=pp, names=megatron_names, show_progress=show_progress)
    elif fmt == "megatron-dist":
        from .megatron_dist import write_megatron_dist
        write_megatron_dist(loaded, dst, tp=tp, show_progress=show_progress)
    elif fmt == "megahf":
        from .megahf_format import write_megahf
        write_megahf(loaded, dst, show_progress=show_progress)
    elif fmt == "hf-gpt2":
        from .hf_causal import write_hf_gpt2
        write_hf_gpt2(loaded, dst, show_progress=show_progress)
    elif fmt == "hf-llama":
        from .hf_causal import write_hf_llama
        write_hf_llama(loaded, dst, show_progress=show_progress)
    elif fmt == "nanotron":
        from .nanotron import write_nanotron
        return write_nanotron(loaded, dst, show_progress=show_progress)
    else:
        from .hf_bert_folder import write_hf_bert
        write_hf_bert(loaded, dst, fmt, show_progress=show_progress)
    return []


def _check_format(fmt: str, flag: str) -> None:
    if fmt not in FORMATS:
        raise ConversionError(f"{flag} {fmt!r}: not a checkpoint format megahf converts; use one of "
                              f"{', '.join(FORMATS)}")


def _check_target(fmt: str, loaded: LoadedCheckpoint, tp: int, pp: int) -> None:
    """Refuse what the target cannot hold before anything is written (the writers check again)."""
    config = loaded.config
    gpt = config.model_type == "megatron_gpt"
    if fmt in ("megatron", "megatron-dist"):
        from .megatron_legacy import check_layout
        check_layout(config, tp, pp)
        if fmt == "megatron-dist" and pp != 1:
            raise ConversionError(f"--pp {pp}: a torch_dist checkpoint stores whole tensors, loadable at any TP x PP; "
                                  "only --tp (which sets the vocabulary padding) applies")
        if not gpt and config.layernorm_order != "pre":
            raise ConversionError(f"a post-LayerNorm BERT cannot be written as {fmt}: Megatron's BERT is pre-LN")
        if not gpt and loaded.model_class != "MegatronBertForPreTraining":
            raise ConversionError(f"a {loaded.model_class} cannot be written as megatron: Megatron's BERT checkpoints "
                                  "hold the pretraining model (MegatronBertForPreTraining)")
    elif (tp, pp) != (1, 1) and fmt == "nanotron":
        raise ConversionError(f"--tp {tp} --pp {pp}: megahf writes nanotron checkpoints unsharded (TP=1, PP=1, as "
                              "nanotron's own Hugging Face converter does); drop --tp/--pp")
    elif (tp, pp) != (1, 1):
        raise ConversionError(f"--tp {tp} --pp {pp}: only the megatron formats are split; {fmt} holds whole tensors")
    if fmt in ("hf-gpt2", "hf-llama", "nanotron") and not gpt:
        raise ConversionError(f"a BERT cannot be written as {fmt}: use hf-megatron-bert, hf-bert, megahf or megatron")
    if fmt in ("hf-bert", "hf-megatron-bert") and gpt:
        raise ConversionError(f"a GPT cannot be written as {fmt}: use hf-gpt2, hf-llama, megahf or megatron")


# ---------------------------------------------------------------------------------------------------- the proof


def probe_batch(config) -> dict[str, torch.Tensor]:
    """The fixed probe batch: PROBE_BATCH x PROBE_LENGTH token ids drawn with seed PROBE_SEED from the real
    vocabulary (BERT: both token types). With a scaled RoPE its positions straddle the end of the context the model
    was pretrained at (`original_max_position_embeddings`, or `max_position_embeddings` where the type has none), so
    that the proof covers positions beyond it, where the scaling types differ most (dynamic: only there)."""
    generator = torch.Generator().manual_seed(PROBE_SEED)
    length = min(PROBE_LENGTH, config.max_position_embeddings)
    batch = {"input_ids": torch.randint(0, config.vocab_size, (PROBE_BATCH, length), generator=generator)}
    rope = getattr(config, "rope_parameters", None) or {}
    if rope.get("rope_type", "default") != "default":
        start = max(rope.get("original_max_position_embeddings", config.max_position_embeddings) - length // 2, 0)
        batch["position_ids"] = torch.arange(start, start + length)[None].expand(PROBE_BATCH, -1)
    if config.model_type == "megatron_bert":
        token_types = torch.zeros_like(batch["input_ids"])
        token_types[:, length // 2:] = 1
        batch.update(attention_mask=torch.ones_like(batch["input_ids"]), token_type_ids=token_types)
    return batch


def _first_logits(output, vocab_size: int) -> torch.Tensor:
    logits = next(v for v in output.to_tuple() if torch.is_tensor(v) and v.ndim >= 2)
    return logits[..., :vocab_size] if logits.shape[-1] >= vocab_size else logits


@torch.no_grad()
def run_probe(fmt: str, path: Path | None, loaded: LoadedCheckpoint) -> tuple[torch.Tensor, str]:
    """Logits of the probe batch from the checkpoint, run as itself where it can run here: transformers formats by
    transformers from the folder, megahf folders by megahf; Megatron and nanotron ones by megahf's model on megahf's
    reading of their tensors (the runner's name says so). In float32
    whatever the stored dtype (bf16 weights are exact in float32), so that the tolerance is float32's."""
    batch = probe_batch(loaded.config)
    if fmt in TRANSFORMERS_FORMATS:
        import transformers

        config = json.loads((path / "config.json").read_text())
        model_class = getattr(transformers, config["architectures"][0])
        model = model_class.from_pretrained(path, use_safetensors=True, dtype=torch.float32).eval()
        runner = f"transformers {model_class.__name__}"
    else:
        model = build_model(loaded).float()
        runner = f"megahf {loaded.model_class}"
        if fmt in OWN_CODE:
            runner += f" on megahf's reading of the {fmt} tensors ({OWN_CODE[fmt]} itself did not run)"
    try:
        return _first_logits(model(**batch), loaded.config.vocab_size).float(), runner
    finally:
        del model


def compare_tensors(a: LoadedCheckpoint, b: LoadedCheckpoint) -> dict:
    """Bitwise comparison of two checkpoints in megahf's names, one tensor pair in memory at a time."""
    mismatched = sorted(set(a.tensors) ^ set(b.tensors))
    compared = 0
    for name in sorted(set(a.tensors) & set(b.tensors)):
        x, y = a.tensors[name].load(), b.tensors[name].load()
        compared += 1
        if x.dtype != y.dtype or x.shape != y.shape or not torch.equal(x, y):
            mismatched.append(name)
    return {"bitwise_equal": not mismatched and compared > 0, "tensors_compared": compared,
            "mismatched": mismatched[:20]}


# ---------------------------------------------------------------------------------------------------- convert


def convert(src: str | os.PathLike, dst: str | os.PathLike, from_format: str, to_format: str, tp: int = 1, pp: int = 1,
            model_overrides: dict | None = None, trust_pickle: bool = False, megatron_names: str = "core",
            show_progress: bool = True, proof: bool = True, command: str | None = None) -> dict:
    """Convert the checkpoint `src` (format `from_format`) into the new folder `dst` (format `to_format`, split
    TP x PP for megatron) and prove it; returns the proof, also written as dst/conversion.json.
    `proof=False` skips the probe and the round trip (benchmarks of the conversion alone); the file says so."""
    src, dst = Path(src), Path(dst)
    _check_format(from_format, "--from")
    _check_format(to_format, "--to")
    if dst.exists():
        raise ConversionError(f"{dst} already exists: converting never overwrites; choose a new folder or remove it")
    if not src.exists():
        raise ConversionError(f"{src}: no such checkpoint")
    started = time.perf_counter()
    loaded = read_checkpoint(from_format, src, model_overrides, trust_pickle)
    _check_target(to_format, loaded, tp, pp)
    dst.parent.mkdir(parents=True, exist_ok=True)
    partial = Path(temporary_name(dst))
    round_trip_dir = Path(temporary_name(dst, tag="round-trip"))
    shutil.rmtree(partial, ignore_errors=True)
    try:
        with explain_write_errors(dst, intact="nothing was written", elsewhere="choose another DST"):
            written_notes = write_checkpoint(to_format, loaded, partial, tp, pp, megatron_names, show_progress)
        converted_at = time.perf_counter()
        report = {
            "megahf_convert": 1,
            "command": command or _python_call(src, dst, from_format, to_format, tp, pp, model_overrides),
            "source": {"format": from_format, "path": str(src), "layout": loaded.layout},
            "target": {"format": to_format, "path": str(dst),
                       "layout": {"tp": tp, "pp": pp, "names": megatron_names} if to_format == "megatron"
                       else {"tp": tp} if to_format == "megatron-dist" else {}},
            "model": {"class": loaded.model_class, "model_type": loaded.config.model_type,
                      "vocab_size": loaded.config.vocab_size, "padded_vocab_size": loaded.config.padded_vocab_size},
            "tensors": len(loaded.tensors),
            "bytes": loaded.total_bytes(),
            "notes": [*loaded.notes, *written_notes],
        }
        if proof:
            report["probe"] = _probe(from_format, src, loaded, to_format, partial)
            report["round_trip"] = _round_trip(from_format, loaded, to_format, partial, round_trip_dir,
                                               show_progress)
        else:
            report["probe"] = report["round_trip"] = None
            report["notes"].append("proof skipped (proof=False)")
        report["seconds"] = {"convert": round(converted_at - started, 3),
                             "proof": round(time.perf_counter() - converted_at, 3)}
        report["ok"] = bool(proof and report["round_trip"]["bitwise_equal"] and report["probe"]["within_tolerance"])
        atomic_write_json(partial / PROOF_FILE, report, indent=2)
        if not publish_folder(partial, dst, replace=False):
            raise ConversionError(f"{dst} appeared while converting (another process?); this conversion was dropped")
    finally:
        shutil.rmtree(partial, ignore_errors=True)
        shutil.rmtree(round_trip_dir, ignore_errors=True)
    return report


def _probe(from_format, src, loaded, to_format, written: Path) -> dict:
    expected, source_runner = run_probe(from_format, src, loaded)
    target = read_checkpoint(to_format, written)  # every writer stores the config, overrides included
    actual, target_runner = run_probe(to_format, written, target)
    if expected.shape != actual.shape:
        raise ConversionError(f"probe logits of the source {tuple(expected.shape)} and of the target "
                              f"{tuple(actual.shape)} differ in shape (a converter bug)")
    diff = (expected - actual).abs()
    scale = expected.abs().max().item()
    # Same weights, same arithmetic up to the order of float32 reductions: a relative error a few hundred ulps of
    # the logits' magnitude at most; a wrong layout gives differences of the order of the logits themselves.
    tolerance = 1e-4 * max(scale, 1.0)
    positions = probe_batch(loaded.config).get("position_ids")
    return {"batch": list(expected.shape[:2]), "seed": PROBE_SEED,
            "positions": [0, expected.shape[1] - 1] if positions is None else [positions.min().item(),
                                                                             positions.max().item()],
            "source_ran_as": source_runner,
            "source_ran_as_itself": from_format not in OWN_CODE, "target_ran_as": target_runner,
            "target_ran_as_itself": to_format not in OWN_CODE, "max_abs_logit_diff": diff.max().item(),
            "mean_abs_logit_diff": diff.mean().item(), "max_abs_logit": scale, "tolerance": tolerance,
            "within_tolerance": diff.max().item() <= tolerance}


def _round_trip(from_format, loaded, to_format, written: Path, folder: Path, show_progress) -> dict:
    """The written target converted back to the source format (same TP x PP) and compared with the source."""
    target = read_checkpoint(to_format, written)
    layout = loaded.layout
    tp, pp = (layout.get("tp") or 1, layout.get("pp") or 1) if from_format == "megatron" else (1, 1)
    if from_format == "megatron-dist":
        tp = layout.get("tp") or 1
    names = layout.get("names", "core") if from_format == "megatron" else "core"
    if from_format == "megahf" and loaded.layout.get("training_step") is not None:
        back_format = "megahf"  # a training checkpoint comes back as a model folder: the weights are what counts
    else:
        back_format = from_format
    shutil.rmtree(folder, ignore_errors=True)
    write_checkpoint(back_format, target, folder, tp, pp, names, show_progress)
    back = read_checkpoint(back_format, folder)
    result = compare_tensors(loaded, back)
    result.update(format=back_format, layout={"tp": tp, "pp": pp} if back_format == "megatron" else {})
    return result


def _python_call(src, dst, from_format, to_format, tp, pp, overrides) -> str:
    parts = ["megahf", "convert", "--from", from_format, "--to", to_format, str(src), str(dst)]
    if (tp, pp) != (1, 1):
        parts += ["--tp", str(tp), "--pp", str(pp)]
    for key, value in (overrides or {}).items():
        parts += ["--model-overrides", f"{key}={value}"]
    return shlex.join(parts)


def summary(report: dict) -> str:
    """The proof as a few lines for the terminal."""
    lines = [f"converted {report['source']['format']} {report['source']['path']} -> {report['target']['format']} "
             f"{report['target']['path']} ({report['tensors']} tensors, {report['bytes'] / 2**20:.1f} MiB, "
             f"{report['seconds']['convert']:.1f} s)"]
    probe, trip = report.get("probe"), report.get("round_trip")
    if probe:
        first, last = probe.get("positions", [0, probe["batch"][1] - 1])
        lines.append(f"probe logits ({probe['source_ran_as']} vs {probe['target_ran_as']}, positions {first}..{last}): "
                     "max |diff| "
                     f"{probe['max_abs_logit_diff']:.3g}, mean |diff| {probe['mean_abs_logit_diff']:.3g} "
                     f"(logits up to {probe['max_abs_logit']:.3g}; tolerance {probe['tolerance']:.3g})")
    if trip:
        lines.append(f"round trip back to {trip['format']}: "
                     + ("bit-exact" if trip["bitwise_equal"] else f"DIFFERS in {trip['mismatched']}")
                     + f" ({trip['tensors_compared']} tensors)")
    if probe and not probe.get("source_ran_as_itself", True):
        lines.append(f"note: {OWN_CODE[report['source']['format']]} did not run here: the probe checks the target "
                     "against megahf's reading of the source (docs/conversion.md says what that reading is tested "
                     "against)")
    lines += [f"note: {note}" for note in report.get("notes", [])]
    lines.append(f"proof written to {Path(report['target']['path']) / PROOF_FILE}"
                 + ("" if report["ok"] else "  -- NOT PROVEN, read it"))
    return "\n".join(lines)


def run(args) -> int:
    """The `megahf convert` verb."""
    from .overrides import parse_overrides

    overrides = parse_overrides(args.model_overrides or [])
    command = shlex.join(["megahf", "convert", *sys.argv[2:]]) if len(sys.argv) > 2 else None
    report = convert(args.src, args.dst, args.from_format, args.to_format, tp=args.tp, pp=args.pp,
                     model_overrides=overrides, trust_pickle=args.trust_pickle, megatron_names=args.megatron_names,
                     show_progress=not args.no_progress, command=command)
    print(summary(report))
    return 0 if report["ok"] else 1


__all__ = ["FORMATS", "PROOF_FILE", "compare_tensors", "convert", "probe_batch", "read_checkpoint", "run",
           "run_probe", "summary", "write_checkpoint"]
