"""Transport security: ZeroMQ CURVE keys, the cloud's and the edge's sockets, and the ZAP authenticator.

Key files are the ones pyzmq's `zmq.auth` writes and reads: `NAME.key` holds a
public key, `NAME.key_secret` the public and the secret key, each as 40 z85
characters. The cloud is a CURVE server with its own secret key and serves only
the edges whose public key file lies in its authorized-keys directory; ZAP
(`zmq.auth.thread.ThreadAuthenticator`) checks each handshake and labels every
message that passes with the sender's public key as its "User-Id", which is
what ties a session to the key that opened it. An edge is a CURVE client that
must know the cloud's public key in advance, so nobody can pose as the cloud.

A refused handshake is silent by design: the edge only ever sees a timeout.
"""

from __future__ import annotations

import os
import struct
import tempfile
from dataclasses import dataclass
from pathlib import Path

import zmq
import zmq.auth
from zmq.auth.thread import ThreadAuthenticator
from zmq.utils import z85

from .bundle import nearest_existing
from .errors import PlcliError

KEY_CHARS = 40  # a 32-byte CURVE key in z85


class KeyFileError(PlcliError):
    """A key file or the authorized-keys directory is missing, unreadable or malformed."""


def _read(path: Path) -> tuple[bytes, bytes | None]:
    """(public, secret or None) from a zmq.auth key file, each checked to be a CURVE key."""
    if not path.is_file():
        raise KeyFileError(f"{path}: no such key file")
    try:
        public, secret = zmq.auth.load_certificate(path)
    except OSError as e:
        raise KeyFileError(f"{path}: cannot read it: {e.strerror or e}") from None
    except ValueError:
        raise KeyFileError(f"{path}: not a key file (no public-key line; `plcli keys generate` writes them)") from None
    for what, key in (("public", public), ("secret", secret)):
        if key is not None and not _is_key(key):
            raise KeyFileError(f"{path}: its {what} key is not {KEY_CHARS} z85 characters")
    return public, secret


def _is_key(key: bytes) -> bool:
    if len(key) != KEY_CHARS:
        return False
    try:
        z85.decode(key)
    except (KeyError, struct.error):  # not a z85 character; a group of five beyond 32 bits
        return False
    return True


def load_key_pair(path: Path) -> tuple[bytes, bytes]:
    """(public, secret) from a NAME.key_secret file."""
    public, secret = _read(Path(path))
    if secret is None:
        raise KeyFileError(f"{path}: holds no secret key (give the NAME.key_secret file, not NAME.key)")
    return public, secret


def load_public_key(path: Path) -> bytes:
    """The public key of a NAME.key file; a secret key file is refused, since it must not travel to the other side."""
    public, secret = _read(Path(path))
    if secret is not None:
        raise KeyFileError(f"{path}: is a secret key file; give the public NAME.key (the secret stays with its owner)")
    return public


def authorized_keys(directory: Path) -> list[bytes]:
    """The public keys of every *.key file in `directory`, the edges a cloud serves."""
    directory = Path(directory)
    if not directory.is_dir():
        raise KeyFileError(f"{directory}: no such directory of authorized keys")
    keys = [load_public_key(p) for p in sorted(directory.glob("*.key"))]
    if not keys:
        raise KeyFileError(f"{directory}: holds no *.key file, so no edge could connect (copy each edge's NAME.key there)")
    return keys


@dataclass(frozen=True)
class ServerKeys:
    """The cloud's key pair and the directory of public keys it authorizes (read once, at start)."""

    public: bytes
    secret: bytes
    authorized_dir: Path
    authorized: int  # keys found there

    @classmethod
    def load(cls, secret_file: Path, authorized_dir: Path) -> "ServerKeys":
        public, secret = load_key_pair(secret_file)
        return cls(public, secret, Path(authorized_dir), len(authorized_keys(authorized_dir)))


@dataclass(frozen=True)
class ClientKeys:
    """The edge's key pair and the cloud's public key it expects."""

    public: bytes
    secret: bytes
    server_public: bytes

    @classmethod
    def load(cls, secret_file: Path, server_key_file: Path) -> "ClientKeys":
        public, secret = load_key_pair(secret_file)
        return cls(public, secret, load_public_key(server_key_file))


def secure_server(socket: zmq.Socket, keys: ServerKeys) -> ThreadAuthenticator:
    """Make `socket` (not yet bound) a CURVE server and start the ZAP handler of its context; stop it after the socket closes.

    ZAP is one handler per context (it binds inproc://zeromq.zap.01), so each
    secured server needs a context of its own.
    """
    auth = ThreadAuthenticator(socket.context)
    auth.start()
    # Loaded here, in this thread; the files were checked by ServerKeys.load, so none is skipped silently.
    auth.configure_curve(domain="*", location=str(keys.authorized_dir))
    socket.curve_server = True
    socket.curve_publickey = keys.public
    socket.curve_secretkey = keys.secret
    return auth


def secure_client(socket: zmq.Socket, keys: ClientKeys) -> None:
    """Make `socket` (not yet connected) a CURVE client that talks only to the cloud holding `keys.server_public`."""
    socket.curve_publickey = keys.public
    socket.curve_secretkey = keys.secret
    socket.curve_serverkey = keys.server_public


def peer_key(frame: zmq.Frame) -> str:
    """The z85 public key of the edge that sent `frame` (a frame of a message received on a secured socket)."""
    return frame.get("User-Id")


def generate_key_pair(path: Path, *, force: bool = False) -> tuple[Path, Path, str]:
    """Write PATH.key and PATH.key_secret (mode 0600); returns both paths and the public key (z85).

    Both are written in a private temporary directory next to them and renamed
    into place, the secret last, so neither file is ever seen half written or
    readable by others.
    """
    path = Path(path)
    directory, name = path.parent, path.name
    if not name or name in (".", "..") or path.is_dir():
        # `keys/` reaches here as `keys`: the pair would be keys.key and keys.key_secret beside that directory.
        raise KeyFileError(f"{path}: give the key pair a name, e.g. keys/edge")
    public_file, secret_file = directory / f"{name}.key", directory / f"{name}.key_secret"
    above = nearest_existing(directory)
    if not above.is_dir():
        raise KeyFileError(f"cannot write {path}: {above} is not a directory")
    for p in (public_file, secret_file):
        if p.is_dir() or (p.exists() and not p.is_file()):
            raise KeyFileError(f"{p} exists and is not a file: move it away, or name the pair otherwise")
    existing = [str(p) for p in (public_file, secret_file) if p.exists()]
    if existing and not force:
        raise KeyFileError(f"{' and '.join(existing)} already exist{'s' if len(existing) == 1 else ''} (--force replaces)")
    try:
        directory.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{name}.", dir=directory))
    except OSError as e:  # named after the pair, not the temporary directory the user never gave
        raise KeyFileError(f"cannot write {path}: {e.strerror or e}") from None
    try:
        try:
            written = [Path(p) for p in zmq.auth.create_certificates(staging, name)]
        except OSError as e:  # a full disk: named after the pair, as above
            raise KeyFileError(f"cannot write {path}: {e.strerror or e}") from None
        if [p.name for p in written] != [public_file.name, secret_file.name]:
            raise RuntimeError(f"pyzmq wrote {[p.name for p in written]}, not {public_file.name} and {secret_file.name}")
        os.chmod(written[0], 0o644)
        os.chmod(written[1], 0o600)
        public, _ = load_key_pair(written[1])
        # An interrupt between the two renames would leave the new public key beside the old secret one: a pair
        # that fails every handshake in silence. The old public key is kept aside until the secret one is in place.
        previous = staging / "previous.key"
        if public_file.exists():
            os.link(public_file, previous)
        os.replace(written[0], public_file)
        try:
            os.replace(written[1], secret_file)
        except BaseException:
            if previous.exists():
                os.replace(previous, public_file)
            else:
                public_file.unlink(missing_ok=True)
            raise
    finally:
        for leftover in staging.iterdir():
            leftover.unlink()
        staging.rmdir()
    return public_file, secret_file, public.decode("ascii")
