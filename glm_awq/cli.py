"""The glm-awq command line: info (and, with the model issue, demo, generate, make-checkpoint)."""

from __future__ import annotations

import argparse
import platform

import torch


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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="glm-awq", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("info", help="print versions, the GPU and which backends run here").set_defaults(func=_info)
    args = parser.parse_args(argv)
    return args.func(args)
