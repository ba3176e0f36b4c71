"""The backends behind glm_awq.ops: each prepares weights into its layout and runs the ops on them.

A backend answers `unavailable_reason(device)` (None when it can run there) and implements prepare_linear,
linear, prepare_experts, route and fused_moe. ops.py validates; backends trust their inputs.
"""

from __future__ import annotations

from glm_awq import _ext, env, reference

NAMES = ("cuda", "triton", "torch")


class TorchBackend:
    """The pure-torch references (fp32 math). Runs anywhere; the CPU path and every test's oracle."""

    name = "torch"

    def unavailable_reason(self, device):
        return None

    def prepare_linear(self, p):
        return p

    def linear(self, x, p):
        t = p.tensors
        return reference.w4a16_linear_ref(x, t["weight_packed"], t["weight_scale"], p.bias, p.group_size)

    def prepare_experts(self, p):
        return p

    def route(self, logits, bias, top_k, scaling, n_group, topk_group, renormalize):
        return reference.route_ref(logits, bias, top_k, scaling, n_group, topk_group, renormalize)

    def fused_moe(self, x, topk_ids, topk_weights, p, expert_map):
        t = p.tensors
        return reference.fused_moe_ref(
            x, topk_ids, topk_weights, t["w13_packed"], t["w13_scale"], t["w2_packed"], t["w2_scale"],
            p.group_size, expert_map,
        )  # fmt: skip


class TritonBackend:
    """glm_awq.kernels: Triton on any CUDA GPU, or on the CPU under TRITON_INTERPRET=1 (tests)."""

    name = "triton"

    def unavailable_reason(self, device):
        try:
            import triton  # noqa: F401
        except ImportError as exc:
            return f"triton is not installed ({exc}); pip install triton (Linux)"
        if device.type == "cuda" or (device.type == "cpu" and env.triton_interpret()):
            return None
        return f"Triton runs on CUDA devices (or on the CPU under TRITON_INTERPRET=1, for tests), not {device}"

    def prepare_linear(self, p):
        from glm_awq.kernels import w4a16_gemm

        p.tensors = w4a16_gemm.prepare(p.tensors["weight_packed"], p.tensors["weight_scale"])
        return p

    def linear(self, x, p):
        from glm_awq.kernels import w4a16_gemm

        return w4a16_gemm.w4a16_gemm(x, p.tensors["weight"], p.tensors["scale"], p.bias, p.group_size)

    def prepare_experts(self, p):
        from glm_awq.kernels import w4a16_gemm

        t = p.tensors
        w13 = w4a16_gemm.prepare(t["w13_packed"], t["w13_scale"])
        w2 = w4a16_gemm.prepare(t["w2_packed"], t["w2_scale"])
        p.tensors = {"w13": w13["weight"], "w13_scale": w13["scale"], "w2": w2["weight"], "w2_scale": w2["scale"]}
        return p

    def route(self, logits, bias, top_k, scaling, n_group, topk_group, renormalize):
        from glm_awq.kernels import moe

        return moe.route(logits, bias, top_k, scaling, n_group, topk_group, renormalize)

    def fused_moe(self, x, topk_ids, topk_weights, p, expert_map):
        from glm_awq.kernels import moe

        t = p.tensors
        return moe.fused_moe(
            x, topk_ids, topk_weights, t["w13"], t["w13_scale"], t["w2"], t["w2_scale"], p.group_size, expert_map
        )


class CudaBackend:
    """glm_awq._C: Marlin-style CUDA C++ kernels (csrc/)."""

    name = "cuda"

    def unavailable_reason(self, device):
        reason = _ext.unavailable_reason()
        if reason is not None:
            return reason
        if device.type != "cuda":
            return f"the CUDA kernels need tensors on a CUDA device, not {device}"
        return "the CUDA GEMM and MoE kernels are not written yet (issue 5)"


_BACKENDS = {b.name: b for b in (CudaBackend(), TritonBackend(), TorchBackend())}


def get(name: str):
    return _BACKENDS[name]


def auto_backend(device, kind: str) -> str:
    """`auto`: the fastest backend that runs on `device` (cuda, then triton, then torch)."""
    if device.type == "cuda":
        for name in ("cuda", "triton"):
            if _BACKENDS[name].unavailable_reason(device) is None:
                return name
    return "torch"  # on the CPU the references beat the Triton interpreter, which exists for tests
