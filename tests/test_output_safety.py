"""Output paths never destroy input or earlier results: an output on the source video (or a
link to it), two outputs on one file, several streams on one file, a job's path outside the
worker's directory, and a run that fails before its first frame with files already there."""

from __future__ import annotations

import json
import os

import pytest

from framecast.config import RunConfig, stream_configs
from framecast.errors import UserError
from framecast.stages.cli import main
from framecast.stages.mqtt.jobs import Job, JobRejected, job_config
from video_fixtures import write_video


def run(capsys, *args: str) -> tuple[int, str]:
    code = main(["run", "--no-console", *args])
    return code, capsys.readouterr().err


def one_line(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("framecast: ")
    return lines[0]


@pytest.fixture
def video(tmp_path):
    return write_video(tmp_path / "victim.mp4", 10)


# ---------------------------------------------------------------- an output on an input


@pytest.mark.parametrize("flag,name", [("--jsonl", "config.json"), ("--srt", "model.safetensors"),
                                       ("--vtt", "tokenizer.json")])
def test_an_output_on_a_file_of_the_model_directory_is_refused(capsys, tmp_path, video, flag, name):
    import shutil

    from framecast.model.load import DEMO_MODEL_DIR

    model = tmp_path / "model"
    shutil.copytree(DEMO_MODEL_DIR, model)
    before = (model / name).read_bytes()
    code, err = run(capsys, "--capture-only", "--model", str(model), "--source", str(video), flag, str(model / name))
    line = one_line(err)
    assert code == 2 and "is the file model.path reads" in line and name in line, line
    assert (model / name).read_bytes() == before
    # a config file says the same to `config check`
    cfg = tmp_path / "c.toml"
    cfg.write_text(f'[model]\npath = "{model}"\n[source]\nuri = "{video}"\n[outputs]\n{flag[2:]} = "{model / name}"\n')
    assert main(["config", "check", str(cfg)]) == 2 and "model.path" in one_line(capsys.readouterr().err)


def test_the_embedded_demo_models_files_count_as_inputs_when_no_model_is_given():
    from framecast.model.load import DEMO_MODEL_DIR
    from framecast.stages.outputs.files import _input_files

    inputs = dict((p, k) for k, p in _input_files(RunConfig()))
    assert inputs[str(DEMO_MODEL_DIR / "model.safetensors")] == "model.path"
    assert inputs[str(DEMO_MODEL_DIR / "config.json")] == "model.path"


@pytest.mark.parametrize("flag", ["--jsonl", "--srt", "--vtt", "--report", "--save-session", "--chapters"])
def test_an_output_on_the_source_video_is_refused_and_the_video_kept(capsys, tmp_path, video, flag):
    before = video.read_bytes()
    code, err = run(capsys, "--capture-only", "--source", str(video), flag, str(video))
    assert code == 2
    line = one_line(err)
    assert str(video) in line and "source.uri" in line and "destroy the input" in line
    assert video.read_bytes() == before


def test_a_link_to_the_source_or_a_file_uri_is_the_source_too(capsys, tmp_path, video):
    before = video.read_bytes()
    hard = tmp_path / "hard.mp4"
    os.link(video, hard)
    soft = tmp_path / "soft.srt"
    soft.symlink_to(video)
    for source, out in ((str(video), str(hard)), (str(video), str(soft)), (f"file://{video}", str(video)),
                        (str(hard), str(video)), (str(video), str(tmp_path / "." / "victim.mp4"))):
        code, err = run(capsys, "--capture-only", "--source", source, "--jsonl", out)
        assert code == 2 and "destroy the input" in one_line(err), (source, out)
    assert video.read_bytes() == before


def test_the_state_file_on_the_source_is_refused(capsys, video):
    before = video.read_bytes()
    code, err = run(capsys, "--capture-only", "--source", str(video), "--set", f"session.state_file={video}")
    assert code == 2 and "session.state_file" in one_line(err)
    assert video.read_bytes() == before


# ---------------------------------------------------------------- two outputs on one file


def test_two_outputs_on_one_file_are_refused_before_anything_is_written(capsys, tmp_path, video):
    same = tmp_path / "same.txt"
    code, err = run(capsys, "--capture-only", "--source", str(video), "--jsonl", str(same), "--srt", str(same),
                    "--vtt", str(same))
    assert code == 2 and "the same file as" in one_line(err) and not same.exists()
    # spelled differently, still one file
    code, err = run(capsys, "--capture-only", "--source", str(video), "--jsonl", str(same),
                    "--srt", str(tmp_path / "sub" / ".." / "same.txt"))
    assert code == 2 and not same.exists()


def test_a_hard_link_between_two_outputs_is_one_file(capsys, tmp_path, video):
    a = tmp_path / "a.srt"
    a.write_text("earlier\n")
    os.link(a, tmp_path / "b.vtt")
    code, err = run(capsys, "--capture-only", "--source", str(video), "--srt", str(a), "--vtt", str(tmp_path / "b.vtt"))
    assert code == 2 and "the same file as outputs.srt" in one_line(err)
    assert a.read_text() == "earlier\n"


def test_the_annotated_videos_webvtt_counts_as_an_output(capsys, tmp_path, video):
    code, err = run(capsys, "--capture-only", "--source", str(video), "--annotate", str(tmp_path / "x.mp4"),
                    "--vtt", str(tmp_path / "x.vtt"))
    line = one_line(err)
    assert code == 2 and "outputs.annotate (its WebVTT)" in line and "the same file as outputs.vtt" in line


def test_config_check_refuses_a_streams_outputs_on_one_file(capsys, tmp_path):
    cfg = tmp_path / "two.toml"
    cfg.write_text('[[streams]]\nid = "a"\nsource = {uri = "demo"}\noutputs = {srt = "x.srt", vtt = "x.srt"}\n')
    assert main(["config", "check", str(cfg)]) == 2
    line = one_line(capsys.readouterr().err)
    assert "outputs.vtt = 'x.srt'" in line and "outputs.srt" in line


# ---------------------------------------------------------------- several streams


@pytest.mark.parametrize("group,key", [("outputs", "chapters"), ("outputs", "summary"), ("outputs", "session"),
                                       ("outputs", "annotate"), ("outputs", "report"), ("outputs", "jsonl"),
                                       ("session", "state_file")])
def test_every_output_path_takes_the_stream_id_and_one_file_per_stream(group, key):
    ext = {"annotate": "mp4", "session": "fcs"}.get(key, "out")
    streams = [{"id": "a", "source": {"uri": "demo"}}, {"id": "b", "source": {"uri": "demo"}}]
    cfg = RunConfig.model_validate({group: {key: f"{{stream_id}}-{key}.{ext}"}, "streams": streams})
    a, b = stream_configs(cfg)
    assert getattr(getattr(a, group), key) == f"a-{key}.{ext}" and getattr(getattr(b, group), key) == f"b-{key}.{ext}"
    shared = RunConfig.model_validate({group: {key: f"all.{ext}"}, "streams": streams})
    with pytest.raises(UserError, match=rf"{group}.{key} = 'all.{ext}' is shared by streams 'a' and 'b'"):
        stream_configs(shared)


def test_save_session_with_two_sources_is_refused(capsys, tmp_path, video):
    target = tmp_path / "x.fcs"
    code, err = run(capsys, "--source", "demo#a", "--source", "demo#b", "--max-frames", "2",
                    "--save-session", str(target))
    assert code == 2 and "is shared by streams 'a' and 'b'" in one_line(err) and not target.exists()


def test_one_streams_output_on_another_streams_source_is_refused(capsys, tmp_path, video):
    before = video.read_bytes()
    cfg = tmp_path / "two.toml"
    cfg.write_text(f'[runtime]\ncapture_only = true\n[[streams]]\nid = "a"\nsource = {{uri = "{video}"}}\n'
                   f'[[streams]]\nid = "b"\nsource = {{uri = "demo", max_frames = 2}}\n'
                   f'outputs = {{srt = "{video}"}}\n')
    code, err = run(capsys, "--config", str(cfg))
    line = one_line(err)
    assert code == 2 and "of stream 'b' is the file source.uri of stream 'a' reads" in line
    assert video.read_bytes() == before


# ---------------------------------------------------------------- worker jobs


@pytest.mark.parametrize("key", ["outputs.session", "outputs.summary", "outputs.chapters", "outputs.annotate",
                                 "outputs.report", "outputs.jsonl"])
@pytest.mark.parametrize("bad", ["/tmp/esc.fcs", "../esc.md", "a/../../esc", "~/esc"])
def test_every_job_output_key_stays_in_the_worker_directory(tmp_path, key, bad):
    with pytest.raises(JobRejected, match="relative to the worker's output directory"):
        job_config(RunConfig(), Job(job_id="t1", source="x", settings={key: bad}), output_dir=str(tmp_path))


def test_a_job_may_not_set_the_state_file_at_all(tmp_path):
    with pytest.raises(JobRejected, match="is the worker's to choose"):
        job_config(RunConfig(), Job(job_id="t1", source="x", settings={"session.state_file": "/tmp/x"}),
                   output_dir=str(tmp_path))


def test_a_job_cannot_leave_the_directory_through_a_symbolic_link(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "link").symlink_to(tmp_path)
    with pytest.raises(JobRejected, match="leaves the worker's output directory"):
        job_config(RunConfig(), Job(job_id="t1", source="x", settings={"outputs.summary": "link/esc.md"}),
                   output_dir=str(out))
    settings = {"outputs.session": "{stream_id}.fcs", "outputs.summary": "{job_id}.md"}
    cfg = job_config(RunConfig(), Job(job_id="t1", source="x", settings=settings), output_dir=str(out))
    assert cfg.outputs.session == str(out / "t1.fcs") and cfg.outputs.summary == str(out / "t1.md")


# ---------------------------------------------------------------- a run that fails before its first frame


def _keep(tmp_path) -> dict:
    files = {"--jsonl": tmp_path / "keep.jsonl", "--srt": tmp_path / "keep.srt", "--vtt": tmp_path / "keep.vtt"}
    for flag, p in files.items():
        p.write_text(f"earlier results of {flag}\n")
    return files


def _args(files: dict) -> list[str]:
    return [a for flag, p in files.items() for a in (flag, str(p))]


def test_a_source_error_before_the_first_frame_keeps_existing_outputs(capsys, tmp_path, video):
    files = _keep(tmp_path)
    code, err = run(capsys, "--capture-only", "--source", str(video), "--start", "10", *_args(files))
    assert code == 2 and "start" in one_line(err)
    for flag, p in files.items():
        assert p.read_text() == f"earlier results of {flag}\n"


def test_a_source_error_before_the_first_frame_still_writes_new_outputs(capsys, tmp_path, video):
    new = tmp_path / "new.jsonl"
    code, _ = run(capsys, "--capture-only", "--source", str(video), "--start", "10", "--jsonl", str(new),
                  "--srt", str(tmp_path / "new.srt"))
    assert code == 2
    lines = [json.loads(x) for x in new.read_text().splitlines()]
    assert lines[-1]["type"] == "eos" and lines[-1]["text"] == "fatal"
    assert any(x["type"] == "error" for x in lines)
    assert (tmp_path / "new.srt").read_text() == ""


def test_an_unreachable_stream_keeps_existing_outputs(capsys, tmp_path):
    files = _keep(tmp_path)
    code, _ = run(capsys, "--capture-only", "--source", "rtsp://127.0.0.1:9/x", "--set", "source.reconnect_max=0",
                  "--set", "source.open_timeout_s=2", *_args(files))
    assert code != 0
    for flag, p in files.items():
        assert p.read_text() == f"earlier results of {flag}\n"


def test_a_run_that_reads_frames_replaces_existing_outputs(capsys, tmp_path, video):
    files = _keep(tmp_path)
    code, _ = run(capsys, "--capture-only", "--source", str(video), *_args(files))
    assert code == 0
    lines = [json.loads(x) for x in files["--jsonl"].read_text().splitlines()]
    assert lines[0]["type"] == "status" and lines[-1] == {**lines[-1], "type": "eos", "text": "eos"}
    assert files["--vtt"].read_text().startswith("WEBVTT")


def test_a_saved_session_is_kept_when_the_run_fails_before_its_first_frame(capsys, tmp_path, video):
    keep = tmp_path / "keep.fcs"
    keep.write_bytes(b"an earlier session")
    others = {"--chapters": tmp_path / "keep-chapters.vtt", "--summary": tmp_path / "keep.md",
              "--report": tmp_path / "keep.html", "--srt": tmp_path / "keep.srt"}
    for p in others.values():
        p.write_text("earlier\n")
    code, err = run(capsys, "--source", str(video), "--start", "10", "--save-session", str(keep), *_args(others))
    assert code == 2 and "start" in one_line(err)
    assert keep.read_bytes() == b"an earlier session"
    assert all(p.read_text() == "earlier\n" for p in others.values())


def test_a_garbage_state_file_is_bad_input_and_kept(capsys, tmp_path):
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"not a safetensors file at all")
    code, err = run(capsys, "--source", "demo", "--max-frames", "2", "--set", f"session.state_file={bad}")
    assert code == 2
    line = one_line(err)
    assert str(bad) in line and "session.state_file" in line and "RuntimeError)" not in line
    assert bad.read_bytes() == b"not a safetensors file at all"
