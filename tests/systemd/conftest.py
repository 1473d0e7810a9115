"""Fixtures of the systemd tests; they live in systemd_support.py so test modules can import its
helpers by a name no other test directory uses (every directory has a `conftest`)."""

from systemd_support import abstract_notify_socket, dock, notify_socket, start_dockd

__all__ = ["abstract_notify_socket", "dock", "notify_socket", "start_dockd"]
