"""An umockdev testbed served to the tests over stdin/stdout: run it under `umockdev-wrapper`.

umockdev's uevent sender finds the testbed's sysfs through the preload library, so the process
that emits uevents must itself run under `umockdev-wrapper`; the test process must not (its
`losetup`, `mount` and `mkfs` are the real ones). This small process holds the testbed instead.

Protocol: the first line out is the testbed's root directory (pass it to the daemon as
UMOCKDEV_DIR). Then one JSON object per line in, one line out ("ok" or "error: ..."):
  {"op": "add", "text": "<umockdev-record text>"}    add devices (emits their `add` uevents)
  {"op": "uevent", "path": "/sys/...", "action": "remove"|"change"|"add"}
  {"op": "remove", "path": "/sys/..."}                remove a device (emits nothing)
  {"op": "property", "path": "/sys/...", "name": "ID_FS_TYPE", "value": "..."}
                                                      change a udev property (emits nothing)
End of input frees the testbed (and its /tmp/umockdev.* directory).
"""

from __future__ import annotations

import ctypes
import json
import os
import sys


def main() -> int:
    lib = ctypes.CDLL("libumockdev.so.0")
    lib.umockdev_testbed_new.restype = ctypes.c_void_p
    lib.umockdev_testbed_get_root_dir.restype = ctypes.c_char_p
    lib.umockdev_testbed_get_root_dir.argtypes = [ctypes.c_void_p]
    lib.umockdev_testbed_add_from_string.restype = ctypes.c_bool
    lib.umockdev_testbed_add_from_string.argtypes = [
        ctypes.c_void_p,
        ctypes.c_char_p,
        ctypes.c_void_p,
    ]
    lib.umockdev_testbed_uevent.argtypes = [ctypes.c_void_p, ctypes.c_char_p, ctypes.c_char_p]
    lib.umockdev_testbed_remove_device.argtypes = [ctypes.c_void_p, ctypes.c_char_p]
    lib.umockdev_testbed_set_property.argtypes = [
        ctypes.c_void_p,
        ctypes.c_char_p,
        ctypes.c_char_p,
        ctypes.c_char_p,
    ]
    gobject = ctypes.CDLL("libgobject-2.0.so.0")
    gobject.g_object_unref.argtypes = [ctypes.c_void_p]

    bed = lib.umockdev_testbed_new()
    root = lib.umockdev_testbed_get_root_dir(bed).decode()
    print(root, flush=True)
    try:
        for line in sys.stdin:
            if not line.strip():
                continue
            req = json.loads(line)
            op = req["op"]
            if op == "add":
                ok = lib.umockdev_testbed_add_from_string(bed, req["text"].encode(), None)
                print("ok" if ok else "error: add_from_string failed", flush=True)
            elif op == "uevent":
                lib.umockdev_testbed_uevent(bed, req["path"].encode(), req["action"].encode())
                print("ok", flush=True)
            elif op == "remove":
                lib.umockdev_testbed_remove_device(bed, req["path"].encode())
                _drop_dangling_links(root)
                print("ok", flush=True)
            elif op == "property":
                lib.umockdev_testbed_set_property(
                    bed, req["path"].encode(), req["name"].encode(), req["value"].encode()
                )
                print("ok", flush=True)
            else:
                print(f"error: unknown op {op!r}", flush=True)
    finally:
        gobject.g_object_unref(bed)
    return 0


def _drop_dangling_links(root: str) -> None:
    """umockdev 0.17 leaves /sys/block/<name> behind when it removes a block device, and then
    cannot add a device of that name again (the re-dock of a camera in the same bay)."""
    for top in ("sys/block", "sys/class", "sys/bus"):
        for dirpath, _dirs, files in os.walk(os.path.join(root, top)):
            for name in files:
                path = os.path.join(dirpath, name)
                if os.path.islink(path) and not os.path.exists(path):
                    os.unlink(path)
            for name in _dirs:
                path = os.path.join(dirpath, name)
                if os.path.islink(path) and not os.path.exists(path):
                    os.unlink(path)


if __name__ == "__main__":
    sys.exit(main())
