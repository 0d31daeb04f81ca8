"""Dense vs factorized latency in PyTorch, for NVIDIA GPUs (FP16, CUDA graphs); runs on CPU for a smoke test.

    python benchmarks/tools/gpu_lowrank.py --device cuda --json benchmarks/results/gpu_lowrank_<gpu>.json
    python benchmarks/tools/gpu_lowrank.py --device cpu --quick          # seconds, checks the script works

Two experiments, each timed with lrdeploy's TorchRunner (CUDA graphs on GPU, runs alternated). The timed region
is the device's work only: inputs are copied to the GPU once per shape (`Runner.bind`), each run replays the
graph and synchronises, outputs stay on the GPU (until this was so, host copies dominated and every ratio read
≈1.00):
1. GEMM microbenchmark: one dense Linear (768×768 and 768×3072) against its factorized pair across ranks that
   are multiples of 64, 16 and 8 and odd ranks, at 128 × batch tokens.
2. Encoders: all-MiniLM-L6-v2 sized (hidden 384, 6 layers) and BERT-base sized (768, 12 layers) BERTs with
   random weights (timing does not depend on the values), dense against every Linear split at the uniform
   rank for ρ=0.5 and 0.7 (rounded to 16), batch 1/8/32/128 × 128 tokens.
"""

from __future__ import annotations

import argparse
import json
import platform
from pathlib import Path

import numpy as np

from lrdeploy.bench.measure import TIMED, BenchSettings, benchmark
from lrdeploy.lowrank.allocate import LayerShape, uniform_ranks


def factorized_linear(torch, linear, rank: int):
    """A Linear(d_in, d_out) replaced by Linear(d_in, rank, no bias) → Linear(rank, d_out) (timing only)."""
    return torch.nn.Sequential(torch.nn.Linear(linear.in_features, rank, bias=False),
                               torch.nn.Linear(rank, linear.out_features))


def split_all_linears(torch, module, budget: float):
    """Replace every nn.Linear of `module` by its uniform-rank pair for `budget`; returns the module."""
    linears = [(name, m) for name, m in module.named_modules() if isinstance(m, torch.nn.Linear)]
    shapes = [LayerShape(name, m.in_features, m.out_features) for name, m in linears]
    plan = uniform_ranks(shapes, budget, 16)
    for name, linear in linears:
        if plan[name] is not None:
            parent_name, _, attr = name.rpartition(".")
            parent = module.get_submodule(parent_name) if parent_name else module
            setattr(parent, attr, factorized_linear(torch, linear, plan[name]))
    return module


def gemm_rows(torch, runner_cls, device, precision, settings, tokens, shapes, ranks):
    rows = []
    for d_in, d_out in shapes:
        dense = torch.nn.Linear(d_in, d_out)
        for rank in ranks:
            if rank >= min(d_in, d_out):
                continue
            runners = [runner_cls(dense, "dense", device, precision),
                       runner_cls(factorized_linear(torch, dense, rank), "split", device, precision)]
            result = benchmark(runners, lambda b, s, _: {"input": np.random.default_rng(0).standard_normal(
                (b * s, d_in)).astype(np.float32)}, [(tokens // 128, 128, None)], settings)
            shape = result.shapes[0]
            rows.append({"d_in": d_in, "d_out": d_out, "rank": rank, "tokens": tokens,
                         "dense_p50_ms": shape.latency["dense"].p50_ms, "split_p50_ms": shape.latency["split"].p50_ms,
                         "ratio_p50": shape.ratio_p50, "flop_ratio": rank * (d_in + d_out) / (d_in * d_out)})
            print(f"GEMM {d_in}×{d_out} rank {rank} @ {tokens} tokens: ratio {shape.ratio_p50:.3f} "
                  f"(FLOP ratio {rows[-1]['flop_ratio']:.3f})")
    return rows


def encoder_rows(torch, runner_cls, device, precision, settings, configs, budgets, batches):
    from transformers import BertConfig, BertModel

    class Encoder(torch.nn.Module):
        def __init__(self, bert):
            super().__init__()
            self.bert = bert

        def forward(self, input_ids, attention_mask):
            return self.bert(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state

    rows = []
    for label, hidden, layers in configs:
        config = BertConfig(hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=hidden // 64,
                            intermediate_size=4 * hidden, attn_implementation="sdpa")
        for budget in budgets:
            torch.manual_seed(0)
            dense = Encoder(BertModel(config).eval())
            split = split_all_linears(torch, Encoder(BertModel(config).eval()), budget)
            runners = [runner_cls(dense, "dense", device, precision), runner_cls(split, "split", device, precision)]

            def feed(batch, seq, _):
                return {"input_ids": np.random.default_rng(0).integers(1, 1000, (batch, seq)),
                        "attention_mask": np.ones((batch, seq), np.int64)}

            for shape in benchmark(runners, feed, [(batch, 128, None) for batch in batches], settings).shapes:
                rows.append({"model": label, "budget": budget, "batch": shape.batch, "seq": shape.seq,
                             "dense_p50_ms": shape.latency["dense"].p50_ms,
                             "split_p50_ms": shape.latency["split"].p50_ms, "ratio_p50": shape.ratio_p50})
                print(f"{label} ρ={budget} batch {shape.batch}×128: ratio {shape.ratio_p50:.3f}")
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    parser.add_argument("--precision", default=None, help="fp16 on cuda, fp32 on cpu by default")
    parser.add_argument("--iterations", type=int, default=50)
    parser.add_argument("--quick", action="store_true", help="tiny sizes and few runs (a smoke test)")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()

    import torch

    from lrdeploy.runtime.torch import TorchRunner

    precision = args.precision or ("fp16" if args.device == "cuda" else "fp32")
    if args.quick:
        settings = BenchSettings(warmup=1, iterations=2)
        gemm_shapes, ranks, tokens = [(64, 64)], [16, 17], 256
        configs, budgets, batches = [("tiny", 64, 1)], [0.5], [1]
    else:
        settings = BenchSettings(warmup=10, iterations=args.iterations)
        gemm_shapes, ranks, tokens = [(768, 768), (768, 3072)], [64, 128, 192, 256, 320, 48, 80, 96, 112, 72, 88, 97,
                                                                  191, 255], 4096
        configs = [("MiniLM-sized (384×6)", 384, 6), ("BERT-base-sized (768×12)", 768, 12)]
        budgets, batches = [0.5, 0.7], [1, 8, 32, 128]
    result = {
        "command": "python benchmarks/tools/gpu_lowrank.py " + " ".join(f"--{k} {v}" for k, v in vars(args).items() if v),
        "device": torch.cuda.get_device_name() if args.device == "cuda" else platform.processor() or platform.machine(),
        "precision": precision, "torch": torch.__version__, "cuda_graphs": args.device == "cuda", "timed": TIMED,
        "gemm": gemm_rows(torch, TorchRunner, args.device, precision, settings, tokens, gemm_shapes, ranks),
        "encoders": encoder_rows(torch, TorchRunner, args.device, precision, settings, configs, budgets, batches),
    }
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
