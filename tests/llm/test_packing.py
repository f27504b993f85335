"""The packed adapter layout (chemfl.llm.packing): numpy only, exact round trips, loud misfits."""

import numpy as np
import pytest

from chemfl.errors import ChemFLError
from chemfl.llm.packing import AdapterLayout


def state(seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {
        "layers.0.q.lora_A.weight": rng.normal(size=(4, 6)).astype(np.float32),
        "layers.0.q.lora_B.weight": rng.normal(size=(5, 4)).astype(np.float32),
        "lm_head.lora_B.weight": rng.normal(size=(7, 4)).astype(np.float32),
    }


def test_pack_then_unpack_is_exact_and_keeps_order():
    named = state()
    layout = AdapterLayout.of(named)
    flat = layout.pack(named)
    assert flat.dtype == np.float32 and flat.shape == (layout.size,) == (24 + 20 + 28,)
    back = layout.unpack(flat)
    assert list(back) == list(named)
    assert all(np.array_equal(back[name], named[name]) for name in named)
    # Elementwise maths on the vector is the maths on every tensor (what the server does).
    other = state(1)
    mean = layout.unpack((flat + layout.pack(other)) / 2)
    assert all(np.allclose(mean[name], (named[name] + other[name]) / 2) for name in named)


def test_the_digest_names_the_layout():
    named = state()
    layout = AdapterLayout.of(named)
    assert layout.digest == AdapterLayout.of(state(5)).digest  # values do not matter
    reordered = dict(reversed(list(named.items())))
    assert AdapterLayout.of(reordered).digest != layout.digest
    reshaped = {**named, "lm_head.lora_B.weight": np.zeros((4, 7), np.float32)}
    assert AdapterLayout.of(reshaped).digest != layout.digest and AdapterLayout.of(reshaped).size == layout.size


def test_a_vector_of_the_wrong_size_or_shape_is_refused():
    layout = AdapterLayout.of(state())
    with pytest.raises(ChemFLError, match="72 in one vector"):
        layout.unpack(np.zeros(71, np.float32))
    with pytest.raises(ChemFLError, match="shape"):
        layout.unpack(np.zeros((2, 36), np.float32))
    with pytest.raises(ValueError, match="state keys differ"):
        layout.pack({"layers.0.q.lora_A.weight": np.zeros((4, 6), np.float32)})
