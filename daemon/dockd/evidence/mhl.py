"""The ASC MHL history of a session folder (SPEC §6), built from the journal.

ASC MHL is the media industry's hash list for chain of custody; `ascmhl-debug verify FOLDER`
(PyPI `ascmhl`, the reference implementation) checks a folder against it with no dockd at hand.
A session folder gets one generation, at its root:

    ascmhl/0001_<session id>_<YYYY-MM-DD_HHMMSS>Z.mhl     the hash list
    ascmhl/ascmhl_chain.xml                               names it, with its C4 id

The hash list covers `files/...` (xxh128 computed inline during the offload, read from the
journal: the footage is never read again for it), `SHA256SUMS` and `custody.jsonl` (hashed here
from their bytes). `manifest.json` and `manifest.json.sig` come later, so they are recorded as
ignore patterns, beside the reference implementation's defaults (`.DS_Store`, `ascmhl`).

The XML is written here rather than by the `ascmhl` package, because its bytes must be the same
however often a restart rebuilds them: the package names files and dates after now() and in the
process's local time zone. Every value below comes from the journal: the creation date is the
session's sealing time, file dates are the camera's mtimes, hash dates the copy times, all UTC.
Directory hashes are computed the way the reference implementation computes them
(`ascmhl.hasher.DirectoryHashContext`), over what its verify walks: every path not ignored.

A session may hold 100 000 files, so the hash list is written as a stream (`HashListBody`, fed
in `tree_key` order by `dockd.evidence.seal`), never built whole in memory.
"""

from __future__ import annotations

import binascii
import hashlib
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime

import xxhash

from dockd import __version__
from dockd.evidence.keys import ASCMHL, MANIFEST
from dockd.evidence.manifest import SIGNATURE
from dockd.ids import rfc3339_from_ns
from dockd.journal.rows import SessionRow

CHAIN = f"{ASCMHL}/ascmhl_chain.xml"
TOOL = "dockd"
HASH_FORMAT = "xxh128"
FILES = "files"
# The reference implementation's defaults, then what is written after the history. Patterns
# without a slash match a name at any depth: the only form its verify honours, as it matches
# patterns against absolute paths. So a camera file named like one of these is not in the MHL
# (SHA256SUMS and the manifest still cover it).
IGNORE_PATTERNS = (".DS_Store", "ascmhl", "ascmhl/", MANIFEST, SIGNATURE)
_IGNORED_NAMES = frozenset(p.rstrip("/") for p in IGNORE_PATTERNS)

_HEX = 32  # an xxh128 in hex digits
# what XML 1.0 has no place for: a character outside its Char production
_NOT_XML = re.compile("[^\t\n\r\x20-\ud7ff\ue000-\ufffd\U00010000-\U0010ffff]")
_C4_ALPHABET = "123456789ABCDEFGHJKLMNPQRSTUVWXYZabcdefghijkmnopqrstuvwxyz"


@dataclass(frozen=True)
class Entry:
    """One file of the session folder, as the hash list records it."""

    path: str  # relative to the session root, "/"-separated
    size: int
    xxh128: str
    mtime: str | None = None  # RFC 3339
    hashdate: str | None = None  # RFC 3339


class HashListBody:
    """The `<hash>` and `<directoryhash>` elements of a hash list, written as entries come.

    Entries must come in `tree_key` order, the reference implementation's order (post-order, by
    name: a folder's sub-folders, each whole, then its files, then the folder's own directory
    hash). Then only the open folders are held: root to the current one, each with the content
    and structure hashes of its own children. That list is the one thing here that grows with a
    session (with its largest folder, not with its file count): ASC MHL hashes a folder over
    the sorted hashes of its children, so they must all be at hand when it closes.
    """

    def __init__(self, write: Callable[[bytes], object]) -> None:
        self._write = write
        self._open = [_Folder("", "")]  # the root, then the path to the current folder
        self._last = b""

    def add(self, e: Entry) -> None:
        key = tree_key(e.path)
        if key < self._last:
            raise ValueError(f"hash list: {e.path} comes out of tree order")
        self._last = key
        if len(e.xxh128) != _HEX or not e.xxh128.isascii():
            raise ValueError(f"hash list: {e.path}: {e.xxh128!r} is not an xxh128")
        *dirs, name = e.path.split("/")
        kept, listed = _walked(dirs, name)
        depth = 0
        while (
            depth < min(len(kept), len(self._open) - 1)
            and self._open[depth + 1].name == kept[depth]
        ):
            depth += 1
        while len(self._open) - 1 > depth:
            self._close()
        for part in kept[depth:]:
            parent = self._open[-1]
            self._open.append(_Folder(part, f"{parent.path}/{part}" if parent.path else part))
        if listed:
            folder = self._open[-1]
            folder.content += e.xxh128.encode("ascii")
            folder.structure += _structure(name, e.xxh128).encode("ascii")
            if representable(e.path):
                self._write(_file_hash(e))

    def finish(self) -> tuple[str, str]:
        """Close every folder; returns the root's (content, structure) hashes."""
        while len(self._open) > 1:
            self._close()
        root = self._open[0]
        return _hash_of_hashes(root.content), _hash_of_hashes(root.structure)

    def _close(self) -> None:
        folder = self._open.pop()
        content, structure = _hash_of_hashes(folder.content), _hash_of_hashes(folder.structure)
        parent = self._open[-1]
        parent.content += content.encode("ascii")
        parent.structure += _structure(folder.name, structure).encode("ascii")
        if representable(folder.path):
            lines = [
                "    <directoryhash>",
                f"      <path>{_text(folder.path)}</path>",
                *_dir_hashes(content, structure, "      "),
                "    </directoryhash>",
            ]
            self._write(_lines(lines))


@dataclass
class _Folder:
    name: str
    path: str  # relative to the root, "" for the root
    # the children's hashes, 32 hex digits each, packed: a folder of 100 000 files holds 6 MB
    content: bytearray = field(default_factory=bytearray)
    structure: bytearray = field(default_factory=bytearray)


def tree_key(path: str) -> bytes:
    """A key whose byte order is the hash list's element order (`HashListBody`).

    Per folder `\\x01 name \\x00`, then `\\x02 name` for the file: a folder's sub-folders
    (\\x01) sort before its files (\\x02), and NUL (which no name holds) ends a folder name below
    any byte of a longer one, so `b/x` sorts before `b-c/y` as the tree has it (by path, "-" is
    before "/"). UTF-8 byte order is code point order, Python's order of names. A path below
    an ignored name keys as the folders above it: those are still walked (a folder holding only
    ignored entries is there, empty)."""
    *dirs, name = path.split("/")
    kept, listed = _walked(dirs, name)
    key = b"".join(b"\x01" + d.encode("utf-8") + b"\x00" for d in kept)
    return key + b"\x02" + name.encode("utf-8") if listed else key


def _walked(dirs: list[str], name: str) -> tuple[list[str], bool]:
    """The folders of a path the reference verify walks into, and whether it sees the file:
    nothing at or below an ignored name, but the folders above it are there."""
    for n, part in enumerate(dirs):
        if part in _IGNORED_NAMES:
            return dirs[:n], False
    return dirs, name not in _IGNORED_NAMES


def header(
    *,
    root_content: str,
    root_structure: str,
    created: str,
    hostname: str,
    comment: str | None = None,
    process: str = "transfer",
    tool_version: str = __version__,
) -> bytes:
    """A hash list up to its `<hashes>`: the root hash comes before the elements it sums up,
    so the body (`HashListBody`) is written first and this put before it."""
    out = [
        '<?xml version="1.0" encoding="UTF-8"?>',
        '<hashlist version="2.0" xmlns="urn:ASC:MHL:v2.0">',
        "  <creatorinfo>",
        f"    <creationdate>{_text(created)}</creationdate>",
        f"    <hostname>{_text(hostname)}</hostname>",
        f'    <tool version="{_attr(tool_version)}">{TOOL}</tool>',
    ]
    if comment:
        out.append(f"    <comment>{_text(comment)}</comment>")
    out += [
        "  </creatorinfo>",
        "  <processinfo>",
        f"    <process>{process}</process>",
        "    <roothash>",
        *_dir_hashes(root_content, root_structure, "      "),
        "    </roothash>",
        "    <ignore>",
        *(f"      <pattern>{_text(p)}</pattern>" for p in IGNORE_PATTERNS),
        "    </ignore>",
        "  </processinfo>",
        "  <hashes>",
    ]
    return _lines(out)


FOOTER = b"  </hashes>\n</hashlist>\n"


def sealing_time(session: SessionRow) -> str:
    """The history's date: when the session was sealed, never now()."""
    return session.sealed_at or session.uploaded_at or session.docked_at


def comment(session: SessionRow, dock_id: str) -> str:
    return f"dockd offload of camera {session.camera}, session {session.id}, dock {dock_id}"


def file_entry(path: str, size: int, xxh128: str, mtime_ns: int, copied_at: str | None) -> Entry:
    """A camera file (`path` relative to `files/`): the camera's mtime, hashed when copied."""
    return Entry(f"{FILES}/{path}", size, xxh128, _mtime(mtime_ns), copied_at)


def sidecar_entry(name: str, size: int, xxh128: str, sealed: str) -> Entry:
    """SHA256SUMS or custody.jsonl: made, and hashed, at the sealing."""
    return Entry(name, size, xxh128, seconds(sealed), sealed)


def hash_list_name(session_id: str, sealed: str) -> str:
    """`ascmhl/0001_<folder>_<date>Z.mhl`: the reference implementation's naming, with the
    session folder's name and its sealing time (UTC) instead of now()."""
    at = datetime.fromisoformat(sealed.replace("Z", "+00:00")).astimezone(UTC)
    return f"{ASCMHL}/0001_{session_id}_{at.strftime('%Y-%m-%d_%H%M%S')}Z.mhl"


def chain(generations: Sequence[tuple[str, str]]) -> bytes:
    """`ascmhl_chain.xml`: each generation's (file name, C4 id), in order."""
    out = [
        '<?xml version="1.0" encoding="UTF-8"?>',
        '<ascmhldirectory xmlns="urn:ASC:MHL:DIRECTORY:v2.0">',
    ]
    for n, (name, c4_id) in enumerate(generations, start=1):
        out += [
            f'  <hashlist sequencenr="{n}">',
            f"    <path>{_text(name.rpartition('/')[2])}</path>",
            f"    <c4>{c4_id}</c4>",
            "  </hashlist>",
        ]
    out.append("</ascmhldirectory>")
    return ("\n".join(out) + "\n").encode("utf-8")


def xxh128(data: bytes) -> str:
    return xxhash.xxh3_128(data).hexdigest()


def c4(data: bytes) -> str:
    """The C4 id (SMPTE ST 2114) of `data`: SHA-512 in base 58, 90 characters, "c4" first."""
    return c4_of_sha512(hashlib.sha512(data).digest())


def c4_of_sha512(sha512: bytes) -> str:
    """The C4 id of data whose SHA-512 (raw 64 bytes) is `sha512`."""
    n = int.from_bytes(sha512, "big")
    digits = ""
    while n:
        n, r = divmod(n, 58)
        digits = _C4_ALPHABET[r] + digits
    return "c4" + digits.rjust(88, "1")


def representable(text: str) -> bool:
    """True if XML 1.0 can carry `text` (it has no place for most control characters)."""
    return _NOT_XML.search(text) is None


def ignored(path: str) -> bool:
    """True if the reference implementation's verify skips `path` (relative to the root)."""
    return any(part in _IGNORED_NAMES for part in path.split("/"))


# --- directory hashes, as ascmhl.hasher.DirectoryHashContext computes them ---------------------


def _hash_of_hashes(packed: bytearray) -> str:
    h = xxhash.xxh3_128()
    # sorted as the hex strings the reference sorts: ASCII byte order is their str order
    for s in sorted(packed[i : i + _HEX] for i in range(0, len(packed), _HEX)):
        h.update(binascii.unhexlify(s))
    return h.hexdigest()


def _structure(name: str, digest: str) -> str:
    return xxh128(name.encode("utf-8") + binascii.unhexlify(digest))


def _file_hash(e: Entry) -> bytes:
    attrs = f' size="{e.size}"'
    if e.mtime:
        attrs += f' lastmodificationdate="{_attr(e.mtime)}"'
    hashdate = f' hashdate="{_attr(e.hashdate)}"' if e.hashdate else ""
    return _lines(
        [
            "    <hash>",
            f"      <path{attrs}>{_text(e.path)}</path>",
            f'      <{HASH_FORMAT} action="original"{hashdate}>{e.xxh128}</{HASH_FORMAT}>',
            "    </hash>",
        ]
    )


def _dir_hashes(content: str, structure: str, indent: str) -> list[str]:
    return [
        f"{indent}<content>",
        f"{indent}  <{HASH_FORMAT}>{content}</{HASH_FORMAT}>",
        f"{indent}</content>",
        f"{indent}<structure>",
        f"{indent}  <{HASH_FORMAT}>{structure}</{HASH_FORMAT}>",
        f"{indent}</structure>",
    ]


# --- values -------------------------------------------------------------------------------------


def _mtime(ns: int) -> str | None:
    try:
        return rfc3339_from_ns(ns)
    except (ValueError, OverflowError, OSError):  # a camera clock far off: no date at all
        return None


def seconds(at: str) -> str:
    """Journal times carry microseconds; the hash list's own dates show whole seconds."""
    return at[:19] + "Z"


def _lines(lines: list[str]) -> bytes:
    return ("\n".join(lines) + "\n").encode("utf-8")


def _text(s: str) -> str:
    return s.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;").replace("\r", "&#13;")


def _attr(s: str) -> str:
    return _text(s).replace('"', "&quot;").replace("\n", "&#10;").replace("\t", "&#9;")
