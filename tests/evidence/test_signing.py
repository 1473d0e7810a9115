"""Manifest signatures: the dock key, its public line, and what a signature proves."""

from __future__ import annotations

import base64
import hashlib
import stat
from pathlib import Path

import pytest

from dockd.evidence.signing import (
    DockKey,
    SigningError,
    check_signature,
    load,
    load_or_create,
    parse_public_line,
    trusted_keys,
)


def test_dock_key_is_created_once_private_to_the_service_user(tmp_path: Path) -> None:
    path = tmp_path / "state" / "dock.key"
    assert load(path, "dock-a") is None  # read-only commands never create one
    key = load_or_create(path, "dock-a")
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    again = load_or_create(path, "dock-a")
    assert again.key_id == key.key_id


def test_public_line_round_trips_and_names_the_dock(tmp_path: Path) -> None:
    key = load_or_create(tmp_path / "k", "station1-dock-a")
    line = key.public_line()
    parsed = parse_public_line(line, "test")
    assert parsed.key_id == key.key_id
    assert parsed.dock_id == "station1-dock-a"


def test_signature_checks_out_and_fails_after_any_edit(tmp_path: Path) -> None:
    key = load_or_create(tmp_path / "k", "d")
    manifest = b'{"format": "dockd.manifest/1", "files": []}\n'
    sig = key.sign(manifest)
    assert key.sign(manifest) == sig  # deterministic: a restart re-signs to the same bytes
    trusted = trusted_keys(None, key)
    assert check_signature(manifest, sig, trusted) is None
    edited = manifest.replace(b"[]", b"[ ]")
    problem = check_signature(edited, sig, trusted)
    assert problem is not None
    assert "altered" in problem


def raw_signature(key: DockKey, data: bytes) -> bytes:
    """A signature file as dockd wrote them before the prehashed scheme: over the raw bytes."""
    sig = base64.b64encode(key.private.sign(data)).decode()
    return f"dockd-ed25519 {key.key_id} {sig}\n".encode()


def test_manifests_are_signed_over_their_sha512_with_a_prefix(tmp_path: Path) -> None:
    key = load_or_create(tmp_path / "k", "d")
    manifest = b'{"format": "dockd.manifest/1", "files": []}\n'
    sig = key.sign(manifest)
    scheme, key_id, signature = sig.decode().split()

    assert (scheme, key_id) == ("dockd-ed25519-sha512", key.key_id)
    assert sig.endswith(b"\n") and sig.count(b"\n") == 1
    assert key.sign_sha512(hashlib.sha512(manifest).digest()) == sig  # as the seal signs it
    message = b"dockd.manifest.sha512/1\n" + hashlib.sha512(manifest).digest()
    assert len(message) == 24 + 64
    key.public.verify(base64.b64decode(signature), message)  # what docs/evidence.md checks
    with pytest.raises(ValueError, match="SHA-512"):
        key.sign_sha512(hashlib.sha256(manifest).digest())


def test_signatures_over_the_raw_bytes_still_verify_and_neither_survives_an_edit(
    tmp_path: Path,
) -> None:
    """Evidence sealed before the prehashed scheme keeps verifying."""
    key = load_or_create(tmp_path / "k", "d")
    trusted = trusted_keys(None, key)
    manifest = b'{"format": "dockd.manifest/1", "files": []}\n'
    edited = manifest.replace(b"[]", b"[ ]")
    for sig in (key.sign(manifest), raw_signature(key, manifest)):
        assert check_signature(manifest, sig, trusted) is None
        problem = check_signature(edited, sig, trusted)
        assert problem == f"signature by key {key.key_id} does not match the manifest (altered)"


def test_a_signature_under_the_other_schemes_name_does_not_verify(tmp_path: Path) -> None:
    key = load_or_create(tmp_path / "k", "d")
    trusted = trusted_keys(None, key)
    manifest = b"manifest"
    new, old = key.sign(manifest), raw_signature(key, manifest)
    relabelled = [
        new.replace(b"dockd-ed25519-sha512 ", b"dockd-ed25519 "),
        old.replace(b"dockd-ed25519 ", b"dockd-ed25519-sha512 "),
    ]
    for sig in relabelled:
        assert "altered" in (check_signature(manifest, sig, trusted) or "")
    assert check_signature(manifest, b"ssh-ed25519 x y\n", trusted) == "signature file is malformed"


def test_signature_by_an_untrusted_dock_is_refused(tmp_path: Path) -> None:
    ours = load_or_create(tmp_path / "ours", "a")
    theirs = load_or_create(tmp_path / "theirs", "b")
    data = b"manifest"
    problem = check_signature(data, theirs.sign(data), trusted_keys(None, ours))
    assert problem is not None
    assert "not trusted" in problem


def test_trusted_keys_dir_holds_key_show_lines_and_replaces_the_own_key(tmp_path: Path) -> None:
    ours = load_or_create(tmp_path / "ours", "a")
    other = load_or_create(tmp_path / "other", "b")
    trusted_dir = tmp_path / "trusted"
    trusted_dir.mkdir()
    (trusted_dir / "dock-b.pub").write_text(other.public_line() + "\n")
    keys = trusted_keys(trusted_dir, ours)
    assert set(keys) == {other.key_id}


def test_malformed_or_forged_public_lines_are_refused_naming_the_file(tmp_path: Path) -> None:
    key = load_or_create(tmp_path / "k", "d")
    scheme, _key_id, public, dock = key.public_line().split()
    with pytest.raises(SigningError, match=r"bad\.pub"):
        parse_public_line("ssh-ed25519 AAAA", "bad.pub")
    with pytest.raises(SigningError, match="does not match"):
        parse_public_line(f"{scheme} {'0' * 16} {public} {dock}", "forged.pub")


def test_a_key_file_that_is_not_a_key_is_a_config_error(tmp_path: Path) -> None:
    path = tmp_path / "dock.key"
    path.write_text("not a key")
    with pytest.raises(SigningError, match=r"signing\.key_file"):
        load_or_create(path, "d")
