"""Per-kernel time of one decode step of a dense and a MoE layer (batch 1) under torch.profiler: where a layer's
time goes beyond its int4 GEMMs (norms, RoPE, attention, KV writes, routing, the shared expert, residual adds).

    python benchmarks/profile_decode.py [--context 1024] [--ckpt-dir DIR] [--reps 20]
    python benchmarks/profile_decode.py --tiny      # the same on a tiny checkpoint (CPU: a smoke test)

Eager kernel durations only: the launch gaps that a CUDA graph removes are not in these numbers, so the table
also prints the layer's CUDA-graph time (GPU) for comparison. The real-dims checkpoint (3 dense + 1 MoE layer,
~7 GB) goes to a scratch folder unless --ckpt-dir names one.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
from pathlib import Path

import torch

import glm_awq
from glm_awq import checkpoint

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402


def profile_layer(model, idx: int, context: int, reps: int):
    """Rows (us per step, calls per step, kernel name) for layer idx decoding one token at `context`, longest
    first, and the step function itself."""
    device = model.device
    block = model.model.layers[idx]
    pos = torch.tensor([context], device=device)
    x = torch.randn(1, 1, model.config.hidden_size, device=device, dtype=model.dtype)

    def step():
        cos, sin = model.rope_cos[pos], model.rope_sin[pos]
        mask = model.cache_positions[None, :] <= pos[:, None]
        return block(x, cos, sin, pos, mask)

    for _ in range(3):
        step()
    gpu = device.type == "cuda"
    activity = torch.profiler.ProfilerActivity.CUDA if gpu else torch.profiler.ProfilerActivity.CPU
    if gpu:
        torch.cuda.synchronize()
    with torch.profiler.profile(activities=[activity]) as prof:
        for _ in range(reps):
            step()
        if gpu:
            torch.cuda.synchronize()
    rows = []
    for ev in prof.key_averages():
        us = (ev.device_time_total if gpu else ev.self_cpu_time_total) / reps
        if us > 0 and ev.count >= reps:
            rows.append((us, ev.count // reps, ev.key))
    return sorted(rows, reverse=True), step


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--context", type=int, default=1024)
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--ckpt-dir", default=None)
    ap.add_argument("--tiny", action="store_true", help="a tiny checkpoint (runs on the CPU too)")
    args = ap.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    cfg = checkpoint.tiny_config(2) if args.tiny else checkpoint.real_config(4)  # 3 dense + 1 MoE layer
    folder = Path(args.ckpt_dir) if args.ckpt_dir else Path(tempfile.mkdtemp(prefix="glm_awq_profile_")) / "ckpt"
    try:
        if not (folder / "config.json").exists():
            checkpoint.write_checkpoint(folder, cfg, device=device, tokenizer=False)
        max_seq = max(64, 2 * args.context) if args.tiny else 4096
        context = min(args.context, max_seq - 1)
        model = glm_awq.load(folder, device=device, max_seq_len=max_seq, progress=False)
        model.setup_caches(1)
        card = common.card() if device == "cuda" else "cpu"
        print(f"{card}, backends {model.backends()}, fused norms "
              f"{'on' if model.model.norm.fused else 'off'}, position {context}")  # fmt: skip
        first_moe = model.config.first_k_dense_replace
        with torch.inference_mode():
            for kind, idx in (("dense", 0), ("moe", first_moe)):
                rows, step = profile_layer(model, idx, context, args.reps)
                total = sum(r[0] for r in rows)
                graph = ""
                if device == "cuda" and "torch" not in model.backends():
                    graph = f"; CUDA graph {common.graph_time_us(step):.1f} us"
                print(f"\nlayer {idx} ({kind}): {total:.1f} us of kernels in {sum(r[1] for r in rows)} launches{graph}")
                for us, calls, name in rows:
                    print(f"  {us:8.1f} us  x{calls:<3d} {name[:110]}")
    finally:
        if not args.ckpt_dir:
            shutil.rmtree(folder.parent, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
