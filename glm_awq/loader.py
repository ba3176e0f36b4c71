"""glm_awq.load: read a GLM-4.6 checkpoint's safetensors shards straight into a GlmForCausalLM.

The model is built on `meta`; each shard is opened once (safe_open, memory-mapped) and its tensors are read one
at a time, checked (name, shape, dtype) before their bytes are read, and moved to the device. Host memory
stays at about one tensor. Quantized weights are handed to glm_awq.ops.prepare_linear / prepare_experts as
soon as a module is complete, so the backend's layout is built once, at load.

Whether a module is int4 or float is decided by what the checkpoint holds (`P.weight_packed` or `P.weight`),
never by quantization_config's targets/ignore. Projections of one input (q/k/v, gate/up) wait for each other:
when all are int4, their checkpoint tensors are concatenated along N and prepared once, as one linear
(model.install_merged); when any is float, each is filled on its own.

Any problem raises a LoaderError naming the file and the tensor; no partly filled model is ever returned.
Checkpoints are read with safetensors only (no pickle).
"""

from __future__ import annotations

import json
import re
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from glm_awq import ops
from glm_awq.config import GlmConfig
from glm_awq.model import Experts, GlmForCausalLM, Linear, install_merged

INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"
FLOATS = (torch.bfloat16, torch.float16, torch.float32)
SAFETENSORS_DTYPES = {
    "BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32, "F64": torch.float64,
    "I8": torch.int8, "U8": torch.uint8, "I16": torch.int16, "I32": torch.int32, "I64": torch.int64,
    "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}  # fmt: skip
_EXPERT = re.compile(r"^(model\.layers\.\d+\.mlp\.experts)\.(\d+)\.(gate|up|down)_proj\.(\w+)$")
_LAYER = re.compile(r"^model\.layers\.(\d+)\.")


class LoaderError(ValueError):
    """A checkpoint that does not match the GLM-4.6-AWQ format this config describes."""


def _dtype_name(dtype) -> str:
    return str(dtype).removeprefix("torch.")


# --------------------------------------------------------------------------------------------- checkpoint


def find_shards(path: str | Path) -> tuple[Path, dict[Path, list[str] | None]]:
    """(folder, {shard file: tensor names listed for it by the index, or None for 'all' (single file)})."""
    path = Path(path)
    if path.is_file() and path.name.endswith(".json"):
        folder, index = path.parent, path
    elif path.is_file() and path.suffix == ".safetensors":
        return path.parent, {path: None}
    elif path.is_dir():
        folder, index = path, path / INDEX
        if not index.exists():
            if (path / SINGLE).exists():
                return path, {path / SINGLE: None}
            raise FileNotFoundError(f"{path} holds neither {INDEX} nor {SINGLE}; is it a GLM-4.6 checkpoint folder?")
    else:
        raise FileNotFoundError(f"{path} does not exist")
    try:
        data = json.loads(index.read_text())
    except json.JSONDecodeError as exc:
        raise LoaderError(f"{index} is not valid JSON ({exc}); re-download it") from None
    weight_map = data.get("weight_map") if isinstance(data, dict) else None
    if not isinstance(weight_map, dict) or not weight_map:
        raise LoaderError(f"{index} has no 'weight_map' object mapping tensor names to shard files")
    shards: dict[Path, list[str]] = {}
    for name, file in weight_map.items():
        if not isinstance(file, str) or "/" in file or "\\" in file or file.startswith(".."):
            raise LoaderError(f"{index}: weight_map[{name!r}] = {file!r} is not a shard file name in this folder")
        shards.setdefault(folder / file, []).append(name)
    for file in shards:
        if not file.exists():
            raise LoaderError(f"{index} lists {file.name} (e.g. for {shards[file][0]}) but {file} does not exist")
    return folder, shards


# ------------------------------------------------------------------------------------------------- filling


@dataclass
class _Pending:
    """Tensors of one Linear gathered until the module is complete (they may span shards)."""

    module: Linear
    tensors: dict[str, torch.Tensor] = field(default_factory=dict)
    files: dict[str, str] = field(default_factory=dict)


@dataclass
class _Merge:
    """Sibling Linears of one input (model.Attention/MLP.MERGES), each held once complete until all are."""

    parent: torch.nn.Module
    name: str  # the merged module's attribute, e.g. "qkv_proj"
    parts: tuple[str, ...]  # the parts' checkpoint names, in output order
    ready: dict[str, _Pending] = field(default_factory=dict)


@dataclass
class _ExpertStack:
    """One layer's experts, copied into their stacked place as they arrive: w13 [E, 2I, H/8], w2 [E, H, I/8]."""

    module: Experts
    tensors: dict[str, torch.Tensor] = field(default_factory=dict)
    seen: set = field(default_factory=set)


class _Filler:
    def __init__(self, model: GlmForCausalLM, device: torch.device, backend: str | None, merge: bool):
        self.model, self.device, self.backend = model, device, backend
        c = model.config
        self.group_size = c.group_size
        self.linears = {n: m for n, m in model.named_modules() if isinstance(m, Linear)}
        self.merges: dict[str, _Merge] = {}  # a part's checkpoint name -> its group
        if merge:
            for n, m in model.named_modules():
                for merged, parts in getattr(m, "MERGES", {}).items():
                    group = _Merge(m, merged, tuple(f"{n}.{p}" for p in parts))
                    self.merges.update(dict.fromkeys(group.parts, group))
        self.finished: set[str] = set()  # complete Linears (filled, prepared or held for a merge): no tensor follows
        self.experts = {n: _ExpertStack(m) for n, m in model.named_modules() if isinstance(m, Experts)}
        # every plain parameter (norms, embeddings, router), by checkpoint name
        self.params = {}
        for mname, module in model.named_modules():
            if isinstance(module, Linear):
                continue
            for pname, p in module.named_parameters(recurse=False):
                self.params[f"{mname}.{pname}" if mname else pname] = (module, pname, tuple(p.shape), p.dtype)
        self.done: set[str] = set()
        self.pending: dict[str, _Pending] = {}
        self.mtp_layers = range(c.num_hidden_layers, c.num_hidden_layers + c.num_nextn_predict_layers)

    # A tensor's fate is decided by its name before its bytes are read.
    def accept(self, name: str, file: Path, shape: tuple, dtype: torch.dtype) -> str:
        """'read' or 'skip' (MTP layer); raises for names this model does not have."""
        m = _LAYER.match(name)
        if m and int(m.group(1)) in self.mtp_layers:
            return "skip"
        if name in self.params:
            self._check(name, file, shape, self.params[name][2], dtype, FLOATS)
            return "read"
        prefix, _, leaf = name.rpartition(".")
        if prefix in self.linears:
            self._check_linear(name, file, prefix, leaf, shape, dtype)
            return "read"
        m = _EXPERT.match(name)
        if m and m.group(1) in self.experts:
            self._check_expert(name, file, int(m.group(2)), m.group(3), m.group(4), shape, dtype)
            return "read"
        raise LoaderError(
            f"{file.name}: unexpected tensor {name} {list(shape)}; it is not part of a GLM-4.6 model with this "
            f"config ({self.model.config.num_hidden_layers} layers, first_k_dense_replace="
            f"{self.model.config.first_k_dense_replace}); is config.json from the same checkpoint?"
        )

    def _check(self, name, file, shape, want, dtype, allowed):
        if tuple(shape) != tuple(want):
            raise LoaderError(f"{file.name}: {name} has shape {list(shape)}; this config expects {list(want)}")
        if dtype not in allowed:
            names = ", ".join(_dtype_name(d) for d in allowed)
            raise LoaderError(f"{file.name}: {name} has dtype {_dtype_name(dtype)}; expected {names}")

    def _packed_shapes(self, n: int, k: int, name: str, file: Path) -> dict:
        if self.group_size is None:
            raise LoaderError(
                f"{file.name}: {name} is int4 (weight_packed) but config.json has no quantization_config; "
                "use the config.json that came with the checkpoint"
            )
        if k % self.group_size or k % 8:
            raise LoaderError(f"{file.name}: {name}: K={k} is not a multiple of group_size={self.group_size}")
        return {"weight_packed": (n, k // 8), "weight_scale": (n, k // self.group_size), "weight_shape": (2,)}

    def _leaf_rule(self, leaf, n, k, has_bias, name, file):
        """(shape, allowed dtypes) for one serialized tensor of a Linear [N, K]."""
        if leaf == "weight":
            return (n, k), FLOATS
        if leaf == "bias" and has_bias:
            return (n,), FLOATS
        if leaf in ("weight_packed", "weight_scale", "weight_shape"):
            shape = self._packed_shapes(n, k, name, file)[leaf]
            dtypes = {"weight_packed": (torch.int32,), "weight_scale": FLOATS,
                      "weight_shape": (torch.int64, torch.int32)}[leaf]  # fmt: skip
            return shape, dtypes
        if leaf in ("weight_zero_point", "weight_g_idx"):
            raise LoaderError(
                f"{file.name}: {name} is present: "
                + ("asymmetric int4 (zero points)" if leaf == "weight_zero_point" else "activation reordering (g_idx)")
                + " is not supported; glm_awq runs symmetric pack-quantized weights without act-order"
            )
        raise LoaderError(f"{file.name}: unexpected tensor {name}; a Linear here holds weight/bias or the int4 trio")

    def _check_linear(self, name, file, prefix, leaf, shape, dtype):
        lin = self.linears[prefix]
        want, allowed = self._leaf_rule(leaf, lin.out_features, lin.in_features, lin.bias is not None, name, file)
        self._check(name, file, shape, want, allowed=allowed, dtype=dtype)

    def _check_expert(self, name, file, e, proj, leaf, shape, dtype):
        ex = self.experts[name.split(".experts.")[0] + ".experts"].module
        if e >= ex.num_experts:
            raise LoaderError(f"{file.name}: unexpected tensor {name}: expert {e} >= n_routed_experts={ex.num_experts}")
        if leaf == "weight":
            raise LoaderError(
                f"{file.name}: {name} is a float expert weight; glm_awq runs routed experts in int4 only "
                "(GLM-4.6-AWQ quantizes every routed expert). Quantize the checkpoint with llmcompressor W4A16"
            )
        n, k = (ex.hidden_size, ex.intermediate_size) if proj == "down" else (ex.intermediate_size, ex.hidden_size)
        want, allowed = self._leaf_rule(leaf, n, k, False, name, file)
        self._check(name, file, shape, want, allowed=allowed, dtype=dtype)

    # Filling, once the tensor has been read and moved to the device.
    def put(self, name: str, file: Path, t: torch.Tensor) -> None:
        if name in self.done:
            raise LoaderError(f"{file.name}: {name} appears twice in the checkpoint")
        self.done.add(name)
        if name in self.params:
            module, pname, _, target = self.params[name]
            setattr(module, pname, torch.nn.Parameter(t.to(target), requires_grad=False))
            return
        prefix, _, leaf = name.rpartition(".")
        if prefix in self.linears:
            if prefix in self.finished:
                raise LoaderError(
                    f"{file.name}: {name} arrives after {prefix} was already complete: a Linear holds either a float "
                    "weight (+ bias) or the int4 weight_packed / weight_scale / weight_shape (+ bias), not both"
                )
            p = self.pending.setdefault(prefix, _Pending(self.linears[prefix]))
            p.tensors[leaf], p.files[leaf] = t, file.name
            self._maybe_finish_linear(prefix, p)
            return
        m = _EXPERT.match(name)
        self._put_expert(m.group(1), int(m.group(2)), m.group(3), m.group(4), file, t)

    def _check_weight_shape(self, name: str, file: str, t: torch.Tensor, n: int, k: int) -> None:
        if t.tolist() != [n, k]:
            raise LoaderError(f"{file}: {name} = {t.tolist()}, but the module is [out={n}, in={k}]")

    def _maybe_finish_linear(self, prefix: str, p: _Pending) -> None:
        lin, t = p.module, p.tensors
        if "weight" in t and "weight_packed" in t:
            raise LoaderError(f"{p.files['weight']}: {prefix} has both weight and weight_packed; which one is real?")
        complete = "weight" in t or {"weight_packed", "weight_scale", "weight_shape"} <= t.keys()
        if not complete or (lin.bias is not None and "bias" not in t):
            return
        if "weight_shape" in t:
            self._check_weight_shape(f"{prefix}.weight_shape", p.files["weight_shape"], t["weight_shape"],
                                     lin.out_features, lin.in_features)  # fmt: skip
        del self.pending[prefix]
        self.finished.add(prefix)
        group = self.merges.get(prefix)
        if group is None:
            self._fill_linear(prefix, p)
            return
        group.ready[prefix] = p
        if len(group.ready) == len(group.parts):
            self._finish_merge(group)

    def _fill_linear(self, prefix: str, p: _Pending) -> None:
        """A complete Linear on its own: float weights into the module, int4 ones prepared for the backend."""
        lin, t = p.module, p.tensors
        bias = t["bias"].to(self.model.dtype) if lin.bias is not None else None
        if "weight" in t:
            lin.weight = torch.nn.Parameter(t["weight"].to(self.model.dtype), requires_grad=False)
            if bias is not None:
                lin.bias = torch.nn.Parameter(bias, requires_grad=False)
        else:
            lin.set_prepared(self._prepare_linear(prefix, p.files["weight_packed"], t, bias))

    def _finish_merge(self, group: _Merge) -> None:
        """All parts are complete: one linear of their concatenated N when all are int4 with one scale dtype,
        else each on its own. Their tensors are dropped either way."""
        parts = [group.ready.pop(prefix) for prefix in group.parts]
        if any("weight" in p.tensors for p in parts) or len({p.tensors["weight_scale"].dtype for p in parts}) > 1:
            for prefix, p in zip(group.parts, parts):
                self._fill_linear(prefix, p)
            return
        leaves = [leaf for leaf in ("weight_packed", "weight_scale", "bias") if leaf in parts[0].tensors]
        t = {leaf: torch.cat([p.tensors[leaf] for p in parts]) for leaf in leaves}  # along N
        bias = t["bias"].to(self.model.dtype) if "bias" in t else None
        label = f"{' + '.join(group.parts)} (merged into {group.name})"
        prepared = self._prepare_linear(label, parts[0].files["weight_packed"], t, bias)
        install_merged(group.parent, group.name, prepared)

    def _prepare_linear(self, label: str, file: str, t: dict, bias) -> ops.PreparedLinear:
        try:
            return ops.prepare_linear(t["weight_packed"], t["weight_scale"], bias, self.group_size, self.backend)
        except (ValueError, TypeError) as exc:
            raise LoaderError(f"{file}: {label}: {exc}") from exc

    def _put_expert(self, stack_name: str, e: int, proj: str, leaf: str, file: Path, t: torch.Tensor) -> None:
        st = self.experts[stack_name]
        ex = st.module
        big_e, h, i = ex.num_experts, ex.hidden_size, ex.intermediate_size
        if leaf == "weight_shape":
            n, k = (h, i) if proj == "down" else (i, h)
            self._check_weight_shape(f"{stack_name}.{e}.{proj}_proj.weight_shape", file.name, t, n, k)
        else:
            key = ("w2_" if proj == "down" else "w13_") + leaf.removeprefix("weight_")  # w13_packed, w2_scale, ...
            if key not in st.tensors:
                rows = h if proj == "down" else 2 * i
                cols = t.shape[1]
                st.tensors[key] = torch.empty(big_e, rows, cols, dtype=t.dtype, device=self.device)
            dst = st.tensors[key]
            if dst.dtype != t.dtype:
                raise LoaderError(
                    f"{file.name}: {stack_name}.{e}.{proj}_proj.{leaf} is {_dtype_name(t.dtype)} but other experts "
                    f"of this layer store {_dtype_name(dst.dtype)}; all experts of a layer must agree"
                )
            rows = {"gate": slice(0, i), "up": slice(i, 2 * i), "down": slice(0, h)}[proj]
            dst[e, rows].copy_(t)
        st.seen.add((e, proj, leaf))
        if len(st.seen) == big_e * 3 * 3:
            try:
                ex.prepared = ops.prepare_experts(
                    st.tensors["w13_packed"], st.tensors["w13_scale"], st.tensors["w2_packed"], st.tensors["w2_scale"],
                    self.group_size, self.backend,
                )  # fmt: skip
            except (ValueError, TypeError) as exc:
                raise LoaderError(f"{file.name}: {stack_name}: {exc}") from exc
            st.tensors.clear()

    def check_complete(self, folder: Path) -> None:
        missing = []
        for name, (module, pname, _, _) in self.params.items():
            if getattr(module, pname).is_meta:
                missing.append(name)
        for name, lin in self.linears.items():
            if name not in self.finished and lin.prepared is None and (lin.weight is None or lin.weight.is_meta):
                p = self.pending.get(name)
                have = sorted(p.tensors) if p else []
                missing.append(f"{name} (found {', '.join(have)})" if have else f"{name}.weight or .weight_packed")
        for name, st in self.experts.items():
            if st.module.prepared is None:
                ex = st.module
                absent = [
                    f"{name}.{e}.{proj}_proj.{leaf}"
                    for e in range(ex.num_experts)
                    for proj in ("gate", "up", "down")
                    for leaf in ("weight_packed", "weight_scale", "weight_shape")
                    if (e, proj, leaf) not in st.seen
                ]
                more = f" (and {len(absent) - 1} more expert tensors of this layer)" if len(absent) > 1 else ""
                missing.append(absent[0] + more)
        if missing:
            shown = "; ".join(missing[:5]) + (f"; ... {len(missing) - 5} more" if len(missing) > 5 else "")
            raise LoaderError(
                f"{folder}: {len(missing)} module(s) missing from the checkpoint: {shown}. "
                "Is the download complete, and is config.json (num_hidden_layers, dims) from the same checkpoint?"
            )


# ---------------------------------------------------------------------------------------------------- load


def load(
    path: str | Path,
    device: str | torch.device | None = None,
    dtype: torch.dtype = torch.bfloat16,
    backend: str | None = None,
    max_seq_len: int = 4096,
    progress: bool = True,
    merge_projections: bool = True,
) -> GlmForCausalLM:
    """Load a GLM-4.6(-AWQ) checkpoint folder (config.json + index + shards, or one model.safetensors).

    device: default cuda if visible, else cpu. dtype: activations and float weights (bf16; fp32 for tight
    tests). backend: glm_awq.ops backend for the int4 weights (None: GLM_AWQ_BACKEND, default auto).
    max_seq_len: the KV cache and RoPE table length. merge_projections: run q/k/v and gate/up as one int4 linear
    each where all of them are int4 (False keeps every projection separate). Returns the model in eval mode.
    """
    from safetensors import SafetensorError, safe_open

    if dtype not in FLOATS:
        raise ValueError(f"dtype={dtype} is not supported; use torch.bfloat16, torch.float16 or torch.float32")
    if max_seq_len < 1:
        raise ValueError(f"max_seq_len={max_seq_len} must be positive")
    device = torch.device(device if device is not None else ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device={str(device)!r} but torch sees no CUDA GPU (torch {torch.__version__}); use device='cpu'")
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    folder, shards = find_shards(path)
    config = GlmConfig.from_file(folder / "config.json")

    with torch.device("meta"):
        model = GlmForCausalLM(config, dtype)
    filler = _Filler(model, device, backend, merge_projections)
    total = sum(f.stat().st_size for f in shards)
    bar = _progress(total, progress)
    start, nbytes = time.perf_counter(), 0
    try:
        for file, names in shards.items():
            try:
                handle = safe_open(str(file), framework="pt", device="cpu")
            except (SafetensorError, OSError) as exc:
                raise LoaderError(f"{file}: cannot open the shard ({exc}); is it truncated? Re-download it") from None
            with handle as f:
                present, counted = set(f.keys()), 0
                for name in names if names is not None else sorted(present):
                    if name not in present:
                        raise LoaderError(f"{file}: the index lists {name} in {file.name} but the shard lacks it")
                    sl = f.get_slice(name)
                    shape, dt = tuple(sl.get_shape()), SAFETENSORS_DTYPES.get(sl.get_dtype(), sl.get_dtype())
                    size = _nbytes(shape, dt)
                    if filler.accept(name, file, shape, dt) == "read":
                        try:
                            t = f.get_tensor(name)
                        except (SafetensorError, OSError, RuntimeError) as exc:
                            raise LoaderError(f"{file}: cannot read {name} ({exc}); is the shard truncated?") from None
                        filler.put(name, file, t.to(device))
                        nbytes += size
                    bar.update(size)
                    counted += size
            bar.update(file.stat().st_size - counted)  # the header, and tensors the index did not list
        if config.tie_word_embeddings and model.lm_head.weight is not None and model.lm_head.weight.is_meta:
            model.lm_head.weight = model.model.embed_tokens.weight
        filler.check_complete(folder)
    finally:
        bar.close()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    seconds = time.perf_counter() - start
    model.setup_rope(max_seq_len, device)
    if set(model.backends()) & {"triton", "cuda"}:  # Triton runs there: norms, RoPE, attention, float linears
        model.use_fused_kernels(True)
    model.checkpoint_dir = folder
    model.load_stats = {"bytes": nbytes, "seconds": seconds, "gb_per_s": nbytes / max(seconds, 1e-9) / 1e9}
    return model.eval()


def _nbytes(shape: tuple, dtype) -> int:
    n = 1
    for s in shape:
        n *= s
    return n * (dtype.itemsize if isinstance(dtype, torch.dtype) else 1)


class _NoBar:
    def update(self, n):
        pass

    def close(self):
        pass


def _progress(total: int, enabled: bool):
    if not enabled:
        return _NoBar()
    from tqdm.auto import tqdm

    return tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, desc="loading", dynamic_ncols=True)
