"""Generation: KV-cache prefill + decode, sampling without host syncs, CUDA-graph decode, text in and out.

The decode step has static shapes (token [B, 1], position int64 [1] as a device tensor advanced in place), so on
a GPU it is captured once per batch size in a CUDA graph and replayed. Sampling (temperature, top-k, top-p)
uses the exponential race (argmax of p / Exp(1), the same distribution as torch.multinomial without its host
sync). `generate` looks at the end-of-sequence flags only every `sync_every` steps; `generate_stream` hands
every token to the caller, which is a sync by nature.

Legend: B batch, T prompt tokens, V vocab, n new tokens.
"""

from __future__ import annotations

import json
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import torch

# ------------------------------------------------------------------------------------------------ sampling


def sample(
    logits: torch.Tensor,
    temperature: float = 0.0,
    top_p: float = 1.0,
    top_k: int = 0,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """logits fp32 [B, V] -> token ids int64 [B]. temperature 0 is greedy; top_k 0 and top_p 1 disable those."""
    if temperature <= 0:
        return logits.argmax(-1)
    logits = logits.float() / temperature
    if top_k > 0:
        kth = logits.topk(min(top_k, logits.shape[-1]), dim=-1).values[:, -1:]  # [B, 1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    if top_p < 1.0:
        sorted_probs, order = probs.sort(dim=-1, descending=True)
        # keep the smallest prefix whose mass reaches top_p (the first token always stays)
        drop = sorted_probs.cumsum(-1) - sorted_probs >= top_p
        probs = torch.zeros_like(probs).scatter_(-1, order, sorted_probs.masked_fill(drop, 0.0))
    race = torch.empty_like(probs).exponential_(1.0, generator=generator)
    return (probs / race).argmax(-1)


# ------------------------------------------------------------------------------------------------- decode


class Decoder:
    """One decode step for a fixed batch size: static token [B, 1] and position [1] buffers, optionally replayed
    from a CUDA graph. Holds the model's KV cache by address, so it lives as long as that cache."""

    def __init__(self, model, batch: int, cuda_graph: bool, strict: bool = True):
        """strict=False: if capture fails (a backend that syncs or allocates on the host), warn and run eagerly."""
        self.model = model
        device = model.device
        self.token = torch.zeros(batch, 1, dtype=torch.long, device=device)
        self.pos = torch.zeros(1, dtype=torch.long, device=device)
        self.graph = None
        self.logits = None
        if cuda_graph:
            try:
                self._capture()
            except Exception as exc:  # noqa: BLE001  (any capture failure: the eager step still works)
                if strict:
                    raise
                self.graph = self.logits = None
                torch.cuda.synchronize()
                warnings.warn(
                    f"CUDA-graph capture of the decode step failed ({type(exc).__name__}: {exc}); decoding eagerly. "
                    "Pass cuda_graph=False to skip the attempt",
                    stacklevel=3,
                )

    def _step(self) -> torch.Tensor:
        return self.model(self.token, self.pos)[:, -1]  # [B, V]

    def _capture(self) -> None:
        # Warm up on a side stream (lazy inits, autotuning) before capture, as torch.cuda.graphs recommends.
        # The warm-up writes KV row `pos` (0 here); the real prefill rewrites it before any read.
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(2):
                self._step()
        torch.cuda.current_stream().wait_stream(stream)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.logits = self._step()

    def __call__(self, token: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        """token int64 [B], pos int64 [1] (device tensors) -> logits fp32 [B, V]."""
        self.token.copy_(token[:, None])
        self.pos.copy_(pos)
        if self.graph is None:
            return self._step()
        self.graph.replay()
        return self.logits


def _graph_safe(model) -> bool:
    """CUDA graphs need a GPU and backends without host syncs (the torch references sync in fused_moe)."""
    return model.device.type == "cuda" and "torch" not in model.backends()


def _eos_tensor(model, eos_token_id) -> torch.Tensor:
    if eos_token_id is None:
        eos_token_id = model.config.eos_token_id
    ids = [eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id)
    return torch.tensor(ids, dtype=torch.long, device=model.device)


@torch.inference_mode()
def generate_stream(
    model,
    input_ids: torch.Tensor,
    max_new_tokens: int,
    temperature: float = 0.0,
    top_p: float = 1.0,
    top_k: int = 0,
    eos_token_id: int | Sequence[int] | None = None,
    generator: torch.Generator | None = None,
    cuda_graph: bool | None = None,
    sync_every: int = 1,
) -> Iterator[torch.Tensor]:
    """Prefill input_ids int [B, T], then yield each step's new ids int64 [B] (on the model's device).

    eos_token_id: None uses config.json's; [] never stops. Rows that finished keep yielding their eos id.
    Stops after max_new_tokens, or once every row has produced an eos (checked every `sync_every` steps).
    cuda_graph: None captures the decode step where that is safe (GPU, a graph-safe backend).
    """
    if input_ids.dim() == 1:
        input_ids = input_ids[None]
    b, t = input_ids.shape
    if t == 0:
        raise ValueError("input_ids is empty: generation needs at least one prompt token")
    if t + max_new_tokens > model.max_seq_len:
        raise ValueError(
            f"prompt ({t}) + max_new_tokens ({max_new_tokens}) exceeds max_seq_len={model.max_seq_len}; "
            "load the model with a larger max_seq_len or ask for fewer tokens"
        )
    if max_new_tokens <= 0:
        return
    device = model.device
    input_ids = input_ids.to(device=device, dtype=torch.long)
    eos = _eos_tensor(model, eos_token_id)
    if model.cache_batch_size != b:
        model.setup_caches(b)
    use_graph = _graph_safe(model) if cuda_graph is None else cuda_graph
    decoder = model._decoders.get((b, use_graph))
    if decoder is None:
        decoder = model._decoders[(b, use_graph)] = Decoder(model, b, use_graph, strict=cuda_graph is not None)

    logits = model(input_ids, torch.arange(t, device=device), last_only=True)[:, -1]  # [B, V]
    token = sample(logits, temperature, top_p, top_k, generator)
    done = torch.isin(token, eos)
    pos = torch.full((1,), t, dtype=torch.long, device=device)
    yield token
    for step in range(1, max_new_tokens):
        if eos.numel() and step % sync_every == 0 and bool(done.all()):
            return
        logits = decoder(token, pos)
        nxt = sample(logits, temperature, top_p, top_k, generator)
        if eos.numel():
            nxt = torch.where(done, token, nxt)  # a finished row repeats its eos
            done = done | torch.isin(nxt, eos)
        token = nxt
        pos += 1
        yield token


@torch.inference_mode()
def generate(
    model,
    input_ids: torch.Tensor,
    max_new_tokens: int,
    temperature: float = 0.0,
    top_p: float = 1.0,
    top_k: int = 0,
    eos_token_id: int | Sequence[int] | None = None,
    generator: torch.Generator | None = None,
    cuda_graph: bool | None = None,
    sync_every: int = 16,
) -> torch.Tensor:
    """New token ids int64 [B, n], n <= max_new_tokens: up to and including the last row's first eos.

    Rows that stop earlier are padded with their eos id. See generate_stream for the arguments.
    """
    steps = generate_stream(
        model, input_ids, max_new_tokens, temperature, top_p, top_k, eos_token_id, generator, cuda_graph, sync_every
    )
    tokens = list(steps)
    if not tokens:
        return torch.empty(input_ids.shape[0] if input_ids.dim() == 2 else 1, 0, dtype=torch.long)
    out = torch.stack(tokens, dim=1)  # [B, n]
    eos = _eos_tensor(model, eos_token_id)
    if eos.numel():
        hit = torch.isin(out, eos)
        if bool(hit.any(-1).all()):
            first = hit.int().argmax(-1)  # each row's first eos
            out = out[:, : int(first.max()) + 1]
    return out


# ----------------------------------------------------------------------------------------------- tokenizer


def _template_error(message: str):
    raise ValueError(f"the checkpoint's chat template refused the messages: {message}")


class ChatTokenizer:
    """A `tokenizers` Tokenizer plus the checkpoint's chat template (tokenizer_config.json or
    chat_template.jinja). Never runs code from the checkpoint folder: the template renders in jinja2's sandbox,
    or, without jinja2, by a fixed GLM-4 layout."""

    def __init__(self, folder: str | Path):
        from tokenizers import Tokenizer

        folder = Path(folder)
        path = folder / "tokenizer.json"
        if not path.exists():
            raise FileNotFoundError(
                f"{path} does not exist: generate_text needs the checkpoint's tokenizer.json; "
                "pass token ids to model.generate instead"
            )
        self.tokenizer = Tokenizer.from_file(str(path))
        self.template = None
        self.special: dict = {}
        cfg_path = folder / "tokenizer_config.json"
        if cfg_path.exists():
            cfg = json.loads(cfg_path.read_text())
            template = cfg.get("chat_template")
            if isinstance(template, list):  # [{"name": "default", "template": ...}, ...]
                template = next((t["template"] for t in template if t.get("name") == "default"), None)
            self.template = template
            self.special = {k: v for k, v in cfg.items() if k.endswith("_token") and isinstance(v, str)}
        if self.template is None and (folder / "chat_template.jinja").exists():
            self.template = (folder / "chat_template.jinja").read_text()

    def encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=False).ids

    def decode(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=True)

    def render(self, messages: list[dict]) -> str:
        """The prompt text for a chat, ending with the assistant's turn. Message contents pass untouched
        (GLM's `/nothink` switch is for the template and the model to read)."""
        if self.template is not None:
            try:
                from jinja2.sandbox import ImmutableSandboxedEnvironment
            except ImportError:
                pass
            else:
                env = ImmutableSandboxedEnvironment(
                    trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"]
                )
                env.globals["raise_exception"] = _template_error
                env.globals["strftime_now"] = lambda fmt: time.strftime(fmt)
                return env.from_string(self.template).render(
                    messages=messages, add_generation_prompt=True, **self.special
                )
        return self.glm_layout(messages)

    @staticmethod
    def glm_layout(messages: list[dict]) -> str:
        """GLM-4's chat layout without jinja: [gMASK]<sop>, then <|role|>\\ncontent per turn, then <|assistant|>."""
        turns = "".join(f"<|{m['role']}|>\n{m['content']}" for m in messages)
        return f"[gMASK]<sop>{turns}<|assistant|>\n"


def generate_text(
    model,
    prompt: str,
    max_new_tokens: int = 128,
    *,
    chat: bool = True,
    tokenizer: ChatTokenizer | None = None,
    on_text: Callable[[str], None] | None = None,
    return_stats: bool = False,
    **sampling,
):
    """Generate a reply to `prompt` with the checkpoint's tokenizer; returns the new text.

    chat: wrap the prompt in the chat template (else encode it as is). on_text: called with each new piece of
    text as it is produced. return_stats: return (text, {prompt_tokens, new_tokens, prefill_s, decode_s,
    tokens_per_s}) instead. sampling: temperature, top_p, top_k, eos_token_id, generator, cuda_graph.
    """
    if tokenizer is None:
        if model.checkpoint_dir is None:
            raise ValueError("the model was not loaded from a folder: pass tokenizer=ChatTokenizer(folder)")
        tokenizer = ChatTokenizer(model.checkpoint_dir)
    text = tokenizer.render([{"role": "user", "content": prompt}]) if chat else prompt
    ids = tokenizer.encode(text)
    if not ids:
        raise ValueError("the prompt encodes to no tokens; give a non-empty prompt")
    input_ids = torch.tensor([ids], dtype=torch.long)
    eos = _eos_tensor(model, sampling.get("eos_token_id")).tolist()
    new: list[int] = []
    shown = ""
    start = time.perf_counter()
    first = None
    for token in generate_stream(model, input_ids, max_new_tokens, **sampling):
        tok = int(token[0])  # the host sync a stream implies
        if first is None:
            first = time.perf_counter()
        if tok in eos:
            break
        new.append(tok)
        if on_text is not None:
            decoded = tokenizer.decode(new)
            if len(decoded) > len(shown) and not decoded.endswith("\ufffd"):  # wait for a whole UTF-8 character
                on_text(decoded[len(shown) :])
                shown = decoded
    end = time.perf_counter()
    out = tokenizer.decode(new)
    if on_text is not None and len(out) > len(shown):
        on_text(out[len(shown) :])
    if not return_stats:
        return out
    first = first or end
    decode_tokens = max(len(new) - 1, 0)
    stats = {
        "prompt_tokens": len(ids),
        "new_tokens": len(new),
        "prefill_s": first - start,
        "decode_s": end - first,
        "tokens_per_s": decode_tokens / (end - first) if end > first and decode_tokens else float("nan"),
    }
    return out, stats
