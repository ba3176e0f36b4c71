"""Shared benchmark plumbing: the card's name, the two ceilings measured in this run, timing, JSON + plot."""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
import triton


def card() -> str:
    return torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"


def out_dir() -> Path:
    path = Path(os.environ.get("OUT", "out"))
    path.mkdir(parents=True, exist_ok=True)
    return path


def time_us(fn, warmup_ms: int = 25, rep_ms: int = 200) -> float:
    """Median time of fn() in microseconds, timed with CUDA events (triton.testing.do_bench)."""
    return triton.testing.do_bench(fn, warmup=warmup_ms, rep=rep_ms, return_mode="median") * 1e3


def graph_time_us(fn, calls: int = 1) -> float:
    """Median time of fn() replayed from a CUDA graph; fn may run `calls` layers, the time is per call."""
    fn()  # compile and allocate outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return time_us(graph.replay) / calls


def measure_ceilings() -> dict:
    """Copy bandwidth (bytes read + written / time, 2 GiB) and the bf16 matmul rate (8192^3, random data)."""
    src = torch.randn(2**29, device="cuda")  # 2 GiB
    dst = torch.empty_like(src)
    copy_us = time_us(lambda: dst.copy_(src))
    del src, dst
    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    mm_us = time_us(lambda: a @ b)
    return {
        "copy_GBps": 2 * 2**31 / copy_us / 1e3,
        "bf16_TFLOPs": 2 * 8192**3 / mm_us / 1e6,
    }


def floor_us(nbytes: float, flops: float, ceilings: dict) -> float:
    return max(nbytes / ceilings["copy_GBps"] / 1e3, flops / ceilings["bf16_TFLOPs"] / 1e6)


def write_results(name: str, payload: dict) -> Path:
    path = out_dir() / f"{name}.json"
    path.write_text(json.dumps(payload, indent=1))
    return path


def plot(name: str, title: str, series: dict[str, tuple[list, list]], xlabel: str, ylabel: str) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    fig, ax = plt.subplots(figsize=(8, 5))
    for label, (xs, ys) in series.items():
        ax.plot(xs, ys, marker="o", label=label)
    ax.set_xscale("log", base=2)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out_dir() / f"{name}.png", dpi=110)
    plt.close(fig)
