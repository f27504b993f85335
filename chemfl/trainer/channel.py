"""The channel between a ClientApp relay and the facility trainer: a node-local Unix socket,
authenticated with a per-job secret, carrying JSON headers and raw array bytes (never pickle).

Imports neither torch nor Flower (numpy only): the relay loads in a fraction of a second.

Secret: a file of at least 32 bytes (`write_secret` writes 64 random hex characters), mode 0600,
owned by the job's user; both ends refuse any other mode, so a secret another user could read is
never used.

Handshake, both ways, per connection (HMAC-SHA256 over random 32-byte nonces, compared with
hmac.compare_digest; the role is part of the MAC, so one side's proof cannot be replayed as the other's):
    trainer -> client   {"kind": "challenge", "protocol", "nonce"}
    client  -> trainer  {"kind": "response", "proof": HMAC(secret, "client:" + nonce), "nonce": client nonce}
    trainer -> client   {"kind": "accepted", "proof": HMAC(secret, "trainer:" + client nonce)}
                        or {"kind": "refused", "error"} (the client raises TrainerError with it)
Then one request and one reply; the connection closes.

Frame: 16-byte prefix (header length, payload length: two big-endian uint64), the JSON header, then
the payload: each array's raw C-order bytes, in the order of the header's `arrays` list of
{"name", "dtype" (numpy's dtype.str, e.g. "<f4"), "shape"}. Only bool, integer and float dtypes
travel. Before authentication a frame may hold at most 4 KiB of header and no payload.

Every read has a deadline: a dead peer (refused, reset, EOF mid-frame) raises at once, a silent one
when its deadline passes; nothing waits forever.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import math
import os
import secrets
import socket
import stat
import struct
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from chemfl.errors import ChemFLError
from chemfl.files import write_file_atomically

PROTOCOL = "chemfl-trainer/1"
REQUEST_KINDS = ("train", "evaluate", "ping", "shutdown")
PREFIX = struct.Struct(">QQ")  # header bytes, payload bytes
HANDSHAKE_HEADER_LIMIT = 4096
HEADER_LIMIT = 16 << 20
ARRAY_KINDS = "biuf"  # bool, signed and unsigned integers, floats
SOCKET_PATH_LIMIT = 107  # sun_path holds 108 bytes with the terminating NUL
SECRET_BYTES = 32

logger = logging.getLogger(__name__)


class TrainerError(ChemFLError):
    """The trainer refused or failed a request (its own message), or could not be reached or
    authenticated (what failed on the way, and the fix)."""


@dataclass(frozen=True)
class TrainerReply:
    """A reply: the trained adapter (train; empty otherwise), the scalars (protocol.TrainReport's
    keys for train, EvalReport's for evaluate, {"world-size"} for ping), the facility's name, and
    for an evaluate on the test set (task `evaluate-on = "test"`) chemfl.llm.evaluation's whole
    result (what the local path sends as the `evaluation` record)."""

    arrays: dict[str, np.ndarray]
    metrics: dict[str, int | float]
    facility: str
    evaluation: dict | None = None


@dataclass(frozen=True)
class TrainerRequest:
    """A request as rank 0 receives it: the task config (protocol.Task's keys), the run config the
    ClientApp received, and the adapter arrays."""

    kind: str
    config: dict
    run_config: dict
    arrays: dict[str, np.ndarray]


# --- the secret -------------------------------------------------------------------------------------


def write_secret(path: str | Path) -> Path:
    """A fresh random secret at `path`, mode 0600, written atomically (a missing folder is created 0700)."""
    path = Path(path)
    if not path.parent.exists():
        path.parent.mkdir(mode=0o700, parents=True)
    write_file_atomically(path, secrets.token_hex(SECRET_BYTES) + "\n", mode=0o600)
    return path


def read_secret(path: str | Path) -> bytes:
    """The job's secret; refused unless the file is mode 0600 and owned by this user (anything
    looser would let other users on the node talk to the trainer or pose as it)."""
    path = Path(path)
    try:
        info = path.stat()
    except FileNotFoundError:
        raise TrainerError(
            f"secret file {path} does not exist; create it once per job before starting the trainer: "
            f"chemfl trainer --secret-file {path} --new-secret"
        ) from None
    mode = stat.S_IMODE(info.st_mode)
    if mode != 0o600:
        raise TrainerError(
            f"secret file {path} has mode {mode:04o}; it must be 0600 (readable by the job's user only): "
            f"chmod 600 {path}"
        )
    if info.st_uid != os.getuid():
        raise TrainerError(f"secret file {path} belongs to uid {info.st_uid}, not to this user (uid {os.getuid()})")
    secret = path.read_bytes().strip()
    if len(secret) < SECRET_BYTES:
        raise TrainerError(f"secret file {path} holds {len(secret)} bytes, fewer than {SECRET_BYTES}; write a new one")
    return secret


def _proof(secret: bytes, role: bytes, nonce: bytes) -> bytes:
    return hmac.new(secret, role + b":" + nonce, hashlib.sha256).hexdigest().encode()


def _nonce(header: dict) -> bytes:
    try:
        nonce = bytes.fromhex(str(header.get("nonce", "")))
    except ValueError:
        nonce = b""
    if len(nonce) != SECRET_BYTES:
        raise TrainerError("the peer sent no valid nonce: it does not speak the trainer's protocol")
    return nonce


# --- frames -----------------------------------------------------------------------------------------


def send_frame(sock: socket.socket, header: dict, arrays: Mapping[str, np.ndarray] | None = None) -> None:
    """One frame: prefix, JSON header (with the arrays' names, dtypes, shapes), raw array bytes."""
    contiguous = [(str(name), np.asarray(array, order="C")) for name, array in (arrays or {}).items()]
    for name, array in contiguous:
        if array.dtype.kind not in ARRAY_KINDS:
            raise TrainerError(f"array {name!r} has dtype {array.dtype}; only bool, integer and float arrays travel")
    described = {
        **header,
        "arrays": [{"name": name, "dtype": array.dtype.str, "shape": list(array.shape)} for name, array in contiguous],
    }
    try:
        encoded = json.dumps(described).encode()
    except TypeError as error:
        raise TrainerError(f"request values must be str, int, float or bool ({error})") from None
    payload = sum(array.nbytes for _, array in contiguous)
    sock.sendall(PREFIX.pack(len(encoded), payload) + encoded)
    for _, array in contiguous:
        if array.nbytes:
            sock.sendall(array.reshape(-1).view(np.uint8))


def receive_frame(
    sock: socket.socket, deadline: float, header_limit: int = HEADER_LIMIT, payload_limit: int | None = None
) -> tuple[dict, dict[str, np.ndarray]]:
    """(header, arrays) of the next frame; raises TimeoutError past `deadline` (time.monotonic()),
    ConnectionError when the peer closes mid-frame, TrainerError when the frame is malformed."""
    header_size, payload_size = PREFIX.unpack(_receive(sock, PREFIX.size, deadline))
    if header_size > header_limit or (payload_limit is not None and payload_size > payload_limit):
        raise TrainerError(f"frame of {header_size} + {payload_size} bytes is larger than allowed here")
    try:
        header = json.loads(_receive(sock, header_size, deadline))
        layout = [
            (str(item["name"]), np.dtype(str(item["dtype"])), tuple(int(n) for n in item["shape"]))
            for item in header.pop("arrays", [])
        ]
    except (ValueError, TypeError, KeyError, AttributeError) as error:  # AttributeError: not a JSON object
        raise TrainerError(f"malformed frame header ({error})") from None
    if any(dtype.kind not in ARRAY_KINDS for _, dtype, _ in layout):
        raise TrainerError("malformed frame header: an array of a dtype that cannot travel")
    sizes = [math.prod(shape) * dtype.itemsize for _, dtype, shape in layout]
    if sum(sizes) != payload_size or any(n < 0 for _, _, shape in layout for n in shape):
        raise TrainerError(f"frame payload of {payload_size} bytes does not match its arrays' shapes")
    buffer = bytearray(payload_size)
    _receive_into(sock, memoryview(buffer), deadline)
    arrays, offset = {}, 0
    for (name, dtype, shape), size in zip(layout, sizes, strict=True):
        if size == 0:
            arrays[name] = np.empty(shape, dtype)
        else:
            array = np.frombuffer(buffer, dtype, math.prod(shape), offset).reshape(shape)
            arrays[name] = array if array.flags.aligned else array.copy()  # torch.from_numpy wants aligned memory
        offset += size
    return header, arrays


def _receive(sock: socket.socket, size: int, deadline: float) -> bytes:
    buffer = bytearray(size)
    _receive_into(sock, memoryview(buffer), deadline)
    return bytes(buffer)


def _receive_into(sock: socket.socket, view: memoryview, deadline: float) -> None:
    while len(view):
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise TimeoutError("deadline passed")
        sock.settimeout(remaining)
        received = sock.recv_into(view)
        if received == 0:
            raise ConnectionError("the other side closed the connection mid-frame")
        view = view[received:]


# --- the relay's end --------------------------------------------------------------------------------


class TrainerClient:
    """What the ClientApp relay calls: `request(kind, ...)` opens one authenticated connection,
    sends one request, waits for its reply.

    `timeout`: seconds a request may take from connecting to the last reply byte (a train task's
    whole training; the trainer serves one request at a time, so waiting for a busy trainer counts).
    `connect_timeout`: seconds to keep retrying while nothing listens on the socket yet (trainer
    starting); a dead trainer therefore raises within `connect_timeout`, and a trainer that dies
    mid-request raises at once (the kernel closes its end).
    """

    def __init__(
        self, socket_path: str | Path, secret_path: str | Path, timeout: float = 3600.0, connect_timeout: float = 5.0
    ):
        self.socket_path = Path(socket_path)
        self.secret = read_secret(secret_path)
        self.timeout = timeout
        self.connect_timeout = connect_timeout

    def request(
        self,
        kind: str,
        config: Mapping | None = None,
        run_config: Mapping | None = None,
        arrays: Mapping[str, np.ndarray] | None = None,
    ) -> TrainerReply:
        """Send `kind` ("train", "evaluate", "ping", "shutdown") with the task config, the run config
        and the adapter; the TrainerReply, or TrainerError with the trainer's message."""
        if kind not in REQUEST_KINDS:
            raise TrainerError(f"request kind {kind!r} is not one of {', '.join(REQUEST_KINDS)}")
        deadline = time.monotonic() + self.timeout
        with self._connect() as sock:
            try:
                self._authenticate(sock, deadline)
                sent = {"kind": kind, "config": dict(config or {}), "run_config": dict(run_config or {})}
                send_frame(sock, sent, arrays)
                header, reply_arrays = receive_frame(sock, deadline)
            except TimeoutError:
                raise TrainerError(
                    f"no reply from the trainer at {self.socket_path} within {self.timeout:g} s; see its log, or raise "
                    "the timeout for longer tasks"
                ) from None
            except OSError as error:  # ConnectionError, BrokenPipeError: the trainer died or stopped
                raise TrainerError(
                    f"the trainer at {self.socket_path} closed the connection before replying ({error}); it died or "
                    "was stopped: see its log"
                ) from None
        if header.get("kind") == "error":
            raise TrainerError(str(header.get("error")))
        if header.get("kind") != "reply":
            raise TrainerError(f"the trainer at {self.socket_path} sent {header.get('kind')!r} instead of a reply")
        return TrainerReply(
            reply_arrays, dict(header.get("metrics", {})), str(header.get("facility", "")), header.get("evaluation")
        )

    def facility(self) -> str:
        """The facility the trainer serves (a ping: the ranks answer, so it also checks they are alive)."""
        return self.request("ping").facility

    def _connect(self) -> socket.socket:
        give_up = time.monotonic() + self.connect_timeout
        while True:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sock.settimeout(max(0.1, give_up - time.monotonic()))
            try:
                sock.connect(str(self.socket_path))
                return sock
            except (FileNotFoundError, ConnectionRefusedError, TimeoutError) as error:
                sock.close()
                if time.monotonic() >= give_up:
                    raise TrainerError(
                        f"no trainer is listening at {self.socket_path} after {self.connect_timeout:g} s "
                        f"({error.strerror or 'timed out'}); start it (chemfl trainer --socket {self.socket_path} ...) "
                        "and wait for 'trainer ready', or fix the socket path"
                    ) from None
                time.sleep(0.1)
            except OSError as error:
                sock.close()
                raise TrainerError(f"cannot connect to the trainer at {self.socket_path}: {error}") from None

    def _authenticate(self, sock: socket.socket, deadline: float) -> None:
        challenge, _ = receive_frame(sock, deadline, HANDSHAKE_HEADER_LIMIT, payload_limit=0)
        if challenge.get("protocol") != PROTOCOL:
            raise TrainerError(
                f"the process at {self.socket_path} speaks {challenge.get('protocol')!r}, not {PROTOCOL}: the relay "
                "and the trainer must run the same ChemFL version"
            )
        own_nonce = secrets.token_bytes(SECRET_BYTES)
        proof = _proof(self.secret, b"client", _nonce(challenge)).decode()
        send_frame(sock, {"kind": "response", "proof": proof, "nonce": own_nonce.hex()})
        verdict, _ = receive_frame(sock, deadline, HANDSHAKE_HEADER_LIMIT, payload_limit=0)
        if verdict.get("kind") == "refused":
            raise TrainerError(f"the trainer at {self.socket_path} refused this client: {verdict.get('error')}")
        if not hmac.compare_digest(str(verdict.get("proof", "")).encode(), _proof(self.secret, b"trainer", own_nonce)):
            raise TrainerError(
                f"the process listening at {self.socket_path} does not know the job's secret, so it is not this "
                "job's trainer; check --socket and --secret-file on both sides"
            )


# --- the trainer's end ------------------------------------------------------------------------------


class TrainerConnection:
    """One authenticated client on rank 0: its request in, one reply or error out."""

    def __init__(self, sock: socket.socket, io_timeout: float):
        self.sock = sock
        self.io_timeout = io_timeout

    def authenticate(self, secret: bytes) -> None:
        """Challenge the client; a wrong proof is told why (so the relay raises a clear error) and
        raised here as TrainerError."""
        deadline = time.monotonic() + self.io_timeout
        nonce = secrets.token_bytes(SECRET_BYTES)
        send_frame(self.sock, {"kind": "challenge", "protocol": PROTOCOL, "nonce": nonce.hex()})
        answer, _ = receive_frame(self.sock, deadline, HANDSHAKE_HEADER_LIMIT, payload_limit=0)
        if not hmac.compare_digest(str(answer.get("proof", "")).encode(), _proof(secret, b"client", nonce)):
            send_frame(
                self.sock,
                {
                    "kind": "refused",
                    "error": "authentication failed: the client's secret differs from the trainer's; both must read "
                    "this job's secret file (--secret-file)",
                },
            )
            raise TrainerError("a client failed authentication (wrong secret)")
        send_frame(self.sock, {"kind": "accepted", "proof": _proof(secret, b"trainer", _nonce(answer)).decode()})

    def receive_request(self) -> TrainerRequest:
        header, arrays = receive_frame(self.sock, time.monotonic() + self.io_timeout)
        kind, config, run_config = header.get("kind"), header.get("config"), header.get("run_config")
        if kind not in REQUEST_KINDS or not isinstance(config, dict) or not isinstance(run_config, dict):
            raise TrainerError(f"malformed request (kind {kind!r}); the relay must use chemfl.trainer.channel")
        return TrainerRequest(kind, config, run_config, arrays)

    def send_reply(self, reply: TrainerReply) -> None:
        self.sock.settimeout(self.io_timeout)
        header = {"kind": "reply", "metrics": reply.metrics, "facility": reply.facility}
        if reply.evaluation is not None:
            header["evaluation"] = reply.evaluation
        send_frame(self.sock, header, reply.arrays)

    def send_error(self, message: str) -> None:
        self.sock.settimeout(self.io_timeout)
        send_frame(self.sock, {"kind": "error", "error": message})

    def close(self) -> None:
        self.sock.close()

    def __enter__(self) -> TrainerConnection:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()


class TrainerListener:
    """Rank 0's socket: bound in a folder created mode 0700, the socket itself chmod 0600, and
    only authenticated connections handed out."""

    def __init__(self, socket_path: str | Path, secret: bytes, io_timeout: float = 60.0):
        self.path = Path(socket_path)
        self.secret = secret
        self.io_timeout = io_timeout
        check_socket_path(self.path)
        self._socket = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            self._socket.bind(str(self.path))
            os.chmod(self.path, 0o600)
            self._socket.listen(16)
        except OSError as error:
            self._socket.close()
            raise TrainerError(f"cannot listen on {self.path} ({error}); choose another --socket") from None

    def accept(self, timeout: float) -> TrainerConnection | None:
        """The next authenticated client; None when no client (or only one that failed the
        handshake, which is logged and dropped) arrived within `timeout` seconds."""
        self._socket.settimeout(timeout)
        try:
            sock, _ = self._socket.accept()
        except TimeoutError:
            return None
        connection = TrainerConnection(sock, self.io_timeout)
        try:
            connection.authenticate(self.secret)
        except (TrainerError, OSError) as error:
            logger.warning("dropped a client at %s: %s", self.path, error)
            connection.close()
            return None
        return connection

    def close(self) -> None:
        """Stop listening and remove the socket file."""
        self._socket.close()
        self.path.unlink(missing_ok=True)


def check_socket_path(path: Path) -> None:
    """Make `path` ready to bind, or say what to fix: its length, its folder (created 0700 when
    missing, else it must be writable), a stale socket left by a killed trainer (removed), a live one
    (refused: another trainer listens there) or another file in the way (refused)."""
    if len(os.fsencode(path)) > SOCKET_PATH_LIMIT:
        raise TrainerError(
            f"socket path {path} has {len(os.fsencode(path))} bytes; Unix sockets allow {SOCKET_PATH_LIMIT}: "
            "choose a shorter --socket, e.g. /tmp/$USER/chemfl-$JOBID/trainer.sock"
        )
    folder = path.parent
    fix = "choose --socket under a node-local folder this user owns, e.g. /tmp/$USER/chemfl-$JOBID/trainer.sock"
    try:
        if not folder.is_dir():
            folder.mkdir(mode=0o700, parents=True)
            os.chmod(folder, 0o700)
    except OSError as error:  # no permission, or a file in the way
        raise TrainerError(f"cannot create the socket's folder {folder} ({error.strerror}); {fix}") from None
    if not os.access(folder, os.W_OK | os.X_OK):
        raise TrainerError(f"the socket's folder {folder} is not writable by this user; {fix}")
    if not (path.exists() or path.is_symlink()):
        return
    if not stat.S_ISSOCK(path.lstat().st_mode):
        raise TrainerError(f"{path} exists and is not a socket; remove it or choose another --socket")
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        try:
            probe.connect(str(path))
        except OSError:
            path.unlink()  # nobody listens: a socket left by a trainer that was killed
            return
    raise TrainerError(f"another trainer is already listening at {path}; stop it or choose another --socket")
