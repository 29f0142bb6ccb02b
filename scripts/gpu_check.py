"""Checks of MegatronGPT on a CUDA device: the same numbers as on the CPU, every attention implementation, the KV
cache, and a bf16 training step. Run where a GPU is present: `python scripts/gpu_check.py`; prints one line per
check and exits non-zero on the first mismatch.
"""

from __future__ import annotations

import sys

import torch

import megahf  # noqa: F401  (registers the Auto classes)
from megahf import MegatronGPTConfig, MegatronGPTForCausalLM


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.float().cpu(), b.float().cpu()
    return ((a - b).abs().max() / b.abs().max()).item()


def check(name: str, error: float, tolerance: float) -> None:
    status = "ok" if error <= tolerance else "FAILED"
    print(f"{status:6s} {name}: relative error {error:.2e} (tolerance {tolerance:.0e})", flush=True)
    if error > tolerance:
        sys.exit(1)


def main() -> None:
    assert torch.cuda.is_available(), "no CUDA device"
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    print(f"device: {torch.cuda.get_device_name()}, torch {torch.__version__}")
    for preset in ("gpt-tiny", "llama-tiny"):
        config = MegatronGPTConfig.from_preset(preset, hidden_dropout=0.0, attention_dropout=0.0)
        torch.manual_seed(0)
        cpu = MegatronGPTForCausalLM(config).eval()
        gpu = MegatronGPTForCausalLM(config).eval()
        gpu.load_state_dict(cpu.state_dict())
        gpu.cuda()
        ids = torch.randint(0, config.vocab_size, (2, 64))
        mask = torch.ones_like(ids)
        mask[1, :10] = 0  # left padding in the second row
        with torch.no_grad():
            reference = cpu(ids, attention_mask=mask).logits
            for attn in ("eager", "sdpa"):
                gpu.set_attn_implementation(attn)
                logits = gpu(ids.cuda(), attention_mask=mask.cuda()).logits
                check(f"{preset} fp32 {attn} logits, CUDA vs CPU", relative_error(logits[mask.bool()],
                                                                                  reference[mask.bool()]), 1e-4)
        prompt = ids[:1, :16].cuda()
        cached = gpu.generate(prompt, max_new_tokens=24, do_sample=False, use_cache=True)
        uncached = gpu.generate(prompt, max_new_tokens=24, do_sample=False, use_cache=False)
        check(f"{preset} generate with and without KV cache", float((cached != uncached).sum()), 0)

        # One bf16-autocast training step agrees with fp32 to bf16 precision, and the loss is finite.
        gpu.train()
        labels = ids.cuda()
        loss32 = gpu(labels, labels=labels).loss
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss16 = gpu(labels, labels=labels).loss
        loss16.backward()
        finite = all(torch.isfinite(p.grad).all() for p in gpu.parameters() if p.grad is not None)
        check(f"{preset} bf16 autocast loss vs fp32 (finite grads: {finite})", relative_error(loss16, loss32), 2e-2)
        if not finite:
            sys.exit(1)


if __name__ == "__main__":
    main()
