"""The typed model of the configuration (SPEC §4), and the only place its defaults live.

A bad file is refused as a whole, before anything starts, with every problem named by its key
path, the value found and what was expected. Unknown keys are errors: a typo must never fall
back silently to a default.
"""

from __future__ import annotations

import json
import os
import re
import tomllib
from pathlib import Path
from typing import Annotated, Any, Literal, get_args, get_origin

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    PlainSerializer,
    ValidationError,
    field_validator,
    model_validator,
)

from dockd.errors import ConfigError
from dockd.ids import CAMERA_ID_RE, DOCK_ID_RE, camera_id
from dockd.offload.walk import glob_regex
from dockd.units import parse_duration, parse_rate, parse_size

DEFAULT_CONFIG_PATH = Path("/etc/dockd/dockd.toml")


def _size(value: Any) -> int:
    if not isinstance(value, str | int):
        raise ValueError("is not a size (use B/KiB/MiB/GiB/KB/MB/GB)")
    return parse_size(value)


def _duration(value: Any) -> float:
    if not isinstance(value, str | int | float):
        raise ValueError("is not a duration (use ms/s/m/h/d, e.g. 10m)")
    return parse_duration(value)


def _regex(value: Any) -> re.Pattern[str]:
    if isinstance(value, re.Pattern):
        return value
    if not isinstance(value, str):
        raise ValueError("is not a regular expression (a string expected)")
    try:
        return re.compile(value)
    except re.error as exc:
        raise ValueError(f"is not a valid regular expression ({exc})") from None


def _hex_id(value: Any) -> str:
    if not isinstance(value, str) or not re.fullmatch(r"[0-9a-fA-F]{4}", value):
        raise ValueError('is not a 4-digit hex USB id (as udev ID_VENDOR_ID, e.g. "2a2b")')
    return value.lower()


def _rate(value: Any) -> int | None:
    if not isinstance(value, str):
        raise ValueError("is not a rate (use e.g. 40MB/s, or empty for unlimited)")
    return parse_rate(value)


def _path(value: Any) -> Any:
    """A path that must be given: "" would silently mean the config file's own directory."""
    if isinstance(value, str):
        if not value.strip():
            raise ValueError("is empty (a path expected)")
        if "\0" in value:
            raise ValueError("contains a NUL byte (a path expected)")
    return value


def _optional_path(value: Any) -> Any:
    """An optional path: "" means not set (as SPEC's `password_file = ""`)."""
    if isinstance(value, str) and not value.strip():
        return None
    return _path(value)


Size = Annotated[int, BeforeValidator(_size), PlainSerializer(lambda v: v, return_type=int)]
Duration = Annotated[float, BeforeValidator(_duration)]
Regex = Annotated[
    re.Pattern[str], BeforeValidator(_regex), PlainSerializer(lambda p: p.pattern, return_type=str)
]
HexId = Annotated[str, BeforeValidator(_hex_id)]
Rate = Annotated[int | None, BeforeValidator(_rate)]
ReqPath = Annotated[Path, BeforeValidator(_path)]
OptPath = Annotated[Path | None, BeforeValidator(_optional_path)]


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, arbitrary_types_allowed=True)


class DockConfig(_Section):
    id: str = "dock"
    state_dir: ReqPath = Path("/var/lib/dockd")

    @field_validator("id")
    @classmethod
    def _id_shape(cls, v: str) -> str:
        if not DOCK_ID_RE.fullmatch(v):
            raise ValueError("is not a dock id (1-64 of A-Z a-z 0-9 _ -)")
        return v


class UdevMatch(_Section):
    vendor_id: HexId
    model_id: HexId | None = None
    serial: Regex | None = None
    fs_label: Regex | None = None


class UdevSource(_Section):
    enabled: bool = False
    match: list[UdevMatch] = Field(default_factory=list)
    # where cameras are mounted, one private (0700) directory per camera; dockd's alone: a mount
    # found under it at start-up is taken for one a killed daemon left, and unmounted
    mount_dir: ReqPath = Path("/run/dockd/mounts")
    # filesystem type (udev ID_FS_TYPE) -> FUSE driver, used when the kernel has no driver for it
    fuse_helpers: dict[str, str] = Field(
        default_factory=lambda: {"vfat": "fusefat", "exfat": "mount.exfat-fuse"}
    )
    # longest a mount, remount or unmount may take before it is given up as failed
    mount_timeout: Duration = 30.0

    @field_validator("mount_dir")
    @classmethod
    def _absolute_mount_dir(cls, v: Path) -> Path:
        if not v.is_absolute():
            raise ValueError("is not an absolute path (mounts must not depend on the cwd)")
        return v

    @field_validator("fuse_helpers")
    @classmethod
    def _helpers(cls, v: dict[str, str]) -> dict[str, str]:
        for fs_type, command in v.items():
            if not re.fullmatch(r"[a-z0-9_.-]{1,32}", fs_type):
                raise ValueError(f"has {fs_type!r}, which is not a filesystem type (as ID_FS_TYPE)")
            if not command.strip():
                raise ValueError(f"has an empty command for {fs_type!r}")
        return v

    @field_validator("mount_timeout")
    @classmethod
    def _timeout_bounds(cls, v: float) -> float:
        if not 1.0 <= v <= 600.0:
            raise ValueError("is out of range (1s to 10m)")
        return v

    @model_validator(mode="after")
    def _needs_allowlist(self) -> UdevSource:
        if self.enabled and not self.match:
            raise ValueError(
                "is enabled with no [[sources.udev.match]] entry: no device could ever be a camera"
            )
        return self


class DirectorySource(_Section):
    enabled: bool = False
    path: ReqPath = Path("/srv/dock")


class Sources(_Section):
    udev: UdevSource = UdevSource()
    directory: DirectorySource = DirectorySource()

    # No source enabled is a valid configuration (a custodian's machine that only runs
    # `dockd verify`); `dockd run` refuses it (sources.build_sources).


class OffloadConfig(_Section):
    include: list[str] = Field(default_factory=lambda: ["**/*"])
    exclude: list[str] = Field(
        default_factory=lambda: [".*", "**/.*", "System Volume Information/**"]
    )
    chunk_size: Size = 8 * 1024**2
    verify: Literal["readback", "source-and-readback"] = "readback"
    parallel_cameras: int = Field(default=4, ge=1, le=64)
    min_free_staging: Size = 2 * 1024**3
    read_attempts: int = Field(default=3, ge=1, le=100)
    copy_attempts: int = Field(default=3, ge=1, le=100)
    # files in flight per camera: one is read back while the next is read from the camera
    copy_workers: int = Field(default=2, ge=1, le=16)

    @field_validator("chunk_size")
    @classmethod
    def _chunk_bounds(cls, v: int) -> int:
        if not 4096 <= v <= 1024**3:
            raise ValueError("is out of range (4KiB to 1GiB)")
        return v

    @field_validator("include", "exclude")
    @classmethod
    def _globs(cls, v: list[str]) -> list[str]:
        for pattern in v:
            if pattern.startswith("/") or not pattern:
                raise ValueError(f"has {pattern!r}: globs are relative to the camera root")
            try:
                glob_regex(pattern)
            except re.error as exc:
                raise ValueError(f"has {pattern!r}, which is not a valid glob ({exc})") from None
        return v


class StoreConfig(_Section):
    kind: Literal["filesystem", "s3"] = "filesystem"
    path: OptPath = None
    endpoint_url: str | None = None
    bucket: str | None = None
    prefix: str = ""
    region: str | None = None
    access_key_id: str | None = None
    secret_access_key_file: OptPath = None
    object_lock_mode: Literal["GOVERNANCE", "COMPLIANCE"] | None = None
    object_lock_days: int | None = Field(default=None, ge=1, le=36500)
    storage_class: str | None = None
    verify: Literal["checksum", "readback"] = "checksum"

    @model_validator(mode="after")
    def _kind_needs(self) -> StoreConfig:
        if self.kind == "filesystem" and self.path is None:
            raise ValueError('kind "filesystem" needs store.path')
        if self.kind == "s3" and not self.bucket:
            raise ValueError('kind "s3" needs store.bucket')
        if self.object_lock_mode is not None and self.object_lock_days is None:
            raise ValueError(
                f'store.object_lock_mode = "{self.object_lock_mode}" needs store.object_lock_days'
            )
        if self.object_lock_days is not None and self.object_lock_mode is None:
            raise ValueError(
                f"store.object_lock_days = {self.object_lock_days} needs store.object_lock_mode"
            )
        return self


class UploadConfig(_Section):
    concurrency: int = Field(default=2, ge=1, le=64)
    max_attempts: int = Field(default=0, ge=0)
    backoff_max: Duration = 600.0
    backoff_initial: Duration = 1.0
    bandwidth_limit: Rate = None


class CameraDefaults(_Section):
    clear: Literal["never", "after_upload"] = "never"


class CameraFacts(_Section):
    officer: str | None = None


class MqttConfig(_Section):
    enabled: bool = True
    host: str = "localhost"
    port: int = Field(default=1883, ge=1, le=65535)
    tls: bool = False
    ca_file: OptPath = None
    cert_file: OptPath = None
    key_file: OptPath = None
    username: str = ""
    password_file: OptPath = None
    topic_prefix: str = "dockd"
    progress_interval: Duration = 1.0
    homeassistant_discovery: bool = False
    publish_officer: bool = False

    @field_validator("topic_prefix")
    @classmethod
    def _topic(cls, v: str) -> str:
        bad = any(c in v for c in "+#\0") or v.startswith(("/", "$")) or v.endswith("/")
        if not v or bad:
            raise ValueError("is not a topic prefix (no + # NUL, no leading $ or /, no trailing /)")
        return v


class SigningConfig(_Section):
    key_file: OptPath = None
    trusted_keys_dir: OptPath = None


class MetricsConfig(_Section):
    enabled: bool = False
    listen: str = "127.0.0.1:9469"

    @field_validator("listen")
    @classmethod
    def _host_port(cls, v: str) -> str:
        host, sep, port = v.rpartition(":")
        if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise ValueError("is not host:port")
        return v


class LogConfig(_Section):
    level: Literal["debug", "info", "warning", "error"] = "info"


class Config(_Section):
    dock: DockConfig = DockConfig()
    sources: Sources = Sources(directory=DirectorySource(enabled=True))
    offload: OffloadConfig = OffloadConfig()
    store: StoreConfig = Field(default_factory=lambda: StoreConfig(path=Path("/srv/evidence")))
    upload: UploadConfig = UploadConfig()
    camera: CameraDefaults = CameraDefaults()
    cameras: dict[str, CameraFacts] = Field(default_factory=dict)
    mqtt: MqttConfig = MqttConfig()
    signing: SigningConfig = SigningConfig()
    metrics: MetricsConfig = MetricsConfig()
    log: LogConfig = LogConfig()

    @field_validator("cameras")
    @classmethod
    def _camera_ids(cls, v: dict[str, CameraFacts]) -> dict[str, CameraFacts]:
        for key in v:
            if not CAMERA_ID_RE.fullmatch(key) or camera_id(key) is None:
                raise ValueError(f"has {key!r}, which is not a camera id ([A-Za-z0-9._-]{{1,64}})")
        return v

    @property
    def journal_path(self) -> Path:
        return self.dock.state_dir / "journal.sqlite3"

    @property
    def staging_dir(self) -> Path:
        return self.dock.state_dir / "staging"

    @property
    def key_file(self) -> Path:
        return self.signing.key_file or self.dock.state_dir / "dock.key"

    def officer(self, camera: str) -> str | None:
        facts = self.cameras.get(camera)
        return facts.officer if facts else None

    def effective(self) -> dict[str, Any]:
        """The configuration as JSON-able data, defaults filled in (for `check-config`)."""
        return json.loads(self.model_dump_json())  # type: ignore[no-any-return]


def config_path(arg: str | None) -> Path:
    """`-c FILE`, else $DOCKD_CONFIG, else /etc/dockd/dockd.toml."""
    if arg:
        return Path(arg)
    env = os.environ.get("DOCKD_CONFIG")
    return Path(env) if env else DEFAULT_CONFIG_PATH


def load_config(path: Path) -> Config:
    """Read, parse and validate `path`. Raises ConfigError naming every problem."""
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read the configuration file ({exc.strerror})") from None
    try:
        data = tomllib.loads(raw.decode("utf-8"))
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path}: not UTF-8 ({exc})") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML ({exc})") from None
    return parse_config(data, base=path.parent, origin=str(path))


def parse_config(data: dict[str, Any], base: Path | None = None, origin: str = "config") -> Config:
    """Validate a TOML document's data. Relative paths are taken relative to `base`."""
    try:
        config = Config.model_validate(data)
    except ValidationError as exc:
        lines = [_describe(err, data) for err in exc.errors()]
        raise ConfigError(f"{origin}: invalid configuration\n  " + "\n  ".join(lines)) from None
    if base is not None:
        config = _resolve_paths(config, base.resolve())
    problems = _check_paths(config)
    if problems:
        raise ConfigError(f"{origin}: invalid configuration\n  " + "\n  ".join(problems))
    return config


def _describe(err: Any, data: dict[str, Any]) -> str:
    loc = tuple(str(p) for p in err["loc"] if not isinstance(p, int))
    key = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in err["loc"])[1:]
    key = key or "(top level)"
    kind = err["type"]
    if kind == "extra_forbidden":
        parent = _lookup(Config, loc[:-1])
        expected = f" (known keys: {', '.join(parent)})" if parent else ""
        return f"{key}: unknown key{expected}"
    if kind == "missing":
        return f"{key}: required key is missing"
    value = json.dumps(err.get("input"), default=str, ensure_ascii=False)
    msg: str = err["msg"]
    if msg.startswith("Value error, "):
        msg = msg.removeprefix("Value error, ")
        if isinstance(err["input"], dict) and (not loc or _lookup(Config, loc)):
            # a model validator speaks for its whole section
            return f"{key}: {msg}" if loc else msg
        return f"{key}: {value} {msg}"
    return f"{key}: {value} is invalid: {msg[0].lower()}{msg[1:]}"


def _lookup(model: type[BaseModel], loc: tuple[str, ...]) -> list[str]:
    """The known field names of the section at `loc`, to suggest on an unknown key."""
    current: Any = model
    parts = list(loc)
    while parts:
        part = parts.pop(0)
        if not (isinstance(current, type) and issubclass(current, BaseModel)):
            return []
        field = current.model_fields.get(part)
        if field is None:
            return []
        current = field.annotation
        if get_origin(current) is dict:  # cameras."X6..." : the next part is a table's name
            current = get_args(current)[-1]
            if parts:
                parts.pop(0)
        elif get_origin(current) is list:  # sources.udev.match (list indices are not in loc)
            current = get_args(current)[-1]
    if isinstance(current, type) and issubclass(current, BaseModel):
        return list(current.model_fields)
    return []


def _resolve_paths(config: Config, base: Path) -> Config:
    def r(p: Path | None) -> Path | None:
        return None if p is None else (p if p.is_absolute() else base / p)

    def section(model: _Section, keys: tuple[str, ...]) -> Any:
        return model.model_copy(update={k: r(getattr(model, k)) for k in keys})

    sources = config.sources.model_copy(
        update={"directory": section(config.sources.directory, ("path",))}
    )
    return config.model_copy(
        update={
            "dock": section(config.dock, ("state_dir",)),
            "sources": sources,
            "store": section(config.store, ("path", "secret_access_key_file")),
            "mqtt": section(config.mqtt, ("ca_file", "cert_file", "key_file", "password_file")),
            "signing": section(config.signing, ("key_file", "trusted_keys_dir")),
        }
    )


def _check_paths(config: Config) -> list[str]:
    """Checks that need the filesystem; nothing is created here.

    A path that cannot even be looked at (permission denied on a parent, a symlink loop) is a
    problem to report, never an exception to escape: a bad config must always end in ConfigError.
    """
    problems: list[str] = []

    def not_a_dir(key: str, p: Path) -> None:
        try:
            if p.exists() and not p.is_dir():
                problems.append(f'{key}: "{p}" exists and is not a directory')
        except OSError as exc:
            problems.append(f'{key}: "{p}" cannot be looked at ({exc.strerror})')

    def readable_file(key: str, p: Path | None) -> None:
        if p is None:
            return
        try:
            is_file = p.is_file()
        except OSError:
            is_file = False
        if not is_file:
            problems.append(f'{key}: "{p}" is not a readable file')
        elif not os.access(p, os.R_OK):
            problems.append(f'{key}: "{p}" is not readable')

    def apart(key_a: str, a: Path, key_b: str, b: Path, why: str) -> None:
        try:
            overlap = _overlaps(a, b)
        except (OSError, RuntimeError) as exc:  # RuntimeError: a symlink loop (Python < 3.13)
            problems.append(f'{key_a}: "{a}" or {key_b} "{b}" cannot be resolved ({exc})')
            return
        if overlap:
            problems.append(f'{key_a}: "{a}" overlaps {key_b}: {why}')

    state_dir = config.dock.state_dir
    dock_dir = config.sources.directory.path if config.sources.directory.enabled else None
    store_dir = config.store.path if config.store.kind == "filesystem" else None

    not_a_dir("dock.state_dir", state_dir)
    if dock_dir is not None:
        not_a_dir("sources.directory.path", dock_dir)
        apart(
            "sources.directory.path",
            dock_dir,
            "dock.state_dir",
            state_dir,
            "every subdirectory of the dock directory is taken for a camera, "
            "so staging must not be inside it, nor the reverse",
        )
    if store_dir is not None:
        not_a_dir("store.path", store_dir)
        if dock_dir is not None:
            apart(
                "store.path",
                store_dir,
                "sources.directory.path",
                dock_dir,
                "the store must not be inside a camera dock or the reverse",
            )
        apart(
            "store.path",
            store_dir,
            "dock.state_dir",
            state_dir,
            "staging and the evidence store must be apart",
        )
    if config.store.kind == "s3":
        readable_file("store.secret_access_key_file", config.store.secret_access_key_file)
    if config.mqtt.enabled:
        readable_file("mqtt.password_file", config.mqtt.password_file)
        if config.mqtt.tls:
            readable_file("mqtt.ca_file", config.mqtt.ca_file)
            readable_file("mqtt.cert_file", config.mqtt.cert_file)
            readable_file("mqtt.key_file", config.mqtt.key_file)
    trusted = config.signing.trusted_keys_dir
    if trusted is not None:
        try:
            is_dir = trusted.is_dir()
        except OSError:
            is_dir = False
        if not is_dir:
            problems.append(f'signing.trusted_keys_dir: "{trusted}" is not a directory')
    return problems


def _overlaps(a: Path, b: Path) -> bool:
    a, b = a.resolve(), b.resolve()
    return a == b or a in b.parents or b in a.parents
