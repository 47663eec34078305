"""Events: the versioned JSON envelope (the public contract) and round trips."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest

from framecast.events import (EVENT_TYPES, SCHEMA_VERSION, Answer, EndOfStream, Error, Flush, Frame, Metrics,
                             Narration, NarrationDelta, Question, SceneChange, Status, Stop, event_from_dict)

ISO_Z = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z$")

SAMPLES = [
    SceneChange(score=0.25, pts=1.5, seq=3, stream_id="cam"),
    NarrationDelta(text="A red", narration_id="n1", pts=2.0),
    Narration(text="A red circle moves left.", pts=2.0, pts_start=1.0, pts_end=2.0, tokens=7),
    Answer(text="Two.", request_id="r1", question="How many shapes?", pts=3.0),
    Status(state="reconnecting", text="rtsp://cam: no frame for 5 s", reconnects=2),
    Metrics(stages={"change": {"items_in": 3.0, "drops": 0.0}}),
    Error(text="x.mp4: truncated", stage="file", fatal=True),
    Question(text="What colour?", request_id="q1", reply_to="resp/topic", correlation=b"\x01"),
    Stop(text="signal"),
    Flush(),
    EndOfStream(text="eos"),
]


@pytest.mark.parametrize("ev", SAMPLES, ids=lambda e: e.type)
def test_envelope_has_the_required_keys_and_round_trips(ev):
    d = json.loads(ev.to_json())
    assert {"v", "type", "stream_id", "seq", "ts", "pts"} <= d.keys()
    assert d["v"] == SCHEMA_VERSION and d["type"] == ev.type and ISO_Z.match(d["ts"])
    if hasattr(ev, "text"):
        assert d["text"] == ev.text
    back = event_from_dict(d)
    assert type(back) is type(ev) and back.to_dict() == ev.to_dict()


def test_frame_never_serialises_pixels_or_features():
    f = Frame(pixels=np.zeros((6, 8, 3), np.uint8), pts=0.1, seq=4, changed=True, change_score=np.float32(0.5),
              features=object())
    d = json.loads(f.to_json())
    assert "pixels" not in d and "features" not in d
    assert (d["width"], d["height"], d["seq"], d["changed"], d["change_score"]) == (8, 6, 4, True, 0.5)
    with pytest.raises(ValueError, match="unknown event type 'frame'"):
        event_from_dict(d)


def test_private_transport_fields_stay_private_and_control_flags():
    d = Question(text="?", reply_to="t", correlation=b"x").to_dict()
    assert "reply_to" not in d and "correlation" not in d
    assert Question.control and Stop.control and Flush.control
    assert not EndOfStream.control and not Narration.control and not Frame.control


def test_floats_rounded_and_numpy_scalars_plain():
    d = json.loads(Status(state="running", fps=np.float64(29.97002997), pts=1 / 3).to_json())
    assert d["fps"] == 29.97003 and d["pts"] == 0.333333


def test_unknown_type_and_extra_fields_rejected():
    with pytest.raises(ValueError):
        event_from_dict({"type": "nope"})
    with pytest.raises(ValueError):
        event_from_dict({"type": "status", "state": "x", "surprise": 1})
    assert set(EVENT_TYPES) >= {"frame", "change", "narration", "narration.partial", "answer", "status", "metrics",
                                "error", "question", "stop", "flush", "eos"}
