"""`config check` and `run` agree (the config models validate source URIs, MQTT URLs and seeds,
naming file and key); file names with `#` and `file://` URIs; the smaller one-line errors."""

from __future__ import annotations

import json

import pytest
from framecast.config import split_stream_uri
from framecast.stages.cli import build_parser, main
from video_fixtures import write_video


def one_line(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("framecast: "), err
    return err


@pytest.mark.parametrize("body, key, why", [
    ('[mqtt]\nurl = "ftp://x"\n', "mqtt.url", "mqtt:// or mqtts://"),
    ('[mqtt]\nurl = "mqtt://[::1"\n', "mqtt.url", "Invalid IPv6 URL"),
    ('[mqtt]\nurl = "mqtt://"\n', "mqtt.url", "no host"),
    ('[source]\nuri = "rtsp:/bad"\n', "source.uri", "rtsp://host"),
    ('[source]\nuri = "ftp://x/a.mp4"\n', "source.uri", "unsupported source scheme"),
    ('[source]\nuri = "camera:abc"\n', "source.uri", "camera:N"),
    ('[source]\nseed = -5\n', "source.seed", "greater than or equal to 0"),
    ('[[streams]]\nid = "a"\n[streams.source]\nuri = "http://[::1"\n', "source.uri", "Invalid IPv6 URL"),
])
def test_config_check_and_run_refuse_the_same_files(capsys, tmp_path, body, key, why):
    f = tmp_path / "c.toml"
    f.write_text(body)
    for argv in (["config", "check", str(f)], ["run", "--config", str(f), "--capture-only", "--no-console"]):
        assert main(argv) == 2
        line = one_line(capsys)
        assert str(f) in line and key in line and why in line, line


@pytest.mark.parametrize("outputs", ['srt = "{v}"', 'jsonl = "{v}"', 'vtt = "{d}/x.vtt"\nsrt = "{d}/x.vtt"'])
def test_config_check_and_run_refuse_the_same_outputs(capsys, tmp_path, outputs):
    """An output on the source video, or two outputs on one file: `config check` says what `run` says."""
    video = tmp_path / "in.mp4"
    write_video(video, 4, fps=10, width=64, height=48)
    f = tmp_path / "c.toml"
    f.write_text(f'[source]\nuri = "{video}"\n[outputs]\n' + outputs.format(v=video, d=tmp_path) + "\n")
    lines = []
    for argv in (["config", "check", str(f)], ["run", "--config", str(f), "--capture-only", "--no-console"]):
        assert main(argv) == 2
        lines.append(one_line(capsys))
    assert lines[0] == lines[1] and ("reads" in lines[0] or "same file" in lines[0]), lines
    assert video.stat().st_size > 0


def test_mqtt_url_error_hides_the_password(capsys):
    assert main(["run", "--capture-only", "--no-console", "--mqtt", "ftp://me:secret@x"]) == 2
    line = one_line(capsys)
    assert "secret" not in line and "mqtt.url" in line


@pytest.fixture()
def clip(tmp_path):
    write_video(tmp_path / "take#2.mp4", 10, fps=10, width=96, height=64)
    return tmp_path / "take#2.mp4"


def events(path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.mark.parametrize("form", ["plain", "file_uri_escaped", "file_uri_raw", "file_localhost"])
def test_file_name_with_hash_works_with_one_source(capsys, tmp_path, clip, form):
    uri = {"plain": str(clip), "file_uri_escaped": f"file://{tmp_path}/take%232.mp4",
           "file_uri_raw": f"file://{clip}", "file_localhost": f"file://localhost{tmp_path}/take%232.mp4"}[form]
    out = tmp_path / "o.jsonl"
    assert main(["run", "--capture-only", "--no-console", "--source", uri, "--jsonl", str(out)]) == 0, \
        capsys.readouterr().err
    ev = events(out)
    assert ev[0]["state"] == "running" and ev[0]["stream_id"] == "default" and ev[-1]["text"] == "eos"


def test_uri_hash_id_still_splits_when_the_whole_is_not_a_file(tmp_path, clip):
    assert split_stream_uri(str(clip)) == (str(clip), None)
    assert split_stream_uri(f"{tmp_path}/ok.mp4#cam") == (f"{tmp_path}/ok.mp4", "cam")
    assert split_stream_uri("rtsp://h/x#door") == ("rtsp://h/x", "door")
    assert split_stream_uri(f"{clip}#cam") == (str(clip), "cam")  # the file, named `cam`


def test_several_sources_with_a_hash_file(capsys, tmp_path, clip):
    write_video(tmp_path / "b.mp4", 10, fps=10, width=96, height=64)
    out = tmp_path / "{stream_id}.jsonl"
    code = main(["run", "--capture-only", "--no-console", "--source", str(clip), "--source", f"{tmp_path}/b.mp4#bee",
                 "--jsonl", str(out)])
    assert code == 0, capsys.readouterr().err
    assert events(tmp_path / "bee.jsonl")[-1]["text"] == "eos"
    assert events(tmp_path / "stream1.jsonl")[0]["text"].startswith(str(clip))


# -- the smaller ones

def test_mmproj_without_model_is_refused(capsys, tmp_path):
    assert main(["run", "--capture-only", "--no-console", "--mmproj", "v.gguf"]) == 2
    assert "model.path" in one_line(capsys)
    f = tmp_path / "m.toml"
    f.write_text('[model]\nmmproj = "v.gguf"\n')
    assert main(["config", "check", str(f)]) == 2 and "model.mmproj" in one_line(capsys)


@pytest.mark.parametrize("n", ["0", "-3"])
def test_ask_max_tokens_below_one(capsys, n):
    assert main(["ask", "--session", "x.fcs", "--max-tokens", n, "q"]) == 2
    assert "--max-tokens" in one_line(capsys)


@pytest.mark.parametrize("argv", [["run", "--config", "{d}"], ["config", "check", "{d}"],
                                  ["submit", "--mqtt", "mqtt://127.0.0.1:9", "{d}"]])
def test_a_directory_is_called_a_directory(capsys, tmp_path, argv):
    assert main([a.replace("{d}", str(tmp_path)) for a in argv]) == 2
    assert "is a directory" in one_line(capsys)


@pytest.mark.parametrize("setting", ["source.fps=-1", "narration.max_tokens=0", "source.bogus=1"])
def test_submit_validates_job_settings_before_queueing(capsys, setting):
    # port 9: nothing listens; the setting must fail first, without a connection attempt
    assert main(["submit", "--mqtt", "mqtt://127.0.0.1:9", "--set", setting, "demo"]) == 2
    assert setting.split("=")[0] in one_line(capsys)


def test_capture_only_with_a_model_output_says_how_to_turn_it_off(capsys, tmp_path):
    write_video(tmp_path / "a.mp4", 10, fps=10, width=96, height=64)
    assert main(["run", "--config", "recorded-analysis", "--capture-only", "--no-console",
                 "--source", str(tmp_path / "a.mp4")]) == 2
    line = one_line(capsys)
    assert "--set outputs." in line and "--capture-only" in line


def test_one_frame_is_singular(capsys, tmp_path):
    write_video(tmp_path / "a.mp4", 10, fps=10, width=96, height=64)
    out = tmp_path / "o.jsonl"
    assert main(["run", "--capture-only", "--no-console", "--source", str(tmp_path / "a.mp4"), "--max-frames", "1",
                 "--jsonl", str(out)]) == 0
    eof = [e for e in events(out) if e.get("state") == "eof"][0]
    assert eof["text"].endswith("after 1 frame")


@pytest.mark.parametrize("command", ["worker", "submit"])
def test_worker_and_submit_help_shows_defaults(command):
    sub = build_parser()._subparsers._group_actions[0].choices[command]
    for action in sub._actions:
        if action.option_strings and action.dest != "help":
            assert action.help and ("default:" in action.help or "required" in action.help), action.option_strings


@pytest.mark.parametrize("key, value", [("session.state_file", ""), ("source.uri", "x.mp4"),
                                        ("outputs.console", "false")])
def test_a_refused_job_setting_is_not_listed_as_allowed(capsys, key, value):
    assert main(["submit", "--mqtt", "mqtt://127.0.0.1:9", "--set", f"{key}={value}", "demo"]) == 2
    line = one_line(capsys)
    allowed, _, refused = line.partition("except")
    assert key in refused, line


@pytest.mark.parametrize("uri", ["udp://@:1234", "tcp://:1234?listen", "srt://:9000?mode=listener",
                                 "rtsp://user:pass@cam.lan:554/s", "camera:/dev/video0", "/dev/video0", "clip:2.mp4",
                                 "file:///v/take%232.mp4"])
def test_valid_source_forms_pass_the_config(uri):
    from framecast.config import SourceConfig

    assert SourceConfig(uri=uri).uri == uri
