"""Synthetic GLM-4.6-AWQ checkpoints from random weights, in exactly the format llmcompressor writes.

Layout (as the real zai-org/GLM-4.6 AWQ checkpoints): sharded safetensors `model-0000i-of-0000n.safetensors`
plus `model.safetensors.index.json`; config.json with a compressed-tensors quantization_config (pack-quantized,
W4A16 symmetric group 128) and an explicit ignore list; layers 0..first_k_dense_replace-1 entirely bf16;
after them the attention projections and the routed experts int4 (`weight_packed` int32 [N, K/8],
`weight_scale` bf16 [N, K/128], `weight_shape` int64 [2]); shared experts, router (`mlp.gate.weight`,
`e_score_correction_bias` fp32), norms, embeddings and lm_head bf16. Quantized with glm_awq.quant.quantize,
which is bit-exact with compressed-tensors.

Weights are N(0, 0.02) like the real model's init, norms near 1, so activations and logits stay finite and
the logits are far from flat. A small byte-level tokenizer (tokenizers library) with GLM's special tokens
and a chat template can be written beside it, so `generate_text` runs on a tiny checkpoint.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import torch

from glm_awq.config import GlmConfig
from glm_awq.quant import quantize

# GLM-4's special tokens; the tiny tokenizer puts them right after the 256 byte tokens.
SPECIAL_TOKENS = [
    "<|endoftext|>", "[MASK]", "[gMASK]", "[sMASK]", "<sop>", "<eop>", "<|system|>", "<|user|>",
    "<|assistant|>", "<|observation|>", "<think>", "</think>",
]  # fmt: skip
# eos as GLM-4.6 has it: <|endoftext|>, <|user|>, <|observation|>
TINY_EOS = tuple(256 + SPECIAL_TOKENS.index(t) for t in ("<|endoftext|>", "<|user|>", "<|observation|>"))
# A GLM-4-style chat template (the real one adds tools and thinking switches; this one keeps the layout).
CHAT_TEMPLATE = (
    "[gMASK]<sop>{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)
STD = 0.02


def packaged_config() -> dict:
    """GLM-4.6's config.json as shipped inside the package (glm_awq/data/glm46_config.json)."""
    from importlib.resources import files

    return json.loads(files("glm_awq.data").joinpath("glm46_config.json").read_text())


def real_config(layers: int = 92) -> GlmConfig:
    """GLM-4.6 at its real dimensions, cut to `layers` layers."""
    d = packaged_config()
    d["num_hidden_layers"] = layers
    d["quantization_config"] = quantization_config(GlmConfig.from_dict(d, "glm46_config.json"), layers)
    return GlmConfig.from_dict(d, "glm46_config.json")


def tiny_config(layers: int = 4, **overrides) -> GlmConfig:
    """GLM-4.6's architecture at toy size (every int4 K a multiple of 128): 1 dense layer, then MoE layers."""
    base = dict(
        vocab_size=320, hidden_size=256, intermediate_size=512, moe_intermediate_size=128, num_hidden_layers=layers,
        num_attention_heads=8, num_key_value_heads=2, head_dim=64, n_routed_experts=16, n_shared_experts=1,
        num_experts_per_tok=4, first_k_dense_replace=min(1, layers), max_position_embeddings=4096,
        eos_token_id=TINY_EOS, pad_token_id=TINY_EOS[0],
    )  # fmt: skip
    base.update(overrides)
    cfg = GlmConfig(**base)
    cfg.validate("tiny_config")
    return dataclasses.replace(cfg, quantization_config=quantization_config(cfg, cfg.num_hidden_layers))


def ignore_list(config: GlmConfig, layers: int, quantize_shared: bool = False) -> list[str]:
    """The modules llmcompressor's GLM-4.6 AWQ recipe leaves in bf16 (the router is no Linear, so not listed)."""
    names = []
    for i in range(layers):
        p = f"model.layers.{i}"
        if not config.is_moe_layer(i):
            names += [f"{p}.self_attn.{x}_proj" for x in "qkvo"] + [f"{p}.mlp.{x}_proj" for x in ("gate", "up", "down")]
        elif not quantize_shared and config.n_shared_experts:
            names += [f"{p}.mlp.shared_experts.{x}_proj" for x in ("gate", "up", "down")]
    return names + ["lm_head"]


def quantization_config(config: GlmConfig, layers: int, group_size: int = 128, targets=("Linear",),
                        quantize_shared: bool = False) -> dict:  # fmt: skip
    weights = {
        "actorder": None, "block_structure": None, "dynamic": False, "group_size": group_size, "num_bits": 4,
        "observer": "minmax", "observer_kwargs": {}, "strategy": "group", "symmetric": True, "type": "int",
    }  # fmt: skip
    return {
        "config_groups": {
            "group_0": {
                "format": "pack-quantized", "input_activations": None, "output_activations": None,
                "targets": list(targets), "weights": weights,
            }  # fmt: skip
        },
        "format": "pack-quantized",
        "global_compression_ratio": None,
        "ignore": ignore_list(config, layers, quantize_shared),
        "kv_cache_scheme": None,
        "quant_method": "compressed-tensors",
        "quantization_status": "compressed",
        "sparsity_config": {},
        "transform_config": {},
        "version": "0.12.2",
    }


# ----------------------------------------------------------------------------------------------- tensors


class _Random:
    def __init__(self, seed: int, device):
        self.device = torch.device(device)
        self.gen = torch.Generator(device=self.device).manual_seed(seed)

    def normal(self, *shape: int, std: float = STD, mean: float = 0.0) -> torch.Tensor:
        t = torch.randn(*shape, generator=self.gen, device=self.device, dtype=torch.float32)
        return t.mul_(std).add_(mean)


def _linear(rng, name: str, n: int, k: int, quantized: bool, bias: bool, group_size: int) -> Iterator:
    w = rng.normal(n, k).to(torch.bfloat16)
    if quantized:
        packed, scale = quantize(w, group_size)
        yield f"{name}.weight_packed", packed
        yield f"{name}.weight_scale", scale
        yield f"{name}.weight_shape", torch.tensor([n, k], dtype=torch.int64)
    else:
        yield f"{name}.weight", w
    if bias:
        yield f"{name}.bias", rng.normal(n).to(torch.bfloat16)


def _norm(rng, name: str, dim: int) -> Iterator:
    yield name, rng.normal(dim, std=0.1, mean=1.0).to(torch.bfloat16)


def tensors(config: GlmConfig, seed: int = 0, device="cpu", router_dtype=torch.float32,
            quantize_shared: bool = False) -> Iterator[tuple[str, torch.Tensor]]:  # fmt: skip
    """Every tensor of the checkpoint, in model order (one layer in memory at a time)."""
    c, rng, g = config, _Random(seed, device), config.group_size or 128
    h, d = c.hidden_size, c.head_dim
    yield "model.embed_tokens.weight", rng.normal(c.vocab_size, h, std=1.0).to(torch.bfloat16)
    for i in range(c.num_hidden_layers):
        p, moe = f"model.layers.{i}", c.is_moe_layer(i)
        yield from _norm(rng, f"{p}.input_layernorm.weight", h)
        q, kv = c.num_attention_heads * d, c.num_key_value_heads * d
        for x, n in (("q", q), ("k", kv), ("v", kv)):
            yield from _linear(rng, f"{p}.self_attn.{x}_proj", n, h, moe, c.attention_bias, g)
        yield from _linear(rng, f"{p}.self_attn.o_proj", h, c.num_attention_heads * d, moe, False, g)
        if c.use_qk_norm:
            yield from _norm(rng, f"{p}.self_attn.q_norm.weight", d)
            yield from _norm(rng, f"{p}.self_attn.k_norm.weight", d)
        yield from _norm(rng, f"{p}.post_attention_layernorm.weight", h)
        if not moe:
            for x, (n, k) in (("gate", (c.intermediate_size, h)), ("up", (c.intermediate_size, h)),
                              ("down", (h, c.intermediate_size))):  # fmt: skip
                yield from _linear(rng, f"{p}.mlp.{x}_proj", n, k, False, False, g)
            continue
        yield f"{p}.mlp.gate.weight", rng.normal(c.n_routed_experts, h).to(router_dtype)
        yield f"{p}.mlp.gate.e_score_correction_bias", rng.normal(c.n_routed_experts, std=0.01)
        i_dim = c.moe_intermediate_size
        for e in range(c.n_routed_experts):
            for x, (n, k) in (("gate", (i_dim, h)), ("up", (i_dim, h)), ("down", (h, i_dim))):
                yield from _linear(rng, f"{p}.mlp.experts.{e}.{x}_proj", n, k, True, False, g)
        if c.n_shared_experts:
            s = c.shared_intermediate_size
            for x, (n, k) in (("gate", (s, h)), ("up", (s, h)), ("down", (h, s))):
                yield from _linear(rng, f"{p}.mlp.shared_experts.{x}_proj", n, k, quantize_shared, False, g)
    yield "model.norm.weight", rng.normal(h, std=0.1, mean=1.0).to(torch.bfloat16)
    if not c.tie_word_embeddings:  # std 2/sqrt(H): logits of std ~2, far from flat at any H (0.028 at H=5120)
        yield "lm_head.weight", rng.normal(c.vocab_size, h, std=2.0 / h**0.5).to(torch.bfloat16)


# ------------------------------------------------------------------------------------------------ writing


def write_shards(folder: Path, named: Iterator[tuple[str, torch.Tensor]], shard_bytes: int) -> dict[str, str]:
    """Save tensors into model-0000i-of-0000n.safetensors files of about shard_bytes each, plus the index json.
    Returns the weight_map. Holds at most one shard in host memory."""
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    parts: list[list[str]] = []
    buf: dict[str, torch.Tensor] = {}
    size = total = 0

    def flush():
        nonlocal buf, size
        if buf:
            save_file(buf, str(folder / f"part-{len(parts):05d}.tmp"), metadata={"format": "pt"})
            parts.append(list(buf))
            buf, size = {}, 0

    for name, t in named:
        t = t.detach().to("cpu").contiguous()
        nbytes = t.numel() * t.element_size()
        if buf and size + nbytes > shard_bytes:
            flush()
        buf[name], size, total = t, size + nbytes, total + nbytes
    flush()
    weight_map = {}
    for i, names in enumerate(parts):
        final = f"model-{i + 1:05d}-of-{len(parts):05d}.safetensors"
        os.replace(folder / f"part-{i:05d}.tmp", folder / final)
        weight_map.update(dict.fromkeys(names, final))
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    return weight_map


def write_tokenizer(folder: Path, config: GlmConfig) -> None:
    """A byte-level BPE with no merges (one token per byte) plus GLM's special tokens; tokenizer_config.json
    with a GLM-style chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    if config.vocab_size < 256 + len(SPECIAL_TOKENS):
        raise ValueError(f"vocab_size={config.vocab_size} is too small for 256 bytes + {len(SPECIAL_TOKENS)} specials")
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {ch: i for i, ch in enumerate(alphabet)}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(SPECIAL_TOKENS)
    tok.save(str(folder / "tokenizer.json"))
    tokenizer_config = {
        "chat_template": CHAT_TEMPLATE, "eos_token": "<|endoftext|>", "pad_token": "<|endoftext|>",
        "tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": config.max_position_embeddings,
    }  # fmt: skip
    (folder / "tokenizer_config.json").write_text(json.dumps(tokenizer_config, indent=2) + "\n")


def write_checkpoint(
    out: str | Path,
    config: GlmConfig,
    *,
    seed: int = 0,
    device="cpu",
    shard_bytes: int = 2 << 30,
    router_dtype: torch.dtype = torch.float32,
    quantize_shared: bool = False,
    tokenizer: bool = True,
) -> Path:
    """Write a random-weight checkpoint of `config` to `out` (created; must not already hold a checkpoint).

    Written into `out`.partial and renamed at the end, so `out` either holds a whole checkpoint or nothing.
    device: where the random weights are drawn and quantized (cuda makes real dims fast).
    """
    out = Path(out)
    if (out / "config.json").exists():
        raise FileExistsError(f"{out} already holds a checkpoint; remove it or choose another folder")
    tmp = out.with_name(out.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    d = config.to_dict()
    if config.quantization_config is None:
        d["quantization_config"] = quantization_config(config, config.num_hidden_layers, config.group_size or 128)
    d["quantization_config"]["ignore"] = ignore_list(config, config.num_hidden_layers, quantize_shared)
    d["transformers_version"] = "4.56.2"
    named = tensors(config, seed, device, router_dtype, quantize_shared)
    write_shards(tmp, named, shard_bytes)
    (tmp / "config.json").write_text(json.dumps(d, indent=2) + "\n")
    if tokenizer and config.vocab_size >= 256 + len(SPECIAL_TOKENS):
        write_tokenizer(tmp, config)
    if out.exists():
        out.rmdir()  # an empty folder (checked above that it holds no checkpoint); rmdir fails if not empty
    os.replace(tmp, out)
    return out
