"""GLM-4.6 (model_type glm4_moe) configuration, read from a checkpoint's config.json.

Accepts the v4 keys GLM-4.6 ships (`rope_theta`, `partial_rotary_factor` at the top level) and the v5
`rope_parameters` dict, and validates the compressed-tensors `quantization_config` (pack-quantized, 4-bit int,
symmetric, group strategy). Anything else is rejected with an error that names the key and the value.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

from glm_awq import quant

# Keys this module understands; other keys in config.json are ignored (they do not change the forward pass).
_DEFAULT_EOS = (151329, 151336, 151338)


@dataclass(frozen=True)
class GlmConfig:
    vocab_size: int = 151552
    hidden_size: int = 5120  # H
    intermediate_size: int = 12288  # dense MLP of layers 0..first_k_dense_replace-1
    moe_intermediate_size: int = 1536  # I, per routed expert
    num_hidden_layers: int = 92
    num_attention_heads: int = 96
    num_key_value_heads: int = 8
    head_dim: int = 128
    n_routed_experts: int = 160  # E
    n_shared_experts: int = 1
    num_experts_per_tok: int = 8  # A
    first_k_dense_replace: int = 3
    n_group: int = 1
    topk_group: int = 1
    norm_topk_prob: bool = True
    routed_scaling_factor: float = 2.5
    rms_norm_eps: float = 1e-5
    rope_theta: float = 1e6
    partial_rotary_factor: float = 0.5
    attention_bias: bool = True
    use_qk_norm: bool = True
    max_position_embeddings: int = 202752
    tie_word_embeddings: bool = False
    num_nextn_predict_layers: int = 1  # MTP layers stored after the last layer; glm_awq ignores them
    eos_token_id: tuple[int, ...] = _DEFAULT_EOS
    pad_token_id: int | None = None
    group_size: int | None = 128  # None: no quantization_config (an all-bf16 checkpoint)
    quantization_config: dict | None = field(default=None, compare=False, repr=False)

    # ------------------------------------------------------------------------------------------- derived

    @property
    def rotary_dim(self) -> int:
        """Leading dims of each head that RoPE rotates (64 of 128 for GLM-4.6)."""
        return int(self.head_dim * self.partial_rotary_factor)

    @property
    def shared_intermediate_size(self) -> int:
        return self.moe_intermediate_size * self.n_shared_experts

    def is_moe_layer(self, layer: int) -> bool:
        return layer >= self.first_k_dense_replace

    # ------------------------------------------------------------------------------------------- reading

    @classmethod
    def from_dict(cls, d: dict, where: str = "config.json") -> GlmConfig:
        if not isinstance(d, dict):
            raise ValueError(f"{where}: expected a JSON object, got {type(d).__name__}")
        model_type = d.get("model_type", "glm4_moe")
        if model_type != "glm4_moe":
            raise ValueError(f"{where}: model_type={model_type!r}; glm_awq runs GLM-4.5/4.6 (model_type glm4_moe) only")
        act = d.get("hidden_act", "silu")
        if act != "silu":
            raise ValueError(f"{where}: hidden_act={act!r} is not supported; GLM-4.6 uses silu (SwiGLU)")

        rope_theta, partial = _rope(d, where)
        eos = d.get("eos_token_id", list(_DEFAULT_EOS))
        eos = () if eos is None else (eos,) if isinstance(eos, int) else tuple(int(e) for e in eos)

        kwargs = {}
        for name in (
            "vocab_size", "hidden_size", "intermediate_size", "moe_intermediate_size", "num_hidden_layers",
            "num_attention_heads", "num_key_value_heads", "n_routed_experts", "n_shared_experts",
            "num_experts_per_tok", "first_k_dense_replace", "n_group", "topk_group", "norm_topk_prob",
            "routed_scaling_factor", "rms_norm_eps", "attention_bias", "use_qk_norm", "max_position_embeddings",
            "tie_word_embeddings", "num_nextn_predict_layers", "pad_token_id",
        ):  # fmt: skip
            if d.get(name) is not None:
                kwargs[name] = d[name]
        if d.get("head_dim") is None and "hidden_size" in d and "num_attention_heads" in d:
            kwargs["head_dim"] = d["hidden_size"] // d["num_attention_heads"]
        elif d.get("head_dim") is not None:
            kwargs["head_dim"] = d["head_dim"]

        qc = d.get("quantization_config")
        group_size = None if qc is None else check_quantization_config(qc, where)
        cfg = cls(
            **kwargs,
            rope_theta=float(rope_theta),
            partial_rotary_factor=float(partial),
            eos_token_id=eos,
            group_size=group_size,
            quantization_config=qc,
        )
        cfg.validate(where)
        return cfg

    @classmethod
    def from_file(cls, path: str | Path) -> GlmConfig:
        path = Path(path)
        if path.is_dir():
            path = path / "config.json"
        try:
            d = json.loads(path.read_text())
        except FileNotFoundError:
            raise FileNotFoundError(f"{path} does not exist; a GLM-4.6 checkpoint folder holds config.json") from None
        except json.JSONDecodeError as exc:
            raise ValueError(f"{path} is not valid JSON ({exc})") from None
        return cls.from_dict(d, where=str(path))

    def validate(self, where: str = "config") -> None:
        def bad(msg: str) -> ValueError:
            return ValueError(f"{where}: {msg}")

        for name in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
                     "head_dim", "n_routed_experts", "num_experts_per_tok"):  # fmt: skip
            if not isinstance(getattr(self, name), int) or getattr(self, name) <= 0:
                raise bad(f"{name}={getattr(self, name)!r} must be a positive integer")
        if self.num_attention_heads % self.num_key_value_heads:
            raise bad(
                f"num_attention_heads={self.num_attention_heads} is not a multiple of "
                f"num_key_value_heads={self.num_key_value_heads} (grouped-query attention needs whole groups)"
            )
        if self.rotary_dim % 2 or not 0 < self.rotary_dim <= self.head_dim:
            raise bad(
                f"partial_rotary_factor={self.partial_rotary_factor} gives {self.rotary_dim} rotary dims of "
                f"head_dim={self.head_dim}; it must be an even number in [2, head_dim]"
            )
        if not 0 <= self.first_k_dense_replace <= self.num_hidden_layers:
            raise bad(f"first_k_dense_replace={self.first_k_dense_replace} is outside [0, {self.num_hidden_layers}]")
        if not 0 < self.num_experts_per_tok <= self.n_routed_experts:
            raise bad(
                f"num_experts_per_tok={self.num_experts_per_tok} must be in [1, n_routed_experts={self.n_routed_experts}]"
            )
        e, g, tg = self.n_routed_experts, self.n_group, self.topk_group
        if g < 1 or e % g or not 0 < tg <= g or self.num_experts_per_tok > tg * (e // g):
            raise bad(
                f"n_group={g}, topk_group={tg} do not fit n_routed_experts={e} with num_experts_per_tok="
                f"{self.num_experts_per_tok} (groups must split E evenly and hold at least top_k experts)"
            )
        if self.n_shared_experts < 0:
            raise bad(f"n_shared_experts={self.n_shared_experts} must be >= 0")

    def to_dict(self) -> dict:
        """config.json contents in the v4 style GLM-4.6 ships (top-level rope_theta and partial_rotary_factor)."""
        d = asdict(self)
        d.pop("group_size")
        qc = d.pop("quantization_config")
        d["eos_token_id"] = list(self.eos_token_id)
        d.update(
            architectures=["Glm4MoeForCausalLM"], model_type="glm4_moe", hidden_act="silu", rope_scaling=None,
            attention_dropout=0.0, torch_dtype="bfloat16", use_cache=True,
        )  # fmt: skip
        if qc is not None:
            d["quantization_config"] = qc
        return d


def _rope(d: dict, where: str) -> tuple[float, float]:
    """(rope_theta, partial_rotary_factor) from v5 `rope_parameters` or the v4 top-level keys."""
    params = d.get("rope_parameters")
    scaling = d.get("rope_scaling")
    if params is not None:
        if not isinstance(params, dict):
            raise ValueError(f"{where}: rope_parameters must be an object, got {params!r}")
        rope_type = params.get("rope_type", params.get("type", "default"))
        if rope_type != "default":
            raise ValueError(
                f"{where}: rope_parameters.rope_type={rope_type!r} is not supported; GLM-4.6 uses 'default'"
            )
        theta = params.get("rope_theta", d.get("rope_theta", 10000.0))
        partial = params.get("partial_rotary_factor", d.get("partial_rotary_factor", 0.5))
        return theta, partial
    if scaling is not None:
        rope_type = scaling.get("rope_type", scaling.get("type")) if isinstance(scaling, dict) else scaling
        if rope_type != "default":
            raise ValueError(
                f"{where}: rope_scaling={scaling!r} is not supported; glm_awq implements GLM-4.6's plain RoPE "
                "(rope_scaling null)"
            )
    # GLM-4.6 ships partial_rotary_factor 0.5; transformers defaults it to 0.5 for glm4_moe as well.
    return d.get("rope_theta", 10000.0), d.get("partial_rotary_factor", 0.5)


def check_quantization_config(qc: dict, where: str = "config.json") -> int:
    """Validate a compressed-tensors quantization_config for W4A16 pack-quantized; return its group size."""
    where = f"{where}: quantization_config"
    if not isinstance(qc, dict):
        raise ValueError(f"{where} must be an object, got {type(qc).__name__}")
    method = qc.get("quant_method")
    if method != "compressed-tensors":
        raise ValueError(
            f"{where}.quant_method={method!r} is not supported; glm_awq reads compressed-tensors checkpoints "
            "(llmcompressor's W4A16 pack-quantized format)"
        )
    fmt = qc.get("format")
    if fmt not in (None, "pack-quantized"):
        raise ValueError(f"{where}.format={fmt!r} is not supported; glm_awq reads 'pack-quantized' int4 weights only")
    status = qc.get("quantization_status", "compressed")
    if status != "compressed":
        raise ValueError(
            f"{where}.quantization_status={status!r}: the weights are not stored packed; glm_awq reads checkpoints "
            "saved compressed (quantization_status 'compressed')"
        )
    if qc.get("sparsity_config"):
        raise ValueError(f"{where}.sparsity_config is set: sparse checkpoints are not supported")
    if qc.get("kv_cache_scheme") is not None:
        raise ValueError(f"{where}.kv_cache_scheme={qc['kv_cache_scheme']!r}: quantized KV caches are not supported")
    groups = qc.get("config_groups")
    if not isinstance(groups, dict) or not groups:
        raise ValueError(f"{where}.config_groups is missing or empty; it must describe the int4 weight scheme")
    sizes = set()
    for name, group in groups.items():
        gwhere = f"{where}.config_groups.{name}"
        if not isinstance(group, dict):
            raise ValueError(f"{gwhere} must be an object, got {group!r}")
        gfmt = group.get("format")
        if gfmt not in (None, "pack-quantized"):
            raise ValueError(f"{gwhere}.format={gfmt!r} is not supported; glm_awq reads 'pack-quantized' only")
        for act in ("input_activations", "output_activations"):
            if group.get(act) is not None:
                raise ValueError(
                    f"{gwhere}.{act} is set: activation quantization is not supported; glm_awq runs W4A16 "
                    "(weights int4, activations bf16)"
                )
        weights = group.get("weights")
        if not isinstance(weights, dict):
            raise ValueError(f"{gwhere}.weights is missing; it must describe the int4 weight scheme")
        sizes.add(quant.check_weight_scheme(weights, where=gwhere))
    if len(sizes) != 1:
        raise ValueError(f"{where}: config groups use different group sizes {sorted(sizes)}; glm_awq needs one")
    return sizes.pop()
