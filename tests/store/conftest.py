"""The store contract suite runs against the real S3 server too: its session fixture lives with
the S3 tests (tests/s3/conftest.py) and is loaded from there, not copied. Both directories'
fixtures use the same data directory, so one server serves the whole run."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

_NAME = "dockd_tests_s3_server"
if _NAME not in sys.modules:
    _spec = importlib.util.spec_from_file_location(
        _NAME, Path(__file__).resolve().parents[1] / "s3" / "conftest.py"
    )
    assert _spec is not None and _spec.loader is not None
    _module = importlib.util.module_from_spec(_spec)
    sys.modules[_NAME] = _module
    _spec.loader.exec_module(_module)

S3Server = sys.modules[_NAME].S3Server
s3_server = sys.modules[_NAME].s3_server
