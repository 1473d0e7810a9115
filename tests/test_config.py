"""The configuration (SPEC §4): the shipped example, defaults, units, and every way to get it wrong.

A bad configuration must be refused as a whole with a ConfigError whose message names the key path,
the value found and what was expected.
"""

from __future__ import annotations

import copy
import json
import os
import re
import tomllib
from pathlib import Path
from typing import Any

import pytest
from pydantic import BaseModel

from dockd.config import (
    DEFAULT_CONFIG_PATH,
    Config,
    config_path,
    load_config,
    parse_config,
)
from dockd.errors import EX_CONFIG, ConfigError

EXAMPLE = Path(__file__).resolve().parent.parent / "config" / "dockd.toml"

MiB = 1024**2
GiB = 1024**3


def _merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(base)
    for key, value in over.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


def _base(tmp_path: Path) -> dict[str, Any]:
    """A valid configuration whose paths all live under tmp_path."""
    return {
        "dock": {"id": "test-dock", "state_dir": str(tmp_path / "state")},
        "sources": {"directory": {"enabled": True, "path": str(tmp_path / "dock")}},
        "store": {"kind": "filesystem", "path": str(tmp_path / "evidence")},
    }


def _config(tmp_path: Path, **sections: Any) -> Config:
    return parse_config(_merge(_base(tmp_path), sections))


def _refused(tmp_path: Path, **sections: Any) -> str:
    """The ConfigError message for the base configuration with `sections` merged in."""
    with pytest.raises(ConfigError) as info:
        parse_config(_merge(_base(tmp_path), sections))
    return str(info.value)


def _write(tmp_path: Path, text: str, name: str = "dockd.toml") -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


# --- the shipped example --------------------------------------------------------------------------


def test_shipped_example_parses_without_error() -> None:
    with EXAMPLE.open("rb") as f:
        config = parse_config(tomllib.load(f))
    assert config.dock.id == "station1-dock-a"
    assert config.sources.directory.enabled is True
    assert config.sources.directory.path == Path("/srv/dock")
    assert config.sources.udev.enabled is False
    assert config.store.kind == "filesystem"
    assert config.store.path == Path("/srv/evidence")
    assert config.mqtt.enabled is True
    assert config.mqtt.password_file is None
    assert config.signing.trusted_keys_dir is None


def test_shipped_example_loads_from_its_file() -> None:
    config = load_config(EXAMPLE)
    assert config.store.path == Path("/srv/evidence")


def _model_keys(model: type[BaseModel], prefix: str = "") -> list[str]:
    keys: list[str] = []
    for name, field in model.model_fields.items():
        annotation = field.annotation
        args = getattr(annotation, "__args__", ())
        inner = args[-1] if args else annotation
        if isinstance(inner, type) and issubclass(inner, BaseModel):
            keys.extend(_model_keys(inner, f"{prefix}{name}."))
        else:
            keys.append(prefix + name)
    return keys


def _example_keys(text: str) -> set[str]:
    """Every "section.key" the example shows, set or commented out."""
    keys: set[str] = set()
    section = ""
    for line in text.splitlines():
        header = re.match(r"^#?\s*\[\[?([^\]]+)\]\]?\s*(#.*)?$", line)
        if header:
            section = header.group(1).strip()
            section = "cameras" if section.startswith("cameras.") else section
            continue
        key = re.match(r"^#?\s*([a-z_]+)\s*=", line)
        if key:
            keys.add(f"{section}.{key.group(1)}")
    return keys


def test_shipped_example_shows_every_key_the_model_knows() -> None:
    keys = _model_keys(Config)
    assert "offload.read_attempts" in keys and "sources.udev.match.serial" in keys
    shown = _example_keys(EXAMPLE.read_text(encoding="utf-8"))
    assert sorted(set(keys) - shown) == []
    assert sorted(shown - set(keys)) == []


def test_shipped_example_commented_udev_match_and_camera_facts_load_when_uncommented() -> None:
    text = EXAMPLE.read_text(encoding="utf-8")
    for block in ("[[sources.udev.match]]", '[cameras."X6039B2A3"]'):
        start = text.index(f"\n# {block}\n") + 1
        lines = text[start:].split("\n")
        n = next(i for i, line in enumerate(lines) if not line.startswith("#"))
        uncommented = "\n".join(line[2:] for line in lines[:n] if line.startswith("# "))
        text = text[:start] + uncommented + "\n" + "\n".join(lines[n:])
    text = text.replace("[sources.udev]\n", "[sources.udev]\nenabled = true\n", 1)
    text = re.sub(r"(?m)^enabled = false\n(?=\n# A device is a camera)", "", text)
    config = parse_config(tomllib.loads(text))
    assert config.sources.udev.enabled is True
    (match,) = config.sources.udev.match
    assert match.vendor_id == "2a2b"
    assert match.model_id == "0001"
    assert match.serial is not None and match.serial.search("X6039B2A3")
    assert match.fs_label is not None and match.fs_label.search("CAMERA")
    assert config.officer("X6039B2A3") == "badge-1234"


# --- defaults -------------------------------------------------------------------------------------


def test_empty_config_takes_the_embedded_defaults() -> None:
    config = parse_config({})
    assert config.dock.id == "dock"
    assert config.dock.state_dir == Path("/var/lib/dockd")
    assert config.sources.directory.enabled is True
    assert config.sources.directory.path == Path("/srv/dock")
    assert config.sources.udev.enabled is False
    assert config.offload.chunk_size == 8 * MiB
    assert config.offload.min_free_staging == 2 * GiB
    assert config.offload.verify == "readback"
    assert config.offload.parallel_cameras == 4
    assert config.offload.include == ["**/*"]
    assert config.offload.exclude == [".*", "**/.*", "System Volume Information/**"]
    assert config.store.kind == "filesystem"
    assert config.store.path == Path("/srv/evidence")
    assert config.store.verify == "checksum"
    assert config.upload.concurrency == 2
    assert config.upload.max_attempts == 0
    assert config.upload.backoff_max == 600.0
    assert config.upload.backoff_initial == 1.0
    assert config.upload.bandwidth_limit is None
    assert config.camera.clear == "never"
    assert config.mqtt.enabled is True
    assert config.mqtt.host == "localhost"
    assert config.mqtt.port == 1883
    assert config.mqtt.topic_prefix == "dockd"
    assert config.mqtt.progress_interval == 1.0
    assert config.metrics.enabled is False
    assert config.metrics.listen == "127.0.0.1:9469"
    assert config.log.level == "info"


def test_partial_section_keeps_defaults_for_the_keys_left_out(tmp_path: Path) -> None:
    config = _config(tmp_path, offload={"parallel_cameras": 2}, upload={"concurrency": 8})
    assert config.offload.parallel_cameras == 2
    assert config.offload.chunk_size == 8 * MiB
    assert config.upload.concurrency == 8
    assert config.upload.backoff_max == 600.0


def test_state_dir_derives_journal_staging_and_key_paths(tmp_path: Path) -> None:
    config = _config(tmp_path)
    state = tmp_path / "state"
    assert config.journal_path == state / "journal.sqlite3"
    assert config.staging_dir == state / "staging"
    assert config.key_file == state / "dock.key"


def test_explicit_signing_key_file_overrides_the_state_dir_default(tmp_path: Path) -> None:
    config = _config(tmp_path, signing={"key_file": str(tmp_path / "k")})
    assert config.key_file == tmp_path / "k"


def test_empty_optional_paths_mean_not_set(tmp_path: Path) -> None:
    config = _config(
        tmp_path,
        signing={"key_file": "", "trusted_keys_dir": ""},
        mqtt={"password_file": ""},
    )
    assert config.signing.trusted_keys_dir is None
    assert config.mqtt.password_file is None
    assert config.key_file == tmp_path / "state" / "dock.key"


def test_effective_configuration_is_json_with_defaults_filled_in(tmp_path: Path) -> None:
    config = _config(
        tmp_path,
        sources={"udev": {"enabled": True, "match": [{"vendor_id": "2A2B", "serial": "^X6"}]}},
    )
    effective = config.effective()
    json.dumps(effective)
    assert effective["offload"]["chunk_size"] == 8 * MiB
    assert effective["upload"]["backoff_max"] == 600.0
    assert effective["sources"]["udev"]["match"] == [
        {"vendor_id": "2a2b", "model_id": None, "serial": "^X6", "fs_label": None}
    ]
    assert effective["store"]["path"] == str(tmp_path / "evidence")


def test_per_camera_officer_is_looked_up_by_camera_id(tmp_path: Path) -> None:
    config = _config(tmp_path, cameras={"X6039B2A3": {"officer": "badge-1234"}})
    assert config.officer("X6039B2A3") == "badge-1234"
    assert config.officer("OTHER") is None


def test_config_path_prefers_argument_then_environment_then_etc(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("DOCKD_CONFIG", "/env/dockd.toml")
    assert config_path("/arg/dockd.toml") == Path("/arg/dockd.toml")
    assert config_path(None) == Path("/env/dockd.toml")
    monkeypatch.delenv("DOCKD_CONFIG")
    assert config_path(None) == DEFAULT_CONFIG_PATH == Path("/etc/dockd/dockd.toml")


# --- units ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("65536B", 65536),
        ("64KiB", 64 * 1024),
        ("8MiB", 8 * MiB),
        ("1GiB", GiB),
        ("64KB", 64_000),
        ("8MB", 8_000_000),
        ("1GB", 1_000_000_000),
        (65536, 65536),
    ],
)
def test_chunk_size_in_every_size_unit_is_read_as_bytes(
    tmp_path: Path, text: str | int, expected: int
) -> None:
    assert _config(tmp_path, offload={"chunk_size": text}).offload.chunk_size == expected


def test_min_free_staging_in_gb_is_read_as_bytes(tmp_path: Path) -> None:
    config = _config(tmp_path, offload={"min_free_staging": "5GB"})
    assert config.offload.min_free_staging == 5_000_000_000


@pytest.mark.parametrize(
    ("text", "expected"),
    [("500ms", 0.5), ("30s", 30.0), ("10m", 600.0), ("2h", 7200.0), ("1d", 86400.0), (45, 45.0)],
)
def test_durations_in_every_unit_are_read_as_seconds(
    tmp_path: Path, text: str | int, expected: float
) -> None:
    config = _config(
        tmp_path,
        upload={"backoff_max": text, "backoff_initial": text},
        mqtt={"progress_interval": text},
    )
    assert config.upload.backoff_max == expected
    assert config.upload.backoff_initial == expected
    assert config.mqtt.progress_interval == expected


@pytest.mark.parametrize(
    ("text", "expected"), [("40MB/s", 40_000_000), ("5MiB/s", 5 * MiB), ("", None)]
)
def test_bandwidth_limit_is_read_as_bytes_per_second_or_unlimited(
    tmp_path: Path, text: str, expected: int | None
) -> None:
    assert _config(tmp_path, upload={"bandwidth_limit": text}).upload.bandwidth_limit == expected


# --- bad values -----------------------------------------------------------------------------------


def test_refusal_is_a_config_error_with_exit_code_78(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        parse_config(_merge(_base(tmp_path), {"offload": {"chunk_size": "huge"}}))
    assert info.value.exit_code == EX_CONFIG == 78


def test_chunk_size_in_parsecs_is_refused_naming_the_key(tmp_path: Path) -> None:
    msg = _refused(tmp_path, offload={"chunk_size": "8 parsecs"})
    assert "offload.chunk_size" in msg
    assert '"8 parsecs"' in msg
    assert "KiB" in msg  # what was expected


def test_chunk_size_as_a_float_is_refused_naming_the_key(tmp_path: Path) -> None:
    msg = _refused(tmp_path, offload={"chunk_size": 8.5})
    assert "offload.chunk_size" in msg and "8.5" in msg and "not a size" in msg


@pytest.mark.parametrize("value", ["2KiB", "2GiB", 0])
def test_chunk_size_out_of_range_is_refused_naming_the_bounds(
    tmp_path: Path, value: str | int
) -> None:
    msg = _refused(tmp_path, offload={"chunk_size": value})
    assert "offload.chunk_size" in msg and json.dumps(value) in msg
    assert "4KiB to 1GiB" in msg


def test_backoff_max_in_fortnights_is_refused_naming_the_key(tmp_path: Path) -> None:
    msg = _refused(tmp_path, upload={"backoff_max": "10 fortnights"})
    assert "upload.backoff_max" in msg and '"10 fortnights"' in msg and "ms/s/m/h/d" in msg


def test_negative_progress_interval_is_refused_naming_the_key(tmp_path: Path) -> None:
    msg = _refused(tmp_path, mqtt={"progress_interval": -1})
    assert "mqtt.progress_interval" in msg and "-1" in msg and "negative" in msg


def test_nan_duration_from_toml_is_refused_naming_the_key(tmp_path: Path) -> None:
    path = _write(tmp_path, "[upload]\nbackoff_max = nan\n")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert "upload.backoff_max" in str(info.value) and "NaN" in str(info.value)


def test_bandwidth_limit_that_is_not_a_rate_is_refused_naming_the_key(tmp_path: Path) -> None:
    msg = _refused(tmp_path, upload={"bandwidth_limit": "fast"})
    assert "upload.bandwidth_limit" in msg and '"fast"' in msg and "40MB/s" in msg


def test_bandwidth_limit_as_a_bare_number_is_refused_naming_the_key(tmp_path: Path) -> None:
    msg = _refused(tmp_path, upload={"bandwidth_limit": 40})
    assert "upload.bandwidth_limit" in msg and "40" in msg and "not a rate" in msg


def test_zero_bandwidth_limit_is_refused_naming_the_key(tmp_path: Path) -> None:
    msg = _refused(tmp_path, upload={"bandwidth_limit": "0MB/s"})
    assert "upload.bandwidth_limit" in msg and '"0MB/s"' in msg


def test_typo_in_a_section_key_is_refused_listing_the_known_keys(tmp_path: Path) -> None:
    msg = _refused(tmp_path, offload={"chunk_sise": "8MiB"})
    assert "offload.chunk_sise" in msg
    assert "unknown key" in msg
    assert "chunk_size" in msg.split("offload.chunk_sise", 1)[1]


def test_typo_in_a_camera_table_is_refused_listing_the_known_keys(tmp_path: Path) -> None:
    msg = _refused(tmp_path, cameras={"X1": {"oficer": "badge-1"}})
    assert "cameras.X1.oficer" in msg and "unknown key" in msg and "officer" in msg


def test_unknown_top_level_section_is_refused_naming_it(tmp_path: Path) -> None:
    msg = _refused(tmp_path, frobnicate={"x": 1})
    assert "frobnicate" in msg and "unknown key" in msg and "offload" in msg


def test_section_that_is_not_a_table_is_refused_naming_it(tmp_path: Path) -> None:
    msg = _refused(tmp_path, dock=5)
    assert "dock: 5" in msg


def test_integer_key_given_a_word_is_refused_naming_the_key(tmp_path: Path) -> None:
    msg = _refused(tmp_path, offload={"parallel_cameras": "four"})
    assert "offload.parallel_cameras" in msg and '"four"' in msg and "integer" in msg


@pytest.mark.parametrize("dock_id", ["no spaces", "", "a" * 65, "dock\n", "dock/a", "döck"])
def test_bad_dock_id_is_refused_naming_the_key(tmp_path: Path, dock_id: str) -> None:
    msg = _refused(tmp_path, dock={"id": dock_id})
    assert "dock.id" in msg and json.dumps(dock_id, ensure_ascii=False) in msg
    assert "not a dock id" in msg


def test_bad_serial_regex_is_refused_naming_the_list_entry(tmp_path: Path) -> None:
    match = [{"vendor_id": "2a2b", "serial": "("}]
    msg = _refused(tmp_path, sources={"udev": {"enabled": True, "match": match}})
    assert 'sources.udev.match[0].serial: "("' in msg
    assert "not a valid regular expression" in msg


def test_bad_fs_label_regex_in_the_second_entry_is_refused_naming_it(tmp_path: Path) -> None:
    matches = [{"vendor_id": "2a2b"}, {"vendor_id": "2a2b", "fs_label": "[CAMERA"}]
    msg = _refused(tmp_path, sources={"udev": {"enabled": True, "match": matches}})
    assert 'sources.udev.match[1].fs_label: "[CAMERA"' in msg


@pytest.mark.parametrize("vendor_id", ["zzzz", "2a2", "2a2b5", "0x2a"])
def test_vendor_id_that_is_not_four_hex_digits_is_refused_naming_the_key(
    tmp_path: Path, vendor_id: str
) -> None:
    msg = _refused(
        tmp_path, sources={"udev": {"enabled": True, "match": [{"vendor_id": vendor_id}]}}
    )
    assert f'sources.udev.match[0].vendor_id: "{vendor_id}"' in msg and "hex" in msg


def test_vendor_id_written_as_a_toml_integer_is_refused_naming_the_key(tmp_path: Path) -> None:
    msg = _refused(tmp_path, sources={"udev": {"enabled": True, "match": [{"vendor_id": 0x2A2B}]}})
    assert "sources.udev.match[0].vendor_id: 10795" in msg and "hex" in msg


def test_model_id_that_is_not_hex_is_refused_naming_the_key(tmp_path: Path) -> None:
    match = [{"vendor_id": "2a2b", "model_id": "cam1"}]
    msg = _refused(tmp_path, sources={"udev": {"enabled": True, "match": match}})
    assert 'sources.udev.match[0].model_id: "cam1"' in msg


def test_udev_match_without_vendor_id_is_refused_naming_the_missing_key(tmp_path: Path) -> None:
    match = [{"serial": "^X6"}]
    msg = _refused(tmp_path, sources={"udev": {"enabled": True, "match": match}})
    assert "sources.udev.match[0].vendor_id: required key is missing" in msg


def test_udev_match_vendor_id_is_case_folded(tmp_path: Path) -> None:
    config = _config(
        tmp_path, sources={"udev": {"enabled": True, "match": [{"vendor_id": "2A2B"}]}}
    )
    assert config.sources.udev.match[0].vendor_id == "2a2b"


def test_udev_enabled_without_match_entries_is_refused(tmp_path: Path) -> None:
    msg = _refused(tmp_path, sources={"udev": {"enabled": True}})
    assert "sources.udev" in msg and "[[sources.udev.match]]" in msg and "enabled" in msg


def test_no_source_enabled_is_valid_for_verify_but_refused_by_run_naming_both_sources(
    tmp_path: Path,
) -> None:
    from dockd.sources import build_sources

    data = _base(tmp_path)
    data["sources"] = {"directory": {"enabled": False}}
    config = parse_config(data)  # a custodian's verify-only machine has no camera source
    with pytest.raises(ConfigError) as info:
        build_sources(config)
    msg = str(info.value)
    assert "sources:" in msg and "no enabled source" in msg
    assert "sources.udev" in msg and "sources.directory" in msg


def test_filesystem_store_without_path_is_refused_naming_store_path(tmp_path: Path) -> None:
    data = _base(tmp_path)
    del data["store"]["path"]
    with pytest.raises(ConfigError) as info:
        parse_config(data)
    assert "store" in str(info.value) and '"filesystem" needs store.path' in str(info.value)


def test_filesystem_store_with_empty_path_is_refused_naming_store_path(tmp_path: Path) -> None:
    msg = _refused(tmp_path, store={"path": ""})
    assert "needs store.path" in msg


def test_empty_state_dir_is_refused_instead_of_meaning_the_current_directory(
    tmp_path: Path,
) -> None:
    msg = _refused(tmp_path, dock={"state_dir": ""})
    assert 'dock.state_dir: ""' in msg and "empty" in msg


def test_path_with_a_nul_byte_is_refused_naming_the_key(tmp_path: Path) -> None:
    msg = _refused(tmp_path, store={"path": "/srv/evi\0dence"})
    assert "store.path" in msg and "NUL" in msg


def test_s3_store_without_bucket_is_refused_naming_store_bucket(tmp_path: Path) -> None:
    msg = _refused(tmp_path, store={"kind": "s3"})
    assert '"s3" needs store.bucket' in msg


def test_s3_store_with_bucket_is_accepted_without_a_path(tmp_path: Path) -> None:
    data = _base(tmp_path)
    data["store"] = {"kind": "s3", "bucket": "evidence", "prefix": "evidence/"}
    config = parse_config(data)
    assert config.store.bucket == "evidence" and config.store.path is None


def test_unknown_store_kind_is_refused_listing_the_kinds(tmp_path: Path) -> None:
    msg = _refused(tmp_path, store={"kind": "ftp"})
    assert 'store.kind: "ftp"' in msg and "'filesystem'" in msg and "'s3'" in msg


def test_object_lock_mode_without_days_is_refused_naming_both_keys(tmp_path: Path) -> None:
    msg = _refused(tmp_path, store={"kind": "s3", "bucket": "b", "object_lock_mode": "GOVERNANCE"})
    assert 'store.object_lock_mode = "GOVERNANCE" needs store.object_lock_days' in msg


def test_object_lock_days_without_mode_is_refused_naming_both_keys(tmp_path: Path) -> None:
    msg = _refused(tmp_path, store={"kind": "s3", "bucket": "b", "object_lock_days": 30})
    assert "store.object_lock_days = 30 needs store.object_lock_mode" in msg


def test_bad_object_lock_mode_is_refused_listing_the_modes(tmp_path: Path) -> None:
    msg = _refused(
        tmp_path,
        store={"kind": "s3", "bucket": "b", "object_lock_mode": "STRICT", "object_lock_days": 1},
    )
    assert 'store.object_lock_mode: "STRICT"' in msg and "COMPLIANCE" in msg


def test_bad_offload_verify_is_refused_listing_the_choices(tmp_path: Path) -> None:
    msg = _refused(tmp_path, offload={"verify": "full"})
    assert 'offload.verify: "full"' in msg and "'readback'" in msg
    assert "'source-and-readback'" in msg


def test_bad_store_verify_is_refused_listing_the_choices(tmp_path: Path) -> None:
    msg = _refused(tmp_path, store={"verify": "md5"})
    assert 'store.verify: "md5"' in msg and "'checksum'" in msg


def test_bad_camera_clear_and_log_level_are_refused_naming_their_keys(tmp_path: Path) -> None:
    msg = _refused(tmp_path, camera={"clear": "always"}, log={"level": "loud"})
    assert 'camera.clear: "always"' in msg and 'log.level: "loud"' in msg


def test_upload_concurrency_zero_is_refused_naming_the_key(tmp_path: Path) -> None:
    msg = _refused(tmp_path, upload={"concurrency": 0})
    assert "upload.concurrency: 0" in msg and "greater than or equal to 1" in msg


def test_negative_max_attempts_is_refused_naming_the_key(tmp_path: Path) -> None:
    msg = _refused(tmp_path, upload={"max_attempts": -1})
    assert "upload.max_attempts: -1" in msg


def test_mqtt_port_out_of_range_is_refused_naming_the_key(tmp_path: Path) -> None:
    msg = _refused(tmp_path, mqtt={"port": 70000})
    assert "mqtt.port: 70000" in msg


@pytest.mark.parametrize("prefix", ["a/#", "dock+d", "/dockd", "dockd/", "", "$SYS"])
def test_bad_mqtt_topic_prefix_is_refused_naming_the_key(tmp_path: Path, prefix: str) -> None:
    msg = _refused(tmp_path, mqtt={"topic_prefix": prefix})
    assert f"mqtt.topic_prefix: {json.dumps(prefix)}" in msg and "not a topic prefix" in msg


def test_nested_mqtt_topic_prefix_is_accepted(tmp_path: Path) -> None:
    assert _config(tmp_path, mqtt={"topic_prefix": "police/evidence"}).mqtt.topic_prefix == (
        "police/evidence"
    )


def test_missing_mqtt_password_file_is_refused_when_mqtt_is_enabled(tmp_path: Path) -> None:
    missing = tmp_path / "no-such-password"
    msg = _refused(tmp_path, mqtt={"enabled": True, "password_file": str(missing)})
    assert f'mqtt.password_file: "{missing}"' in msg and "not a readable file" in msg


def test_missing_mqtt_password_file_is_ignored_when_mqtt_is_disabled(tmp_path: Path) -> None:
    config = _config(
        tmp_path, mqtt={"enabled": False, "password_file": str(tmp_path / "no-such-password")}
    )
    assert config.mqtt.enabled is False


def test_existing_mqtt_password_file_is_accepted(tmp_path: Path) -> None:
    secret = tmp_path / "mqtt-password"
    secret.write_text("hunter2\n")
    assert _config(tmp_path, mqtt={"password_file": str(secret)}).mqtt.password_file == secret


def test_mqtt_tls_with_a_missing_ca_file_is_refused_naming_the_key(tmp_path: Path) -> None:
    missing = tmp_path / "ca.pem"
    msg = _refused(tmp_path, mqtt={"tls": True, "ca_file": str(missing)})
    assert f'mqtt.ca_file: "{missing}"' in msg


def test_s3_secret_key_file_that_does_not_exist_is_refused_naming_the_key(tmp_path: Path) -> None:
    missing = tmp_path / "s3-secret"
    msg = _refused(
        tmp_path,
        store={"kind": "s3", "bucket": "b", "secret_access_key_file": str(missing)},
    )
    assert f'store.secret_access_key_file: "{missing}"' in msg


def test_trusted_keys_dir_that_does_not_exist_is_refused_naming_the_key(tmp_path: Path) -> None:
    missing = tmp_path / "trusted"
    msg = _refused(tmp_path, signing={"trusted_keys_dir": str(missing)})
    assert f'signing.trusted_keys_dir: "{missing}"' in msg and "not a directory" in msg


@pytest.mark.parametrize("camera", ["bad id", "..", "x/y"])
def test_bad_camera_id_under_cameras_is_refused_naming_it(tmp_path: Path, camera: str) -> None:
    msg = _refused(tmp_path, cameras={camera: {"officer": "badge-1"}})
    assert "cameras" in msg and repr(camera) in msg and "not a camera id" in msg


def test_metrics_listen_without_a_port_is_refused_naming_the_key(tmp_path: Path) -> None:
    msg = _refused(tmp_path, metrics={"listen": "localhost"})
    assert 'metrics.listen: "localhost"' in msg and "host:port" in msg


def test_absolute_include_glob_is_refused_naming_the_key(tmp_path: Path) -> None:
    msg = _refused(tmp_path, offload={"include": ["/DCIM/**"]})
    assert "offload.include" in msg and "/DCIM/**" in msg and "relative" in msg


# --- paths on disk --------------------------------------------------------------------------------


def test_store_path_inside_state_dir_is_refused_naming_both_keys(tmp_path: Path) -> None:
    inside = tmp_path / "state" / "evidence"
    msg = _refused(tmp_path, store={"path": str(inside)})
    assert f'store.path: "{inside}" overlaps dock.state_dir' in msg


def test_store_path_equal_to_state_dir_is_refused_naming_both_keys(tmp_path: Path) -> None:
    msg = _refused(tmp_path, store={"path": str(tmp_path / "state")})
    assert "store.path" in msg and "overlaps dock.state_dir" in msg


def test_state_dir_inside_store_path_is_refused(tmp_path: Path) -> None:
    msg = _refused(tmp_path, dock={"state_dir": str(tmp_path / "evidence" / "state")})
    assert "store.path" in msg and "overlaps dock.state_dir" in msg


def test_store_path_inside_the_dock_directory_is_refused(tmp_path: Path) -> None:
    msg = _refused(tmp_path, store={"path": str(tmp_path / "dock" / "evidence")})
    assert "store.path" in msg and "overlaps sources.directory.path" in msg


def test_state_dir_inside_the_dock_directory_is_refused(tmp_path: Path) -> None:
    state = tmp_path / "dock" / "state"
    msg = _refused(tmp_path, dock={"state_dir": str(state)})
    assert f'sources.directory.path: "{tmp_path / "dock"}" overlaps dock.state_dir' in msg


def test_overlap_through_a_symlink_is_still_refused(tmp_path: Path) -> None:
    (tmp_path / "state").mkdir()
    (tmp_path / "alias").symlink_to(tmp_path / "state")
    msg = _refused(tmp_path, store={"path": str(tmp_path / "alias" / "evidence")})
    assert "overlaps dock.state_dir" in msg


def test_state_dir_that_is_an_existing_regular_file_is_refused(tmp_path: Path) -> None:
    state = tmp_path / "state"
    state.write_text("not a directory")
    msg = _refused(tmp_path)
    assert f'dock.state_dir: "{state}" exists and is not a directory' in msg


def test_store_path_that_is_an_existing_regular_file_is_refused(tmp_path: Path) -> None:
    (tmp_path / "evidence").write_text("")
    msg = _refused(tmp_path)
    assert "store.path" in msg and "not a directory" in msg


def test_state_dir_in_a_symlink_loop_is_refused_not_crashing(tmp_path: Path) -> None:
    (tmp_path / "loop").symlink_to(tmp_path / "loop")
    msg = _refused(tmp_path, dock={"state_dir": str(tmp_path / "loop" / "state")})
    assert "dock.state_dir" in msg


def test_missing_directories_are_fine_because_nothing_is_created_here(tmp_path: Path) -> None:
    config = _config(tmp_path)
    assert not (tmp_path / "state").exists()
    assert not (tmp_path / "evidence").exists()
    assert config.dock.state_dir == tmp_path / "state"


def test_relative_paths_are_resolved_against_the_config_files_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    etc = tmp_path / "etc"
    etc.mkdir()
    (etc / "mqtt-password").write_text("secret\n")
    (etc / "trusted").mkdir()
    path = _write(
        etc,
        "\n".join(
            [
                "[dock]",
                'state_dir = "state"',
                "[sources.directory]",
                "enabled = true",
                'path = "../dock"',
                "[store]",
                'path = "evidence"',
                "[mqtt]",
                'password_file = "mqtt-password"',
                "[signing]",
                'key_file = "keys/dock.key"',
                'trusted_keys_dir = "trusted"',
                "",
            ]
        ),
    )
    monkeypatch.chdir(tmp_path)  # not where the file is: the file's directory must win
    config = load_config(path)
    assert config.dock.state_dir == etc / "state"
    assert config.sources.directory.path == etc / ".." / "dock"
    assert config.store.path == etc / "evidence"
    assert config.mqtt.password_file == etc / "mqtt-password"
    assert config.signing.key_file == etc / "keys" / "dock.key"
    assert config.signing.trusted_keys_dir == etc / "trusted"
    assert config.journal_path == etc / "state" / "journal.sqlite3"


def test_relative_password_file_missing_next_to_the_config_is_refused(tmp_path: Path) -> None:
    path = _write(
        tmp_path,
        f'[dock]\nstate_dir = "{tmp_path / "state"}"\n[store]\npath = "{tmp_path / "ev"}"\n'
        f'[sources.directory]\nenabled = true\npath = "{tmp_path / "dock"}"\n'
        '[mqtt]\npassword_file = "mqtt-password"\n',
    )
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert f'mqtt.password_file: "{tmp_path / "mqtt-password"}"' in str(info.value)


# --- the file itself ------------------------------------------------------------------------------


def test_invalid_toml_syntax_is_refused_naming_the_file(tmp_path: Path) -> None:
    path = _write(tmp_path, "[offload\nchunk_size = 8MiB\n")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert str(path) in str(info.value) and "not valid TOML" in str(info.value)
    assert "line 1" in str(info.value)


def test_missing_config_file_is_refused_naming_it(tmp_path: Path) -> None:
    path = tmp_path / "nope.toml"
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert str(path) in str(info.value) and "cannot read" in str(info.value)
    assert "No such file" in str(info.value)


def test_config_path_that_is_a_directory_is_refused_naming_it(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(tmp_path)
    assert str(tmp_path) in str(info.value) and "cannot read" in str(info.value)


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads any file")
def test_unreadable_config_file_is_refused_naming_it(tmp_path: Path) -> None:
    path = _write(tmp_path, "")
    path.chmod(0)
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert str(path) in str(info.value) and "Permission denied" in str(info.value)


def test_non_utf8_config_file_is_refused_naming_it(tmp_path: Path) -> None:
    path = tmp_path / "latin1.toml"
    path.write_bytes('[cameras."X1"]\nofficer = "Müller"\n'.encode("latin-1"))
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert str(path) in str(info.value) and "not UTF-8" in str(info.value)


def test_errors_name_the_config_file_they_come_from(tmp_path: Path) -> None:
    path = _write(tmp_path, '[offload]\nchunk_size = "8 parsecs"\n')
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert str(info.value).startswith(f"{path}: invalid configuration")


def test_several_errors_at_once_are_all_reported(tmp_path: Path) -> None:
    path = _write(
        tmp_path,
        "\n".join(
            [
                "[dock]",
                'id = "no spaces"',
                "[offload]",
                'chunk_size = "8 parsecs"',
                'verify = "full"',
                "chunk_sise = 1",
                "[upload]",
                "concurrency = 0",
                'backoff_max = "soon"',
                'bandwidth_limit = "fast"',
                "[mqtt]",
                'topic_prefix = "a/#"',
                "[frobnicate]",
                "",
            ]
        ),
    )
    with pytest.raises(ConfigError) as info:
        load_config(path)
    msg = str(info.value)
    for expected in [
        'dock.id: "no spaces"',
        'offload.chunk_size: "8 parsecs"',
        'offload.verify: "full"',
        "offload.chunk_sise: unknown key",
        "upload.concurrency: 0",
        'upload.backoff_max: "soon"',
        'upload.bandwidth_limit: "fast"',
        'mqtt.topic_prefix: "a/#"',
        "frobnicate: unknown key",
    ]:
        assert expected in msg
    assert len(msg.splitlines()) == 1 + 9  # the heading, then one line per problem


def test_several_path_problems_at_once_are_all_reported(tmp_path: Path) -> None:
    (tmp_path / "state").write_text("")
    msg = _refused(
        tmp_path,
        mqtt={"password_file": str(tmp_path / "nope")},
        signing={"trusted_keys_dir": str(tmp_path / "nope-dir")},
    )
    assert "dock.state_dir" in msg and "mqtt.password_file" in msg
    assert "signing.trusted_keys_dir" in msg
