"""End-to-end decode on a real-dims synthetic GLM-4.6-AWQ checkpoint (3 dense layers + a few MoE layers).

    python benchmarks/bench_decode.py [--moe-layers 2] [--context 1024] [--ckpt-dir DIR] [--keep]

1. measures this card's copy bandwidth and bf16 matmul rate (the floors);
2. writes the checkpoint with glm_awq.checkpoint (random weights drawn and quantized on the GPU) to a scratch
   folder (not $OUT: it is ~9 GB);
3. loads it with the default backend (auto) and reports load throughput (GB/s; the shards were just written,
   so they are read from the page cache: this is the loader + host-to-device path, not the disk);
4. checks the fast backend's logits against the torch backend's (fp32 references) on the same checkpoint;
5. times one dense and one MoE layer at batch 1, decoding at position --context, under a CUDA graph, with the
   bytes each reads and its floor; times the whole decode step; projects tokens/s for all 92 layers
   (3 dense + 89 MoE + embedding/norm/lm_head) as if one card held them (it does not: ~176 GB);
6. generates --new-tokens tokens with model.generate (prefill + graphed decode) for an end-to-end rate.
Writes $OUT/bench_decode.json (with the card's name) and prints a short table last.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

import glm_awq
from glm_awq import checkpoint, generate

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

REAL_LAYERS, DENSE_LAYERS = 92, 3


def tensor_bytes(tensors) -> int:
    """Bytes of distinct tensors (a backend may keep one tensor under two names, e.g. a scale and its cast)."""
    unique = {(t.data_ptr(), t.numel() * t.element_size()) for t in tensors if t.numel()}
    return sum(n for _, n in unique)


def layer_bytes(block, cfg, context: int) -> tuple[int, dict]:
    """Bytes one decode step of `block` reads at batch 1: its weights (for a MoE layer only the A of E routed
    experts a token touches) plus the KV cache up to `context`."""
    parts = {}
    own = []
    for m in block.modules():
        own += [p for p in m.parameters(recurse=False)]
        prepared = getattr(m, "prepared", None)
        if isinstance(prepared, glm_awq.PreparedLinear):
            own += list(prepared.tensors.values()) + ([prepared.bias] if prepared.bias is not None else [])
        elif isinstance(prepared, glm_awq.PreparedExperts):
            experts = tensor_bytes(prepared.tensors.values())
            parts["experts_touched"] = experts * cfg.num_experts_per_tok // cfg.n_routed_experts
    parts["weights"] = tensor_bytes(own)
    parts["kv_cache"] = 2 * cfg.num_key_value_heads * cfg.head_dim * context * 2  # k and v, bf16
    return sum(parts.values()), parts


def time_fn(fn, graph: bool) -> tuple[float, str]:
    """Median us of fn, replayed from a CUDA graph when asked and capturable, else eager."""
    if graph:
        try:
            return common.graph_time_us(fn), "cuda-graph"
        except Exception as exc:  # noqa: BLE001  (report, and fall back to eager timing)
            print(f"  CUDA-graph capture failed ({type(exc).__name__}: {exc}); timing eagerly")
            torch.cuda.synchronize()
    return common.time_us(fn), "eager"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--moe-layers", type=int, default=2)
    ap.add_argument("--context", type=int, default=1024, help="decode position for the per-layer timings")
    ap.add_argument("--prompt-len", type=int, default=32)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--max-seq-len", type=int, default=4096)
    ap.add_argument("--ckpt-dir", default=None, help="reuse/keep the checkpoint here (default: a temp folder)")
    ap.add_argument("--keep", action="store_true", help="do not delete the checkpoint afterwards")
    ap.add_argument("--backend", default=None, help="cuda | triton (default: GLM_AWQ_BACKEND, auto)")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        print("bench_decode needs a CUDA GPU")
        return 1
    torch.manual_seed(0)
    results: dict = {"card": common.card(), "torch": torch.__version__, "args": vars(args)}
    results["ceilings"] = ceilings = common.measure_ceilings()
    print(f"{results['card']}: copy {ceilings['copy_GBps']:.0f} GB/s, bf16 {ceilings['bf16_TFLOPs']:.0f} TFLOP/s")

    # ---------------------------------------------------------------------------------------- checkpoint
    layers = DENSE_LAYERS + args.moe_layers
    ckpt = Path(args.ckpt_dir) if args.ckpt_dir else Path(tempfile.mkdtemp(prefix="glm_awq_bench_")) / "ckpt"
    if not (ckpt / "config.json").exists():
        start = time.perf_counter()
        checkpoint.write_checkpoint(ckpt, checkpoint.real_config(layers), device="cuda", shard_bytes=4 << 30,
                                    tokenizer=False)  # fmt: skip
        results["write_s"] = time.perf_counter() - start
        print(f"wrote {layers}-layer real-dims checkpoint to {ckpt} in {results['write_s']:.0f} s")
    size = sum(f.stat().st_size for f in ckpt.glob("*.safetensors"))
    results["checkpoint_GB"] = size / 1e9

    try:
        # ------------------------------------------------------------------------------------- load
        model = glm_awq.load(ckpt, device="cuda", backend=args.backend, max_seq_len=args.max_seq_len, progress=False)
        cfg = model.config
        stats = model.load_stats
        results["load"] = stats
        results["backends"] = model.backends()
        print(f"loaded {stats['bytes'] / 1e9:.2f} GB in {stats['seconds']:.1f} s = {stats['gb_per_s']:.2f} GB/s; "
              f"backends {model.backends()}")

        # --------------------------------------------------------------------- parity vs torch backend
        ids = torch.randint(0, cfg.vocab_size, (1, args.prompt_len), device="cuda")

        first_moe = cfg.first_k_dense_replace

        def run_recording(m):
            """Logits, every decoder layer's output (the residual stream) and, for the first MoE layer (whose input
            is the same in both models: the dense layers are bf16), its attention and MLP outputs."""
            outs, parts = [], {}
            layers = m.model.layers
            hooks = [layer.register_forward_hook(lambda mod, inp, out: outs.append(out.detach().clone()))
                     for layer in layers]  # fmt: skip
            for name in ("self_attn", "mlp"):
                hooks.append(getattr(layers[first_moe], name).register_forward_hook(
                    lambda mod, inp, out, name=name: parts.__setitem__(name, out.detach().clone())))  # fmt: skip
            hooks.append(layers[first_moe].mlp.register_forward_pre_hook(
                lambda mod, inp: parts.__setitem__("mlp_input", inp[0].detach().clone())))  # fmt: skip
            try:
                return m(ids), outs, parts
            finally:
                for h in hooks:
                    h.remove()

        with torch.inference_mode():
            fast, fast_layers, fast_parts = run_recording(model)
            ref_model = glm_awq.load(ckpt, device="cuda", backend="torch", max_seq_len=64, progress=False)
            ref, ref_layers, ref_parts = run_recording(ref_model)
            # The fast MoE block on exactly the reference's input: the kernels' own error, without the routing
            # changes that a slightly different input can cause (top-k is discontinuous).
            same_input = model.model.layers[first_moe].mlp(ref_parts["mlp_input"])
            del ref_model
        torch.cuda.empty_cache()

        def rel_err(a, b):
            return ((a - b).double().norm() / b.double().norm()).item()

        rel = rel_err(fast, ref)
        per_layer = [rel_err(a, b) for a, b in zip(fast_layers, ref_layers)]
        parts = {name: rel_err(fast_parts[name], ref_parts[name]) for name in ("self_attn", "mlp")}
        parts["mlp_on_reference_input"] = rel_err(same_input, ref_parts["mlp"])
        agree = (fast.argmax(-1) == ref.argmax(-1)).float().mean().item()
        results["parity"] = {"rel_err_vs_torch": rel, "argmax_agreement": agree, "finite": bool(fast.isfinite().all()),
                             "per_layer_rel_err": per_layer, f"layer_{first_moe}_parts_rel_err": parts}  # fmt: skip
        print(f"logits vs torch backend: rel err {rel:.2e}, argmax agreement {agree:.3f}; after each layer: "
              + ", ".join(f"{e:.1e}" for e in per_layer)
              + f"; layer {first_moe}: " + ", ".join(f"{k} {v:.1e}" for k, v in parts.items()))  # fmt: skip

        # ------------------------------------------------------------------------- per-layer latency
        graph = "torch" not in model.backends()
        model.setup_caches(1)
        pos = torch.tensor([args.context], device="cuda")
        x = torch.randn(1, 1, cfg.hidden_size, device="cuda", dtype=model.dtype)

        def layer_fn(block):
            def fn():
                cos, sin = model.rope_cos[pos], model.rope_sin[pos]
                mask = model.cache_positions[None, :] <= pos[:, None]
                return block(x, cos, sin, pos, mask)

            return fn

        per_layer = {}
        with torch.inference_mode():
            for kind, idx in (("dense", 0), ("moe", DENSE_LAYERS)):
                block = model.model.layers[idx]
                us, mode = time_fn(layer_fn(block), graph)
                nbytes, parts = layer_bytes(block, cfg, args.context)
                floor = common.floor_us(nbytes, 0, ceilings)
                per_layer[kind] = {"layer": idx, "us": us, "mode": mode, "bytes": nbytes, "parts": parts,
                                   "GBps": nbytes / us / 1e3, "floor_us": floor, "pct_of_floor": 100 * floor / us}
                print(f"layer {idx} ({kind}): {us:.1f} us ({mode}), reads {nbytes / 1e6:.1f} MB -> "
                      f"{nbytes / us / 1e3:.0f} GB/s, floor {floor:.1f} us ({100 * floor / us:.0f}%)")
            results["per_layer"] = per_layer
            # the same layers with the eager norms and RoPE (model.use_fused_kernels(False)): the baseline of the
            # fused Triton kernels, measured in this run
            fused = any(getattr(m, "fused", False) for m in model.modules())
            if fused:
                model.use_fused_kernels(False)
                for kind, entry in per_layer.items():
                    entry["us_eager_norms"], _ = time_fn(layer_fn(model.model.layers[entry["layer"]]), graph)
                    print(f"layer {entry['layer']} ({kind}) with eager norms, RoPE, attention and float linears: {entry['us_eager_norms']:.1f} us")
                model.use_fused_kernels(True)
                # and with the float linears (the shared expert; all of layers 0-2) on torch instead of the skinny
                # kernel (glm_awq.kernels.dense): its baseline, in this run
                from glm_awq.kernels import dense

                saved, dense.FASTER_UP_TO_M = dense.FASTER_UP_TO_M, 0
                try:
                    for kind, entry in per_layer.items():
                        entry["us_torch_float"], _ = time_fn(layer_fn(model.model.layers[entry["layer"]]), graph)
                        print(f"layer {entry['layer']} ({kind}) with the float linears on torch: "
                              f"{entry['us_torch_float']:.1f} us")
                finally:
                    dense.FASTER_UP_TO_M = saved
            if "cuda" in model.backends():  # the MoE through the token sort (moe_gemm + moe_sum), in this run
                cuda_cls = glm_awq.backends.CudaBackend
                saved, cuda_cls.PER_TOKEN_MAX_T = cuda_cls.PER_TOKEN_MAX_T, 0
                try:
                    entry = per_layer["moe"]
                    entry["us_sorted_moe"], _ = time_fn(layer_fn(model.model.layers[entry["layer"]]), graph)
                    print(f"layer {entry['layer']} (moe) with the routed experts through the sort: "
                          f"{entry['us_sorted_moe']:.1f} us")
                finally:
                    cuda_cls.PER_TOKEN_MAX_T = saved

            # ------------------------------------------------------------- whole decode step, projection
            decoder = generate.Decoder(model, 1, cuda_graph=graph, strict=False)  # warns and runs eagerly if needed
            token = torch.zeros(1, dtype=torch.long, device="cuda")
            step_us = common.time_us(lambda: decoder(token, pos))
            step_mode = "cuda-graph" if decoder.graph is not None else "eager"
            t_dense, t_moe = per_layer["dense"]["us"], per_layer["moe"]["us"]
            rest_us = max(step_us - DENSE_LAYERS * t_dense - args.moe_layers * t_moe, 0.0)
            projected_us = DENSE_LAYERS * t_dense + (REAL_LAYERS - DENSE_LAYERS) * t_moe + rest_us
            results["decode_step"] = {
                "layers": layers, "step_us": step_us, "mode": step_mode, "embed_norm_lm_head_us": rest_us,
                "projected_92_layer_us": projected_us, "projected_tokens_per_s": 1e6 / projected_us,
            }  # fmt: skip
            print(f"decode step ({layers} layers, {step_mode}): {step_us:.0f} us; embed+norm+lm_head ~{rest_us:.0f} us; "
                  f"92 layers projected {projected_us / 1e3:.2f} ms/token = {1e6 / projected_us:.1f} tokens/s")

            # ------------------------------------------------------------------------- end to end
            prompt = torch.randint(0, cfg.vocab_size, (1, args.prompt_len), device="cuda")
            model.generate(prompt, 4, eos_token_id=[])  # warm: graph capture for batch 1 happens here
            torch.cuda.synchronize()
            start = time.perf_counter()
            out = model.generate(prompt, args.new_tokens, eos_token_id=[])
            torch.cuda.synchronize()
            total = time.perf_counter() - start
            results["generate"] = {"new_tokens": out.shape[1], "seconds": total, "tokens_per_s": out.shape[1] / total}
            print(f"generate: {out.shape[1]} tokens in {total:.2f} s = {out.shape[1] / total:.1f} tokens/s "
                  f"({layers} layers, prefill of {args.prompt_len} included)")
    finally:
        if not args.keep and not args.ckpt_dir:
            shutil.rmtree(ckpt.parent, ignore_errors=True)

    path = common.write_results("bench_decode", results)
    d, m, s = results["per_layer"]["dense"], results["per_layer"]["moe"], results["decode_step"]
    print(f"\n== bench_decode on {results['card']} (backends {', '.join(results['backends'])}); JSON: {path}")
    print(f"{'what':34s} {'value':>12s}  note")
    rows = [
        ("load throughput", f"{stats['gb_per_s']:.2f} GB/s", f"{stats['bytes'] / 1e9:.1f} GB, page cache -> GPU"),
        ("logits rel err vs torch backend", f"{results['parity']['rel_err_vs_torch']:.2e}",
         f"argmax agreement {results['parity']['argmax_agreement']:.3f}"),
        ("dense layer, batch 1", f"{d['us']:.1f} us", f"{d['pct_of_floor']:.0f}% of floor, {d['mode']}"
         + (f"; eager norms {d['us_eager_norms']:.1f} us" if "us_eager_norms" in d else "")
         + (f"; float on torch {d['us_torch_float']:.1f} us" if "us_torch_float" in d else "")),
        ("MoE layer, batch 1", f"{m['us']:.1f} us", f"{m['pct_of_floor']:.0f}% of floor, {m['mode']}"
         + (f"; eager norms {m['us_eager_norms']:.1f} us" if "us_eager_norms" in m else "")
         + (f"; float on torch {m['us_torch_float']:.1f} us" if "us_torch_float" in m else "")),
        ("embed + norm + lm_head", f"{s['embed_norm_lm_head_us']:.0f} us", "step minus layers"),
        ("92 layers projected", f"{s['projected_92_layer_us'] / 1e3:.2f} ms", f"{s['projected_tokens_per_s']:.1f} tokens/s"),
        (f"generate ({layers} layers)", f"{results['generate']['tokens_per_s']:.1f} tok/s", "end to end, batch 1"),
    ]  # fmt: skip
    for what, value, note in rows:
        print(f"{what:34s} {value:>12s}  {note}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
