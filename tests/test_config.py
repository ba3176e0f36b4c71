"""GlmConfig: GLM-4.6's real config.json, v4 and v5 rope keys, and every quantization_config we must refuse."""

import copy

import pytest

from glm_awq import checkpoint
from glm_awq.config import GlmConfig


@pytest.fixture(scope="module")
def real():
    return checkpoint.packaged_config()


def test_real_glm46_config(real):
    c = GlmConfig.from_dict(real)
    assert (c.hidden_size, c.num_hidden_layers, c.num_attention_heads, c.num_key_value_heads) == (5120, 92, 96, 8)
    assert (c.head_dim, c.rotary_dim, c.rope_theta, c.group_size) == (128, 64, 1e6, 128)
    assert (c.n_routed_experts, c.num_experts_per_tok, c.first_k_dense_replace) == (160, 8, 3)
    assert c.eos_token_id == (151329, 151336, 151338) and c.attention_bias and c.use_qk_norm
    assert c.is_moe_layer(3) and not c.is_moe_layer(2)


def test_v5_rope_parameters_equal_v4_keys(real):
    v5 = copy.deepcopy(real)
    theta, factor = v5.pop("rope_theta"), v5.pop("partial_rotary_factor")
    v5["rope_parameters"] = {"rope_type": "default", "rope_theta": theta, "partial_rotary_factor": factor}
    assert GlmConfig.from_dict(v5) == GlmConfig.from_dict(real)


def test_missing_partial_rotary_factor_defaults_to_half(real):
    # transformers' glm4_moe default; older configs omit the key
    d = copy.deepcopy(real)
    d.pop("partial_rotary_factor")
    assert GlmConfig.from_dict(d).rotary_dim == 64


def test_to_dict_roundtrip(real):
    c = checkpoint.real_config(5)
    assert GlmConfig.from_dict(c.to_dict()) == c
    assert c.num_hidden_layers == 5 and len(c.quantization_config["ignore"]) == 3 * 7 + 2 * 3 + 1


def test_bf16_checkpoint_has_no_group_size(real):
    d = copy.deepcopy(real)
    d.pop("quantization_config")
    assert GlmConfig.from_dict(d).group_size is None


def _weights(real, **change):
    d = copy.deepcopy(real)
    d["quantization_config"]["config_groups"]["group_0"]["weights"].update(change)
    return d


def _qc(real, **change):
    d = copy.deepcopy(real)
    d["quantization_config"].update(change)
    return d


def _group(real, **change):
    d = copy.deepcopy(real)
    d["quantization_config"]["config_groups"]["group_0"].update(change)
    return d


# Every variant a compressed-tensors checkpoint can declare that the int4 kernels cannot run.
REJECTED = [
    ("awq-method", lambda r: _qc(r, quant_method="awq"), "quant_method='awq'"),
    ("marlin-format", lambda r: _qc(r, format="marlin-24"), "format='marlin-24'"),
    ("frozen", lambda r: _qc(r, quantization_status="frozen"), "quantization_status='frozen'"),
    ("sparse", lambda r: _qc(r, sparsity_config={"format": "sparse-24-bitmask"}), "sparsity_config"),
    ("kv-fp8", lambda r: _qc(r, kv_cache_scheme={"num_bits": 8}), "kv_cache_scheme"),
    ("no-groups", lambda r: _qc(r, config_groups={}), "config_groups"),
    ("8-bit", lambda r: _weights(r, num_bits=8), "num_bits=8"),
    ("asymmetric", lambda r: _weights(r, symmetric=False), "symmetric=False"),
    ("channel", lambda r: _weights(r, strategy="channel", group_size=None), "strategy='channel'"),
    ("act-order", lambda r: _weights(r, actorder="group"), "actorder='group'"),
    ("fp4", lambda r: _weights(r, type="float"), "type='float'"),
    ("w4a8", lambda r: _group(r, input_activations={"num_bits": 8, "type": "int"}), "input_activations"),
    ("group-format", lambda r: _group(r, format="float-quantized"), "format='float-quantized'"),
]


@pytest.mark.parametrize("build, message", [(b, m) for _, b, m in REJECTED], ids=[n for n, _, _ in REJECTED])
def test_unsupported_quantization_is_rejected(real, build, message):
    with pytest.raises(ValueError, match="quantization_config") as info:
        GlmConfig.from_dict(build(real))
    assert message in str(info.value)


@pytest.mark.parametrize(
    "change, message",
    [
        ({"model_type": "deepseek_v3"}, "glm4_moe"),
        ({"rope_scaling": {"rope_type": "yarn", "factor": 4.0}}, "rope_scaling"),
        ({"rope_parameters": {"rope_type": "yarn", "rope_theta": 1e6}}, "rope_type='yarn'"),
        ({"num_key_value_heads": 7}, "num_key_value_heads=7"),  # 96 heads do not split into 7 groups
        ({"partial_rotary_factor": 33 / 128}, "rotary dims"),  # 33 rotary dims: odd, no NeoX halves
        ({"n_group": 3}, "n_group=3"),  # 160 experts do not split into 3 groups
    ],
    ids=["model-type", "yarn-v4", "yarn-v5", "gqa", "rotary", "groups"],
)
def test_unsupported_architecture_is_rejected(real, change, message):
    d = copy.deepcopy(real) | change
    with pytest.raises(ValueError, match="config") as info:
        GlmConfig.from_dict(d)
    assert message in str(info.value)
