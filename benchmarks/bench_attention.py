"""Decode attention at GLM-4.6's shape (Q=96, KV=8, D=128, bf16 cache of max_seq_len slots), batch 1, one token.

Per (cache length S, position): the split-KV kernel (glm_awq.kernels.attention) and, in the same run, the
model's SDPA path (query heads folded into rows, masked); floor = the live k/v bytes / copy bandwidth measured in
this run. CUDA-graph medians. Writes attention.json.

    python benchmarks/bench_attention.py [--cases 4096:1024,4096:4095]
"""

from __future__ import annotations

import argparse
import sys

import torch
import torch.nn.functional as F

from glm_awq.kernels import attention

sys.path.insert(0, __file__.rsplit("/", 1)[0])
import common  # noqa: E402

Q, KV, D = 96, 8, 128


def _sdpa(q, k, v, mask):
    """glm_awq.model.Attention's fallback: rep query heads folded into the rows of each kv head."""
    rep, t = Q // KV, q.shape[2]
    y = F.scaled_dot_product_attention(q.reshape(1, KV, rep * t, D), k, v, attn_mask=mask.repeat(rep, 1))
    return y.view(1, Q, t, D)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cases", default="4096:128,4096:1024,4096:4095,32768:8192")
    args = parser.parse_args()
    ceilings = common.measure_ceilings()
    print(f"{common.card()}: copy {ceilings['copy_GBps']:.0f} GB/s")
    rows = []
    for case in args.cases.split(","):
        s, pos = (int(v) for v in case.split(":"))
        q = torch.randn(1, Q, 1, D, device="cuda", dtype=torch.bfloat16)
        k = torch.randn(1, KV, s, D, device="cuda", dtype=torch.bfloat16)
        v = torch.randn_like(k)
        mask = torch.arange(s, device="cuda")[None, :] <= pos
        ref = _sdpa(q, k, v, mask)
        out = attention.decode_attention(q, k, v, mask)
        err = ((out.float() - ref.float()).norm() / ref.float().norm()).item()
        floor = common.floor_us(2 * KV * (pos + 1) * D * 2, 0, ceilings)
        kernel_us = common.graph_time_us(lambda: attention.decode_attention(q, k, v, mask))
        sdpa_us = common.graph_time_us(lambda: _sdpa(q, k, v, mask))
        rows.append(dict(S=s, position=pos, floor_us=floor, kernel_us=kernel_us, sdpa_us=sdpa_us, rel_err=err))
        print(f"S={s:6d} pos={pos:6d} floor {floor:6.1f} us  split-KV {kernel_us:7.1f} us "
              f"({100 * floor / kernel_us:4.0f}%)  SDPA {sdpa_us:7.1f} us  rel err {err:.1e}", flush=True)  # fmt: skip
    common.write_results("attention", {"card": common.card(), "ceilings": ceilings, "rows": rows})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
