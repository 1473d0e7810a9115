"""The dock's Ed25519 key and manifest signatures.

Each dock has one key pair in `signing.key_file` (0600, created on first start). Its public half
is printed by `dockd key show` as one line, which is also the format of a trusted-key file:

    dockd-ed25519 <key_id> <public key, base64> <dock_id>

`key_id` is the first 16 hex digits of SHA-256 over the raw 32-byte public key. The manifest
names it (`signing.key_id`). The signature is detached, in `manifest.json.sig`:

    dockd-ed25519-sha512 <key_id> <signature, base64>

It signs `dockd.manifest.sha512/1\n` followed by the 64-byte SHA-512 of the exact bytes of
`manifest.json` as stored — no canonicalisation to get wrong. Prehashed because pure Ed25519
hashes its whole message twice: the seal writes a manifest of 100 000 files to disk as it
builds it and must not hold it in memory to sign it; its SHA-512 is taken on the way. The
prefix names what is signed, so these bytes are never a valid signature of anything else.
Manifests signed before that (`dockd-ed25519 <key_id> <signature>`, over the raw bytes) still
verify.

It is written just before the manifest, so the manifest stays the last object of a session.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from dockd.errors import ConfigError

SCHEME = "dockd-ed25519"  # the key type: public-key lines, and signatures over the raw bytes
MANIFEST_SCHEME = "dockd-ed25519-sha512"  # signatures over MANIFEST_DIGEST_PREFIX + SHA-512
MANIFEST_DIGEST_PREFIX = b"dockd.manifest.sha512/1\n"


class SigningError(ConfigError):
    """The dock key (signing.key_file) or a trusted key (signing.trusted_keys_dir) is unusable:
    a configuration problem, refused before anything starts."""


def key_id(public: Ed25519PublicKey) -> str:
    raw = public.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return hashlib.sha256(raw).hexdigest()[:16]


@dataclass(frozen=True)
class DockKey:
    private: Ed25519PrivateKey
    dock_id: str

    @property
    def public(self) -> Ed25519PublicKey:
        return self.private.public_key()

    @property
    def key_id(self) -> str:
        return key_id(self.public)

    def public_line(self) -> str:
        raw = self.public.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
        return f"{SCHEME} {self.key_id} {base64.b64encode(raw).decode()} {self.dock_id}"

    def sign(self, data: bytes) -> bytes:
        """The signature file of a manifest held in memory."""
        return self.sign_sha512(hashlib.sha512(data).digest())

    def sign_sha512(self, sha512: bytes) -> bytes:
        """The signature file of a manifest whose SHA-512 (raw 64 bytes) is `sha512`."""
        sig = base64.b64encode(self.private.sign(manifest_message(sha512))).decode()
        return f"{MANIFEST_SCHEME} {self.key_id} {sig}\n".encode()


def manifest_message(sha512: bytes) -> bytes:
    """What a `dockd-ed25519-sha512` signature signs, for a manifest with this SHA-512."""
    if len(sha512) != hashlib.sha512().digest_size:
        raise ValueError("a manifest digest is the 64 bytes of a SHA-512")
    return MANIFEST_DIGEST_PREFIX + sha512


def load_or_create(path: Path, dock_id: str) -> DockKey:
    """The dock key at `path`; made (0600, O_EXCL so two starts cannot race) if absent."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return _create(path, dock_id)
    except OSError as exc:
        raise SigningError(f"signing.key_file {path}: cannot read ({exc.strerror})") from None
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except ValueError as exc:
        raise SigningError(f"signing.key_file {path}: not a PEM private key ({exc})") from None
    if not isinstance(key, Ed25519PrivateKey):
        raise SigningError(f"signing.key_file {path}: not an Ed25519 key")
    return DockKey(key, dock_id)


def load(path: Path, dock_id: str) -> DockKey | None:
    """The dock key if it exists (read-only commands never create one)."""
    return load_or_create(path, dock_id) if path.exists() else None


def _create(path: Path, dock_id: str) -> DockKey:
    key = Ed25519PrivateKey.generate()
    pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    except FileExistsError:
        return load_or_create(path, dock_id)
    except OSError as exc:
        raise SigningError(f"signing.key_file {path}: cannot create ({exc.strerror})") from None
    try:
        os.write(fd, pem)
        os.fsync(fd)
    finally:
        os.close(fd)
    return DockKey(key, dock_id)


@dataclass(frozen=True)
class TrustedKey:
    key_id: str
    public: Ed25519PublicKey
    dock_id: str
    origin: str


def parse_public_line(line: str, origin: str) -> TrustedKey:
    parts = line.split()
    if len(parts) != 4 or parts[0] != SCHEME:
        raise SigningError(f"{origin}: not a dockd public key line ({SCHEME} KEY_ID KEY DOCK)")
    try:
        raw = base64.b64decode(parts[2], validate=True)
        public = Ed25519PublicKey.from_public_bytes(raw)
    except (binascii.Error, ValueError) as exc:
        raise SigningError(f"{origin}: bad public key ({exc})") from None
    if key_id(public) != parts[1]:
        raise SigningError(f"{origin}: key id {parts[1]} does not match its key")
    return TrustedKey(parts[1], public, parts[3], origin)


def trusted_keys(directory: Path | None, own: DockKey | None) -> dict[str, TrustedKey]:
    """Keys `dockd verify` trusts: every file in `directory`; with none given, this dock's own."""
    keys: dict[str, TrustedKey] = {}
    if directory is not None:
        for path in sorted(directory.iterdir()):
            if path.is_file() and not path.name.startswith("."):
                k = parse_public_line(path.read_text(encoding="utf-8").strip(), str(path))
                keys[k.key_id] = k
    elif own is not None:
        keys[own.key_id] = TrustedKey(own.key_id, own.public, own.dock_id, "this dock")
    return keys


def check_signature(data: bytes, sig_file: bytes, keys: dict[str, TrustedKey]) -> str | None:
    """None if `sig_file` is a good signature of `data` by a trusted key, else the problem.
    Either scheme: over the SHA-512 (what dockd signs now) or over the raw bytes (before)."""
    parts = sig_file.decode("utf-8", errors="replace").split()
    if len(parts) != 3 or parts[0] not in (MANIFEST_SCHEME, SCHEME):
        return "signature file is malformed"
    trusted = keys.get(parts[1])
    if trusted is None:
        return f"signed by key {parts[1]}, which is not trusted"
    if parts[0] == MANIFEST_SCHEME:
        data = manifest_message(hashlib.sha512(data).digest())
    try:
        trusted.public.verify(base64.b64decode(parts[2], validate=True), data)
    except (InvalidSignature, binascii.Error, ValueError):
        return f"signature by key {parts[1]} does not match the manifest (altered)"
    return None
