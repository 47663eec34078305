"""The worker fleet's wire contract (no broker): job parsing and its one-line rejections, what a
job may set, the run config of a job, the stream split."""

from __future__ import annotations

import json

import pytest

from framecast.config import RunConfig
from framecast.errors import UserError
from framecast.stages.mqtt.jobs import FleetTopics, Job, JobRejected, assign, job_config, parse_job, parse_streams
from framecast.stages.mqtt.streams import stream_list_payload
from framecast.stages.mqtt.submit import make_job_id


def job(**kw) -> bytes:
    return json.dumps({"job_id": "talk-1", "source": "/videos/talk.mp4", **kw}).encode()


def test_a_job_round_trips_and_its_next_attempt_counts():
    j = parse_job(job(settings={"narration.interval_s": 1}))
    assert j.attempt == 1 and parse_job(j.next_attempt().payload()).attempt == 2


@pytest.mark.parametrize("payload, needle, job_id", [
    (b"not json", "not valid JSON", None),
    (b"[1, 2]", "must be an object", None),
    (json.dumps({"job_id": "a/b", "source": "x"}).encode(), "job_id", None),
    (job(color="red"), "'color'", "talk-1"),
    (job(source=""), "'source'", "talk-1"),
    (job(settings={"model.path": "/m"}), "'model.path' is the worker's", "talk-1"),
    (job(settings={"mqtt": {"url": "mqtt://x"}}), "'mqtt.url'", "talk-1"),
    (job(settings={"source.uri": "/etc/passwd"}), "'source.uri'", "talk-1"),
    (job(settings={"interval": 2}), "expected group.key", "talk-1"),
    (b"{" + b" " * 70_000 + b"}", "too large", None),
])
def test_bad_jobs_are_rejected_with_the_key_named(payload, needle, job_id):
    with pytest.raises(JobRejected) as e:
        parse_job(payload)
    assert needle in str(e.value) and "\n" not in str(e.value)
    assert e.value.job_id == job_id  # the worker can still publish the error under the job's id


def test_job_config_layers_job_settings_over_the_worker_and_fixes_the_rest():
    base = RunConfig.model_validate({"narration": {"interval_s": 5.0, "max_tokens": 20}, "outputs": {"console": True}})
    j = Job(job_id="talk-1", source="/v/talk.mp4", settings={"narration": {"interval_s": 1.5}, "source.fps": 2})
    cfg = job_config(base, j)
    assert cfg.narration.interval_s == 1.5 and cfg.narration.max_tokens == 20 and cfg.source.fps == 2
    assert cfg.source.uri == "/v/talk.mp4" and cfg.source.stream_id == "talk-1"
    assert cfg.outputs.console is False and cfg.mqtt.url is None
    with pytest.raises(JobRejected, match="narration.interval_s"):
        job_config(base, Job(job_id="t", source="x", settings={"narration.interval_s": -1}))


def test_topics():
    t = FleetTopics("fc")
    assert (t.queue, t.shared_queue("g"), t.job("a", "done"), t.worker("w1"), t.streams) == (
        "fc/jobs", "$share/g/fc/jobs", "fc/jobs/a/done", "fc/workers/w1", "fc/streams")


def test_make_job_id_is_valid_and_unique():
    ids = {make_job_id(s) for s in ["/v/My talk (2).mp4", "rtsp://cam/x", "demo", "/v/" + "x" * 100 + ".mkv"]}
    assert len(ids) == 4 and all(Job(job_id=i, source="s") for i in ids)
    assert make_job_id("/v/My talk (2).mp4").startswith("My-talk-2-")


def test_assign_is_even_deterministic_and_moves_little():
    streams = [f"cam{i}" for i in range(12)]
    three = assign(streams, ["w3", "w1", "w2"])
    assert three == assign(list(reversed(streams)), ["w1", "w2", "w3"])  # order of discovery does not matter
    assert sorted(list(three.values()).count(w) for w in ("w1", "w2", "w3")) == [4, 4, 4]
    two = assign(streams, ["w1", "w2"])
    assert sorted(list(two.values()).count(w) for w in ("w1", "w2")) == [6, 6]
    kept = sum(1 for s in streams if three[s] != "w3" and two[s] == three[s])
    assert kept >= 6  # most streams of the workers that stay do not move
    assert assign(streams, []) == {} and assign([], ["w1"]) == {}


def test_stream_list_payload_and_parse():
    payload = stream_list_payload(["door=rtsp://cam1/s", "yard=demo"])
    assert [s.stream_id for s in parse_streams(payload).streams] == ["door", "yard"]
    assert parse_streams(b"").streams == []  # a cleared retained list
    for bad in (["door"], ["a/b=demo"], ["x=demo", "x=demo"]):
        with pytest.raises(UserError):
            stream_list_payload(bad)


def test_job_output_files_stay_in_the_output_directory(tmp_path):
    from framecast.stages.mqtt.jobs import check_worker_outputs

    base = RunConfig.model_validate({"outputs": {"srt": "subs/{job_id}.srt"}})
    cfg = job_config(base, Job(job_id="t1", source="x", settings={"outputs.jsonl": "{job_id}.jsonl"}),
                     output_dir=str(tmp_path))
    assert cfg.outputs.jsonl == str(tmp_path / "t1.jsonl") and cfg.outputs.srt == str(tmp_path / "subs/t1.srt")
    for bad in ("/etc/cron.d/x", "../up.jsonl", "a/../../b", "~/x"):
        with pytest.raises(JobRejected, match="relative to the worker's output directory"):
            job_config(base, Job(job_id="t1", source="x", settings={"outputs.jsonl": bad}), output_dir=str(tmp_path))
    check_worker_outputs(base)
    with pytest.raises(UserError, match=r"put \{job_id\} in the name"):
        check_worker_outputs(RunConfig.model_validate({"outputs": {"jsonl": "all.jsonl"}}))


@pytest.mark.parametrize("argv, needle", [
    (["worker", "--mqtt", "mqtt://127.0.0.1:1", "--group", "a/b"], "--group 'a/b'"),
    (["worker", "--mqtt", "mqtt://127.0.0.1:1", "--worker-id", "x y"], "--worker-id 'x y'"),
    (["worker", "--mqtt", "mqtt://127.0.0.1:1", "--set", "outputs.jsonl=all.jsonl"], "put {job_id} in the name"),
    (["worker", "--mqtt", "ftp://h", "--capture-only"], "scheme must be mqtt://"),
    (["worker", "--mqtt", "mqtt://127.0.0.1:1", "--output-dir", "/no/such/dir", "--capture-only"], "no such directory"),
    (["submit", "--mqtt", "mqtt://127.0.0.1:1", "demo", "--set", "model.path=/m"], "'model.path' is the worker's"),
    (["submit", "--mqtt", "mqtt://127.0.0.1:1", "/no/such/file.mp4"], "no such file"),
    (["submit", "--mqtt", "mqtt://127.0.0.1:1"], "nothing to submit"),
    (["submit", "--mqtt", "mqtt://127.0.0.1:1", "demo", "--stream", "a=demo"], "not both"),
    (["submit", "--mqtt", "mqtt://127.0.0.1:1", "--stream", "nosource"], "expected ID=SOURCE"),
])
def test_cli_bad_arguments_are_one_line_and_exit_2(argv, needle, capsys):
    from framecast.stages.cli import main

    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("framecast: ") and needle in err, err
