"""Manifest signatures: the dock key, its public line, and what a signature proves."""

from __future__ import annotations

import stat
from pathlib import Path

import pytest

from dockd.evidence.signing import (
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
