"""The GLM-4.6 forward module: flat PyTorch, built on `meta` and filled by glm_awq.loader.

Module names are the checkpoint's names (`model.layers.N.self_attn.q_proj`, ...), so the loader maps a tensor to
its module by name. Quantized weights live in `Linear.prepared` / `Experts.prepared` (glm_awq.ops objects, in
the backend's layout, prepared once at load); every int4 matmul goes through glm_awq.ops, so the model runs on
whichever backend prepared its weights. Projections that read the same input (q/k/v, gate/up) and are all int4
are merged by the loader into one `MergedLinear` (`qkv_proj`, `gate_up_proj`; see `install_merged`): one
kernel launch instead of three or two per decode step.

Legend: B batch, T tokens in this call, S cache length (max_seq_len), H hidden, Q query heads, KV key/value
heads, D head_dim, R rotary dims, V vocab, E routed experts, A active experts per token, I expert intermediate.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from glm_awq import ops
from glm_awq.config import GlmConfig


def _empty(*shape: int, dtype: torch.dtype) -> nn.Parameter:
    return nn.Parameter(torch.empty(*shape, dtype=dtype), requires_grad=False)


class Linear(nn.Module):
    """y = x @ W^T (+ b), W either a float `weight` [N, K] or an int4 `prepared` (ops.PreparedLinear).

    Built with a float `weight`; the loader calls `set_prepared` when the checkpoint stores `weight_packed`.
    `fused` (GlmForCausalLM.use_fused_kernels) runs a float weight at decode sizes on the Triton skinny kernel
    (glm_awq.kernels.dense), with split-K `tickets` kept here.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool, dtype: torch.dtype):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.weight = _empty(out_features, in_features, dtype=dtype)
        self.bias = _empty(out_features, dtype=dtype) if bias else None
        self.prepared: ops.PreparedLinear | None = None
        self.fused = False
        self.register_buffer("tickets", None, persistent=False)  # follows the module to another device

    def set_prepared(self, prepared: ops.PreparedLinear) -> None:
        """Switch to the int4 path; the bias now lives in `prepared`."""
        self.prepared = prepared
        self.weight = None
        self.bias = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.prepared is not None:
            return ops.w4a16_linear(x, self.prepared)
        if self.fused and (dense := _dense_kernels()).takes(x, self.weight):
            return dense.linear(x, self.weight, self.bias, self.tickets)
        return F.linear(x, self.weight, self.bias)

    def set_fused(self, enabled: bool) -> None:
        self.fused = enabled and self.weight is not None and _dense_kernels().runs_on(self.weight.device)
        if self.fused:
            self.tickets = _tickets(self.tickets, self.out_features, self.weight.device)

    def extra_repr(self) -> str:
        kind = f"int4 {self.prepared.backend}" if self.prepared is not None else "float"
        return f"{self.in_features} -> {self.out_features}, {kind}"


def _tickets(current: torch.Tensor | None, n: int, device: torch.device) -> torch.Tensor:
    """Split-K tickets of the float skinny kernel for n output features on device (kept if already there)."""
    if current is not None and current.device == device:
        return current
    return _dense_kernels().tickets_for(n, device)


def _stacked(gate: torch.Tensor | None, up: torch.Tensor | None) -> torch.Tensor | None:
    """[gate; up] as one [2 I, K] tensor without a copy when up's memory directly follows gate's (MLP.set_fused
    makes it so), else None: a weight replaced or moved since then breaks the adjacency, and the eager path runs."""
    if gate is None or up is None or gate.shape != up.shape or gate.dtype != up.dtype or gate.device != up.device:
        return None
    if not (gate.is_contiguous() and up.is_contiguous()) or gate.dim() != 2:
        return None
    if up.untyped_storage().data_ptr() != gate.untyped_storage().data_ptr():
        return None
    if up.data_ptr() != gate.data_ptr() + gate.numel() * gate.element_size():
        return None
    rows, k = gate.shape
    return gate.detach().as_strided((2 * rows, k), (k, 1))


class MergedLinear(nn.Module):
    """Sibling int4 projections of one input as one linear: y = x @ [W_a; W_b; ...]^T (+ [b_a; b_b; ...]),
    returned split into the parts' outputs (views, no copies). Built by the loader from the parts' checkpoint
    tensors concatenated along N, so every backend's layout takes it unchanged."""

    def __init__(self, parts: dict[str, int], prepared: ops.PreparedLinear):
        super().__init__()
        self.parts = parts  # checkpoint name -> out_features, in output order
        self.prepared = prepared

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return ops.w4a16_linear(x, self.prepared).split(list(self.parts.values()), dim=-1)

    def extra_repr(self) -> str:
        parts = " + ".join(f"{name} {n}" for name, n in self.parts.items())
        return f"{self.prepared.in_features} -> {parts}, int4 {self.prepared.backend}"


def install_merged(parent: nn.Module, merged: str, prepared: ops.PreparedLinear) -> None:
    """Replace parent's Linears `parent.MERGES[merged]` by one MergedLinear `merged` holding `prepared`, whose
    N is theirs concatenated in that order."""
    parts = parent.MERGES[merged]
    setattr(parent, merged, MergedLinear({p: getattr(parent, p).out_features for p in parts}, prepared))
    for p in parts:
        delattr(parent, p)


class RMSNorm(nn.Module):
    """x * rsqrt(mean(x^2) + eps) computed in fp32, cast back to x's dtype, then times the weight.

    `fused` (set by GlmForCausalLM.use_fused_kernels): one Triton kernel (glm_awq.kernels.norm) instead of the
    eager ops, which `residual_forward` also folds the residual add into."""

    def __init__(self, dim: int, eps: float, dtype: torch.dtype):
        super().__init__()
        self.eps = eps
        self.weight = _empty(dim, dtype=dtype)
        self.fused = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.fused:
            return _norm_kernels().rms_norm(x, self.weight, self.eps)
        xf = x.float()
        y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return y.to(x.dtype) * self.weight

    def residual_forward(self, x: torch.Tensor, residual: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(norm(x + residual), x + residual)."""
        if self.fused:
            return _norm_kernels().rms_norm(x, self.weight, self.eps, residual=residual)
        h = residual + x
        return self(h), h


def _norm_kernels():
    """glm_awq.kernels.norm, imported on first use (Triton is only needed once fused kernels are switched on)."""
    from glm_awq.kernels import norm

    return norm


def _dense_kernels():
    """glm_awq.kernels.dense, imported on first use, like _norm_kernels."""
    from glm_awq.kernels import dense

    return dense


def _attention_kernels():
    """glm_awq.kernels.attention, imported on first use, like _norm_kernels."""
    from glm_awq.kernels import attention

    return attention


def rope_tables(config: GlmConfig, max_seq_len: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin fp32 [S, R/2]: inv_freq = theta^(-arange(0, R, 2) / R), angle = position * inv_freq."""
    r = config.rotary_dim
    inv_freq = 1.0 / config.rope_theta ** (torch.arange(0, r, 2, dtype=torch.float64, device=device) / r)
    angles = torch.arange(max_seq_len, dtype=torch.float64, device=device)[:, None] * inv_freq  # [S, R/2]
    return angles.cos().float(), angles.sin().float()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Partial NeoX-style RoPE on x [B, T, heads, D] with cos/sin [T, R/2]: dims 0..R-1 rotate, dim i pairing
    with i + R/2 (rotate_half, not interleaved); dims R..D-1 pass through. Computed in fp32."""
    r = cos.shape[-1] * 2
    x1, x2 = x[..., : r // 2].float(), x[..., r // 2 : r].float()
    cos, sin = cos[:, None, :], sin[:, None, :]  # [T, 1, R/2] broadcast over heads
    rotated = torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1).to(x.dtype)
    return torch.cat([rotated, x[..., r:]], dim=-1)


class KVCache(nn.Module):
    """Preallocated keys and values [B, KV, S, D]; written in place at tensor positions (CUDA-graph safe)."""

    def __init__(self, batch: int, kv_heads: int, max_seq_len: int, head_dim: int, dtype, device):
        super().__init__()
        shape = (batch, kv_heads, max_seq_len, head_dim)
        self.register_buffer("k", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("v", torch.zeros(shape, dtype=dtype, device=device), persistent=False)

    def update(self, input_pos: torch.Tensor, k: torch.Tensor, v: torch.Tensor):
        """input_pos int64 [T]; k, v [B, KV, T, D] -> the whole cache (k, v) [B, KV, S, D]."""
        self.k.index_copy_(2, input_pos, k)
        self.v.index_copy_(2, input_pos, v)
        return self.k, self.v


class Attention(nn.Module):
    MERGES = {"qkv_proj": ("q_proj", "k_proj", "v_proj")}  # see install_merged

    def __init__(self, config: GlmConfig, dtype: torch.dtype):
        super().__init__()
        h, d = config.hidden_size, config.head_dim
        self.n_heads, self.n_kv_heads, self.head_dim = config.num_attention_heads, config.num_key_value_heads, d
        bias = config.attention_bias  # q/k/v only: o_proj never has one in GLM-4.6
        self.q_proj = Linear(h, self.n_heads * d, bias, dtype)
        self.k_proj = Linear(h, self.n_kv_heads * d, bias, dtype)
        self.v_proj = Linear(h, self.n_kv_heads * d, bias, dtype)
        self.o_proj = Linear(self.n_heads * d, h, False, dtype)
        self.qkv_proj: MergedLinear | None = None
        if config.use_qk_norm:
            self.q_norm = RMSNorm(d, config.rms_norm_eps, dtype)
            self.k_norm = RMSNorm(d, config.rms_norm_eps, dtype)
        else:
            self.q_norm = self.k_norm = None
        self.kv_cache: KVCache | None = None
        self.fused = False  # see GlmForCausalLM.use_fused_kernels

    def forward(self, x, cos, sin, input_pos=None, mask=None):
        """x [B, T, H]; cos/sin [T, R/2]; input_pos int64 [T] and mask bool [T, S] when writing the KV cache."""
        b, t, _ = x.shape
        # merged: views into one [B, T, Q*D + 2*KV*D] output, contiguous at B*T = 1 (decode); norm_rope copies
        # q and k to contiguous rows otherwise
        q, k, v = self.qkv_proj(x) if self.qkv_proj is not None else (self.q_proj(x), self.k_proj(x), self.v_proj(x))
        q = q.view(b, t, self.n_heads, self.head_dim)
        k = k.view(b, t, self.n_kv_heads, self.head_dim)
        v = v.view(b, t, self.n_kv_heads, self.head_dim)
        if self.fused and (norm := _norm_kernels()).norm_rope_supported(self.head_dim, 2 * cos.shape[-1]):
            # per-head norm and RoPE in one kernel each (glm_awq.kernels.norm); other head sizes stay eager
            has_norm = self.q_norm is not None
            eps = self.q_norm.eps if has_norm else 0.0  # q_norm and k_norm share rms_norm_eps
            q = norm.norm_rope(q, self.q_norm.weight if has_norm else None, eps, cos, sin)
            k = norm.norm_rope(k, self.k_norm.weight if has_norm else None, eps, cos, sin)
        else:
            if self.q_norm is not None:
                q, k = self.q_norm(q), self.k_norm(k)
            q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # [B, heads, T, D]
        if input_pos is None:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
        else:
            k, v = self.kv_cache.update(input_pos, k, v)  # [B, KV, S, D]
            if self.fused and (attn := _attention_kernels()).decode_supported(self.n_heads, self.n_kv_heads, t,
                                                                              self.head_dim):  # fmt: skip
                # decode: the cache split over all SMs, tiles past the position skipped (glm_awq.kernels.attention)
                y = attn.decode_attention(q, k, v, mask)
            else:
                # Fold the rep = Q/KV query heads of each kv head into the query rows ([B, KV, rep*T, D]; query
                # head kv*rep + r serves as row r*T + t), so a masked SDPA kernel reads each cached k/v once
                # instead of the rep-times-expanded copy SDPA's enable_gqa builds when a mask rules out flash.
                rep = self.n_heads // self.n_kv_heads
                q = q.reshape(b, self.n_kv_heads, rep * t, self.head_dim)
                y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask.repeat(rep, 1))
                y = y.view(b, self.n_heads, t, self.head_dim)
        return self.o_proj(y.transpose(1, 2).reshape(b, t, self.n_heads * self.head_dim))


class MLP(nn.Module):
    """SwiGLU: down(silu(gate(x)) * up(x)). The dense layers' MLP and the MoE layers' shared expert."""

    MERGES = {"gate_up_proj": ("gate_proj", "up_proj")}  # see install_merged

    def __init__(self, hidden: int, intermediate: int, dtype: torch.dtype):
        super().__init__()
        self.gate_proj = Linear(hidden, intermediate, False, dtype)
        self.up_proj = Linear(hidden, intermediate, False, dtype)
        self.down_proj = Linear(intermediate, hidden, False, dtype)
        self.gate_up_proj: MergedLinear | None = None
        # float gate and up under use_fused_kernels (`fused`): their weights are halves of one [2 I, H] tensor
        # (_stacked), for the skinny kernel's fused SiLU(gate) * up (glm_awq.kernels.dense.swiglu)
        self.fused = False
        self.register_buffer("gate_up_tickets", None, persistent=False)

    def forward(self, x):
        if self.gate_up_proj is not None:
            gate, up = self.gate_up_proj(x)
        elif (
            self.fused and (merged := _stacked(self.gate_proj.weight, self.up_proj.weight)) is not None
            and (dense := _dense_kernels()).takes(x, merged)
        ):  # fmt: skip
            return self.down_proj(dense.swiglu(x, merged, self.gate_up_tickets))
        else:
            gate, up = self.gate_proj(x), self.up_proj(x)
        return self.down_proj(F.silu(gate) * up)

    def set_fused(self, enabled: bool) -> None:
        """Put float gate/up weights in one tensor once (each becomes a view of its half: no extra memory)."""
        self.fused = False
        if not enabled or self.gate_up_proj is not None:  # int4, merged (gate_proj and up_proj are gone)
            return
        gate, up = self.gate_proj.weight, self.up_proj.weight
        if gate is None or up is None or gate.shape != up.shape or not _dense_kernels().runs_on(gate.device):
            return  # int4 prepared one by one, or no Triton where the weights are
        self.fused = True
        if _stacked(gate, up) is None:
            merged = torch.cat([gate.detach(), up.detach()])
            self.gate_proj.weight = nn.Parameter(merged[: gate.shape[0]], requires_grad=False)
            self.up_proj.weight = nn.Parameter(merged[gate.shape[0] :], requires_grad=False)
        self.gate_up_tickets = _tickets(self.gate_up_tickets, gate.shape[0], gate.device)


class Router(nn.Module):
    """`mlp.gate`: weight fp32 [E, H] (stored bf16 or fp32), e_score_correction_bias fp32 [E]."""

    def __init__(self, config: GlmConfig):
        super().__init__()
        self.weight = _empty(config.n_routed_experts, config.hidden_size, dtype=torch.float32)
        self.e_score_correction_bias = _empty(config.n_routed_experts, dtype=torch.float32)


class Experts(nn.Module):
    """The E routed experts of one layer, stacked by the loader into an ops.PreparedExperts
    (w13 = [gate; up] int32 [E, 2I, H/8], w2 = down int32 [E, H, I/8])."""

    def __init__(self, config: GlmConfig):
        super().__init__()
        self.num_experts = config.n_routed_experts
        self.hidden_size, self.intermediate_size = config.hidden_size, config.moe_intermediate_size
        self.prepared: ops.PreparedExperts | None = None

    def extra_repr(self) -> str:
        backend = self.prepared.backend if self.prepared is not None else "not loaded"
        return f"E={self.num_experts}, H={self.hidden_size}, I={self.intermediate_size}, int4 {backend}"


class MoE(nn.Module):
    def __init__(self, config: GlmConfig, dtype: torch.dtype):
        super().__init__()
        self.config = config
        self.gate = Router(config)
        self.experts = Experts(config)
        n = config.shared_intermediate_size
        self.shared_experts = MLP(config.hidden_size, n, dtype) if n else None

    def forward(self, x):
        c = self.config
        xt = x.reshape(-1, x.shape[-1])  # [T, H]
        logits = F.linear(xt.float(), self.gate.weight)  # [T, E] fp32
        ids, weights = ops.route(
            logits, self.gate.e_score_correction_bias, c.num_experts_per_tok, c.routed_scaling_factor,
            c.n_group, c.topk_group, renormalize=c.norm_topk_prob, backend=self.experts.prepared.backend,
        )  # fmt: skip
        y = ops.fused_moe(xt, ids, weights, self.experts.prepared)  # [T, H]
        if self.shared_experts is not None:
            y = y + self.shared_experts(xt)
        return y.view(x.shape)


class Block(nn.Module):
    def __init__(self, config: GlmConfig, layer: int, dtype: torch.dtype):
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps, dtype)
        self.self_attn = Attention(config, dtype)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps, dtype)
        if config.is_moe_layer(layer):
            self.mlp = MoE(config, dtype)
        else:
            self.mlp = MLP(config.hidden_size, config.intermediate_size, dtype)

    def forward(self, x, cos, sin, input_pos=None, mask=None):
        normed, h = self.post_attention_layernorm.residual_forward(
            self.self_attn(self.input_layernorm(x), cos, sin, input_pos, mask), x
        )
        return h + self.mlp(normed)


class Embedding(nn.Module):
    def __init__(self, vocab: int, dim: int, dtype: torch.dtype):
        super().__init__()
        self.weight = _empty(vocab, dim, dtype=dtype)

    def forward(self, ids):
        return F.embedding(ids, self.weight)


class GlmModel(nn.Module):
    def __init__(self, config: GlmConfig, dtype: torch.dtype):
        super().__init__()
        self.embed_tokens = Embedding(config.vocab_size, config.hidden_size, dtype)
        self.layers = nn.ModuleList(Block(config, i, dtype) for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps, dtype)


class GlmForCausalLM(nn.Module):
    """GLM-4.6. `model(input_ids)` -> fp32 logits [B, T, V] for a full causal prefill without a cache.

    With `input_pos` (int64 [T], the positions of input_ids' columns) the call reads and writes the KV cache
    set up by `setup_caches`; `generate` / `generate_stream` drive that (see glm_awq.generate).
    """

    def __init__(self, config: GlmConfig, dtype: torch.dtype = torch.bfloat16):
        super().__init__()
        self.config, self.dtype = config, dtype
        self.model = GlmModel(config, dtype)
        self.lm_head = Linear(config.hidden_size, config.vocab_size, False, dtype)
        self.max_seq_len = 0
        self.checkpoint_dir = None  # set by the loader; generate_text finds the tokenizer there
        self.load_stats: dict = {}
        self._decoders: dict = {}  # per batch size, see glm_awq.generate

    # ------------------------------------------------------------------------------------------ buffers

    def setup_rope(self, max_seq_len: int, device) -> None:
        cos, sin = rope_tables(self.config, max_seq_len, device)
        self.register_buffer("rope_cos", cos, persistent=False)  # [S, R/2]
        self.register_buffer("rope_sin", sin, persistent=False)
        self.register_buffer("cache_positions", torch.arange(max_seq_len, device=device), persistent=False)  # [S]
        self.max_seq_len = max_seq_len

    @torch.inference_mode(False)  # normal tensors, so eager calls outside inference mode may write them too
    def setup_caches(self, batch_size: int) -> None:
        """Allocate a KV cache [B, KV, S, D] per layer (S = max_seq_len); drops captured decode graphs."""
        c, device = self.config, self.rope_cos.device
        for block in self.model.layers:
            block.self_attn.kv_cache = KVCache(
                batch_size, c.num_key_value_heads, self.max_seq_len, c.head_dim, self.dtype, device
            )
        self._decoders.clear()

    @property
    def cache_batch_size(self) -> int | None:
        cache = self.model.layers[0].self_attn.kv_cache
        return None if cache is None else cache.k.shape[0]

    @property
    def device(self) -> torch.device:
        return self.rope_cos.device

    def use_fused_kernels(self, enabled: bool = True) -> None:
        """Run the RMSNorms (with the residual add before the post-attention one) and the q/k norm + RoPE as
        fused Triton kernels (glm_awq.kernels.norm), attention over the KV cache at decode as a split-KV
        kernel (glm_awq.kernels.attention), and the float linears at decode sizes on the skinny kernel
        (glm_awq.kernels.dense; a float SwiGLU's gate and up weights are put in one tensor for it, once),
        instead of eager torch ops, SDPA and cuBLAS. The loader turns this on when
        the int4 weights are on a Triton or CUDA backend; the torch backend keeps the eager reference."""
        for m in self.modules():
            if isinstance(m, (RMSNorm, Attention)):
                m.fused = enabled
            elif isinstance(m, (Linear, MLP)):
                m.set_fused(enabled)
        self._decoders.clear()  # captured graphs hold the old kernels

    def backends(self) -> list[str]:
        """Backends of the prepared int4 weights, e.g. ['torch']."""
        found = {m.prepared.backend for m in self.modules() if getattr(m, "prepared", None) is not None}
        return sorted(found)

    # ------------------------------------------------------------------------------------------ forward

    def forward(self, input_ids: torch.Tensor, input_pos: torch.Tensor | None = None, last_only: bool = False):
        """input_ids int [B, T] -> fp32 logits [B, T, V] ([B, 1, V] with last_only)."""
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids must be [B, T], got shape {tuple(input_ids.shape)}")
        t = input_ids.shape[1]
        if input_pos is None:
            if t > self.max_seq_len:
                raise ValueError(f"{t} tokens exceed max_seq_len={self.max_seq_len}; load with a larger max_seq_len")
            cos, sin, mask = self.rope_cos[:t], self.rope_sin[:t], None
        else:
            if self.model.layers[0].self_attn.kv_cache is None:
                raise RuntimeError("input_pos needs the KV cache: call model.setup_caches(batch_size) first")
            cos, sin = self.rope_cos[input_pos], self.rope_sin[input_pos]
            mask = self.cache_positions[None, :] <= input_pos[:, None]  # [T, S]: causal over the cache
        x = self.model.embed_tokens(input_ids)
        for block in self.model.layers:
            x = block(x, cos, sin, input_pos, mask)
        if last_only:
            x = x[:, -1:]
        return self.lm_head(self.model.norm(x)).float()

    # --------------------------------------------------------------------------------------- generation

    def generate(self, input_ids, max_new_tokens: int, **kwargs) -> torch.Tensor:
        """New token ids int64 [B, n <= max_new_tokens]; see glm_awq.generate.generate for the options."""
        from glm_awq.generate import generate

        return generate(self, input_ids, max_new_tokens, **kwargs)

    def generate_stream(self, input_ids, max_new_tokens: int, **kwargs):
        """Yields each step's new token ids int64 [B]; see glm_awq.generate.generate_stream."""
        from glm_awq.generate import generate_stream

        return generate_stream(self, input_ids, max_new_tokens, **kwargs)
