"""Launch configs tuned on the device, per GPU family, shipped in kernels/tuned.json: no autotuning at run time.

tuned.json: {family: {kernel: [{"n": N, "k": K, "m_max": M, "config": {...}}, ...]}}, entries of one (n, k)
sorted by m_max; the first entry whose m_max >= m wins. Families: "sm90" (H100/H200), "sm80", ... A kernel
falls back to its own rule where the table has no entry.
"""

from __future__ import annotations

import functools
import json
from pathlib import Path

import torch

TABLE_PATH = Path(__file__).with_name("tuned.json")


@functools.cache
def _table() -> dict:
    if not TABLE_PATH.exists():
        return {}
    return json.loads(TABLE_PATH.read_text())


@functools.cache
def family(device_index: int) -> str:
    major, minor = torch.cuda.get_device_capability(device_index)
    return f"sm{major}{minor}"


def lookup(kernel: str, device: torch.device, **shape: int) -> dict | None:
    if device.type != "cuda":
        return None
    m = shape.pop("m")
    for entry in _table().get(family(device.index or 0), {}).get(kernel, []):
        if all(entry.get(key) == value for key, value in shape.items()) and m <= entry["m_max"]:
            return entry["config"]
    return None
