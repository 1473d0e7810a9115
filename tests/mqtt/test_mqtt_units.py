"""The pure parts of the MQTT observer, without a broker: what may leave the dock, how a bay's
view folds events, the smoothed rate, and the bounded outbox."""

from __future__ import annotations

import base64
import hashlib

from dockd.events import CameraStatus, Progress
from dockd.observers.homeassistant import object_id
from dockd.observers.mqtt import (
    EVENTS_IN_FLIGHT,
    CameraView,
    Outbox,
    Privacy,
    RateMeter,
    clean,
    scrub,
)

SHA = hashlib.sha256(b"footage").hexdigest()
SHA_B64 = base64.b64encode(hashlib.sha256(b"footage").digest()).decode()


def _at(s: float) -> str:
    return f"2026-01-01T00:00:{s:09.6f}Z"


def test_hashes_and_officers_are_blanked_in_free_text() -> None:
    privacy = Privacy(False, ("badge-1234",))
    text = scrub(f"mismatch: expected {SHA}, store said {SHA_B64} for badge-1234", privacy)
    assert SHA not in text and SHA_B64 not in text and "badge-1234" not in text
    assert "mismatch: expected [hash removed]" in text
    # ids that merely look hex-ish stay
    assert scrub("20260101T000000Z-CAM1-a1b2c3") == "20260101T000000Z-CAM1-a1b2c3"


def test_private_keys_are_dropped_at_any_depth_and_officer_kept_only_when_published() -> None:
    details = {
        "path": "DCIM/1.MP4",
        "sha256": SHA,
        "nested": {"file_hash": "x", "Digest": "y", "checksum_sha256": "z", "size": 1},
        "officer": "badge-1234",
        "list": [{"officer_badge": "b"}, SHA],
    }
    out = clean(details, Privacy(False, ("badge-1234",)))
    assert out == {
        "path": "DCIM/1.MP4",
        "nested": {"size": 1},
        "list": [{}, "[hash removed]"],
    }
    assert clean(details, Privacy(True))["officer"] == "badge-1234"


def test_the_smoothed_rate_follows_a_steady_transfer() -> None:
    meter = RateMeter(tau=2.0)
    for n in range(40):
        meter.sample(n * 0.25, n * 250_000)  # 1 MB/s
    assert meter.bps is not None and abs(meter.bps - 1_000_000) < 1
    meter.sample(10.0, 10_000_000)  # a stall of 0.25 s: smoothed, not zeroed
    meter.sample(10.25, 10_000_000)
    assert 800_000 < meter.bps < 1_000_000


def _status(state: str, session: str, done: int = 0, safe: bool = False) -> CameraStatus:
    return CameraStatus("CAM", state, session, 10, done, 1000, done * 100, safe, at=_at(done))


def _progress(session: str, phase: str, done: int) -> Progress:
    return Progress("CAM", session, phase, 10, done, 1000, done * 100, at=_at(done + 0.5))


def test_counts_never_go_down_within_a_phase_and_restart_with_the_next() -> None:
    view = CameraView("CAM")
    assert view.apply_status(_status("offloading", "s1")) is True
    assert view.apply_progress(_progress("s1", "offload", 6))
    assert view.apply_progress(_progress("s1", "offload", 4))  # late, lower: ignored in effect
    assert (view.files_done, view.bytes_done) == (6, 600)
    payload = view.payload()
    assert payload["rate_bps"] and payload["rate_bps"] > 0 and payload["eta_s"] is not None
    assert view.apply_status(_status("offloaded", "s1", 10, safe=True)) is True
    assert view.payload()["eta_s"] == 0 and view.payload()["rate_bps"] == 0
    assert view.apply_status(_status("uploading", "s1", 0, safe=True)) is True
    assert (view.phase, view.files_done, view.bytes_done) == ("upload", 0, 0)
    # the upload worker may say "uploading" twice: not a state change
    assert view.apply_status(_status("uploading", "s1", 0, safe=True)) is False
    assert not view.apply_progress(_progress("s1", "offload", 9))  # not the current phase


def test_an_older_session_does_not_take_the_bay_from_the_one_being_offloaded() -> None:
    view = CameraView("CAM")
    view.apply_status(_status("docked", "s2"))
    view.apply_status(_status("offloading", "s2"))
    assert view.apply_status(_status("uploading", "s1", safe=True)) is None
    assert view.apply_status(_status("uploaded", "s1", 10, safe=True)) is None
    assert not view.apply_progress(_progress("s1", "upload", 5))
    assert (view.session_id, view.state, view.safe_to_undock) == ("s2", "offloading", False)
    view.apply_status(_status("offloaded", "s2", 10, safe=True))
    assert view.apply_status(_status("uploading", "s1", safe=True)) is True  # now it may


def test_the_event_backlog_is_bounded_and_its_losses_are_reported_once() -> None:
    box = Outbox(backlog=3)
    for n in range(10):
        box.add_event(f"e{n}".encode())
    out = box.take_events()
    assert b'"count":7' in out[0] and b"events_dropped" in out[0]
    assert out[1:] == [b"e7", b"e8", b"e9"]
    assert box.dropped == 0 and box.take_events() == []


def test_events_in_flight_are_limited() -> None:
    box = Outbox(backlog=1000)
    for n in range(EVENTS_IN_FLIGHT + 50):
        box.add_event(str(n).encode())
    first = box.take_events()
    assert len(first) == EVENTS_IN_FLIGHT
    for mid, _ in enumerate(first):
        box.sent(mid, None)
    assert box.take_events() == []
    box.acked(0)
    assert box.take_events() == [str(EVENTS_IN_FLIGHT).encode()]


def test_a_retained_topic_has_one_message_in_flight_so_a_stale_resend_cannot_win() -> None:
    box = Outbox(backlog=10)
    box.set_retained("t", b"old")
    assert box.take_retained() == [("t", b"old")]
    box.sent(1, "t")
    box.set_retained("t", b"new")
    assert box.take_retained() == []  # "old" is not acknowledged yet
    # the connection drops; paho will resend "old" itself; on reconnect everything is due again
    box.reconnected()
    assert box.take_retained() == []  # still waiting for "old" to be acknowledged
    box.acked(1)
    assert box.take_retained() == [("t", b"new")]
    box.sent(2, "t")
    box.acked(2)
    assert box.idle
    box.set_retained("t", b"new")  # unchanged: nothing to say
    assert box.take_retained() == []


def test_discovery_object_ids_are_safe_and_distinct() -> None:
    assert object_id("X6039B2A3") == "X6039B2A3"
    dotted, underscored = object_id("CAM.1"), object_id("CAM_1")
    assert dotted != underscored
    assert dotted.startswith("CAM_1_") and all(c.isalnum() or c in "_-" for c in dotted)
