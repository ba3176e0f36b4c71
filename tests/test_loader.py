"""glm_awq.load on synthetic GLM-4.6-AWQ checkpoints: what loads, and every way a checkpoint can be broken.

Each broken case starts from a good checkpoint written by glm_awq.checkpoint, changes one thing, and expects a
LoaderError whose message names the file and the tensor.
"""

import json
import os
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from helpers import rel_err

import glm_awq
from glm_awq import checkpoint
from glm_awq.loader import LoaderError
from glm_awq.quant import dequantize

LAYERS = 2  # layer 0 dense (bf16), layer 1 MoE (int4 attention and experts)


@pytest.fixture(scope="module")
def good(tmp_path_factory):
    folder = tmp_path_factory.mktemp("good") / "ckpt"
    cfg = checkpoint.tiny_config(LAYERS, n_routed_experts=4, num_experts_per_tok=2, vocab_size=300)
    checkpoint.write_checkpoint(folder, cfg, seed=11, shard_bytes=256 << 10, tokenizer=False)
    return folder


@pytest.fixture
def ckpt(good, tmp_path):
    folder = tmp_path / "ckpt"
    shutil.copytree(good, folder)
    return folder


def _index(folder):
    return json.loads((folder / "model.safetensors.index.json").read_text())


def _edit(folder, name, fn):
    """Rewrite the shard holding tensor `name`: fn(tensors dict) edits it in place; the index follows."""
    index = _index(folder)
    file = index["weight_map"][name]
    tensors = load_file(folder / file)
    fn(tensors)
    save_file(tensors, str(folder / file), metadata={"format": "pt"})
    index["weight_map"] = {k: v for k, v in index["weight_map"].items() if v != file} | dict.fromkeys(tensors, file)
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    return file


def _tensors(folder):
    """Every tensor of a sharded checkpoint, by name."""
    tensors = {}
    for file in set(_index(folder)["weight_map"].values()):
        tensors.update(load_file(folder / file))
    return tensors


def _load(folder, **kw):
    return glm_awq.load(folder, device="cpu", dtype=torch.float32, progress=False, **kw)


def test_good_checkpoint_loads_and_is_sharded(good):
    files = set(_index(good)["weight_map"].values())
    assert len(files) >= 3  # the cases below must cross shard boundaries
    model = _load(good)
    attn = model.model.layers[1].self_attn
    assert attn.qkv_proj.prepared is not None and not hasattr(attn, "q_proj")  # int4 q/k/v: one linear
    assert model.model.layers[0].self_attn.q_proj.prepared is None  # dense layer 0 stays float and separate
    experts = model.model.layers[1].mlp.experts.prepared
    assert experts.num_experts == 4 and experts.tensors["w13_packed"].shape == (4, 256, 256 // 8)
    assert model.model.layers[1].mlp.gate.weight.dtype == torch.float32
    assert not any(p.is_meta for p in model.parameters())
    assert model.load_stats["bytes"] > 0


def test_experts_are_stacked_gate_then_up(good):
    """w13[e] = cat([gate_e, up_e]) row-wise; w2[e] = down_e, bit for bit from the shards."""
    model = _load(good)
    t = model.model.layers[1].mlp.experts.prepared.tensors
    tensors = _tensors(good)
    p = "model.layers.1.mlp.experts.3"
    assert torch.equal(t["w13_packed"][3], torch.cat([tensors[f"{p}.gate_proj.weight_packed"],
                                                      tensors[f"{p}.up_proj.weight_packed"]]))  # fmt: skip
    assert torch.equal(t["w2_scale"][3], tensors[f"{p}.down_proj.weight_scale"])


def test_single_file_and_mtp_layer(ckpt):
    """One model.safetensors without an index; the MTP layer (index num_hidden_layers) is skipped silently."""
    tensors = _tensors(ckpt)
    for file in set(_index(ckpt)["weight_map"].values()):
        os.remove(ckpt / file)
    os.remove(ckpt / "model.safetensors.index.json")
    tensors[f"model.layers.{LAYERS}.eh_proj.weight"] = torch.zeros(256, 512, dtype=torch.bfloat16)
    tensors[f"model.layers.{LAYERS}.mlp.experts.0.gate_proj.weight_packed"] = torch.zeros(3, 3, dtype=torch.int32)
    save_file(tensors, str(ckpt / "model.safetensors"))
    model = _load(ckpt)
    assert model(torch.tensor([[1, 2, 3]])).isfinite().all()


def test_bf16_dense_load_matches_fp32_within_bf16(good):
    ids = torch.tensor([[3, 1, 4, 1, 5, 9, 2, 6]])
    ref = _load(good)(ids)
    out = glm_awq.load(good, device="cpu", dtype=torch.bfloat16, progress=False)(ids)
    assert out.dtype == torch.float32  # logits always fp32
    assert ((out - ref).norm() / ref.norm()).item() < 2e-2


def _drop(name):
    return lambda t: t.pop(name)


def _set(name, value):
    return lambda t: t.__setitem__(name, value)


A1 = "model.layers.1.self_attn"
E1 = "model.layers.1.mlp.experts.2"
# (what breaks, tensor to edit, edit, expected message fragment)
BROKEN = [
    # a missing float module and a missing int4 module
    ("missing-norm", f"{A1}.k_norm.weight", _drop(f"{A1}.k_norm.weight"), f"{A1}.k_norm.weight"),
    ("missing-scale", f"{A1}.q_proj.weight_scale", _drop(f"{A1}.q_proj.weight_scale"), f"{A1}.q_proj"),
    # k_proj incomplete while q_proj and v_proj wait for it to merge: only k_proj is reported
    ("missing-bias", f"{A1}.k_proj.bias", _drop(f"{A1}.k_proj.bias"), f"1 module(s) missing from the checkpoint: {A1}.k_proj"),
    ("missing-expert", f"{E1}.up_proj.weight_packed", _drop(f"{E1}.up_proj.weight_packed"), f"{E1}.up_proj.weight_packed"),
    # a tensor no GLM-4.6 module has, and a layer beyond num_hidden_layers + the MTP layer
    ("unexpected", f"{A1}.q_norm.weight", _set(f"{A1}.rotary.inv_freq", torch.zeros(32)), "unexpected tensor"),
    ("layer-beyond-mtp", f"{A1}.q_norm.weight", _set("model.layers.9.input_layernorm.weight", torch.ones(256)), "model.layers.9"),
    # wrong shapes: a float weight, a packed weight (K/8 off by one word), a scale
    ("shape-norm", f"{A1}.q_norm.weight", _set(f"{A1}.q_norm.weight", torch.ones(128)), "has shape [128]"),
    ("shape-packed", f"{A1}.o_proj.weight_packed", _set(f"{A1}.o_proj.weight_packed", torch.zeros(256, 63, dtype=torch.int32)), "expects [256, 64]"),
    ("shape-expert-scale", f"{E1}.down_proj.weight_scale", _set(f"{E1}.down_proj.weight_scale", torch.ones(256, 2)), "expects [256, 1]"),
    # wrong dtypes: packed stored as int64, a norm stored as int, weight_shape as float
    ("dtype-packed", f"{A1}.k_proj.weight_packed", _set(f"{A1}.k_proj.weight_packed", torch.zeros(128, 32, dtype=torch.int64)), "has dtype int64"),
    ("dtype-norm", "model.norm.weight", _set("model.norm.weight", torch.ones(256, dtype=torch.int32)), "has dtype int32"),
    ("dtype-shape", f"{E1}.gate_proj.weight_shape", _set(f"{E1}.gate_proj.weight_shape", torch.tensor([128.0, 256.0])), "has dtype float32"),
    # weight_shape that disagrees with the module
    ("weight-shape-values", f"{A1}.v_proj.weight_shape", _set(f"{A1}.v_proj.weight_shape", torch.tensor([256, 128])), "[out=128, in=256]"),
    # unsupported int4 variants and float routed experts
    ("zero-point", f"{A1}.v_proj.weight_packed", _set(f"{A1}.v_proj.weight_zero_point", torch.zeros(16, 2, dtype=torch.int32)), "asymmetric"),
    ("float-expert", f"{E1}.down_proj.weight_packed", _set(f"{E1}.down_proj.weight", torch.zeros(256, 128)), "int4 only"),
    # a Linear stored both ways (the float weight completes it first; the int4 tensors after it must not be dropped)
    ("float-and-int4", f"{A1}.q_proj.weight_packed", lambda t: t.__setitem__(f"{A1}.q_proj.weight", torch.zeros(
        t[f"{A1}.q_proj.weight_packed"].shape[0], t[f"{A1}.q_proj.weight_packed"].shape[1] * 8)), "both"),
]  # fmt: skip


@pytest.mark.parametrize("case, name, edit, message", BROKEN, ids=[b[0] for b in BROKEN])
def test_broken_checkpoint_is_rejected(ckpt, case, name, edit, message):
    file = _edit(ckpt, name, edit)
    with pytest.raises(LoaderError) as info:
        _load(ckpt)
    text = str(info.value)
    assert message in text
    if not case.startswith("missing"):
        assert file in text  # names the shard


def test_truncated_shard(ckpt):
    file = sorted(set(_index(ckpt)["weight_map"].values()))[1]
    os.truncate(ckpt / file, os.path.getsize(ckpt / file) - 100)
    with pytest.raises(LoaderError, match=f"{file}.*truncated"):
        _load(ckpt)


@pytest.mark.parametrize(
    "corrupt, message",
    [
        (lambda s: s[: len(s) // 2], "not valid JSON"),  # cut mid-download
        (lambda s: json.dumps({"metadata": {}}), "no 'weight_map'"),
        (lambda s: s.replace("model-00002-of", "model-00099-of", 1), "does not exist"),  # a shard that is not there
        (lambda s: s.replace('"model.norm.weight"', '"model.norm.weight_typo"'), "lacks it"),  # index and shard disagree
        (lambda s: s.replace('-of-', '/../x-of-', 1), "not a shard file name"),  # a path outside the folder
    ],
    ids=["truncated-json", "no-weight-map", "missing-shard", "name-not-in-shard", "path-escape"],
)
def test_bad_index(ckpt, corrupt, message):
    index = ckpt / "model.safetensors.index.json"
    index.write_text(corrupt(index.read_text()))
    with pytest.raises((LoaderError, FileNotFoundError), match=message):
        _load(ckpt)


def test_config_mismatch_reports_missing_layers(ckpt):
    """config.json says more layers than the shards hold: every absent module is a clear error, not a crash."""
    config = json.loads((ckpt / "config.json").read_text())
    config["num_hidden_layers"] = LAYERS + 2
    config["num_nextn_predict_layers"] = 0
    (ckpt / "config.json").write_text(json.dumps(config))
    with pytest.raises(LoaderError, match=r"module\(s\) missing.*model\.layers\.2\."):
        _load(ckpt)


def test_quantized_shared_experts_and_bf16_router_load(tmp_path):
    """Shared experts stored int4 (not GLM-4.6-AWQ's recipe, but compressed-tensors allows it) and a bf16 router."""
    cfg = checkpoint.tiny_config(2, n_routed_experts=4, num_experts_per_tok=2, vocab_size=300)
    checkpoint.write_checkpoint(tmp_path / "c", cfg, quantize_shared=True, router_dtype=torch.bfloat16, tokenizer=False)
    model = _load(tmp_path / "c")
    mlp = model.model.layers[1].mlp
    assert mlp.shared_experts.down_proj.prepared is not None
    assert mlp.gate.weight.dtype == torch.float32  # routed in fp32 whatever the stored dtype
    config = json.loads((tmp_path / "c" / "config.json").read_text())
    assert not any("shared_experts" in n for n in config["quantization_config"]["ignore"])


def test_int32_weight_shape_loads(ckpt):
    """Some compressed-tensors versions store weight_shape as int32 (DESIGN.md section 4)."""
    name = f"{A1}.q_proj.weight_shape"
    _edit(ckpt, name, _set(name, torch.tensor([512, 256], dtype=torch.int32)))
    assert _load(ckpt).model.layers[1].self_attn.qkv_proj.prepared is not None


def test_tied_embeddings(tmp_path):
    """tie_word_embeddings: no lm_head tensor in the shards; the head reuses embed_tokens."""
    cfg = checkpoint.tiny_config(2, n_routed_experts=4, num_experts_per_tok=2, tie_word_embeddings=True)
    checkpoint.write_checkpoint(tmp_path / "c", cfg, tokenizer=False)
    model = _load(tmp_path / "c")
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert model(torch.tensor([[1, 2]])).isfinite().all()



# ------------------------------------------------------------------------------------- merged projections

S1 = "model.layers.1.mlp.shared_experts"


def _write(folder, attention_bias=True, **writer_options):
    """A sharded 2-layer checkpoint (layer 0 dense bf16, layer 1 MoE)."""
    cfg = checkpoint.tiny_config(LAYERS, n_routed_experts=4, num_experts_per_tok=2, attention_bias=attention_bias)
    return checkpoint.write_checkpoint(folder, cfg, seed=13, shard_bytes=256 << 10, tokenizer=False, **writer_options)


def test_merged_projections_hold_the_checkpoint_tensors(tmp_path):
    """q/k/v and int4 shared experts' gate/up each become one linear whose tensors are the parts' concatenated
    along N, bit for bit (the torch backend keeps the checkpoint layout); print(model) names the parts."""
    folder = _write(tmp_path / "c", quantize_shared=True)
    model, tensors = _load(folder), _tensors(folder)
    layer = model.model.layers[1]
    qkv, gate_up = layer.self_attn.qkv_proj, layer.mlp.shared_experts.gate_up_proj
    for lin, parts in [(qkv, [f"{A1}.{x}_proj" for x in "qkv"]), (gate_up, [f"{S1}.{x}_proj" for x in ("gate", "up")])]:
        for leaf in ("weight_packed", "weight_scale"):
            assert torch.equal(lin.prepared.tensors[leaf], torch.cat([tensors[f"{p}.{leaf}"] for p in parts]))
    assert torch.equal(qkv.prepared.bias, torch.cat([tensors[f"{A1}.{x}_proj.bias"] for x in "qkv"]).float())
    assert "MergedLinear(256 -> q_proj 512 + k_proj 128 + v_proj 128, int4 torch)" in str(model)
    assert "MergedLinear(256 -> gate_proj 128 + up_proj 128, int4 torch)" in str(model)
    assert not any(hasattr(layer.mlp.shared_experts, f"{x}_proj") for x in ("gate", "up"))  # no second copy


# attention with and without bias; shared experts bf16 (GLM-4.6-AWQ's recipe: gate/up not merged) and int4
@pytest.mark.parametrize(
    "options", [{}, {"attention_bias": False, "quantize_shared": True}], ids=["bias", "no-bias-int4-shared"]
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_merged_model_equals_unmerged_bit_for_bit(tmp_path, options, dtype):
    """Concatenating along N changes no dot product: on the torch backend the merged model's logits and greedy
    tokens are those of the model that runs every projection on its own."""
    folder = _write(tmp_path / "c", **options)
    merged = glm_awq.load(folder, device="cpu", dtype=dtype, max_seq_len=32, progress=False)
    separate = glm_awq.load(folder, device="cpu", dtype=dtype, max_seq_len=32, progress=False, merge_projections=False)
    layer = merged.model.layers[1]
    assert layer.self_attn.qkv_proj is not None and separate.model.layers[1].self_attn.qkv_proj is None
    assert (layer.mlp.shared_experts.gate_up_proj is not None) == options.get("quantize_shared", False)
    ids = torch.randint(0, 300, (2, 7), generator=torch.Generator().manual_seed(1))
    assert torch.equal(merged(ids), separate(ids))
    assert torch.equal(merged.generate(ids, 5, eos_token_id=[]), separate.generate(ids, 5, eos_token_id=[]))


def test_float_k_proj_keeps_q_k_v_separate(ckpt):
    """k_proj stored float (a quantization ignore list may leave it out): no merge, q_proj and v_proj int4 on
    their own; with k_proj's float weight equal to its dequantized int4 one, the logits stay those of the merged
    model."""
    ids = torch.tensor([[3, 1, 4, 1, 5, 9, 2, 6]])
    ref = _load(ckpt)(ids)
    k = f"{A1}.k_proj"
    tensors = _tensors(ckpt)
    weight = dequantize(tensors[f"{k}.weight_packed"], tensors[f"{k}.weight_scale"], 128)  # fp32 [128, 256]
    _edit(ckpt, f"{k}.weight_packed", _set(f"{k}.weight", weight))
    for leaf in ("weight_packed", "weight_scale", "weight_shape"):
        _edit(ckpt, f"{k}.{leaf}", _drop(f"{k}.{leaf}"))
    model = _load(ckpt)
    attn = model.model.layers[1].self_attn
    assert attn.qkv_proj is None and attn.k_proj.prepared is None and torch.equal(attn.k_proj.weight, weight)
    assert attn.q_proj.prepared is not None and attn.v_proj.prepared is not None
    assert rel_err(model(ids), ref) < 1e-5  # F.linear against the reference's matmul + bias: not bit for bit
    assert model.generate(ids, 4, eos_token_id=[]).shape == (1, 4)
