"""Sweep the cuda MoE layer's block size and kernel at prefill sizes, beside the Triton rule and bf16 grouped_mm.

Candidates are (block_m, variant) of glm_awq::moe_gemm: variant 0 the kernels' default (block_m 8: skinny; 16:
the tile kernel with scales folded on tiles up to 512 wide; 64: wgmma where it runs), 1 the mma.sync tile kernel
with scales into B on 128-wide tiles, 5 the folded tile kernel as wide as N allows, 4 the wgmma kernel (block_m 64
or 32, sm_90), 6 (block_m 8) the skinny kernel for experts of <= 8 slots and the wgmma kernel's tiles of 32 for the
rest; "rule" is what CudaBackend.fused_moe picks. Prints time (CUDA graph, routing excluded;
the grouped_mm baseline includes it), % of the floor (measured in this run) and the error against the first
candidate's output; writes sweep_cuda_moe.json.

    python benchmarks/sweep_cuda_moe.py [--ts 256,512,1024,2048,4096] [--candidates 32:1,64:1,64:4]
"""

from __future__ import annotations

import argparse
import sys

import torch

import glm_awq
from glm_awq.kernels import moe

sys.path.insert(0, __file__.rsplit("/", 1)[0])
import common  # noqa: E402
from bench_moe import A, E, H, I, _dense_bf16, _grouped_mm_baseline, _layer_weights, _prefill_case  # noqa: E402
from bench_w4a16_gemm import _rotating  # noqa: E402

CANDIDATES = "32:1,64:1,64:4"  # block_m:variant, ...


def _cuda_layer(x, ids, w, p, block_m, variant):
    """CudaBackend.fused_moe with the block size and kernel forced."""
    sorted_slots, counts, local = moe._sort(ids.reshape(-1), None, E, block_m)[:3]
    t = p.tensors
    ops = torch.ops.glm_awq
    wf = w.reshape(-1).float()
    s13, s2 = t["w13_scale.bfloat16"], t["w2_scale.bfloat16"]
    hid = ops.moe_gemm(x, t["w13"], s13, sorted_slots, counts, wf, A, block_m, 1, 128, variant)
    y = ops.moe_gemm(hid, t["w2"], s2, sorted_slots, counts, wf, A, block_m, 2, 128, variant)
    return ops.moe_sum(y, local, A)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ts", default="256,512,1024,2048,4096")
    parser.add_argument("--candidates", default=CANDIDATES, metavar="BLOCK_M:VARIANT,...")
    args = parser.parse_args()
    ceilings = common.measure_ceilings()
    print(f"{common.card()}: copy {ceilings['copy_GBps']:.0f} GB/s, bf16 {ceilings['bf16_TFLOPs']:.0f} TFLOP/s")
    gen = torch.Generator(device="cuda").manual_seed(0)
    raw = [_layer_weights(gen) for _ in range(2)]
    cuda_layers = [glm_awq.prepare_experts(*r, backend="cuda") for r in raw]
    triton_layers = [glm_awq.prepare_experts(*r, backend="triton") for r in raw]
    baseline = _grouped_mm_baseline(_dense_bf16(*raw[0][:2]), _dense_bf16(*raw[0][2:]), torch.zeros(E, device="cuda"))
    del raw
    rows = []
    for t in (int(v) for v in args.ts.split(",")):
        x, ids, w, floor, base_us = _prefill_case(t, baseline, ceilings)
        s = t * A
        cands = [(f"cuda block_m={bm} variant={v}", lambda p, bm=bm, v=v: _cuda_layer(x, ids, w, p, bm, v), cuda_layers)
                 for bm, v in (map(int, c.split(":")) for c in args.candidates.split(","))]  # fmt: skip
        cands.append(("cuda rule", lambda p: glm_awq.fused_moe(x, ids, w, p), cuda_layers))
        cands.append(("triton rule", lambda p: glm_awq.fused_moe(x, ids, w, p), triton_layers))
        first = None
        for name, call, layers in cands:
            try:
                out = call(layers[0])
                calls = [lambda p=p, call=call: call(p) for p in layers]
                us = common.graph_time_us(_rotating(calls), calls=len(layers))
            except Exception as exc:  # a kernel this device or build does not run
                print(f"T={t:5d} {name}: {type(exc).__name__}: {str(exc)[:100]}")
                continue
            first = out if first is None else first
            err = ((out.float() - first.float()).norm() / first.float().norm()).item()
            ok = bool(torch.isfinite(out).all())
            tflops = 2 * s * 3 * H * I / us / 1e6
            rows.append(dict(T=t, config=name, us=us, floor_us=floor, baseline_us=base_us, err=err, ok=ok))
            print(f"T={t:5d} {name:28} {us:9.1f} us {100 * floor / us:5.1f}% of floor {tflops:6.1f} TFLOP/s  "
                  f"grouped_mm {base_us:8.1f} us ({base_us / us:.2f}x)  err {err:.1e}{'' if ok else '  NaN/inf!'}",
                  flush=True)  # fmt: skip
    common.write_results("sweep_cuda_moe", {"card": common.card(), "ceilings": ceilings, "rows": rows})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
