"""Training throughput and MFU on a real architecture with random weights (no download), each
figure compared with its alternative in the same run:

    .venv/bin/python benchmarks/gpu.py --shape 1.5b --out gpu-figures.json   # on a GPU
    .venv/bin/python benchmarks/gpu.py --smoke                               # CPU: tiny shape, 2 steps

- SFT step: packed (every token real) vs padded (variable-length rows padded to the longest),
  tokens/s counting real tokens only, and MFU = achieved model FLOPs / the GPU's bf16 dense peak
  (6 * parameters * tokens, plus attention's 12 * layers * hidden * seq per token);
- the same with Liger kernels (fused RMSNorm/SwiGLU/RoPE/linear-cross-entropy) when installed;
- a DPO step: live reference (one more forward of chosen and rejected) vs precomputed
  reference log-probs (the reference pass done before training), step-time ratio.

Weights train in fp32 masters under bf16 autocast on GPU (what the trainer does outside
DeepSpeed/FSDP), sdpa attention (flash_attention_2 when --flash and installed).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM, Qwen2Config

SHAPES = {  # Qwen2.5's published configs (config.json of Qwen/Qwen2.5-0.5B and -1.5B)
    "0.5b": dict(hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
                 num_key_value_heads=2, vocab_size=151936, tie_word_embeddings=True),
    "1.5b": dict(hidden_size=1536, intermediate_size=8960, num_hidden_layers=28, num_attention_heads=12,
                 num_key_value_heads=2, vocab_size=151936, tie_word_embeddings=True),
    "smoke": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, vocab_size=1024, tie_word_embeddings=True),
}
BF16_PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0, "L40S": 362.0}  # dense, no sparsity


def peak_tflops() -> float | None:
    if not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name()
    return next((v for k, v in BF16_PEAK_TFLOPS.items() if k in name), None)


def build(shape: str, device: str, attention: str, liger: bool) -> torch.nn.Module:
    if liger:
        from liger_kernel.transformers import apply_liger_kernel_to_qwen2

        apply_liger_kernel_to_qwen2()
    config = Qwen2Config(**SHAPES[shape], max_position_embeddings=32768, attn_implementation=attention)
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config, torch_dtype=torch.float32).to(device)


def flops_per_token(model: torch.nn.Module, seq: int) -> float:
    c = model.config
    params = sum(p.numel() for p in model.parameters())
    return 6 * params + 12 * c.num_hidden_layers * c.hidden_size * seq


def timed(fn, steps: int, device: str) -> float:
    """Seconds per step after one warm-up step."""
    fn()
    if device == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(steps):
        fn()
    if device == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - t0) / steps


def sft(model, batch: int, seq: int, steps: int, packed: bool, device: str) -> dict:
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5)
    vocab = model.config.vocab_size
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, vocab, (batch, seq), generator=g).to(device)
    mask = torch.ones_like(ids)
    if not packed:  # chat rows of 20-100% of seq, padded to the longest in the batch
        lengths = torch.randint(seq // 5, seq + 1, (batch,), generator=g)
        mask = (torch.arange(seq)[None, :] < lengths[:, None]).long().to(device)
    labels = ids.masked_fill(mask == 0, -100)
    real = int(mask.sum())

    def step():
        with torch.autocast(device, dtype=torch.bfloat16, enabled=device == "cuda"):
            loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    seconds = timed(step, steps, device)
    return {"step_s": seconds, "real_tokens_per_s": real / seconds}


def logps(model, ids, mask, prompt: int) -> torch.Tensor:
    logits = model(input_ids=ids, attention_mask=mask).logits[:, prompt - 1:-1]
    return torch.gather(F.log_softmax(logits.float(), -1), 2, ids[:, prompt:, None]).squeeze(2).sum(-1)


def dpo(model, ref, batch: int, seq: int, steps: int, precomputed: bool, device: str) -> dict:
    opt = torch.optim.AdamW(model.parameters(), lr=5e-7)
    vocab, prompt = model.config.vocab_size, seq // 2
    g = torch.Generator().manual_seed(2)
    ids = torch.randint(0, vocab, (2 * batch, seq), generator=g).to(device)  # chosen then rejected
    mask = torch.ones_like(ids)
    with torch.no_grad(), torch.autocast(device, dtype=torch.bfloat16, enabled=device == "cuda"):
        cached = logps(ref, ids, mask, prompt)

    def step():
        with torch.autocast(device, dtype=torch.bfloat16, enabled=device == "cuda"):
            if precomputed:
                ref_lp = cached
            else:
                with torch.no_grad():
                    ref_lp = logps(ref, ids, mask, prompt)
            pol = logps(model, ids, mask, prompt)
        h = (pol[:batch] - pol[batch:]) - (ref_lp[:batch] - ref_lp[batch:])
        loss = -F.logsigmoid(0.1 * h).mean()
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return {"step_s": timed(step, steps, device)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", choices=sorted(SHAPES), default="1.5b")
    ap.add_argument("--smoke", action="store_true", help="tiny shape on CPU, 2 steps: keeps the script correct")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=2048)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--flash", action="store_true", help="flash_attention_2 instead of sdpa")
    ap.add_argument("--out", help="also write the figures here as JSON")
    args = ap.parse_args(argv)
    device = "cuda" if torch.cuda.is_available() and not args.smoke else "cpu"
    if args.smoke:
        args.shape, args.batch, args.seq, args.steps = "smoke", 2, 64, 2
    attention = "flash_attention_2" if args.flash else "sdpa"
    peak = peak_tflops()
    figures: dict = {"device": torch.cuda.get_device_name() if device == "cuda" else "cpu", "shape": args.shape,
                     "batch": args.batch, "seq": args.seq, "attention": attention, "bf16_peak_tflops": peak}

    def mfu(model, tokens_per_s: float) -> float | None:
        return flops_per_token(model, args.seq) * tokens_per_s / (peak * 1e12) if peak else None

    try:
        import liger_kernel  # noqa: F401
        variants = [False, True]
    except ImportError:
        variants = [False]
        figures["liger"] = "not installed"
    for liger in variants:
        model = build(args.shape, device, attention, liger)
        for packed in (True, False):
            r = sft(model, args.batch, args.seq, args.steps, packed, device)
            r["mfu"] = mfu(model, r["real_tokens_per_s"])
            figures[f"sft{'_liger' if liger else ''}_{'packed' if packed else 'padded'}"] = r
        del model
        if device == "cuda":
            torch.cuda.empty_cache()
    policy, ref = build(args.shape, device, attention, False), build(args.shape, device, attention, False).eval()
    ref.requires_grad_(False)
    for pre in (False, True):
        figures[f"dpo_{'precomputed' if pre else 'live'}_reference"] = dpo(
            policy, ref, max(1, args.batch // 2), args.seq, args.steps, pre, device)

    def show(key: str) -> str:
        r = figures[key]
        m = f"  MFU {r['mfu']:.1%}" if r.get("mfu") is not None else "  MFU n/a (no known GPU peak)"
        return f"{key:<22} {r['real_tokens_per_s']:>12,.0f} real tokens/s  {r['step_s'] * 1000:8.1f} ms/step{m}"

    print(f"{figures['device']}, Qwen2.5-{args.shape} shape (random weights), batch {args.batch} x {args.seq}, "
          f"{attention}")
    for key in [k for k in figures if k.startswith("sft")]:
        print(show(key))
    print(f"packing: {figures['sft_packed']['real_tokens_per_s'] / figures['sft_padded']['real_tokens_per_s']:.2f}x "
          "the real tokens/s of padding")
    if "sft_liger_packed" in figures:
        print(f"liger: {figures['sft_liger_packed']['real_tokens_per_s'] / figures['sft_packed']['real_tokens_per_s']:.2f}x")
    else:
        print("liger: not installed")
    live, pre = figures["dpo_live_reference"]["step_s"], figures["dpo_precomputed_reference"]["step_s"]
    print(f"dpo step: live reference {live * 1000:.1f} ms, precomputed {pre * 1000:.1f} ms -> {live / pre:.2f}x")
    if args.out:
        Path(args.out).write_text(json.dumps(figures, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
