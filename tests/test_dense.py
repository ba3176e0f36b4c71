"""The float skinny kernels (glm_awq.kernels.dense): linear and merged SwiGLU against fp64 torch at odd shapes and
every split, the GLM-4.6 shapes on a GPU, and the model's use of them (merged gate/up views, the dispatch rule)."""

import functools

import pytest
import torch
from helpers import device_and_dtypes, poison_allocator, rel_err

from glm_awq import ops

DEVICE, DTYPES = device_and_dtypes()
if (reason := ops.available_backends(DEVICE).get("triton")) is not None:
    pytest.skip(f"triton: {reason}", allow_module_level=True)

from glm_awq.kernels import dense  # noqa: E402


def _data(m, n, k, dtype, seed, bias=False):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(m, k, generator=gen).to(dtype)
    w = (torch.randn(n, k, generator=gen) * 0.05).to(dtype)
    b = (torch.randn(n, generator=gen) * 0.1).to(dtype) if bias else None
    return x, w, b


def _on_device(*tensors):
    return [t.to(DEVICE) if t is not None else None for t in tensors]


def _ref_linear(x, w, b):
    y = x.double() @ w.double().T
    return y + b.double() if b is not None else y


def _ref_swiglu(x, gate_up):
    i = gate_up.shape[0] // 2
    g, u = (x.double() @ gate_up.double().T).split(i, dim=-1)
    return torch.nn.functional.silu(g) * u


# M = 1, 3, 16 (the most rows); N = 40 and 130 leave ragged 64-feature tiles; K = 200 ends inside a 128-deep
# step, K = 1152 is nine steps (split 1, 3, 9 or the automatic split). A bias on every shape but one.
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("m, n, k", [(1, 40, 1152), (3, 130, 200), (16, 64, 1152), (1, 130, 128)])
@pytest.mark.parametrize("split", [1, 3, 9, 0])
@pytest.mark.parametrize("swap", [0, 1])
def test_linear_matches_reference_and_repeats_bits(m, n, k, dtype, split, swap):
    x, w, b = _on_device(*_data(m, n, k, dtype, m + n + k, bias=k != 128))
    tickets = dense.tickets_for(n, DEVICE)
    cfg = dict(BLOCK_N=64, BLOCK_K=128, STAGES=3, SWAP=swap, SPLIT_K=split, num_warps=4)
    run = functools.partial(dense.linear, x, w, b, tickets=tickets, config=cfg)
    poison_allocator(DEVICE)
    out = run()
    assert out.dtype == dtype and out.shape == (m, n)
    assert rel_err(out.cpu(), _ref_linear(x.cpu(), w.cpu(), b.cpu() if b is not None else None)) < 1e-2
    assert not tickets.any(), "the split-K tickets must be left at zero"
    assert torch.equal(out, run())


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("m, i, k", [(1, 40, 1152), (5, 96, 384), (16, 64, 256)])  # I = 40: a ragged tile
@pytest.mark.parametrize("split", [1, 3, 0])
@pytest.mark.parametrize("swap", [0, 1])
def test_swiglu_matches_reference(m, i, k, dtype, split, swap):
    x, w, _ = _on_device(*_data(m, 2 * i, k, dtype, m * i + k))
    cfg = dict(BLOCK_N=32, BLOCK_K=128, STAGES=3, SWAP=swap, SPLIT_K=split, num_warps=4)
    tickets = dense.tickets_for(i, DEVICE)
    poison_allocator(DEVICE)
    out = dense.swiglu(x, w, tickets, config=cfg)
    assert out.shape == (m, i) and out.dtype == dtype
    assert rel_err(out.cpu(), _ref_swiglu(x.cpu(), w.cpu())) < 1e-2
    assert not tickets.any(), "the split-K tickets must be left at zero"
    assert torch.equal(out, dense.swiglu(x, w, config=cfg))  # tickets of its own


def test_default_config_and_leading_dims():
    x, w, b = (t.to(DEVICE) for t in _data(6, 48, 512, DTYPES[0], 7, bias=True))
    out = dense.linear(x.reshape(2, 3, 512), w, b)
    assert out.shape == (2, 3, 48)
    assert rel_err(out.reshape(6, 48).cpu(), _ref_linear(x.cpu(), w.cpu(), b.cpu())) < 1e-2
    assert dense.linear(x[:0], w).shape == (0, 48)


def test_bad_inputs_name_the_problem():
    x, w, b = (t.to(DEVICE) for t in _data(2, 48, 256, DTYPES[0], 1, bias=True))
    with pytest.raises(TypeError, match="differs from x's"):
        dense.linear(x, w.float())
    with pytest.raises(ValueError, match="expects 256"):
        dense.linear(x[:, :128], w)
    with pytest.raises(ValueError, match="at most 16 rows"):
        dense.linear(x.repeat(9, 1), w)
    with pytest.raises(ValueError, match="contiguous"):
        dense.linear(x, w.T.contiguous().T)
    with pytest.raises(ValueError, match="bias must be"):
        dense.linear(x, w, b[:10])
    with pytest.raises(ValueError, match="bias must be a contiguous"):
        dense.linear(x, w, b.repeat_interleave(2)[::2])  # the right shape, strided
    with pytest.raises(ValueError, match="K = 0"):
        dense.linear(x[:, :0], w[:, :0].contiguous())
    with pytest.raises(ValueError, match="two .* halves"):
        dense.swiglu(x, w[:47])
    with pytest.raises(TypeError, match="bf16 or fp16"):
        dense.linear(x.float(), w.float())
    with pytest.raises(ValueError, match="tickets must be int32"):
        dense.linear(x, w, tickets=torch.zeros(1, dtype=torch.int32, device=DEVICE),
                     config=dict(BLOCK_N=16, BLOCK_K=128, STAGES=2, SWAP=0, SPLIT_K=2, num_warps=4))  # fmt: skip


# GLM-4.6's float linears at decode: the shared expert (gate_up merged, down), layers 0-2's MLP and attention.
GLM = {"shared_gate_up": (3072, 5120), "shared_down": (5120, 1536), "dense_gate_up": (24576, 5120),
       "dense_down": (5120, 12288), "attn_q": (12288, 5120), "attn_kv": (1024, 5120)}  # fmt: skip


@pytest.mark.gpu
@pytest.mark.parametrize("shape", list(GLM))
@pytest.mark.parametrize("m", [1, 3, 8, 16])
def test_glm_shapes(shape, m):
    n, k = GLM[shape]
    x, w = (t.cuda() for t in _data(m, n, k, torch.bfloat16, m)[:2])
    poison_allocator("cuda")
    if shape.endswith("gate_up"):
        out, ref = dense.swiglu(x, w, dense.tickets_for(n // 2, "cuda")), _ref_swiglu(x.cpu(), w.cpu())
    else:
        out, ref = dense.linear(x, w, None, dense.tickets_for(n, "cuda")), _ref_linear(x.cpu(), w.cpu(), None)
    assert rel_err(out.cpu(), ref) < 1e-2, shape


@pytest.mark.gpu
def test_cuda_graph_replays():
    x, w, b = (t.cuda() for t in _data(1, 5120, 1536, torch.bfloat16, 4, bias=True))
    tickets = dense.tickets_for(5120, "cuda")
    dense.linear(x, w, b, tickets)  # compile before capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = dense.linear(x, w, b, tickets)
    for seed in range(2):  # twice: the second replay relies on the first leaving the tickets at zero
        x.copy_(torch.randn(1, 1536, generator=torch.Generator().manual_seed(seed)).to(torch.bfloat16).cuda())
        graph.replay()
        assert rel_err(out.cpu(), _ref_linear(x.cpu(), w.cpu(), b.cpu())) < 1e-2


@pytest.mark.parametrize("i", [64, 1536])  # fewer tiles than a wave holds (here and on a GPU), and the shared expert
def test_split_fills_one_wave(i):
    """The automatic split: as many programs as fit the SMs at once (one wave), never more splits than steps."""
    device = torch.device(DEVICE)
    cfg = dense.default_config(1, i, 5120, True, device)
    sms, per_sm = dense._sm_count(device), dense._resident(cfg, True, device)
    split = dense.split_for(1, i, 5120, cfg, True, device)
    tiles, wave = i // cfg["BLOCK_N"], sms * per_sm  # 40 steps: the most splits that keep the grid in one wave
    assert (tiles * split <= wave or split == 1) and (split == 16 or tiles * (split + 1) > wave)
    if tiles < wave:
        assert split > 1
    assert dense.split_for(1, 64, 256, cfg, False, torch.device(DEVICE)) == 2  # K = 256: two steps at most
    assert dense.split_for(1, 1 << 20, 5120, cfg, False, torch.device(DEVICE)) == 1  # more tiles than a wave


def test_takes_decode_sized_16_bit_inputs_only():
    x, w, _ = _on_device(*_data(8, 64, 2048, DTYPES[0], 2))
    assert dense.takes(x, w) and dense.takes(x[:1], w) and dense.takes(x.reshape(2, 4, 2048), w)
    assert dense.takes(x[:0], w)  # no rows: the kernel returns an empty result
    assert not dense.takes(x.repeat(2, 1), w)  # 16 rows: cuBLAS
    assert not dense.takes(x[:1].expand(3, 3, 2048), w)  # 9 rows
    assert not dense.takes(x.half() if x.dtype == torch.bfloat16 else x.bfloat16(), w)  # dtypes differ
    assert not dense.takes(x.float(), w.float())  # fp32: torch
    assert not dense.takes(x[:, :1024], w[:, :1024].contiguous())  # K < MIN_K: cuBLAS measured faster
    assert not dense.takes(x, w.T.contiguous().T)


def test_mlp_merges_float_gate_up_into_views(monkeypatch):
    """MLP.set_fused stacks float gate/up into one tensor whose halves are the weights (no copy left behind), and
    the fused forward (swiglu, then down) matches the eager one."""
    from glm_awq.model import MLP, _stacked

    monkeypatch.setattr(dense, "MIN_K", 0)  # these tiny weights take the kernel too
    ran = []
    monkeypatch.setattr(dense, "swiglu", lambda *a, _f=dense.swiglu, **k: ran.append("swiglu") or _f(*a, **k))
    monkeypatch.setattr(dense, "linear", lambda *a, _f=dense.linear, **k: ran.append("linear") or _f(*a, **k))
    dtype = DTYPES[0]
    mlp = MLP(256, 96, dtype).to(DEVICE)
    gen = torch.Generator().manual_seed(3)
    for lin in (mlp.gate_proj, mlp.up_proj, mlp.down_proj):
        lin.weight.data.copy_((torch.randn(lin.weight.shape, generator=gen) * 0.05).to(dtype))
    x = torch.randn(2, 256, generator=gen).to(dtype).to(DEVICE)
    eager = mlp(x)
    for m in (mlp, mlp.gate_proj, mlp.up_proj, mlp.down_proj):
        m.set_fused(True)
    gate, up = mlp.gate_proj.weight, mlp.up_proj.weight
    merged = _stacked(gate, up)
    assert merged is not None and merged.shape == (192, 256) and merged.data_ptr() == gate.data_ptr()
    assert torch.equal(merged[96:], up) and up.data_ptr() == merged[96:].data_ptr()
    assert rel_err(mlp(x).cpu(), eager.cpu()) < 1e-2
    assert ran == ["swiglu", "linear"], ran  # gate_up, then down
    assert repr(mlp.gate_proj).endswith("(256 -> 96, float)")
    mlp.set_fused(False)
    mlp.set_fused(True)  # already merged: kept, no second copy
    assert mlp.gate_proj.weight.data_ptr() == gate.data_ptr()
    # a weight replaced after the merge breaks the adjacency: the eager path runs, on the new weight
    mlp.up_proj.weight = torch.nn.Parameter(up.detach() * 2, requires_grad=False)
    ran.clear()
    assert rel_err(mlp(x).cpu(), _eager_mlp(mlp, x).cpu()) < 1e-2
    assert "swiglu" not in ran


def _eager_mlp(mlp, x):
    return torch.nn.functional.linear(
        torch.nn.functional.silu(x @ mlp.gate_proj.weight.T) * (x @ mlp.up_proj.weight.T), mlp.down_proj.weight
    )
