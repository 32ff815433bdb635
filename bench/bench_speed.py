#!/usr/bin/env python3
"""Speed benchmark: diyapp's model against Hugging Face ``LlamaForCausalLM`` with the same weights.

    python bench/bench_speed.py                  # everything, about 6-8 minutes on 2 cores
    python bench/bench_speed.py --quick          # fewer repeats, the larger model's slow parts cut (< 2 min)
    python bench/bench_speed.py --out FILE.json  # default: bench/results/speed.json

Two shapes (issue 6): **A** = the default model (vocab 6400, hidden 256, 2 layers, 4 heads, context
128; training batch 16 x 128) and **C** = the large preset (hidden 512, 8 layers, 8 heads, context
512; training batch 8 x 512). For each, our ``DIYForCausalLM`` and a ``transformers.LlamaForCausalLM``
built from ``hf_llama_config`` and loaded with ``to_hf_state_dict`` (identical weights, dropout 0,
checked to give the same logits) are measured side by side in one process:

* training tokens/s: one step = forward + loss + backward + AdamW step (ours ``compute_loss``,
  theirs ``forward(labels=...)``; the same ``torch.optim.AdamW(fused=True)`` for both), in fp32 and
  in our default precision (``diyapp.device.autocast_dtype(cpu, "auto")``); MFU against the matmul
  peak measured here for that precision, and the step's matrix products alone at its own shapes (the
  most its MFU could be at those shapes, and the share of the step they take). The bf16 rows run in a
  fresh process per shape under the C allocator policy the app's bf16 trainer sets
  (``diyapp.allocator``; for theirs too), which a process cannot undo; the fp32 rows run without it,
  as the app's fp32 training does. FLOPs per step = ``tokens * (6 * N + 6 * L * T * H * Dh)``
  with N = weights of every matrix product (q/k/v, o, gate/up, down, and the head), L layers, T the
  sequence length, H * Dh the attention width: 6·N per token for the matrix products forward and
  backward, and the causal attention score and value products (2·T·H·Dh forward per token, half
  of the T x T square, times 3 for the backward);
* the AdamW implementations (for-loop, foreach, fused) on our model;
* generation tokens/s at batch 1 (16-token prompt, greedy; 100 new tokens for A, 200 for C), with
  and without the KV cache. Ours: the app's ``generate``, which decodes with one thread or all
  (whichever its timed steps show faster) and with the weights ``decode_weight_dtype`` picks
  (fp16 where the compiled kernel runs, any CPU with AVX2; else, where the CPU runs bf16 natively,
  FBGEMM's packed fp16 or oneDNN's packed bf16). Theirs: ``generate(min_new_tokens=n)`` with their
  default thread count and with one thread, in fp32 and, where ours decodes with 16-bit weights,
  also with their model cast to fp16 and (where the CPU runs bf16 natively) to bf16; the ratio
  uses the fastest of theirs. One-token steps are reported against the bandwidth bound of the
  bytes ours reads. Ours with the opt-in int8 weights (``precision="int8"``) is timed beside, in a
  row of its own (not the same precision as theirs, never the target's row), and our decoder with
  bf16, fp16 and int8 weights is compared with fp32 weights (logits, greedy tokens). A sampled row
  times a chat reply's path (top-k 20, top-p 0.9, temperature 1; ours with the chat's UTF-8 guard
  and loop stop over a made-up vocabulary of the same size) against their sampled ``generate``;
* our training step at the app's default dropout (0.1) against dropout 0 (attention dropout
  moves PyTorch's CPU attention off its fused kernel);
* fp32 and bf16-autocast loss curves of our model over the same steps (a learnable synthetic
  token stream), with a perturbed fp32 curve as the yardstick of run-to-run noise;
* with ``--compile``: ``torch.compile`` of our training step (compile time, steady speed-up, and
  after how many steps it pays);
* start-up: ``python main.py --help`` and, when the guided session shows a prompt in a
  pseudo-terminal, the time to that first prompt.

Timings are medians of repeated measurements with ours and theirs alternating, because shared
machines are noisy: compare the ratios, which come from the same run. The share of the CPUs other
processes used during each part is recorded next to it. Results are printed as a table and written
as JSON.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import math
import os
import platform
import re
import statistics
import subprocess
import sys
import time
import warnings
from pathlib import Path
from typing import Any, Callable

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

SHAPES = {
    "A": {"config": {}, "batch": 16, "new_tokens": 100},
    "C": {"config": {"hidden_size": 512, "num_layers": 8, "num_heads": 8, "max_seq_len": 512}, "batch": 8,
          "new_tokens": 200},
}
PROMPT_LEN = 16
# Targets from issue 13 (a 2-core AVX-512 machine with native bf16): ratios at equal precision.
TARGETS = {
    ("A", "train_fp32_vs_hf_fp32"): 1.1, ("C", "train_fp32_vs_hf_fp32"): 1.1,
    ("A", "train_bf16_vs_hf_bf16"): 1.4, ("C", "train_bf16_vs_hf_bf16"): 1.4,
    ("A", "mfu_bf16"): 0.6, ("C", "mfu_bf16"): 0.6,
    ("A", "gen_cached_vs_hf"): 3.0, ("C", "gen_cached_vs_hf"): 2.5,
    ("A", "cache_vs_no_cache"): 2.0,
}
STARTUP_TARGET_S = 1.5


# ---------------------------------------------------------------------------------------------------
# Machine and noise


class CpuLoad:
    """Share of the machine's CPU time that *other* processes used between start() and stop()."""

    def __init__(self) -> None:
        self.start()

    @staticmethod
    def _system() -> tuple[float, float]:
        with open("/proc/stat") as f:
            values = [float(v) for v in f.readline().split()[1:]]
        idle = values[3] + (values[4] if len(values) > 4 else 0.0)
        return sum(values[:8]), idle

    def start(self) -> None:
        self.t0, self.i0 = self._system()
        self.own0 = sum(os.times()[:4])

    def stop(self) -> float | None:
        try:
            t1, i1 = self._system()
        except OSError:
            return None
        ticks = os.sysconf("SC_CLK_TCK")
        total = (t1 - self.t0) / ticks
        if total <= 0:
            return None
        busy = total - (i1 - self.i0) / ticks
        own = sum(os.times()[:4]) - self.own0
        return round(max(0.0, min(1.0, (busy - own) / total)), 3)


def machine_info() -> dict[str, Any]:
    import torch
    import transformers

    from diyapp.device import autocast_dtype, cpu_supports_bf16, precision_name

    model = platform.processor()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    default = autocast_dtype(torch.device("cpu"), "auto")
    return {
        "cpu": model, "logical_cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(), "native_bf16": cpu_supports_bf16(),
        "default_precision": precision_name(default), "torch": torch.__version__,
        "transformers": transformers.__version__, "python": platform.python_version(),
        "load_average_at_start": [round(x, 2) for x in os.getloadavg()],
        "env": {k: os.environ[k] for k in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OMP_WAIT_POLICY",
                                             "THP_MEM_ALLOC_ENABLE") if k in os.environ},
    }


def matmul_peak(dtype, sizes: tuple[int, ...], reps: int) -> dict[str, Any]:
    """GFLOP/s of square ``torch.mm`` at each size (its fastest of ``reps``); the peak is the best size.

    The fastest repeat, not the median: a peak is what the machine can do, and noise only slows."""
    import torch

    rates = {}
    for n in sizes:
        a, b = torch.randn(n, n).to(dtype), torch.randn(n, n).to(dtype)
        torch.mm(a, b)
        best = min(_timed(lambda: torch.mm(a, b)) for _ in range(reps))
        rates[str(n)] = round(2 * n ** 3 / best / 1e9, 2)
    return {"gflops_by_size": rates, "peak_gflops": max(rates.values())}


def step_products(model, rows: int, dtype, reps: int) -> dict[str, Any]:
    """The matrix products of one training step alone, at its own shapes: for each ``nn.Linear``
    ``(out, in)`` of ``model`` and ``rows`` tokens, the forward ``(rows, in) x (in, out)``, the input
    gradient ``(rows, out) x (out, in)`` and the weight gradient ``(out, rows) x (rows, in)``, in
    ``dtype`` (6 * rows * N FLOPs, the 6*N part of the FLOPs formula). Their GFLOP/s (fastest of
    ``reps``) is the most a step of these shapes could reach if it did nothing but these products:
    the ceiling of its MFU at these shapes (square products of 2048, the peak, may run faster)."""
    import torch

    shapes = [m.weight.shape for m in model.modules() if isinstance(m, torch.nn.Linear)]

    def random(*size: int):
        return torch.randn(*size).to(dtype)

    # inputs and outputs allocated once: a fresh output a product (C's head: 105 MB) would time the
    # allocator's page faults, not the product
    operands = [(random(out, inp), random(rows, inp), random(rows, out), torch.empty(rows, out, dtype=dtype),
                 torch.empty(rows, inp, dtype=dtype), torch.empty(out, inp, dtype=dtype)) for out, inp in shapes]

    def products() -> None:
        for w, x, g, y, grad_x, grad_w in operands:
            torch.mm(x, w.t(), out=y)
            torch.mm(g, w, out=grad_x)
            torch.mm(g.t(), x, out=grad_w)

    products()
    seconds = min(_timed(products) for _ in range(reps))
    flops = 6 * rows * sum(out * inp for out, inp in shapes)
    return {"rows": rows, "seconds": round(seconds, 5), "gflops": round(flops / seconds / 1e9, 1)}


# ---------------------------------------------------------------------------------------------------
# Models


def build_pair(shape: str, seed: int = 0):
    """Our model and its Hugging Face twin, same weights, dropout 0, both in train mode."""
    import torch
    import transformers

    from diyapp.config import DIYConfig
    from diyapp.hf_export import hf_llama_config, to_hf_state_dict
    from diyapp.model import DIYForCausalLM

    config = DIYConfig(dropout=0.0, **SHAPES[shape]["config"])
    torch.manual_seed(seed)
    ours = DIYForCausalLM(config)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        hf = transformers.LlamaForCausalLM(transformers.LlamaConfig(**hf_llama_config(config)))
    missing, unexpected = hf.load_state_dict(to_hf_state_dict(ours), strict=False)
    assert not unexpected and set(missing) <= {"lm_head.weight"}, (missing, unexpected)
    hf.generation_config.eos_token_id = None
    hf.generation_config.pad_token_id = 0
    ids = torch.randint(0, config.vocab_size, (2, 32))
    ours.eval()
    hf.eval()
    with torch.no_grad():
        diff = (ours(ids) - hf(input_ids=ids).logits).abs().max().item()
    ours.train()
    hf.train()
    return config, ours, hf, {"max_abs_logit_diff": diff, "hf_attention": hf.config._attn_implementation}


def matmul_weights(model) -> int:
    """Weights that take part in matrix products (every nn.Linear, the tied head included)."""
    import torch

    return sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear))


def train_flops_per_token(config, n_matmul: int) -> float:
    attn_width = config.num_heads * config.head_dim
    return 6.0 * n_matmul + 6.0 * config.num_layers * config.max_seq_len * attn_width


def make_adamw(model, kind: str):
    import torch

    options = {"fused": {"fused": True}, "foreach": {"foreach": True}, "for-loop": {"foreach": False}}[kind]
    return torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.95), weight_decay=0.1, **options)


def autocast(dtype):
    import torch

    return torch.autocast("cpu", dtype=dtype) if dtype is not None else contextlib.nullcontext()


def ours_step(model, opt, ids, dtype) -> float:
    with autocast(dtype):
        loss = model.compute_loss(ids)
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    return loss.item()


def hf_step(model, opt, ids, dtype) -> float:
    with autocast(dtype):
        loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    return loss.item()


def interleaved(runs: dict[str, Callable[[], Any]], rounds: int, warmup: int = 1) -> dict[str, list[float]]:
    """Seconds per call of each run, alternating runs (order reversed every other round)."""
    for fn in runs.values():
        for _ in range(warmup):
            fn()
    times: dict[str, list[float]] = {name: [] for name in runs}
    names = list(runs)
    for r in range(rounds):
        for name in (names if r % 2 == 0 else names[::-1]):
            t = time.perf_counter()
            runs[name]()
            times[name].append(time.perf_counter() - t)
    return times


def med(xs: list[float]) -> float:
    return statistics.median(xs)


# ---------------------------------------------------------------------------------------------------
# Parts


def training_rounds(shape: str, quick: bool) -> int:
    """Rounds of training steps per precision row (C's steps are ~15x A's)."""
    big = shape == "C"
    return (1 if big else 4) if quick else (3 if big else 8)


def training(shape: str, ours, hf, config, rounds: int, labels: tuple[str, ...]) -> dict[str, Any]:
    """Training steps of ours and theirs, alternating, in each precision of ``labels`` ("fp32",
    "bf16" autocast): every ratio is at equal precision. The MFU is added by ``main`` against the
    peaks it measured (the bf16 rows come from another process)."""
    import torch

    batch = SHAPES[shape]["batch"]
    seq = config.max_seq_len
    tokens = batch * seq
    ids = torch.randint(0, config.vocab_size, (batch, seq), generator=torch.Generator().manual_seed(1))
    flops = tokens * train_flops_per_token(config, matmul_weights(ours))
    out: dict[str, Any] = {"batch": f"{batch}x{seq}", "tokens_per_step": tokens, "flops_per_step": flops,
                           "optimizer": "torch.optim.AdamW(fused=True) for both"}
    for label in labels:
        dtype = torch.bfloat16 if label == "bf16" else None
        load = CpuLoad()
        o_opt, h_opt = make_adamw(ours, "fused"), make_adamw(hf, "fused")
        times = interleaved({"ours": lambda: ours_step(ours, o_opt, ids, dtype),
                             "theirs": lambda: hf_step(hf, h_opt, ids, dtype)}, rounds, warmup=2 if shape == "A" else 1)
        row = {}
        for who in ("ours", "theirs"):
            step = med(times[who])
            row[who] = {"step_s": round(step, 4), "tokens_per_s": round(tokens / step, 1),
                        "step_s_all": [round(t, 4) for t in times[who]]}
        row["ratio"] = round(row["ours"]["tokens_per_s"] / row["theirs"]["tokens_per_s"], 3)
        row["others_cpu_share"] = load.stop()
        out[label] = row
        del o_opt, h_opt
    return out


def bf16_training_as_the_app(shapes: list[str], quick: bool, threads: int | None, result: dict) -> None:
    """The bf16 training rows of every shape, each in a fresh process (``--bf16-training-child``)
    that sets the C allocator policy first, as the app's bf16 Trainer does
    (``diyapp.allocator.keep_freed_memory``: freed activations stay in the heap, no page faults at
    every step). The policy lasts until a process ends, and a heap shaped by earlier parts changes
    what the next ones measure, hence a process each; ours and theirs both run under it. The MFU is
    computed by the caller against this process's peak."""
    for shape in shapes:
        tr = result["shapes"][shape].get("training")
        if tr is None:
            continue
        print(f"[{shape}] training in bf16, in a process with the app's allocator policy ...", flush=True)
        command = [sys.executable, str(Path(__file__).resolve()), "--bf16-training-child", shape]
        command += ["--quick"] if quick else []
        command += ["--threads", str(threads)] if threads else []
        done = subprocess.run(command, capture_output=True, text=True)
        if done.returncode != 0:
            tr["bf16"] = {"failed": done.stderr.strip().splitlines()[-1:] or ["no output"]}
            print(f"[{shape}]   bf16 training failed: {tr['bf16']['failed']}", flush=True)
            continue
        tr["bf16"] = json.loads(done.stdout.strip().splitlines()[-1])
        print(f"[{shape}]   bf16 tok/s ours {tr['bf16']['ours']['tokens_per_s']:.0f} theirs "
              f"{tr['bf16']['theirs']['tokens_per_s']:.0f} ({tr['bf16']['ratio']:.2f}x)", flush=True)


def bf16_training_child(shape: str, quick: bool) -> int:
    """One shape's bf16 training row under the app's allocator policy, printed as JSON."""
    from diyapp.allocator import keep_freed_memory

    applied = keep_freed_memory()
    config, ours, hf, _ = build_pair(shape)
    rounds = training_rounds(shape, quick)
    row = training(shape, ours, hf, config, rounds, ("bf16",))["bf16"]
    print(json.dumps({**row, "allocator_policy": applied, "rounds": rounds}))
    return 0


def precision_label(dtype) -> str:
    return "bf16" if dtype is not None else "fp32"


def optimizers(shape: str, ours, config, rounds: int) -> dict[str, Any]:
    """Our training step with each AdamW implementation, and the optimizer step alone."""
    import torch

    batch = SHAPES[shape]["batch"]
    ids = torch.randint(0, config.vocab_size, (batch, config.max_seq_len), generator=torch.Generator().manual_seed(2))
    load = CpuLoad()
    kinds = ("fused", "foreach", "for-loop")
    opts = {k: make_adamw(ours, k) for k in kinds}
    step_only: dict[str, list[float]] = {k: [] for k in kinds}

    def run(kind: str) -> None:
        ours.compute_loss(ids).backward()
        t = time.perf_counter()
        opts[kind].step()
        step_only[kind].append(time.perf_counter() - t)
        opts[kind].zero_grad(set_to_none=True)

    times = interleaved({k: (lambda k=k: run(k)) for k in kinds}, rounds)
    tokens = batch * config.max_seq_len
    out = {k: {"train_tokens_per_s": round(tokens / med(times[k]), 1),
               "optimizer_step_ms": round(med(step_only[k][1:] or step_only[k]) * 1e3, 2)} for k in kinds}
    out["fastest"] = min(kinds, key=lambda k: out[k]["optimizer_step_ms"])
    out["others_cpu_share"] = load.stop()
    return out


def dropout_cost(shape: str, ours, config, rounds: int) -> dict[str, Any]:
    """Our training step at dropout 0 (the comparisons) and at the app's default dropout (0.1).

    Attention-probability dropout sends PyTorch's CPU attention to its unfused "math" kernel."""
    import dataclasses

    import torch

    from diyapp.config import DIYConfig
    from diyapp.model import DIYForCausalLM

    rate = DIYConfig().dropout
    dropped = DIYForCausalLM(dataclasses.replace(config, dropout=rate))
    dropped.load_state_dict(ours.state_dict())
    batch = SHAPES[shape]["batch"]
    ids = torch.randint(0, config.vocab_size, (batch, config.max_seq_len), generator=torch.Generator().manual_seed(5))
    opts = {"0": make_adamw(ours, "fused"), str(rate): make_adamw(dropped, "fused")}
    load = CpuLoad()
    times = interleaved({"0": lambda: ours_step(ours, opts["0"], ids, None),
                         str(rate): lambda: ours_step(dropped, opts[str(rate)], ids, None)}, rounds)
    tokens = batch * config.max_seq_len
    out = {f"dropout_{k}_tokens_per_s": round(tokens / med(v), 1) for k, v in times.items()}
    out["slowdown"] = round(med(times[str(rate)]) / med(times["0"]), 3)
    out["others_cpu_share"] = load.stop()
    return out


def compiled_training(shape: str, ours, config, rounds: int) -> dict[str, Any]:
    """``torch.compile`` of our loss (forward + backward compiled; AdamW fused as everywhere):
    its compile time, its steady step time next to eager, and after how many steps it pays."""
    import copy

    import torch

    import tempfile

    batch = SHAPES[shape]["batch"]
    ids = torch.randint(0, config.vocab_size, (batch, config.max_seq_len), generator=torch.Generator().manual_seed(6))
    twin = copy.deepcopy(ours)
    eager_opt, compiled_opt = make_adamw(ours, "fused"), make_adamw(twin, "fused")
    compiled_loss = None

    def compiled_step() -> None:
        compiled_loss(ids).backward()
        compiled_opt.step()
        compiled_opt.zero_grad(set_to_none=True)

    def first_step() -> float:  # compile from scratch (dynamo forgets), timing the first step
        nonlocal compiled_loss
        torch._dynamo.reset()
        compiled_loss = torch.compile(twin.compute_loss)
        t = time.perf_counter()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            compiled_step()
        return time.perf_counter() - t

    load = CpuLoad()
    previous = os.environ.get("TORCHINDUCTOR_CACHE_DIR")
    with tempfile.TemporaryDirectory() as cache:  # "cold": an empty on-disk compile cache, as on a first run
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = cache
        try:
            first = first_step()
            warm = first_step()  # the same again with the cache the first one filled, as on later runs
        finally:
            if previous is None:
                os.environ.pop("TORCHINDUCTOR_CACHE_DIR", None)
            else:
                os.environ["TORCHINDUCTOR_CACHE_DIR"] = previous
    times = interleaved({"eager": lambda: ours_step(ours, eager_opt, ids, None), "compiled": compiled_step}, rounds)
    eager, compiled = med(times["eager"]), med(times["compiled"])
    tokens = batch * config.max_seq_len
    gain = eager - compiled
    return {"first_step_s": round(first, 1), "compile_overhead_s": round(first - eager, 1),
            "first_step_warm_cache_s": round(warm, 1),
            "eager_tokens_per_s": round(tokens / eager, 1), "compiled_tokens_per_s": round(tokens / compiled, 1),
            "speedup": round(eager / compiled, 3),
            "pays_after_steps": math.ceil((first - eager) / gain) if gain > 0 else None,
            "others_cpu_share": load.stop()}


def matching_prefix(a, b) -> int:
    """How many leading positions two ``(1, n)`` id tensors share."""
    n = min(a.shape[1], b.shape[1])
    differ = (a[0, :n] != b[0, :n]).nonzero()
    return int(differ[0]) if len(differ) else n


def generation(shape: str, ours, hf, config, rounds: int, use_cache: bool, bandwidth: float | None = None) -> dict[str, Any]:
    import torch

    from diyapp.decoder import decode_weight_dtype
    from diyapp.device import cpu_supports_bf16
    from diyapp.generation import generate

    new = SHAPES[shape]["new_tokens"]
    prompt = torch.randint(0, config.vocab_size, (1, PROMPT_LEN), generator=torch.Generator().manual_seed(3))
    mask = torch.ones_like(prompt)
    threads = torch.get_num_threads()
    outputs: dict[str, Any] = {}

    def theirs(model, n_threads: int, key: str) -> Callable[[], None]:
        def run() -> None:
            torch.set_num_threads(n_threads)
            try:
                outputs[key] = model.generate(prompt, attention_mask=mask, max_new_tokens=new, min_new_tokens=new,
                                              do_sample=False, use_cache=use_cache)
            finally:
                torch.set_num_threads(threads)
        return run

    def ours_with(precision: str, key: str) -> Callable[[], None]:
        def run() -> None:
            outputs[key] = generate(ours, prompt, new, temperature=0, use_cache=use_cache, precision=precision)
        return run

    # A chat reply's path: sampled (top-k 20, top-p 0.9 as the chat's defaults; temperature 1 so a
    # random model does not fall into a loop and stop early), with the UTF-8 guard and the loop stop
    # the chat runs after every token; theirs sampled with the same top-k and top-p.
    guard = synthetic_utf8_guard(config.vocab_size) if use_cache else None

    def ours_sampled() -> None:
        outputs["sampled_ours"] = generate(ours, prompt, new, temperature=1.0, top_k=20, top_p=0.9, seed=5,
                                           guard=guard, stop_loops=True, on_token=lambda token: None)

    def theirs_sampled() -> None:
        outputs["sampled_theirs"] = hf.generate(prompt, attention_mask=mask, max_new_tokens=new, min_new_tokens=new,
                                                do_sample=True, temperature=1.0, top_k=20, top_p=0.9)

    runs = {"ours": ours_with("auto", "ours"), "theirs": theirs(hf, threads, "theirs")}
    if use_cache:  # the opt-in int8 weights: timed beside, never the headline (not the same precision)
        runs["ours_int8"] = ours_with("int8", "ours_int8")
        runs["sampled_ours"], runs["sampled_theirs"] = ours_sampled, theirs_sampled
    if threads > 1:
        runs["theirs_1_thread"] = theirs(hf, 1, "theirs_1_thread")
    low = decode_weight_dtype(ours) if use_cache else torch.float32
    if low != torch.float32:  # ours decodes with 16-bit weights here: theirs in fp16 too, fairly (and in bf16 where native)
        halves = ((torch.bfloat16, "theirs_bf16"),) if cpu_supports_bf16() else ()
        for half, name in (*halves, (torch.float16, "theirs_fp16")):
            hf_low = copy.deepcopy(hf).to(half).eval()
            runs[name] = theirs(hf_low, threads, name)
            if threads > 1:
                runs[f"{name}_1_thread"] = theirs(hf_low, 1, f"{name}_1_thread")
    ours.eval()
    hf.eval()
    load = CpuLoad()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        times = interleaved(runs, rounds)
    ours.train()
    hf.train()
    rates = {k: round((outputs[k].shape[1] - PROMPT_LEN) / med(v), 1) for k, v in times.items()}
    best_theirs = max(v for k, v in rates.items() if k.startswith("theirs"))
    out: dict[str, Any] = {"new_tokens": new, "prompt_tokens": PROMPT_LEN, "use_cache": use_cache,
                           "tokens_per_s": rates, "theirs_best": best_theirs,
                           "ratio": round(rates["ours"] / best_theirs, 3),
                           "ratio_vs_default_threads": round(rates["ours"] / rates["theirs"], 3),
                           "same_tokens": bool(torch.equal(outputs["ours"], outputs["theirs"])),
                           "matching_new_tokens": matching_prefix(outputs["ours"], outputs["theirs"]) - PROMPT_LEN,
                           "others_cpu_share": load.stop()}
    if use_cache:  # a one-token step streams every weight once: the bandwidth it reaches
        weight_bytes = decoder_weight_bytes(ours, low)
        out["ours_decode_weight_dtype"] = str(low).removeprefix("torch.")
        if low == torch.float16:  # which product multiplies them: the compiled kernel, or FBGEMM and why
            from diyapp import native

            kernel = native.fp16_gemv()
            out["ours_fp16_products"] = (f"compiled kernel, {kernel.width}-bit vectors" if kernel
                                         else f"FBGEMM ({native.unavailable_reason()})")
        out["ours_weight_bytes"] = weight_bytes
        out["ours_ms_per_token"] = round(1e3 / rates["ours"], 3)
        out["ours_weight_stream_gb_per_s"] = round(weight_bytes * rates["ours"] / 1e9, 1)
        if bandwidth:
            out["bandwidth_bound_ms_per_token"] = round(weight_bytes / (bandwidth * 1e9) * 1e3, 3)
        int8_bytes = decoder_weight_bytes(ours, torch.int8)
        out["int8"] = {"tokens_per_s": rates["ours_int8"], "ratio": round(rates["ours_int8"] / best_theirs, 3),
                       "vs_ours_default": round(rates["ours_int8"] / rates["ours"], 3),
                       "weight_bytes": int8_bytes, "ms_per_token": round(1e3 / rates["ours_int8"], 3),
                       "matching_new_tokens_vs_ours_default":
                           matching_prefix(outputs["ours_int8"], outputs["ours"]) - PROMPT_LEN}
        if bandwidth:
            out["int8"]["bandwidth_bound_ms_per_token"] = round(int8_bytes / (bandwidth * 1e9) * 1e3, 3)
        out["sampled"] = {"ours_tokens_per_s": rates["sampled_ours"], "theirs_tokens_per_s": rates["sampled_theirs"],
                          "ratio": round(rates["sampled_ours"] / rates["sampled_theirs"], 3),
                          "ours_new_tokens": outputs["sampled_ours"].shape[1] - PROMPT_LEN}
    return out


def synthetic_utf8_guard(vocab: int):
    """A ``Utf8Guard`` over ``vocab`` made-up tokens (the 256 bytes, then whole CJK characters; ids
    0-2 special), the size of the app's vocabulary, for timing the chat's path without a tokenizer."""
    from diyapp.generation import Utf8Guard

    token_bytes = [bytes([i]) for i in range(256)] + [chr(0x4E00 + i).encode() for i in range(vocab - 256)]
    return Utf8Guard(token_bytes, [0, 1, 2], vocab)


def decoder_weight_bytes(model, dtype) -> int:
    """Bytes a one-token step of ``generate`` reads: the matrices of its decoder, stored in ``dtype``
    (``decode_weight_dtype``: fp16 or bf16 where it picks one; int8 with its scales),
    and one row of the embedding."""
    from diyapp.decoder import Fp16Weight, Int8Weight

    decoder = model.decoder(dtype)
    matrices = [w for layer in decoder.layers for w in layer] + [decoder.head]
    return (sum(w.nbytes if isinstance(w, (Int8Weight, Fp16Weight)) else w.numel() * w.element_size()
                for w in matrices)
            + decoder.embed[0].numel() * decoder.embed.element_size())


def memory_bandwidth(mib: int = 256, reps: int = 5) -> dict[str, Any]:
    """Read bandwidth of one thread and of all of them (a ``sum`` over ``mib`` MiB, far larger than
    any cache; the fastest of ``reps``): the limit of a one-token decode step, which reads every
    weight once, with one thread or all (``generation.ThreadPicker`` uses whichever is faster)."""
    import torch

    threads = torch.get_num_threads()
    data = torch.ones(mib * (1 << 20) // 4)
    out: dict[str, Any] = {"mib": mib}
    try:
        for label, count in (("1_thread", 1), ("all_threads", threads)):
            torch.set_num_threads(count)
            data.sum()
            best = min(_timed(data.sum) for _ in range(reps))
            out[f"read_gb_per_s_{label}"] = round(data.numel() * 4 / best / 1e9, 2)
    finally:
        torch.set_num_threads(threads)
    return out


def _timed(fn: Callable[[], Any]) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def decode_precision(shape: str, ours, config, new: int, lows: tuple[str, ...]) -> dict[str, Any]:
    """Our one-token decoder with fp32 weights against the same with each of ``lows`` ("bf16",
    "fp16", "int8") weights (1 thread, greedy, the bench prompt), alternating: ms/token, the largest logit
    difference on the fp32 decoder's own tokens, equal greedy tokens."""
    import torch

    from diyapp.decoder import Decoder

    dtypes = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16, "int8": torch.int8}
    prompt = torch.randint(0, config.vocab_size, (1, PROMPT_LEN), generator=torch.Generator().manual_seed(3))
    decoders = {name: Decoder(ours, dtypes[name]) for name in ("fp32", *lows)}
    times: dict[str, list[float]] = {k: [] for k in decoders}
    tokens: dict[str, list[int]] = {}
    logits_seen: dict[str, list] = {}
    diffs: dict[str, list[float]] = {k: [] for k in lows}
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    ours.eval()
    try:
        with torch.inference_mode():
            for _ in range(3):
                for name, decode in decoders.items():
                    hidden, cache = ours.model(prompt, past_key_values=ours.new_cache(1), use_cache=True)
                    token = ours.lm_head(hidden[:, -1]).argmax(-1, keepdim=True)
                    out, seen = [int(token)], []
                    t = time.perf_counter()
                    for _ in range(new):
                        logits, cache = decode(token, cache)
                        token = logits.argmax(-1, keepdim=True)
                        out.append(int(token))
                        seen.append(logits)
                    times[name].append((time.perf_counter() - t) / new)
                    tokens[name], logits_seen[name] = out, seen
            # logits of the low-precision weights on the fp32 decoder's own token sequence: same inputs
            for name in lows:
                hidden, cache = ours.model(prompt, past_key_values=ours.new_cache(1), use_cache=True)
                for i, reference in enumerate(logits_seen["fp32"]):
                    logits, cache = decoders[name](torch.tensor([[tokens["fp32"][i]]]), cache)
                    diffs[name].append(float((logits - reference).abs().max() / reference.abs().max()))
    finally:
        torch.set_num_threads(threads)
        ours.train()
    out: dict[str, Any] = {"ms_per_token": {k: round(med(v) * 1e3, 3) for k, v in times.items()}, "new_tokens": new}
    for name in lows:
        same = next((i for i, (a, b) in enumerate(zip(tokens["fp32"], tokens[name])) if a != b), len(tokens["fp32"]))
        out[name] = {"speedup": round(med(times["fp32"]) / med(times[name]), 3),
                     "max_relative_logit_diff": round(max(diffs[name]), 4),
                     "greedy_tokens_equal": tokens["fp32"] == tokens[name], "equal_leading_tokens": same}
    return out


def synthetic_stream(vocab: int, batch: int, seq: int, steps: int, seed: int = 4):
    """Batches from a sparse random Markov chain over ``vocab`` tokens (4 successors each): learnable
    within a few steps, so the loss falls fast enough for a short curve to say something."""
    import torch

    g = torch.Generator().manual_seed(seed)
    successors = torch.randint(0, vocab, (vocab, 4), generator=g)
    batches = []
    for _ in range(steps):
        ids = torch.empty(batch, seq, dtype=torch.long)
        ids[:, 0] = torch.randint(0, vocab, (batch,), generator=g)
        choice = torch.randint(0, 4, (batch, seq), generator=g)
        for t in range(1, seq):
            ids[:, t] = successors[ids[:, t - 1], choice[:, t]]
        batches.append(ids)
    return batches


def loss_curves(steps: int, batch: int, native: bool, clip: float = 1.0) -> dict[str, Any]:
    """Our default model trained from the same start on the same batches in fp32, in fp32 from weights
    perturbed by bf16's rounding size (2^-9 relative: the noise yardstick, how far two fp32 runs
    drift apart from a change that small), and in bf16 autocast. Gradients are clipped at ``clip``
    as the trainer clips them (``TrainConfig.grad_clip``); without clipping this recipe (lr 3e-3,
    no warm-up) has gradient-norm spikes of 13-38 in every precision, and which step a spike hits
    (and how high the loss jumps) changes with any perturbation."""
    import torch

    from diyapp.config import DIYConfig
    from diyapp.model import DIYForCausalLM

    config = DIYConfig(dropout=0.0)
    batches = synthetic_stream(256, batch, config.max_seq_len, steps)
    curves, norms, seconds = {}, {}, {}
    for label, dtype, perturb in (("fp32", None, 0.0), ("fp32_perturbed", None, 2.0 ** -9),
                                  ("bf16", torch.bfloat16, 0.0)):
        torch.manual_seed(0)
        model = DIYForCausalLM(config)
        if perturb:
            gen = torch.Generator().manual_seed(9)
            with torch.no_grad():
                for p in model.parameters():
                    p.mul_(1 + perturb * torch.randn(p.shape, generator=gen))
        opt = torch.optim.AdamW(model.parameters(), lr=3e-3, betas=(0.9, 0.95), weight_decay=0.1, fused=True)
        losses, grad_norms, times = [], [], []
        for ids in batches:
            t = time.perf_counter()
            with autocast(dtype):
                loss = model.compute_loss(ids)
            loss.backward()
            grad_norms.append(round(float(torch.nn.utils.clip_grad_norm_(model.parameters(), clip)), 2))
            opt.step()
            opt.zero_grad(set_to_none=True)
            losses.append(round(loss.item(), 4))
            times.append(time.perf_counter() - t)
        curves[label], norms[label] = losses, grad_norms
        seconds[label] = med(times[1:] or times)

    def gap(name: str) -> list[float]:
        return [abs(a - b) for a, b in zip(curves["fp32"], curves[name])]

    tokens = batch * config.max_seq_len
    bf16_gap, noise_gap = gap("bf16"), gap("fp32_perturbed")
    return {"batch": f"{batch}x{config.max_seq_len}", "steps": steps, "native_bf16": native, "grad_clip": clip,
            "losses": curves, "grad_norms": norms,
            "max_gap": round(max(bf16_gap), 4), "final_gap": round(bf16_gap[-1], 4),
            "max_relative_gap": round(max(g / a for g, a in zip(bf16_gap, curves["fp32"])), 4),
            "noise_max_gap": round(max(noise_gap), 4), "noise_final_gap": round(noise_gap[-1], 4),
            "tokens_per_s": {k: round(tokens / v, 1) for k, v in seconds.items()}}


def startup(runs: int, prompt_runs: int) -> dict[str, Any]:
    """Wall time of ``python main.py --help``, and of ``python main.py`` to its first prompt."""
    out: dict[str, Any] = {}
    times = []
    for _ in range(runs):
        t = time.perf_counter()
        proc = subprocess.run([sys.executable, "main.py", "--help"], cwd=ROOT, capture_output=True, text=True)
        times.append(time.perf_counter() - t)
    out["help_s"] = round(med(times), 3)
    out["help_s_all"] = [round(t, 3) for t in times]
    out["help_ok"] = proc.returncode == 0
    out["first_prompt"] = first_prompt(prompt_runs)
    return out


QUESTION = re.compile(r"\?(?:\x1b\[[0-9;]*m)*\s+\S")  # questionary's "? message" (colour codes allowed)


def first_prompt(runs: int) -> dict[str, Any]:
    """Time from spawning ``python main.py`` in a pseudo-terminal to its first questionary prompt."""
    try:
        import pexpect
    except ImportError:
        return {"measured": False, "why": "pexpect is not installed"}
    times, last = [], ""
    for _ in range(runs):
        t = time.perf_counter()
        child = pexpect.spawn(sys.executable, ["main.py"], cwd=str(ROOT), encoding="utf-8", timeout=20,
                              dimensions=(40, 120), env={**os.environ, "TERM": "xterm-256color"})
        try:
            index = child.expect([QUESTION, pexpect.EOF, pexpect.TIMEOUT])
            elapsed = time.perf_counter() - t
            last = (child.before or "") + (child.after if isinstance(child.after, str) else "")
        finally:
            child.sendcontrol("c")
            child.close(force=True)
        if index != 0:
            text = re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", last).strip()[-200:]
            return {"measured": False, "why": "no questionary prompt appeared" + (f": {text!r}" if text else "")}
        times.append(elapsed)
    return {"measured": True, "seconds": round(med(times), 3), "seconds_all": [round(x, 3) for x in times]}


# ---------------------------------------------------------------------------------------------------
# Report


def verdict(value: float | None, target: float, higher_is_better: bool = True) -> str:
    if value is None:
        return "n/a"
    return "PASS" if (value >= target if higher_is_better else value <= target) else "FAIL"


def build_table(result: dict[str, Any]) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    native = result["machine"]["native_bf16"]
    for shape, part in result["shapes"].items():
        tr = part.get("training")
        if tr:
            for prec in ("fp32", "bf16"):
                row = tr[prec]
                if "ours" not in row:
                    continue
                target = TARGETS[(shape, f"train_{prec}_vs_hf_{prec}")]
                rows.append({"what": f"{shape} train tok/s {prec}, ours vs HF {prec}", "ours": row["ours"]["tokens_per_s"],
                             "theirs": row["theirs"]["tokens_per_s"], "ratio": row["ratio"],
                             "target": f">= {target}x", "verdict": verdict(row["ratio"], target)})
                mfu_target = TARGETS.get((shape, f"mfu_{prec}"))
                rows.append({"what": f"{shape} MFU {prec} (peak {result['peaks'][prec]['peak_gflops']:.0f} GFLOP/s)",
                             "ours": f"{row['ours']['mfu']:.1%}", "theirs": f"{row['theirs']['mfu']:.1%}",
                             "ratio": None, "target": f">= {mfu_target:.0%}" if mfu_target else "",
                             "verdict": verdict(row["ours"]["mfu"], mfu_target) if mfu_target else ""})
                alone = tr.get("products_alone", {}).get(prec)
                if alone:
                    peak = result["peaks"][prec]["peak_gflops"]
                    share = alone["seconds"] / row["ours"]["step_s"]
                    rows.append({"what": f"{shape} {prec}: the step's products alone, at its shapes (MFU ceiling)",
                                 "ours": f"{alone['gflops']:.0f} GFLOP/s = {alone['gflops'] / peak:.1%} of peak",
                                 "theirs": None, "ratio": None, "target": "",
                                 "verdict": f"{alone['seconds'] * 1e3:.1f} ms = {share:.0%} of our step"})
            default = tr["default"]["precision"]
            if "ours" in tr[default]:
                rows.append({"what": f"{shape} train tok/s DEFAULT precision (= {default}), ours", "ours":
                             tr[default]["ours"]["tokens_per_s"], "theirs": None, "ratio": None,
                             "target": "", "verdict": "(the app's precision='auto')"})
        for key, label in (("generation_cached", "cached"), ("generation_no_cache", "no cache")):
            gen = part.get(key)
            if not gen:
                continue
            target = TARGETS.get((shape, "gen_cached_vs_hf")) if key == "generation_cached" else None
            if key == "generation_cached" and "bandwidth_bound_ms_per_token" in gen:
                rows.append({"what": f"{shape} ours decode ms/token vs bandwidth bound ({gen['ours_decode_weight_dtype']})",
                             "ours": gen["ours_ms_per_token"],
                             "theirs": gen["bandwidth_bound_ms_per_token"], "ratio": None, "target": "",
                             "verdict": f"{gen['bandwidth_bound_ms_per_token'] / gen['ours_ms_per_token']:.0%} of the limit"
                                        + (f"; {gen['ours_fp16_products']}" if "ours_fp16_products" in gen else "")})
            rows.append({"what": f"{shape} generate tok/s {label} (b1, {gen['new_tokens']} new)",
                         "ours": gen["tokens_per_s"]["ours"], "theirs": gen["theirs_best"], "ratio": gen["ratio"],
                         "target": f">= {target}x" if target else "",
                         "verdict": verdict(gen["ratio"], target) if target else ""})
            if "sampled" in gen:
                g = gen["sampled"]
                rows.append({"what": f"{shape} generate tok/s {label}, sampled (ours: the chat's path)",
                             "ours": g["ours_tokens_per_s"], "theirs": g["theirs_tokens_per_s"], "ratio": g["ratio"],
                             "target": "", "verdict": f"top-k 20, top-p 0.9; ours {g['ours_new_tokens']} new tokens"})
            if "int8" in gen:
                rows.append({"what": f"{shape} generate tok/s {label}, ours int8 weights (opt-in)",
                             "ours": gen["int8"]["tokens_per_s"], "theirs": gen["theirs_best"],
                             "ratio": gen["int8"]["ratio"], "target": "",
                             "verdict": f"not the same precision as theirs; {gen['int8']['vs_ours_default']:.2f}x ours default"})
        if part.get("generation_cached") and part.get("generation_no_cache"):
            c = part["generation_cached"]["tokens_per_s"]["ours"]
            n = part["generation_no_cache"]["tokens_per_s"]["ours"]
            target = TARGETS.get((shape, "cache_vs_no_cache"))
            rows.append({"what": f"{shape} ours: cached vs no cache tok/s", "ours": c, "theirs": n,
                         "ratio": round(c / n, 3), "target": f">= {target}x" if target else "",
                         "verdict": verdict(c / n, target) if target else ""})
    st = result.get("startup")
    if st:
        rows.append({"what": "python main.py --help (s)", "ours": st["help_s"], "theirs": None, "ratio": None,
                     "target": f"< {STARTUP_TARGET_S} s", "verdict": verdict(st["help_s"], STARTUP_TARGET_S, False)})
        fp_ = st["first_prompt"]
        rows.append({"what": "python main.py -> first prompt (s)", "ours": fp_.get("seconds", "not measured"),
                     "theirs": None, "ratio": None, "target": f"< {STARTUP_TARGET_S} s",
                     "verdict": verdict(fp_.get("seconds"), STARTUP_TARGET_S, False) if fp_.get("measured")
                     else "n/a"})
    return rows


def print_table(rows: list[dict[str, Any]]) -> None:
    def fmt(v: Any) -> str:
        if v is None:
            return "-"
        if isinstance(v, float):
            return f"{v:,.1f}" if v >= 100 else f"{v:.3g}"
        return str(v)

    header = ("measure", "ours", "HF (or 2nd)", "ratio", "target", "")
    body = [(r["what"], fmt(r["ours"]), fmt(r["theirs"]), f"{r['ratio']:.2f}x" if r["ratio"] else "-",
             r["target"], r["verdict"]) for r in rows]
    widths = [max(len(str(x[i])) for x in [header, *body]) for i in range(len(header))]
    for i, line in enumerate([header, *body]):
        print("  ".join(str(c).ljust(w) if j == 0 else str(c).rjust(w) if j < 4 else str(c).ljust(w)
                        for j, (c, w) in enumerate(zip(line, widths))).rstrip())
        if i == 0:
            print("  ".join("-" * w for w in widths))


def notes(result: dict[str, Any]) -> list[str]:
    m, peaks = result["machine"], result["peaks"]
    out = [f"CPU: {m['cpu']} ({m['logical_cpus']} logical CPUs, torch threads {m['torch_threads']}, "
           f"capability {m['cpu_capability']}, native bf16 {m['native_bf16']}); matmul peak fp32 "
           f"{peaks['fp32']['peak_gflops']:.0f} GFLOP/s, bf16 {peaks['bf16']['peak_gflops']:.1f} GFLOP/s."]
    if not m["native_bf16"]:
        fp = [part["training"]["fp32"]["theirs"]["mfu"] for part in result["shapes"].values() if "training" in part]
        out.append("No native bf16: the default precision is fp32 and no bf16 row is measured (emulated bf16 is "
                   "~100x slower); the bf16 targets apply to CPUs with AVX-512 BF16 / AMX" +
                   (f"; HF runs fp32 at {min(fp):.0%}-{max(fp):.0%} MFU here" if fp else "") + ".")
    shares = [sec["others_cpu_share"] for part in result["shapes"].values() for sec in part.values()
              if isinstance(sec, dict) and isinstance(sec.get("others_cpu_share"), float)]
    shares += [tr[k]["others_cpu_share"] for part in result["shapes"].values() if (tr := part.get("training"))
               for k in ("fp32", "bf16") if isinstance(tr[k].get("others_cpu_share"), float)]
    if shares and max(shares) > 0.1:
        out.append(f"Other processes used up to {max(shares):.0%} of the CPUs during parts of this run: absolute "
                   f"figures are depressed (multi-threaded ones most); ratios from the same part stay comparable.")
    return out


# ---------------------------------------------------------------------------------------------------


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer repeats; skip C's slowest parts (< 2 minutes)")
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "speed.json"))
    parser.add_argument("--shapes", default="A,C", help="comma-separated subset of A,C")
    parser.add_argument("--skip", default="", help="comma-separated parts to skip: "
                        "train,optim,dropout,gen,nocache,curve,startup")
    parser.add_argument("--compile", action="store_true",
                        help="also measure torch.compile for training (adds about 1 min for A, 2-3 min for C)")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch threads for everything (default: PyTorch's); on a machine others share, "
                             "1 thread is the least disturbed")
    parser.add_argument("--bf16-training-child", metavar="SHAPE", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.bf16_training_child:
        import torch

        if args.threads:
            torch.set_num_threads(args.threads)
        return bf16_training_child(args.bf16_training_child, args.quick)
    skip = {s.strip() for s in args.skip.split(",") if s.strip()}
    started = time.perf_counter()
    run_load = CpuLoad()

    result: dict[str, Any] = {"quick": args.quick, "shapes": {}}
    # Start-up first, before this process has torch in memory competing for the page cache.
    if "startup" not in skip:
        print("start-up ...", flush=True)
        result["startup"] = startup(runs=3 if args.quick else 7, prompt_runs=1 if args.quick else 3)

    import torch

    from diyapp.device import autocast_dtype

    if args.threads:
        torch.set_num_threads(args.threads)
    result["machine"] = m = machine_info()
    print(f"machine: {m['cpu']} | {m['cpu_capability']} | native bf16 {m['native_bf16']} | "
          f"threads {m['torch_threads']} | default precision {m['default_precision']}", flush=True)
    result["peaks"] = {
        "fp32": matmul_peak(torch.float32, (256, 512, 1024, 2048), reps=5 if args.quick else 10),
        "bf16": matmul_peak(torch.bfloat16, (256, 512, 1024, 2048) if m["native_bf16"] else (256, 512), reps=3),
    }
    print(f"matmul peak: fp32 {result['peaks']['fp32']['peak_gflops']:.1f} GFLOP/s, "
          f"bf16 {result['peaks']['bf16']['peak_gflops']:.1f} GFLOP/s", flush=True)
    default_dtype = autocast_dtype(torch.device("cpu"), "auto")
    result["bandwidth"] = memory_bandwidth()
    print(f"memory read bandwidth: {result['bandwidth']['read_gb_per_s_1_thread']} GB/s (1 thread), "
          f"{result['bandwidth']['read_gb_per_s_all_threads']} GB/s (all threads)", flush=True)
    result["formulas"] = {
        "train_flops_per_step": "tokens * (6*N + 6*L*T*H*Dh); N = weights in matrix products (every nn.Linear, "
                                "the tied head included), L layers, T sequence length, H*Dh attention width",
        "mfu": "train_flops_per_step / median step seconds / measured matmul peak of that precision",
        "products_alone": "the step's nn.Linear products only (forward, input and weight gradients) at its own "
                          "shapes, fastest of several runs: the MFU a step of these shapes could reach at most",
        "tokens_per_s_generation": "new tokens / median wall seconds of the whole generate call (prompt included)",
        "bandwidth_bound_ms_per_token": "bytes of the matrices ours decodes with (in its decode weight dtype: bf16 "
                                        "where the CPU runs it natively) / measured read bandwidth of all threads "
                                        "(a decode step reads each weight once)",
    }

    shapes = [s.strip() for s in args.shapes.split(",") if s.strip()]
    for shape in shapes:
        part: dict[str, Any] = {}
        result["shapes"][shape] = part
        config, ours, hf, check = build_pair(shape)
        part["config"] = {**config.to_dict(), "parameters": ours.num_parameters(),
                          "matmul_weights": matmul_weights(ours)}
        part["equivalence"] = check
        print(f"[{shape}] {ours.num_parameters():,} parameters; max |logit diff| vs HF "
              f"{check['max_abs_logit_diff']:.2e}", flush=True)
        big = shape == "C"
        # Generation first, while both models still hold the same weights (training moves them apart).
        if "gen" not in skip:
            rounds = (1 if big else 3) if args.quick else (3 if big else 5)
            print(f"[{shape}] generation with cache, {rounds} rounds ...", flush=True)
            part["generation_cached"] = generation(shape, ours, hf, config, rounds, use_cache=True,
                                                   bandwidth=result["bandwidth"]["read_gb_per_s_all_threads"])
            lows = ("bf16", "fp16", "int8") if m["native_bf16"] else ("fp16", "int8")  # bf16 emulated: no
            print(f"[{shape}] decoding with {' / '.join(lows)} weights vs fp32 ...", flush=True)
            part["decode_precision"] = decode_precision(shape, ours, config, SHAPES[shape]["new_tokens"], lows)
            if "nocache" not in skip and not (args.quick and big):
                print(f"[{shape}] generation without cache ...", flush=True)
                part["generation_no_cache"] = generation(shape, ours, hf, config, 1 if big else rounds,
                                                         use_cache=False)
        if "train" not in skip:
            rounds = training_rounds(shape, args.quick)
            print(f"[{shape}] training, {rounds} rounds ...", flush=True)
            part["training"] = tr = training(shape, ours, hf, config, rounds, ("fp32",))
            tr["products_alone"] = {label: step_products(ours, tr["tokens_per_step"], dtype, reps=3 if big else 5)
                                    for label, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16))
                                    if label == "fp32" or m["native_bf16"]}
            tr["default"] = {"precision": precision_label(default_dtype),
                             "why": "autocast_dtype('cpu', 'auto'): bf16 where the CPU runs it natively, else fp32"}
            # bf16 rows: in processes of their own (bf16_training_as_the_app), where bf16 is native;
            # emulated bf16 (AVX2) runs ~100x slower than fp32: nothing to learn from timing it
            if not m["native_bf16"]:
                tr["bf16"] = {"skipped": "no native bf16 on this CPU (emulated bf16 is ~100x slower than fp32)"}
            print(f"[{shape}]   fp32 tok/s ours {tr['fp32']['ours']['tokens_per_s']:.0f} theirs "
                  f"{tr['fp32']['theirs']['tokens_per_s']:.0f} ({tr['fp32']['ratio']:.2f}x)", flush=True)
        if "optim" not in skip and not (args.quick and big):
            print(f"[{shape}] AdamW implementations ...", flush=True)
            part["optimizers"] = optimizers(shape, ours, config, rounds=3 if args.quick or big else 6)
        if args.compile:
            print(f"[{shape}] torch.compile ...", flush=True)
            part["compile"] = compiled_training(shape, ours, config, rounds=2 if big else 6)
        if "dropout" not in skip and not args.quick and not big:
            print(f"[{shape}] dropout cost ...", flush=True)
            part["dropout"] = dropout_cost(shape, ours, config, rounds=4)
        del ours, hf

    if "train" not in skip and m["native_bf16"]:
        bf16_training_as_the_app(shapes, args.quick, args.threads, result)

    if "curve" not in skip and "A" in shapes:
        native = m["native_bf16"]
        steps, batch = (30, 16) if native else ((0, 4) if args.quick else (8, 4))
        if steps:
            print(f"loss curves fp32 vs bf16 ({steps} steps, batch {batch}) ...", flush=True)
            result["loss_curves"] = loss_curves(steps, batch, native)

    # The peak again at the end: a noisy moment at the start must not inflate the MFU figures.
    again = matmul_peak(torch.float32, (512, 1024, 2048), reps=5 if args.quick else 10)
    result["peaks"]["fp32"]["again_at_end"] = again
    if again["peak_gflops"] > result["peaks"]["fp32"]["peak_gflops"]:
        result["peaks"]["fp32"]["peak_gflops"] = again["peak_gflops"]
    for part in result["shapes"].values():
        tr = part.get("training")
        for label in ("fp32", "bf16") if tr else ():
            peak = result["peaks"][label]["peak_gflops"] * 1e9
            for who in ("ours", "theirs"):
                if who in tr[label]:
                    tr[label][who]["mfu"] = round(tr["flops_per_step"] / tr[label][who]["step_s"] / peak, 4)

    result["machine"]["load_average_at_end"] = [round(x, 2) for x in os.getloadavg()]
    result["others_cpu_share_whole_run"] = run_load.stop()
    result["table"] = build_table(result)
    result["notes"] = notes(result)
    result["seconds"] = round(time.perf_counter() - started, 1)

    print()
    print_table(result["table"])
    print()
    for shape, part in result["shapes"].items():
        if "optimizers" in part:
            o = part["optimizers"]
            print(f"{shape} AdamW step (ours): " + ", ".join(f"{k} {o[k]['optimizer_step_ms']} ms" for k in
                                                          ("fused", "foreach", "for-loop")) + f" -> {o['fastest']}")
    for shape, part in result["shapes"].items():
        if "compile" in part:
            c = part["compile"]
            print(f"{shape} torch.compile: first step {c['first_step_s']} s (warm compile cache "
                  f"{c['first_step_warm_cache_s']} s), then {c['compiled_tokens_per_s']} tok/s "
                  f"vs eager {c['eager_tokens_per_s']} ({c['speedup']:.2f}x); pays after {c['pays_after_steps']} steps")
        if "dropout" in part:
            d = part["dropout"]
            print(f"{shape} ours at the app's default dropout: {d['slowdown']:.2f}x the step time of dropout 0 "
                  f"({', '.join(f'{k} {v}' for k, v in d.items() if k.endswith('tokens_per_s'))})")
    if "loss_curves" in result:
        lc = result["loss_curves"]
        print(f"loss curves ({lc['batch']}, {lc['steps']} steps, grad clip {lc['grad_clip']}): fp32 {lc['losses']['fp32']}")
        print(f"                               fp32 perturbed 2^-9 {lc['losses']['fp32_perturbed']}")
        print(f"                               bf16 {lc['losses']['bf16']}")
        print(f"  bf16 vs fp32: max gap {lc['max_gap']} (relative {lc['max_relative_gap']:.2%}), final "
              f"{lc['final_gap']}; noise yardstick (perturbed fp32 vs fp32): max {lc['noise_max_gap']}, final "
              f"{lc['noise_final_gap']}")
    for shape, part in result["shapes"].items():
        d = part.get("decode_precision", {})
        for name in ("bf16", "fp16", "int8"):
            if name in d:
                e = d[name]
                print(f"{shape} decode, {name} weights vs fp32 (1 thread): {d['ms_per_token'][name]} vs "
                      f"{d['ms_per_token']['fp32']} ms/token ({e['speedup']:.2f}x), max relative logit diff "
                      f"{e['max_relative_logit_diff']}, greedy tokens equal: {e['greedy_tokens_equal']} "
                      f"(first {e['equal_leading_tokens']} of {d['new_tokens'] + 1})")
    for line in result["notes"]:
        print("note:", line)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, ensure_ascii=False, indent=2))
    print(f"written to {out} ({result['seconds']} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
