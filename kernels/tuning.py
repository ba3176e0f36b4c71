"""Launch configs tuned on the device, per GPU family, shipped in kernels/tuned.json: no autotuning at run time.

tuned.json: {family: {kernel: [{"n": N, "k": K, "m_max": M, "config": {...}}, ...]}}, entries of one (n, k)
sorted by m_max; the first entry whose m_max >= m wins. Families: "sm90" (H100/H200), "sm80", ... A kernel
falls back to its own rule where the table has no entry.

The table is read at import and the family of each device memoised in a plain dict, so that a lookup under
torch.compile is dictionary reads only (no file I/O or driver calls for dynamo to trace).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

TABLE_PATH = Path(__file__).with_name("tuned.json")
TABLE: dict = json.loads(TABLE_PATH.read_text()) if TABLE_PATH.exists() else {}
_FAMILIES: dict[int, str] = {}


def family(device_index: int) -> str:
    name = _FAMILIES.get(device_index)
    if name is None:
        major, minor = torch.cuda.get_device_capability(device_index)
        name = _FAMILIES[device_index] = f"sm{major}{minor}"
    return name


def lookup(kernel: str, device: torch.device, **shape: int) -> dict | None:
    if device.type != "cuda":
        return None
    m = shape.pop("m")
    for entry in TABLE.get(family(device.index or 0), {}).get(kernel, []):
        if all(entry.get(key) == value for key, value in shape.items()) and m <= entry["m_max"]:
            return entry["config"]
    return None
