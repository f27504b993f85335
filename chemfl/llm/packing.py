"""The adapter as it travels: every exchanged LoRA tensor flattened into one float32 vector.

Flower sends each array of a message as its own objects (the array and its chunks), one RPC per
object on every hop (ServerApp -> SuperLink -> SuperNode -> ClientApp and back). A LoRA adapter is
hundreds of small tensors (420 for SmolLM2-135M with all-linear targets), so a per-tensor record costs
841 objects per message, and their round trips, not the bytes, dominated an update in deployment. One vector is one
array and a few 5 MB chunks. Averaging, server optimizers and norms are elementwise, so the server's
maths is unchanged; the names and shapes (the layout) are known to both ends from the model and
LoRA settings, and the digest of the layout travels with every task so a node with another layout
refuses the adapter instead of loading it wrongly.

numpy only: the server-side maths never needs torch for it.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from chemfl.errors import ChemFLError


@dataclass(frozen=True)
class AdapterLayout:
    """Where each named tensor sits in the flat vector: in order, each of its shape."""

    names: tuple[str, ...]
    shapes: tuple[tuple[int, ...], ...]

    @classmethod
    def of(cls, state: Mapping[str, Any]) -> AdapterLayout:
        """The layout of a named state (torch tensors or numpy arrays), in its own order."""
        return cls(tuple(state), tuple(tuple(int(n) for n in value.shape) for value in state.values()))

    @property
    def size(self) -> int:
        return sum(math.prod(shape) for shape in self.shapes)

    @property
    def digest(self) -> str:
        """Short sha256 of names and shapes: equal digests, same layout."""
        text = json.dumps([list(self.names), [list(shape) for shape in self.shapes]])
        return hashlib.sha256(text.encode()).hexdigest()[:16]

    def pack(self, state: Mapping[str, Any]) -> np.ndarray:
        """One contiguous float32 vector of `state`'s tensors in layout order."""
        if set(state) != set(self.names):
            raise ValueError(f"state keys differ from the layout's ({len(state)} vs {len(self.names)} tensors)")
        return np.concatenate([np.asarray(state[name], dtype=np.float32).reshape(-1) for name in self.names])

    def unpack(self, flat: np.ndarray) -> dict[str, np.ndarray]:
        """The named tensors of `flat` (views into it, in layout order)."""
        flat = np.asarray(flat)
        if flat.ndim != 1 or flat.size != self.size:
            raise ChemFLError(
                f"received adapter has {flat.size} values in shape {flat.shape}, this model's LoRA layout needs "
                f"{self.size} in one vector; server and nodes must share model.name, lora.r, "
                "lora.target-modules, lora.freeze-a"
            )
        tensors, offset = {}, 0
        for name, shape in zip(self.names, self.shapes, strict=True):
            count = math.prod(shape)
            tensors[name] = flat[offset : offset + count].reshape(shape)
            offset += count
        return tensors
