"""The backends behind glm_awq.ops: each prepares weights into its layout and runs the ops on them.

A backend answers `unavailable_reason(device)` (None when it can run there) and implements prepare_linear,
linear, prepare_experts, route and fused_moe. ops.py validates; backends trust their inputs.
"""

from __future__ import annotations

from glm_awq import _ext, env, reference

NAMES = ("cuda", "triton", "torch")


class UnsupportedShape(ValueError):
    """A backend's kernels do not tile this layer's shape. Explicit backend: the error reaches the user, with
    the numbers; backend='auto': the next backend in line prepares the layer instead."""


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

        problem = w4a16_gemm.layout_problem(p.in_features, p.group_size)
        if problem is not None:
            raise UnsupportedShape(f"{problem}: use backend='torch' for this layer")
        p.tensors = w4a16_gemm.prepare(p.tensors["weight_packed"], p.tensors["weight_scale"])
        return p

    def linear(self, x, p):
        from glm_awq.kernels import w4a16_gemm

        t = p.tensors
        return w4a16_gemm.w4a16_gemm(x, t["weight"], t["scale"], p.bias, p.group_size, tickets=t["tickets"])

    def prepare_experts(self, p):
        from glm_awq.kernels import moe, w4a16_gemm

        if p.hidden_size % 128 or p.intermediate_size % 128 or p.group_size % 128:
            raise UnsupportedShape(
                f"the Triton MoE needs H % 128 == 0, I % 128 == 0 and group_size % 128 == 0; got H={p.hidden_size}, "
                f"I={p.intermediate_size}, group_size={p.group_size}: use backend='torch' for these experts"
            )
        t = p.tensors
        w13 = w4a16_gemm.prepare(t["w13_packed"], t["w13_scale"])
        w2 = w4a16_gemm.prepare(t["w2_packed"], t["w2_scale"])
        p.tensors = {"w13": w13["weight"], "w13_scale": w13["scale"], "w2": w2["weight"], "w2_scale": w2["scale"]}
        p.tensors["token_tickets"] = moe.token_tickets(moe.PER_TOKEN_MAX_T, p.hidden_size, p.intermediate_size,
                                                       w13["weight"].device)  # fmt: skip
        return p

    def route(self, logits, bias, top_k, scaling, n_group, topk_group, renormalize):
        from glm_awq.kernels import moe

        return moe.route(logits, bias, top_k, scaling, n_group, topk_group, renormalize)

    def fused_moe(self, x, topk_ids, topk_weights, p, expert_map):
        from glm_awq.kernels import moe

        t = p.tensors
        return moe.fused_moe(
            x, topk_ids, topk_weights, t["w13"], t["w13_scale"], t["w2"], t["w2_scale"], p.group_size, expert_map,
            tickets=t["token_tickets"],
        )


class CudaBackend:
    """glm_awq._C: Marlin-style CUDA C++ kernels (csrc/).

    Linear: weights repacked once on the GPU (glm_awq::repack_int4, scales by quant.repack_scales_for_cuda);
    needs N % 64 == 0, K % 128 == 0 and group_size % 128 == 0, else prepare_linear raises ValueError. The repacked
    weight is settled (prepare_linear synchronizes after writing it, and nothing writes it after), so the skinny
    GEMM may load it before the previous kernel on the stream has finished (w4a16_gemm's weight_settled). Below
    DENSE_FROM_M rows (DENSE_SMALL_FROM_M on small layers; `goes_dense`) the fused GEMM runs; from there the
    weight is dequantized (from the same layout, bit for bit the same weights, rounded once to the activation
    dtype) and a dense bf16/fp16 matmul runs.
    MoE: the Triton routing; up to PER_TOKEN_MAX_T tokens (decode), the layer per token without a sort, in two
    launches (glm_awq::moe_per_token: each token's top-k experts as one GEMM with SiLU*up and the routing weight
    in its epilogue, then one GEMM over the slots' down weights that sums them through split-K); above it, the
    Triton token sort (kernels/moe.py _sort), then two CUDA grouped GEMMs over the sorted token-slots (SiLU*up
    fused into GEMM1, the routing weight into GEMM2) and a deterministic sum over each token's slots
    (glm_awq::moe_gemm, glm_awq::moe_sum). Which kernel takes the sorted slots depends on the slots per expert
    (moe_block_m, moe_split): the skinny kernel's blocks of 8, the wgmma kernel's tiles of 32 or 128 (sm_90), the
    mma.sync tile kernel elsewhere, and around 6-7 slots per expert both of the first two, split by expert size.
    """

    name = "cuda"
    MOE_FALLBACK = "triton"  # routing
    # 0: the kernels' default (skinny where it applies); 1: tile kernel, scales multiplied into B; 2: tile kernel,
    # scales folded per k tile (M <= 16); 3: skinny wherever it runs (dense M <= 16, MoE blocks of 8 and 16 slots;
    # w4a16_skinny.cu); 4: the MoE on the wgmma kernel at every size (blocks of 64; sm_90a, w4a16_wgmma.cu);
    # 5: the MoE per token up to PER_TOKEN_TICKETS_T tokens (moe_per_token), then as 0
    VARIANT = 0
    # The MoE per token (no sort, no slot-sum kernel) up to this many tokens, where the skinny kernel runs. H200,
    # GLM-4.6 layer with routing, against the sort (moe_gemm blocks of 8 + moe_sum) in the same run: T = 1 46.0 vs
    # 57.5 us, T = 2 83.2 vs 89.8, T = 4 133.9 vs 143.3, T = 8 242.6 vs 224.4 (benchmarks/NOTES.md, eleventh session).
    PER_TOKEN_MAX_T = 4
    # GEMM1's (block_n, splits) from two tokens: three splits of 256-wide tiles, several waves (H200, routing
    # excluded: T = 2 73.4 us vs 80.4 with the one-wave auto rule, T = 4 125.1 vs 133.4; T = 1 keeps the auto rule:
    # 43.4 vs 49.9).
    PER_TOKEN_GEMM1 = (256, 3)
    PER_TOKEN_TICKETS_T = 16  # the split-K tickets prepare_experts allocates for it: this many tokens, top_k <= 32
    PER_TOKEN_MAX_TOP_K = 32  # kMaxTopK in csrc/ops.h
    SKINNY_K_MAX = 11648  # the skinny MoE stages [8, K] activations in shared memory (moe_skinny_fits in csrc/)
    SKINNY_SMEM = 200 * 1024  # shared memory per block the skinny kernel is built for (kSkinnySmemMax in csrc/)
    _skinny_ok: dict = {}  # device index -> whether the device gives a block SKINNY_SMEM (set in prepare_experts)
    _wgmma_ok: dict = {}  # device index -> whether moe_gemm's wgmma kernel runs there (set in prepare_experts)
    # Where the wgmma kernel runs, the MoE takes its tiles of 128 slots (blocks of 64) above this many slots per
    # expert, and its tiles of 32 (blocks of 32) above WGMMA_SMALL_FROM_PER_EXPERT up to it. H200, GLM-4.6 layer,
    # routing excluded, same run: T = 512 (25.6 per expert) 964 us for tiles of 32 vs 1149 for tiles of 128, T = 640
    # (32) 1365 vs 1251; T = 160 (8.0) 707 vs 878 for the skinny kernel's blocks of 8, T = 144 (7.2) 684-697 vs
    # 738-823, T = 128 (6.4) 676-765 vs 681-686 (benchmarks/NOTES.md, eighteenth session).
    WGMMA_FROM_PER_EXPERT = 28
    WGMMA_SMALL_FROM_PER_EXPERT = 7
    # Up to this many slots per expert the MoE takes the skinny kernel's blocks of 8, above it the wgmma kernel's tiles
    # of 32 (sm_90) or blocks of 16 (FOLD on 512-wide tiles). H200, GLM-4.6 layer, routing excluded: T = 128 (6.4 per
    # expert) 698.6 us vs 754.6 for blocks of 16, T = 160 (8.0) 847.6 vs 798.8 (benchmarks/NOTES.md, fifteenth
    # session); against the tiles of 32, see WGMMA_FROM_PER_EXPERT's numbers.
    SKINNY_MAX_PER_EXPERT = 7
    # Where both kernels run, the MoE splits its experts by size above SPLIT_FROM_PER_EXPERT and up to
    # SPLIT_TO_PER_EXPERT slots per expert on average: the sort's blocks of 8, experts of at most 8 slots on the
    # skinny kernel (one block each) and the rest on the wgmma kernel's tiles of 32 (moe_gemm variant 6), so that no
    # expert is streamed twice (blocks of 8 give an expert of 9-16 slots two) and no expert of 8 slots or fewer takes
    # a wgmma tile.
    # H200, GLM-4.6 layer with routing, same-run A/B against the rule without it (3 rounds, every split round
    # faster): T = 128 (6.4 per expert) 725.6 -> 658.6 us, T = 136 729.2 -> 673.4, T = 144 705.2 -> 667.8; T = 160
    # (8.0) 694.6 -> 723.7 and T = 96 (4.8, routing excluded) 606.5 -> 626.9 slower: two launches in a row, and the
    # smaller share runs on too few CTAs to fill the GPU (benchmarks/NOTES.md, nineteenth session).
    SPLIT_FROM_PER_EXPERT = 5.5
    SPLIT_TO_PER_EXPERT = 7.5
    # From this many rows, dequantize + dense matmul beats the mma.sync tile kernel (H200: q_proj M=256 90 us vs
    # 151 us; M=128 76 us for the tile kernel; benchmarks/NOTES.md).
    DENSE_FROM_M = 256
    # Layers of at most this many weights go dense from DENSE_SMALL_FROM_M rows: their bf16 copy (<= 16 MB) stays
    # in L2 for the matmul (H100: kv_proj M=64 13.6 us dense vs 16.8 tile; expert down 12.2 vs 15.6; expert
    # gate_up, 15.7 M weights, 23.6 vs 19.4).
    DENSE_SMALL_WEIGHTS = 8 << 20
    DENSE_SMALL_FROM_M = 64

    _reasons: dict = {}  # device type -> answer: ops.route asks on every call, also inside torch.compile

    def unavailable_reason(self, device):
        if device.type not in self._reasons:  # probing _C (an import) once, eagerly, keeps dynamo off it
            reason = _ext.unavailable_reason()
            if reason is None and device.type != "cuda":
                reason = f"the CUDA kernels need tensors on a CUDA device, not {device}"
            self._reasons[device.type] = reason
        return self._reasons[device.type]

    @staticmethod
    def check_linear_shape(n: int, k: int, group_size: int) -> str | None:
        """None when the CUDA GEMM takes an [N, K] layer, else why not (with the numbers)."""
        if n % 64 or k % 128 or group_size % 128:
            return (
                f"the CUDA W4A16 GEMM needs N % 64 == 0, K % 128 == 0 and group_size % 128 == 0; got N={n}, "
                f"K={k}, group_size={group_size}: use backend='triton' for this layer"
            )
        return None

    def prepare_linear(self, p):
        import torch

        from glm_awq import quant

        reason = self.check_linear_shape(p.out_features, p.in_features, p.group_size)
        if reason is not None:
            raise UnsupportedShape(reason)
        t = p.tensors
        weight = _ext.ops().repack_int4(t["weight_packed"])  # [K/16, N/64, 32, 4]
        scale = quant.repack_scales_for_cuda(t["weight_scale"])  # [G, N] as stored
        # Split-K tickets: one per (m tile, n tile) for up to 4 m tiles of 64 columns; the kernel leaves them 0.
        tickets = torch.zeros(4 * (p.out_features // 64), dtype=torch.int32, device=weight.device)
        p.tensors = {"weight": weight, "scale": scale, "tickets": tickets}
        self._cast(p, "scale", torch.bfloat16)
        if p.bias is not None:
            self._cast_bias(p, torch.bfloat16)
        # The repacked weight is now settled: once this stream has finished the repack, no queued or running work
        # writes it, so `linear` may tell the skinny GEMM to read it before the previous kernel finishes
        # (weight_settled; a one-time wait per layer at load).
        torch.cuda.current_stream(weight.device).synchronize()
        return p

    @staticmethod
    def _cast(p, key, dtype):
        """The repacked scale in the activation dtype, made once per dtype and kept with the weights."""
        name = f"{key}.{str(dtype).removeprefix('torch.')}"
        t = p.tensors.get(name)
        if t is None:
            t = p.tensors[name] = p.tensors[key].to(dtype).contiguous()
        return t

    @staticmethod
    def _cast_bias(p, dtype):
        name = f"bias.{str(dtype).removeprefix('torch.')}"
        t = p.tensors.get(name)
        if t is None:
            t = p.tensors[name] = p.bias.to(dtype).contiguous()
        return t

    def linear(self, x, p):
        import torch

        dtype = x.dtype
        x2 = x.reshape(-1, p.in_features)  # [M, K]
        if dtype == torch.float32:  # the kernel takes bf16/fp16 activations
            x2 = x2.to(torch.bfloat16)
        scale = self._cast(p, "scale", x2.dtype)
        bias = None if p.bias is None else self._cast_bias(p, x2.dtype)
        t = p.tensors
        if self.goes_dense(x2.shape[0], p.out_features, p.in_features):  # the weight dequantized, then cuBLAS
            w = torch.ops.glm_awq.dequantize_cuda_layout(t["weight"], scale, p.group_size)  # [N, K]
            y = torch.nn.functional.linear(x2, w, bias)
        else:
            y = torch.ops.glm_awq.w4a16_gemm(
                x2, t["weight"], scale, bias, t["tickets"], p.group_size, 0, 0, self.VARIANT if self.VARIANT < 4 else 0,
                weight_settled=True,  # prepare_linear synchronized after writing it
            )
        return y.reshape(*x.shape[:-1], p.out_features).to(dtype)

    @classmethod
    def goes_dense(cls, m: int, n: int, k: int) -> bool:
        """Whether `linear` dequantizes the weight and runs a dense matmul for M rows, rather than the fused GEMM."""
        return m >= cls.DENSE_FROM_M or (m >= cls.DENSE_SMALL_FROM_M and n * k <= cls.DENSE_SMALL_WEIGHTS)

    # ---------------------------------------------------------------------------------------------- MoE

    @staticmethod
    def gate_up_rows(two_i: int, device):
        """w13 row order for the CUDA MoE: 32 gate rows, then the matching 32 up rows, and so on, so that each
        64-row block of the cuda layout carries gate in n8 blocks 0-3 and up in 4-7 (SiLU*up in registers)."""
        import torch

        i = two_i // 2
        chunk = torch.arange(i // 32, device=device).view(-1, 1, 1) * 32
        half = torch.tensor([0, i], device=device).view(1, 2, 1)
        return (chunk + half + torch.arange(32, device=device).view(1, 1, -1)).reshape(-1)

    def prepare_experts(self, p):
        from glm_awq import quant

        h, i, group = p.hidden_size, p.intermediate_size, p.group_size
        if h % 128 or i % 128 or group % 128:
            raise UnsupportedShape(
                f"the CUDA MoE needs H % 128 == 0, I % 128 == 0 and group_size % 128 == 0; got H={h}, I={i}, "
                f"group_size={group}: use backend='triton' for these experts"
            )
        t = p.tensors
        ops = _ext.ops()
        self.skinny_supported(t["w13_packed"].device)
        self.wgmma_supported(t["w13_packed"].device)
        rows = self.gate_up_rows(2 * i, t["w13_packed"].device)
        p.tensors = {
            "w13": ops.repack_int4(t["w13_packed"][:, rows].contiguous()),  # [E, H/16, 2I/64, 32, 4]
            "w13_scale": quant.repack_scales_for_cuda(t["w13_scale"][:, rows]),  # [E, H/group, 2I]
            "w2": ops.repack_int4(t["w2_packed"]),  # [E, I/16, H/64, 32, 4]
            "w2_scale": quant.repack_scales_for_cuda(t["w2_scale"]),  # [E, I/group, H]
        }
        import torch

        # moe_per_token's split-K tickets (int32 zeros, left zero): one per 64-feature tile of the wider GEMM
        tiles = max(self.PER_TOKEN_MAX_TOP_K * 2 * i, h) // 64
        p.tensors["per_token_tickets"] = torch.zeros(
            self.PER_TOKEN_TICKETS_T * tiles, dtype=torch.int32, device=t["w13_packed"].device
        )
        self._cast(p, "w13_scale", torch.bfloat16)
        self._cast(p, "w2_scale", torch.bfloat16)
        return p

    @classmethod
    def per_token(cls, tokens: int, top_k: int, skinny_ok: bool) -> bool:
        """Whether fused_moe runs these tokens through moe_per_token (the skinny kernel's device only)."""
        limit = {5: cls.PER_TOKEN_TICKETS_T, 0: min(cls.PER_TOKEN_MAX_T, cls.PER_TOKEN_TICKETS_T)}.get(cls.VARIANT, 0)
        return skinny_ok and tokens <= limit and top_k <= cls.PER_TOKEN_MAX_TOP_K

    def route(self, logits, bias, top_k, scaling, n_group, topk_group, renormalize):
        return _BACKENDS[self.MOE_FALLBACK].route(logits, bias, top_k, scaling, n_group, topk_group, renormalize)

    @classmethod
    def skinny_supported(cls, device) -> bool:
        """Whether `device` runs the skinny kernel: a block must opt into SKINNY_SMEM of shared memory (sm_90 and
        sm_100 can; sm_80 / 86 / 89 / 120 cannot and use the tile kernel). Asked eagerly by prepare_experts, so
        that fused_moe only reads a dict (also under torch.compile)."""
        import torch

        ok = cls._skinny_ok.get(device.index)
        if ok is None:
            props = torch.cuda.get_device_properties(device)
            optin = getattr(props, "shared_memory_per_block_optin", None)
            ok = optin >= cls.SKINNY_SMEM if optin is not None else props.major in (9, 10)
            cls._skinny_ok[device.index] = ok
        return ok

    @classmethod
    def wgmma_supported(cls, device) -> bool:
        """Whether moe_gemm's wgmma kernel runs on `device` with this build (sm_90 and sm_90a code). Asked eagerly
        by prepare_experts, like skinny_supported."""
        ok = cls._wgmma_ok.get(device.index)
        if ok is None:
            from glm_awq import _C  # loaded: prepare_experts has called _ext.ops()

            ok = cls._wgmma_ok[device.index] = bool(_C.wgmma_supported(device.index))
        return ok

    @staticmethod
    def _per_expert(slots: int, experts: int) -> float:
        """Slots per touched expert on average (at most `experts` of them are touched)."""
        return slots / max(1, min(experts, slots))

    @classmethod
    def moe_block_m(cls, slots: int, experts: int, k_max: int, skinny_ok: bool = True, wgmma_ok: bool = False) -> int:
        """Rows per expert block: 8 (the skinny kernel, where the device runs it) while the touched experts
        average <= SKINNY_MAX_PER_EXPERT slots; where the device runs the wgmma kernel, 64 above
        WGMMA_FROM_PER_EXPERT and 32 (its small tiles) above WGMMA_SMALL_FROM_PER_EXPERT; else that average rounded
        up to 16, at most 64 (the tile kernel; 16 runs skinny under VARIANT 3, 64 and 32 take the wgmma kernel where
        it runs)."""
        if cls.VARIANT == 4:  # the wgmma kernel on request: its tiles of 128 slots (blocks of 64)
            return 64
        per_expert = cls._per_expert(slots, experts)
        skinny = skinny_ok and cls.VARIANT in (0, 3, 5) and k_max <= cls.SKINNY_K_MAX
        if skinny and per_expert <= cls.SKINNY_MAX_PER_EXPERT:
            return 8
        if wgmma_ok and cls.VARIANT in (0, 5):
            if per_expert > cls.WGMMA_FROM_PER_EXPERT:
                return 64
            if per_expert > cls.WGMMA_SMALL_FROM_PER_EXPERT:
                return 32
        return 16 * min(4, max(1, -(-int(per_expert) // 16)))

    @classmethod
    def moe_split(cls, slots: int, experts: int, k_max: int, skinny_ok: bool, wgmma_ok: bool) -> bool:
        """Whether the sorted MoE splits its experts between the skinny and the wgmma kernel: where both run, from
        SPLIT_FROM_PER_EXPERT to SPLIT_TO_PER_EXPERT slots per expert on average (moe_gemm variant 6)."""
        per_expert = cls._per_expert(slots, experts)
        return (skinny_ok and wgmma_ok and cls.VARIANT in (0, 5) and k_max <= cls.SKINNY_K_MAX
                and cls.SPLIT_FROM_PER_EXPERT < per_expert <= cls.SPLIT_TO_PER_EXPERT)  # fmt: skip

    def fused_moe(self, x, topk_ids, topk_weights, p, expert_map):
        import torch

        from glm_awq.kernels import moe as triton_moe  # the token sort (no host sync) is shared with Triton

        dtype = x.dtype
        xx = x.to(torch.bfloat16) if dtype == torch.float32 else x  # [T, H]
        tokens, top_k = topk_ids.shape
        slots = tokens * top_k
        if slots == 0:
            return torch.zeros_like(x)
        # Under expert parallelism only this GPU's share of the slots lands here (expected: E_local / E_global).
        local_slots = slots if expert_map is None else max(1, slots * p.num_experts // expert_map.numel())
        skinny_ok = self._skinny_ok.get(x.device.index, False)  # filled by prepare_experts on this device
        t = p.tensors
        ops = torch.ops.glm_awq
        if expert_map is not None:
            expert_map = expert_map.to(torch.int32).contiguous()
        if self.per_token(tokens, top_k, skinny_ok):
            s13, s2 = self._cast(p, "w13_scale", xx.dtype), self._cast(p, "w2_scale", xx.dtype)
            ids, weights = topk_ids.to(torch.int32).contiguous(), topk_weights.float().contiguous()
            bn1, s1 = self.PER_TOKEN_GEMM1 if tokens > 1 else (0, 0)  # 2I is a multiple of 256 (prepare_experts)
            out = ops.moe_per_token(xx, t["w13"], s13, t["w2"], s2, ids, weights, expert_map,
                                    t["per_token_tickets"], p.group_size, bn1, s1)  # fmt: skip
            return out.to(dtype)
        wgmma_ok = self._wgmma_ok.get(x.device.index, False)
        k_max = max(p.hidden_size, p.intermediate_size)
        split = self.moe_split(local_slots, p.num_experts, k_max, skinny_ok, wgmma_ok)
        block_m = 8 if split else self.moe_block_m(local_slots, p.num_experts, k_max, skinny_ok, wgmma_ok)
        sort = triton_moe._sort(topk_ids.reshape(-1), expert_map, p.num_experts, block_m)
        sorted_slots, counts, local = sort[0], sort[1], sort[2]  # [blocks * block_m], [E], [S]
        weights = topk_weights.reshape(-1).float().contiguous()  # [S]
        s13, s2 = self._cast(p, "w13_scale", xx.dtype), self._cast(p, "w2_scale", xx.dtype)
        v = 6 if split else self.VARIANT if self.VARIANT != 5 else 0  # 5 is 0 beyond the per-token path
        h = ops.moe_gemm(xx, t["w13"], s13, sorted_slots, counts, weights, top_k, block_m, 1, p.group_size, v)  # [S, I]
        y = ops.moe_gemm(h, t["w2"], s2, sorted_slots, counts, weights, top_k, block_m, 2, p.group_size, v)  # [S, H]
        return ops.moe_sum(y, local, top_k).to(dtype)  # [T, H]


_BACKENDS = {b.name: b for b in (CudaBackend(), TritonBackend(), TorchBackend())}


def get(name: str):
    return _BACKENDS[name]


def auto_candidates(device) -> list[str]:
    """`auto`, in order of preference on `device`: cuda, then triton on a GPU; torch always last. On the CPU the
    references beat the Triton interpreter, which exists for tests."""
    names = [n for n in ("cuda", "triton") if device.type == "cuda" and _BACKENDS[n].unavailable_reason(device) is None]
    return [*names, "torch"]
