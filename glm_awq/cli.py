"""The glm-awq command line: info, demo, generate, make-checkpoint."""

from __future__ import annotations

import argparse
import platform
import shutil
import sys
import time

import torch

DEMO_NAME = "demo-tiny-v1"  # bump when the synthetic format or tiny config changes, so a stale cache is rebuilt
DEMO_LAYERS = 4


def _info(args) -> int:
    import glm_awq
    from glm_awq import env, ops

    print(f"glm_awq {glm_awq.__version__}  python {platform.python_version()}  torch {torch.__version__}")
    try:
        import triton

        print(f"triton {triton.__version__}")
    except ImportError:
        print("triton not installed")
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        print(f"GPU: {props.name} (sm_{props.major}{props.minor}, {props.multi_processor_count} SMs, "
              f"{props.total_memory / 2**30:.0f} GiB)")
    else:
        print("GPU: none visible to torch")
    print(f"GLM_AWQ_BACKEND={env.backend()}")
    for name, reason in ops.available_backends().items():
        print(f"  {name:7s} {'available' if reason is None else 'unavailable: ' + reason}")
    return 0


def _dtype(name: str) -> torch.dtype:
    return {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[name]


def _sampling(args) -> dict:
    return {"temperature": args.temperature, "top_p": args.top_p, "top_k": args.top_k}


def _report(model, stats: dict) -> None:
    device = model.device
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu"
    print(
        f"\n[{stats['new_tokens']} tokens, prompt {stats['prompt_tokens']}] prefill {stats['prefill_s'] * 1e3:.0f} ms, "
        f"decode {stats['tokens_per_s']:.1f} tokens/s  |  backend {', '.join(model.backends()) or 'none (bf16)'} "
        f"on {device} ({name})"
    )


def _demo(args) -> int:
    from glm_awq import checkpoint, env, generate, loader

    path = env.cache_dir() / DEMO_NAME
    if args.rebuild and path.exists():
        shutil.rmtree(path)
    if not (path / "config.json").exists():
        print(f"writing a tiny GLM-4.6-architecture checkpoint (random int4 weights) to {path}")
        checkpoint.write_checkpoint(path, checkpoint.tiny_config(DEMO_LAYERS), seed=0, shard_bytes=2 << 20)
    else:
        print(f"reusing {path}")
    model = loader.load(path, device=args.device, dtype=_dtype(args.dtype), backend=args.backend, progress=False)
    print(f"loaded {model.load_stats['bytes'] / 1e6:.1f} MB in {model.load_stats['seconds'] * 1e3:.0f} ms; "
          f"random weights, so the text is noise: the point is the pipeline")
    print(f"prompt: {args.prompt!r}\nreply: ", end="", flush=True)
    # eos disabled: a random model may emit one at once, and the demo is here to show decode speed
    _, stats = generate.generate_text(
        model, args.prompt, args.max_new_tokens, on_text=lambda s: print(s, end="", flush=True),
        return_stats=True, eos_token_id=[], **_sampling(args),
    )  # fmt: skip
    _report(model, stats)
    return 0


def _generate(args) -> int:
    from glm_awq import generate, loader

    model = loader.load(args.model, device=args.device, dtype=_dtype(args.dtype), backend=args.backend,
                        max_seq_len=args.max_seq_len, progress=not args.quiet)  # fmt: skip
    _, stats = generate.generate_text(
        model, args.prompt, args.max_new_tokens, chat=not args.no_chat,
        on_text=lambda s: print(s, end="", flush=True), return_stats=True, **_sampling(args),
    )  # fmt: skip
    _report(model, stats)
    return 0


def _make_checkpoint(args) -> int:
    from glm_awq import checkpoint

    if args.real_dims:
        config = checkpoint.real_config(args.layers)
    else:
        config = checkpoint.tiny_config(args.layers)
    router = torch.float32 if args.router_dtype == "fp32" else torch.bfloat16
    start = time.perf_counter()
    out = checkpoint.write_checkpoint(
        args.out, config, seed=args.seed, device=args.device, shard_bytes=int(args.shard_mb * 2**20),
        router_dtype=router, quantize_shared=args.quantize_shared,
    )  # fmt: skip
    size = sum(f.stat().st_size for f in out.glob("*.safetensors"))
    print(f"wrote {out} ({size / 1e9:.2f} GB, {config.num_hidden_layers} layers, "
          f"{'real' if args.real_dims else 'tiny'} dims) in {time.perf_counter() - start:.1f} s")
    return 0


def _add_run_args(p: argparse.ArgumentParser, max_new_tokens: int) -> None:
    p.add_argument("--max-new-tokens", type=int, default=max_new_tokens)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--device", default=None, help="default: cuda if visible, else cpu")
    p.add_argument("--dtype", choices=("bf16", "fp16", "fp32"), default="bf16")
    p.add_argument("--backend", choices=("auto", "cuda", "triton", "torch"), default=None,
                   help="default: GLM_AWQ_BACKEND (auto)")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="glm-awq", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("info", help="print versions, the GPU and which backends run here").set_defaults(func=_info)

    p = sub.add_parser("demo", help="write (once) a tiny GLM-4.6-architecture checkpoint, load it, generate")
    p.add_argument("--prompt", default="Hello, GLM! /nothink")
    p.add_argument("--rebuild", action="store_true", help="rewrite the cached tiny checkpoint")
    _add_run_args(p, max_new_tokens=32)
    p.set_defaults(func=_demo)

    p = sub.add_parser("generate", help="generate text from a checkpoint folder")
    p.add_argument("--model", required=True, help="checkpoint folder (config.json, shards, tokenizer.json)")
    p.add_argument("--prompt", required=True)
    p.add_argument("--no-chat", action="store_true", help="encode the prompt as is, without the chat template")
    p.add_argument("--max-seq-len", type=int, default=4096)
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    _add_run_args(p, max_new_tokens=256)
    p.set_defaults(func=_generate)

    p = sub.add_parser("make-checkpoint", help="write a random-weight checkpoint in the GLM-4.6-AWQ format")
    p.add_argument("out")
    p.add_argument("--layers", type=int, default=4)
    dims = p.add_mutually_exclusive_group()
    dims.add_argument("--tiny", action="store_true", help="toy dimensions (default)")
    dims.add_argument("--real-dims", action="store_true", help="GLM-4.6's real dimensions (about 2 GB per MoE layer)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu", help="where to draw and quantize the weights (cuda is faster)")
    p.add_argument("--shard-mb", type=float, default=4096)
    p.add_argument("--router-dtype", choices=("fp32", "bf16"), default="fp32")
    p.add_argument("--quantize-shared", action="store_true", help="store the shared experts in int4 too")
    p.set_defaults(func=_make_checkpoint)

    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError, FileExistsError, RuntimeError) as exc:
        print(f"glm-awq {args.command}: error: {exc}", file=sys.stderr)
        return 2
