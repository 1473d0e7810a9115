"""Directory source: subdirectories are cameras; appearing docks, vanishing undocks."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

import pytest

from dockd.errors import SourceError
from dockd.sources.base import Docked, SourceEvent, Undocked
from dockd.sources.directory import DirectorySource


async def _next(queue: asyncio.Queue[SourceEvent]) -> SourceEvent:
    return await asyncio.wait_for(queue.get(), 10)


async def test_cameras_present_at_start_are_docked_before_start_returns(tmp_path: Path) -> None:
    (tmp_path / "CAMB").mkdir()
    (tmp_path / "CAMA").mkdir()
    (tmp_path / "not-a-camera.txt").write_text("files are not cameras")
    source = DirectorySource(tmp_path)
    queue: asyncio.Queue[SourceEvent] = asyncio.Queue()
    await source.start(queue)
    try:
        got = [queue.get_nowait(), queue.get_nowait()]
        assert queue.empty()
        assert [e.camera for e in got] == ["CAMA", "CAMB"]
        assert all(isinstance(e, Docked) and e.root == tmp_path / e.camera for e in got)
    finally:
        await source.stop()


async def test_rename_in_docks_and_rename_away_undocks(tmp_path: Path) -> None:
    dock = tmp_path / "dock"
    dock.mkdir()
    aside = tmp_path / "aside"
    (aside / "X6039B2A3" / "DCIM").mkdir(parents=True)
    source = DirectorySource(dock)
    queue: asyncio.Queue[SourceEvent] = asyncio.Queue()
    await source.start(queue)
    try:
        os.rename(aside / "X6039B2A3", dock / "X6039B2A3")
        event = await _next(queue)
        assert isinstance(event, Docked)
        assert event.camera == "X6039B2A3"
        os.rename(dock / "X6039B2A3", aside / "X6039B2A3")
        event = await _next(queue)
        assert isinstance(event, Undocked)
        assert event.camera == "X6039B2A3"
    finally:
        await source.stop()


async def test_mkdir_docks_and_rmdir_undocks_and_nested_changes_are_ignored(
    tmp_path: Path,
) -> None:
    source = DirectorySource(tmp_path)
    queue: asyncio.Queue[SourceEvent] = asyncio.Queue()
    await source.start(queue)
    try:
        (tmp_path / "CAM1").mkdir()
        assert isinstance(await _next(queue), Docked)
        (tmp_path / "CAM1" / "DCIM").mkdir()  # inside a camera: not a new camera
        (tmp_path / "CAM1" / "DCIM").rmdir()
        (tmp_path / "CAM1").rmdir()
        event = await _next(queue)
        assert isinstance(event, Undocked)
        assert event.camera == "CAM1"
    finally:
        await source.stop()


async def test_missing_dock_directory_is_a_source_error(tmp_path: Path) -> None:
    source = DirectorySource(tmp_path / "absent")
    with pytest.raises(SourceError, match="not a directory"):
        await source.start(asyncio.Queue())
