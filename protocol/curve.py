"""CurveZMQ keys for a backend on another machine (PROTOCOL.md section 6).

Key files are ZeroMQ certificates: ``NAME.key`` (public, safe to copy) and ``NAME.key_secret``
(secret, mode 0600). ``python -m protocol.curve DIR [NAME]`` writes a pair with only pyzmq,
e.g. on the machine that runs GIMP; ``python -m backend keygen`` does the same.
"""

from __future__ import annotations

import argparse
import os
from dataclasses import dataclass
from pathlib import Path

import zmq
import zmq.auth


def generate_keypair(directory: Path | str, name: str) -> tuple[Path, Path]:
    """Write ``NAME.key`` and ``NAME.key_secret`` into ``directory``; return their paths."""
    if not zmq.has("curve"):
        raise RuntimeError("this libzmq was built without CURVE support")
    directory = Path(directory)
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    public, secret = zmq.auth.create_certificates(directory, name)
    os.chmod(secret, 0o600)
    return Path(public), Path(secret)


def load_keypair(secret_file: Path | str) -> tuple[bytes, bytes]:
    """Return (public, secret) Z85 keys from a ``.key_secret`` file."""
    try:
        public, secret = zmq.auth.load_certificate(secret_file)
    except (OSError, ValueError) as exc:
        raise ValueError(f"cannot read the CURVE key file {secret_file}: {exc}") from None
    if not secret:
        raise ValueError(f"{secret_file} holds no secret key; give the .key_secret file")
    return public, secret


@dataclass(frozen=True)
class CurveClient:
    """What a client needs for a CURVE server: the server's public key and its own pair."""

    server_key: bytes
    public_key: bytes
    secret_key: bytes

    @classmethod
    def from_files(cls, server_key: str | bytes, client_secret_file: Path | str) -> CurveClient:
        public, secret = load_keypair(client_secret_file)
        key = server_key.encode("ascii") if isinstance(server_key, str) else server_key
        return cls(key, public, secret)

    def apply(self, socket: zmq.Socket) -> None:
        socket.curve_serverkey = self.server_key
        socket.curve_publickey = self.public_key
        socket.curve_secretkey = self.secret_key


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m protocol.curve",
        description="Write a CURVE key pair (NAME.key, NAME.key_secret).")
    parser.add_argument("directory")
    parser.add_argument("name", nargs="?", default="client")
    args = parser.parse_args(argv)
    public, secret = generate_keypair(args.directory, args.name)
    print(f"public key file: {public}\nsecret key file: {secret} (keep it private)")
    print(f"public key: {load_keypair(secret)[0].decode('ascii')}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
