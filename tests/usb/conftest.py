"""Fixtures of the USB tests; they live in usb_support.py so test modules can import its
helpers by a name no other test directory uses (every directory has a `conftest`)."""

from usb_support import devices, dock, testbed

__all__ = ["devices", "dock", "testbed"]
