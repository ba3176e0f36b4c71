"""The GLM-4.6 forward module against transformers, the KV cache against full prefill, sampling and generation.

Parity checkpoints are made without glm_awq's writer or quantizer: a random tiny `Glm4MoeForCausalLM` saved by
transformers (per-expert names, as the real checkpoint), its Linear weights quantized by compressed-tensors'
own path (calculate_qparams + the pack-quantized compressor), reloaded by transformers with
`CompressedTensorsConfig(dequantize=True)`. transformers 5.x has no int4 forward on the CPU: it decompresses
the int4 weights with compressed-tensors at load and runs them as float (its routed experts are fused 3-D
tensors that compressed-tensors' Linear-based forward does not reach), so the comparison is our int4 path
against the same int4 weights decompressed by an independent implementation.
"""

import json
import shutil

import pytest
import torch
from helpers import rel_err

import glm_awq
from glm_awq import checkpoint, generate
from glm_awq.config import GlmConfig

transformers = pytest.importorskip("transformers")
pytest.importorskip("compressed_tensors")

from compressed_tensors.compressors import BaseCompressor  # noqa: E402
from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme  # noqa: E402
from compressed_tensors.quantization.utils import calculate_qparams  # noqa: E402

VOCAB = 300
ARGS = QuantizationArgs(num_bits=4, type="int", symmetric=True, strategy="group", group_size=128)

# Each case is one checkpoint; the comments say which checkpoint variation it exists for.
CASES = {
    # GLM-4.6 as shipped: v4 config keys, targets ["Linear"], fp32 router, one model.safetensors (no index)
    "v4-linear-fp32router-1file": dict(style="v4", targets=["Linear"], router=torch.float32, shards=1, seed=1),
    # v5 rope_parameters, regex targets (the "KeyError: 'Linear'" checkpoints), bf16 router, 3 shards; the
    # targets leave k_proj float, so q/k/v cannot merge and run as three linears
    "v5-regex-bf16router-3shards-floatk": dict(
        style="v5", targets=["re:.*self_attn\\.[qvo]_proj$", "re:.*mlp\\.experts\\..*_proj$"],
        router=torch.bfloat16, shards=3, seed=2, rope_theta=5e5, float_k_proj=True,
    ),  # fmt: skip
    # int4 shared experts, group-limited routing (n_group 2 / topk_group 1) and no top-k renormalisation
    "v4-int4shared-groups-2shards": dict(
        style="v4", targets=["Linear"], router=torch.float32, shards=2, seed=3, quantize_shared=True,
        n_group=2, topk_group=1, norm_topk_prob=False,
    ),  # fmt: skip
}


def _hf_config(case):
    return transformers.Glm4MoeConfig(
        vocab_size=VOCAB, hidden_size=256, intermediate_size=384, moe_intermediate_size=128, num_hidden_layers=3,
        num_attention_heads=8, num_key_value_heads=2, head_dim=64, n_routed_experts=8, num_experts_per_tok=2,
        first_k_dense_replace=1, attention_bias=True, use_qk_norm=True, routed_scaling_factor=2.5,
        rope_theta=case.get("rope_theta", 1e6), partial_rotary_factor=0.5, max_position_embeddings=512,
        n_group=case.get("n_group", 1), topk_group=case.get("topk_group", 1),
        norm_topk_prob=case.get("norm_topk_prob", True), eos_token_id=None,
    )  # fmt: skip


def _quantized(name: str, case) -> bool:
    """GLM-4.6-AWQ's recipe: attention and routed experts of MoE layers int4; (optionally) shared experts too."""
    if not name.endswith("_proj.weight") or name.startswith(("model.layers.0.", "lm_head")):
        return False
    if case.get("float_k_proj") and name.endswith("k_proj.weight"):
        return False
    return "shared_experts" not in name or case.get("quantize_shared", False)


def _ct_compress(w: torch.Tensor) -> dict:
    groups = w.reshape(w.shape[0], -1, ARGS.group_size)
    scale, zero_point = calculate_qparams(groups.amin(-1), groups.amax(-1), ARGS)
    scheme = QuantizationScheme(targets=["Linear"], weights=ARGS, format="pack-quantized")
    compressor = BaseCompressor.get_value_from_registry("pack-quantized")
    return compressor.compress({"weight": w, "weight_scale": scale, "weight_zero_point": zero_point}, scheme)


def _write_hf_checkpoint(folder, case):
    """A random tiny Glm4MoeForCausalLM, compressed by compressed-tensors into the GLM-4.6-AWQ layout."""
    from safetensors.torch import load_file, save_file

    torch.manual_seed(case["seed"])
    model = transformers.Glm4MoeForCausalLM(_hf_config(case))
    with torch.no_grad():  # weights like a trained model's: norms near 1, biases and router bias non-zero
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1 + 0.1 * torch.randn_like(p))
            elif name.endswith("bias"):
                p.normal_(0, 0.02)
            elif "embed" in name:
                p.normal_(0, 1.0)
            elif name == "lm_head.weight":
                p.normal_(0, 0.125)
        for m in model.modules():
            if hasattr(m, "e_score_correction_bias"):
                m.e_score_correction_bias.normal_(0, 0.01)
    model.save_pretrained(folder)
    state = load_file(folder / "model.safetensors")
    out = {}
    for name, t in state.items():
        router = ".mlp.gate." in name
        t = t.to(case["router"]) if name.endswith("mlp.gate.weight") else t if router else t.to(torch.bfloat16)
        if _quantized(name, case):
            prefix = name.removesuffix(".weight")
            out.update({f"{prefix}.{k}": v for k, v in _ct_compress(t).items()})
        else:
            out[name] = t
    (folder / "model.safetensors").unlink()
    names = sorted(out)
    if case["shards"] == 1:
        save_file(out, str(folder / "model.safetensors"), metadata={"format": "pt"})
    else:
        n = case["shards"]
        weight_map = {}
        for i in range(n):
            file = f"model-{i + 1:05d}-of-{n:05d}.safetensors"
            part = names[i::n]  # interleaved: one module's tensors land in different shards
            save_file({k: out[k] for k in part}, str(folder / file), metadata={"format": "pt"})
            weight_map.update(dict.fromkeys(part, file))
        (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))

    config = json.loads((folder / "config.json").read_text())
    if case["style"] == "v4":  # GLM-4.6 ships rope_theta / partial_rotary_factor at the top level
        rope = config.pop("rope_parameters")
        config.update(rope_theta=rope["rope_theta"], partial_rotary_factor=rope["partial_rotary_factor"])
    qc = checkpoint.quantization_config(GlmConfig.from_dict(config), 3, targets=case["targets"],
                                        quantize_shared=case.get("quantize_shared", False))  # fmt: skip
    config["quantization_config"] = qc
    (folder / "config.json").write_text(json.dumps(config, indent=2))


_BUILT = {}


def _parity(name, tmp_path_factory):
    """(case, folder, transformers model, our fp32 model), built once per case per session."""
    if name not in _BUILT:
        case = CASES[name]
        folder = tmp_path_factory.mktemp(name)
        _write_hf_checkpoint(folder, case)
        hf = transformers.Glm4MoeForCausalLM.from_pretrained(
            folder, dtype=torch.float32, quantization_config=transformers.CompressedTensorsConfig(dequantize=True)
        ).eval()
        ours = glm_awq.load(folder, device="cpu", dtype=torch.float32, progress=False)
        _BUILT[name] = case, folder, hf, ours
    return _BUILT[name]


@pytest.fixture(scope="module", params=list(CASES))
def parity(request, tmp_path_factory):
    return _parity(request.param, tmp_path_factory)


def test_logits_match_transformers(parity):
    case, _, hf, ours = parity
    ids = torch.randint(0, VOCAB, (2, 19), generator=torch.Generator().manual_seed(case["seed"]))  # odd T
    with torch.no_grad():
        ref = hf(ids).logits.float()
    out = ours(ids)
    assert out.dtype == torch.float32 and out.shape == (2, 19, VOCAB)
    assert rel_err(out, ref) < 1e-2
    assert torch.equal(out.argmax(-1), ref.argmax(-1))


def test_greedy_generation_matches_transformers(parity):
    case, _, hf, ours = parity
    ids = torch.randint(0, VOCAB, (1, 7), generator=torch.Generator().manual_seed(case["seed"] + 100))
    with torch.no_grad():
        ref = hf.generate(ids, max_new_tokens=16, do_sample=False, eos_token_id=None, pad_token_id=0)[:, 7:]
    out = ours.generate(ids, 16, eos_token_id=[])
    assert out.tolist() == ref.tolist()


def test_projections_merge_where_all_are_int4(parity):
    """The parity cases cover both paths: q/k/v merged unless k_proj is float; gate/up merged where int4."""
    case, _, _, ours = parity
    dense, moe = ours.model.layers[0], ours.model.layers[1]
    assert dense.self_attn.qkv_proj is None and dense.mlp.gate_up_proj is None  # bf16 layer
    assert (moe.self_attn.qkv_proj is None) == case.get("float_k_proj", False)
    assert (moe.mlp.shared_experts.gate_up_proj is not None) == case.get("quantize_shared", False)


@pytest.mark.parametrize("name", ["v4-linear-fp32router-1file"])  # one checkpoint is enough for this bound
def test_bf16_activations_stay_close(name, tmp_path_factory):
    """The production dtype: bf16 activations against transformers' fp32 run of the same int4 weights."""
    _, folder, hf, _ = _parity(name, tmp_path_factory)
    ours = glm_awq.load(folder, device="cpu", dtype=torch.bfloat16, progress=False)
    ids = torch.randint(0, VOCAB, (1, 16), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        ref = hf(ids).logits.float()
    assert rel_err(ours(ids), ref) < 1e-2  # measured 5e-3..6e-3 (fp32 activations: 3e-4)


# --------------------------------------------------------------------------------------- glm_awq's own


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A synthetic GLM-4.6-AWQ checkpoint (glm_awq's writer) with a tokenizer, 3 layers: 1 dense + 2 MoE."""
    folder = tmp_path_factory.mktemp("tiny") / "ckpt"
    cfg = checkpoint.tiny_config(3, n_routed_experts=8, num_experts_per_tok=2)
    checkpoint.write_checkpoint(folder, cfg, seed=7, shard_bytes=1 << 20)
    return folder


@pytest.fixture(scope="module")
def tiny_fp32(tiny):
    return glm_awq.load(tiny, device="cpu", dtype=torch.float32, max_seq_len=64, progress=False)


@pytest.mark.parametrize("batch, prefix", [(1, 1), (2, 5), (3, 12)])  # one-token prefill; batch > 1; long prefill
def test_kv_cache_decode_equals_full_prefill(tiny_fp32, batch, prefix):
    model = tiny_fp32
    ids = torch.randint(0, 300, (batch, 13), generator=torch.Generator().manual_seed(batch))
    full = model(ids)  # [B, 13, V], no cache
    model.setup_caches(batch)
    steps = [model(ids[:, :prefix], torch.arange(prefix))]
    for p in range(prefix, 13):
        steps.append(model(ids[:, p : p + 1], torch.tensor([p])))
    cached = torch.cat(steps, dim=1)
    assert rel_err(cached, full) < 1e-5


def test_synthetic_logits_are_meaningful(tiny_fp32):
    """The writer's weight scales give finite logits that are far from flat (greedy is not a coin toss)."""
    logits = tiny_fp32(torch.tensor([[1, 2, 3, 4]]))
    assert torch.isfinite(logits).all()
    assert logits.std() > 0.5


def test_stream_equals_generate_and_eos_stops(tiny_fp32):
    model = tiny_fp32
    ids = torch.tensor([[5, 6, 7, 8], [9, 10, 11, 12]])
    free = model.generate(ids, 10, eos_token_id=[])
    streamed = torch.stack(list(model.generate_stream(ids, 10, eos_token_id=[])), dim=1)
    assert torch.equal(free, streamed)
    # make row 0's 4th token and row 1's 6th token the eos: the output stops after the later one,
    # and row 0 repeats its eos from then on
    eos = [int(free[0, 3]), int(free[1, 5])]
    earlier = free[0, :3].tolist() + free[1, :5].tolist()
    assert eos[0] not in earlier and eos[1] not in earlier, "this seed repeats the chosen eos ids: change the prompt"
    out = model.generate(ids, 10, eos_token_id=eos, sync_every=1)
    assert out.shape == (2, 6)
    assert torch.equal(out[1], free[1, :6])
    assert torch.equal(out[0, :4], free[0, :4]) and (out[0, 4:] == eos[0]).all()


def test_generate_rejects_too_long(tiny_fp32):
    with pytest.raises(ValueError, match="max_seq_len=64"):
        tiny_fp32.generate(torch.zeros(1, 60, dtype=torch.long), 10)


@pytest.mark.parametrize("temperature, top_k, top_p", [(0.0, 0, 1.0), (1.0, 1, 1.0), (0.7, 0, 1e-6)])
def test_sampling_limits_reduce_to_greedy(temperature, top_k, top_p):
    # top_k=1 and a vanishing top_p both leave only the argmax
    logits = torch.randn(4, 50, generator=torch.Generator().manual_seed(0))
    out = generate.sample(logits, temperature, top_p, top_k, torch.Generator().manual_seed(1))
    assert torch.equal(out, logits.argmax(-1))


@pytest.mark.parametrize("top_k, top_p", [(3, 1.0), (0, 0.5), (5, 0.3)])
def test_sampling_stays_in_the_allowed_set_and_is_seeded(top_k, top_p):
    logits = torch.randn(1, 40, generator=torch.Generator().manual_seed(2)).repeat(2000, 1)
    g = torch.Generator().manual_seed(3)
    out = generate.sample(logits, 1.0, top_p, top_k, g)
    # top-k first, then the nucleus of the renormalised top-k distribution
    probs, order = torch.softmax(logits[0], -1).sort(descending=True)
    kept = probs[: top_k or 40] / probs[: top_k or 40].sum()
    allowed = set(order[: int((kept.cumsum(0) - kept < top_p).sum())].tolist())
    assert len(allowed) > 1  # the case must leave a choice, or it tests nothing beyond greedy
    assert set(out.tolist()) <= allowed and len(set(out.tolist())) == len(allowed)  # all, and only, allowed
    assert torch.equal(out, generate.sample(logits, 1.0, top_p, top_k, torch.Generator().manual_seed(3)))


def test_generate_text_with_chat_template(tiny_fp32):
    tok = generate.ChatTokenizer(tiny_fp32.checkpoint_dir)
    prompt = "Hi there /nothink"
    rendered = tok.render([{"role": "user", "content": prompt}])
    # jinja2's rendering of the checkpoint's template and the fixed GLM layout agree, /nothink untouched
    assert rendered == generate.ChatTokenizer.glm_layout([{"role": "user", "content": prompt}])
    assert rendered == f"[gMASK]<sop><|user|>\n{prompt}<|assistant|>\n"
    ids = tok.encode(rendered)
    assert ids[:2] == [256 + checkpoint.SPECIAL_TOKENS.index(t) for t in ("[gMASK]", "<sop>")]
    assert tok.tokenizer.decode(ids, skip_special_tokens=False).endswith("/nothink<|assistant|>\n")
    pieces = []
    text, stats = glm_awq.generate_text(tiny_fp32, prompt, 6, eos_token_id=[], on_text=pieces.append,
                                        return_stats=True)  # fmt: skip
    assert isinstance(text, str) and "".join(pieces) == text
    assert stats["new_tokens"] == 6 and stats["prompt_tokens"] == len(ids)
    expected = tiny_fp32.generate(torch.tensor([ids]), 6, eos_token_id=[])[0].tolist()
    assert text == tok.decode(expected)


def test_cli_make_checkpoint_and_demo(tmp_path, monkeypatch, capsys):
    from glm_awq import cli

    out = tmp_path / "ck"
    assert cli.main(["make-checkpoint", str(out), "--layers", "2", "--tiny", "--shard-mb", "1"]) == 0
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1  # sharded
    assert cli.main(["make-checkpoint", str(out), "--layers", "2"]) == 2  # refuses to overwrite
    assert "already holds a checkpoint" in capsys.readouterr().err
    monkeypatch.setenv("GLM_AWQ_CACHE", str(tmp_path / "cache"))
    assert cli.main(["demo", "--max-new-tokens", "4"]) == 0
    printed = capsys.readouterr().out
    assert "tokens/s" in printed and "backend torch" in printed
    assert cli.main(["generate", "--model", str(out), "--prompt", "hey", "--max-new-tokens", "3", "--quiet"]) == 0
    shutil.rmtree(out)


def test_bench_decode_counts_the_bytes_a_decode_step_reads(tiny_fp32):
    """benchmarks/bench_decode.py's floor rests on layer_bytes; check it by hand on the tiny model."""
    import importlib.util
    from pathlib import Path

    pytest.importorskip("triton")  # benchmarks/common.py imports it
    path = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_decode.py"
    spec = importlib.util.spec_from_file_location("bench_decode", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    cfg = tiny_fp32.config
    dense, parts = bench.layer_bytes(tiny_fp32.model.layers[0], cfg, context=10)
    assert parts["kv_cache"] == 2 * cfg.num_key_value_heads * cfg.head_dim * 10 * 2
    assert dense == parts["kv_cache"] + sum(p.numel() * 4 for p in tiny_fp32.model.layers[0].parameters())
    _, parts = bench.layer_bytes(tiny_fp32.model.layers[1], cfg, context=10)
    t = tiny_fp32.model.layers[1].mlp.experts.prepared.tensors
    one_expert = sum(x[0].numel() * x.element_size() for x in t.values())
    assert parts["experts_touched"] == cfg.num_experts_per_tok * one_expert  # A of E experts, int4 + scales


def test_triton_backend_runs_the_model(tmp_path):
    """The model goes through glm_awq.ops only, so another backend runs it unchanged. On the CPU the Triton
    kernels run in the interpreter, which needs fp16 activations (it computes bf16 dots wrongly)."""
    reason = glm_awq.available_backends("cpu")["triton"]
    if reason is not None:
        pytest.skip(reason)
    cfg = checkpoint.tiny_config(2, n_routed_experts=4, num_experts_per_tok=2)  # small: the interpreter is slow
    # int4 shared experts: merged gate/up runs through the Triton GEMM too (q/k/v always merge in layer 1)
    checkpoint.write_checkpoint(tmp_path / "c", cfg, seed=9, tokenizer=False, quantize_shared=True)
    ref = glm_awq.load(tmp_path / "c", device="cpu", dtype=torch.float32, progress=False)
    model = glm_awq.load(tmp_path / "c", device="cpu", dtype=torch.float16, backend="triton", progress=False)
    assert model.backends() == ["triton"] and model.model.layers[1].mlp.shared_experts.gate_up_proj is not None
    ids = torch.randint(0, 300, (1, 5), generator=torch.Generator().manual_seed(4))
    assert rel_err(model(ids), ref(ids)) < 1e-2
    assert torch.equal(model.generate(ids, 3, eos_token_id=[]), ref.generate(ids, 3, eos_token_id=[]))


@pytest.mark.gpu
def test_gpu_default_backend_and_cuda_graph_decode(tiny):
    """On a GPU: the default (fast) backend against the torch backend, and graphed decode against eager decode."""
    ref = glm_awq.load(tiny, device="cuda", dtype=torch.bfloat16, backend="torch", max_seq_len=64, progress=False)
    model = glm_awq.load(tiny, device="cuda", dtype=torch.bfloat16, max_seq_len=64, progress=False)
    ids = torch.randint(0, 300, (2, 11), generator=torch.Generator().manual_seed(6)).cuda()
    assert rel_err(model(ids), ref(ids)) < 1e-2
    if "torch" in model.backends():
        pytest.skip(f"no fast backend on this GPU: {glm_awq.available_backends()}")
    eager = model.generate(ids, 12, eos_token_id=[], cuda_graph=False)
    graphed = model.generate(ids, 12, eos_token_id=[], cuda_graph=True)
    assert model._decoders[(2, True)].graph is not None  # really captured
    assert torch.equal(graphed, eager)
    # positions past the prompt were written through the graph: a second call reuses it and still agrees
    assert torch.equal(model.generate(ids, 12, eos_token_id=[], cuda_graph=True), eager)
