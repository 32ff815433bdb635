#!/usr/bin/env python3
"""CUDA figures for bench/gpu_check.sh: bf16 training throughput and MFU, and cached generation.

    python bench/gpu_speed.py                    # on the CUDA device (fails with one line without one)
    python bench/gpu_speed.py --device cpu --quick   # the same code on a CPU, tiny shapes (a dry run)

Shapes: C (hidden 512, 8 layers, 8 heads, context 512, batch 8 x 512, as bench_speed.py) and L
(hidden 1024, 16 layers, 16 heads, context 1024, batch 16 x 1024). One step = ``compute_loss`` under
bf16 autocast + backward + fused AdamW, fp32 master weights (what the trainer does); MFU against the
bf16 matmul peak measured here (square ``torch.mm``). Generation: ``diyapp.generation.generate``
greedy at batch 1 with the KV cache (the app's path), ms/token. Also checks on the device that the
model's logits equal the CPU's (fp32) and that a bf16 step's loss is close to the fp32 one.
Results are printed and written to bench/results/gpu_speed.json.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from diyapp.config import DIYConfig  # noqa: E402
from diyapp.generation import generate  # noqa: E402
from diyapp.model import DIYForCausalLM  # noqa: E402

SHAPES = {
    "C": ({"hidden_size": 512, "num_layers": 8, "num_heads": 8, "max_seq_len": 512}, 8),
    "L": ({"hidden_size": 1024, "num_layers": 16, "num_heads": 16, "max_seq_len": 1024}, 16),
}
QUICK = {"C": ({"hidden_size": 64, "num_layers": 2, "num_heads": 2, "max_seq_len": 64}, 2)}


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device: torch.device, reps: int) -> float:
    """Median seconds of ``fn`` over ``reps`` calls after one warm-up call."""
    fn()
    sync(device)
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def matmul_peak(device: torch.device, dtype: torch.dtype, n: int) -> float:
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    return 2 * n ** 3 / timed(lambda: torch.mm(a, b), device, 10)


def flops_per_token(config: DIYConfig, model: DIYForCausalLM) -> float:
    n = sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear))
    return 6.0 * n + 6.0 * config.num_layers * config.max_seq_len * config.num_heads * config.head_dim


def train_speed(name: str, overrides: dict, batch: int, device: torch.device, peak: float, reps: int) -> dict:
    config = DIYConfig(dropout=0.0, **overrides)
    torch.manual_seed(0)
    model = DIYForCausalLM(config).to(device).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
    ids = torch.randint(0, config.vocab_size, (batch, config.max_seq_len), device=device)

    def step() -> None:
        with torch.autocast(device.type, dtype=torch.bfloat16):
            loss = model.compute_loss(ids)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    seconds = timed(step, device, reps)
    tokens = batch * config.max_seq_len
    flops = tokens * flops_per_token(config, model)
    out = {"shape": name, "parameters": model.num_parameters(), "batch": f"{batch}x{config.max_seq_len}",
           "step_s": round(seconds, 4), "tokens_per_s": round(tokens / seconds, 1),
           "mfu_bf16": round(flops / seconds / peak, 4)}
    if device.type == "cuda":
        out["peak_memory_gib"] = round(torch.cuda.max_memory_allocated(device) / 2 ** 30, 2)
    return out


def generation_speed(name: str, overrides: dict, device: torch.device, new: int, reps: int) -> dict:
    config = DIYConfig(dropout=0.0, **overrides)
    torch.manual_seed(0)
    model = DIYForCausalLM(config).to(device).eval()
    prompt = torch.randint(0, config.vocab_size, (1, 16), device=device)
    seconds = timed(lambda: generate(model, prompt, new, temperature=0), device, reps)
    return {"shape": name, "new_tokens": new, "tokens_per_s": round(new / seconds, 1),
            "ms_per_token": round(seconds / new * 1e3, 3)}


def agreement(device: torch.device) -> dict:
    """The device's logits against the CPU's on the same weights (fp32), and a bf16 loss against fp32."""
    config = DIYConfig(vocab_size=512, hidden_size=128, num_layers=2, num_heads=4, num_kv_heads=2,
                       max_seq_len=64, dropout=0.0)
    torch.manual_seed(1)
    cpu = DIYForCausalLM(config).eval()
    dev = DIYForCausalLM(config).to(device).eval()
    dev.load_state_dict(cpu.state_dict())
    ids = torch.randint(0, config.vocab_size, (2, 64))
    with torch.no_grad():
        logit_diff = float((cpu(ids) - dev(ids.to(device)).cpu()).abs().max())
        fp32 = float(dev.compute_loss(ids.to(device)))
        with torch.autocast(device.type, dtype=torch.bfloat16):
            bf16 = float(dev.compute_loss(ids.to(device)))
        with torch.inference_mode():
            _, cache = dev(ids[:, :63].to(device), use_cache=True)
            step, _ = dev.decode_step(ids[:, 63:].to(device), cache)
        decode_diff = float((step.cpu() - cpu(ids)[:, -1]).abs().max())
    return {"max_abs_logit_diff_vs_cpu": logit_diff, "decode_step_diff_vs_cpu": decode_diff,
            "loss_fp32": round(fp32, 5), "loss_bf16": round(bf16, 5), "ok": logit_diff < 1e-3
            and decode_diff < 1e-3 and abs(fp32 - bf16) < 0.05}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--quick", action="store_true", help="tiny shapes, few repeats (a dry run)")
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "gpu_speed.json"))
    args = parser.parse_args()
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("no CUDA device here / 这里没有 CUDA 设备 (use --device cpu for a dry run)")
        return 1
    shapes = QUICK if args.quick else SHAPES
    reps = 2 if args.quick else 10
    result: dict = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
                    "torch": torch.__version__}
    result["bf16_matmul_peak_tflops"] = round(matmul_peak(device, torch.bfloat16, 512 if args.quick else 8192) / 1e12, 2)
    result["agreement"] = agreement(device)
    print(f"device {result['device']}: bf16 matmul peak {result['bf16_matmul_peak_tflops']} TFLOP/s; "
          f"agreement {result['agreement']}", flush=True)
    peak = result["bf16_matmul_peak_tflops"] * 1e12
    result["training_bf16"] = []
    for name, (overrides, batch) in shapes.items():
        row = train_speed(name, overrides, batch, device, peak, reps)
        result["training_bf16"].append(row)
        print(f"train bf16 {name} {row['batch']}: {row['tokens_per_s']:,.0f} tok/s, MFU {row['mfu_bf16']:.1%}", flush=True)
    result["generation_cached_b1"] = []
    for name, (overrides, _) in shapes.items():
        row = generation_speed(name, overrides, device, 32 if args.quick else 200, 2 if args.quick else 3)
        result["generation_cached_b1"].append(row)
        print(f"generate {name} batch 1 cached: {row['tokens_per_s']:,.0f} tok/s ({row['ms_per_token']} ms/token)",
              flush=True)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    print(f"written to {out}")
    return 0 if result["agreement"]["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
