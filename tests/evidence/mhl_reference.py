"""The ASC MHL reference implementation (PyPI `ascmhl`), run the way a court's expert would.

`ascmhl-debug verify FOLDER` and `ascmhl-debug xsd-schema-check FILE` are the click commands
`ascmhl.commands.verify` and `ascmhl.commands.xsd_schema_check`. They are run here in a child
Python, the same commands with the same exit codes (0 clean, 10 missing file, 11 hash mismatch,
21 new file), but without the `ascmhl-debug` entry point's start-up check for a newer release,
which would reach out to the network on every call.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

XSD_DIR = Path(__file__).parent / "xsd"  # from the ascmhl 1.2 sdist: the wheel has none

_RUN = (
    "import sys\n"
    "from ascmhl import commands\n"
    "getattr(commands, sys.argv[1]).main(sys.argv[2:], prog_name='ascmhl-debug')\n"
)


def ascmhl(command: str, *args: str | Path) -> subprocess.CompletedProcess[str]:
    """`ascmhl-debug COMMAND ARGS...` (command as its Python name: verify, xsd_schema_check)."""
    pytest.importorskip("ascmhl", reason="the ASC MHL reference implementation (pip ascmhl)")
    return subprocess.run(
        [sys.executable, "-c", _RUN, command, *map(str, args)],
        capture_output=True,
        text=True,
        check=False,
        timeout=60,
    )


def reference_verify(folder: Path, *options: str) -> subprocess.CompletedProcess[str]:
    return ascmhl("verify", *options, folder)


def xsd_check(mhl_file: Path) -> subprocess.CompletedProcess[str]:
    """The .mhl file against ASCMHL.xsd, or a chain file against the directory schema."""
    if mhl_file.name == "ascmhl_chain.xml":
        return ascmhl(
            "xsd_schema_check",
            "--directory_file",
            "--xsd_file",
            XSD_DIR / "ASCMHLDirectory__combined.xsd",
            mhl_file,
        )
    return ascmhl("xsd_schema_check", "--xsd_file", XSD_DIR / "ASCMHL.xsd", mhl_file)
