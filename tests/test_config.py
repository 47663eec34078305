"""Configuration: groups, presets, TOML/YAML files, CLI overrides, one-line errors."""

from __future__ import annotations

import pytest

from framecast.config import ConfigError, RunConfig, load_config, preset_names, resolve_config_path


def test_defaults_are_a_capture_demo():
    cfg = load_config()
    assert cfg == RunConfig() and cfg.source.uri == "demo" and cfg.change.enabled and cfg.outputs.console


def test_toml_and_yaml_give_the_same_config(tmp_path):
    (tmp_path / "a.toml").write_text('[source]\nuri = "x.mp4"\nfps = 2\nend = 9.5\n[outputs]\nsrt = "a.srt"\n')
    (tmp_path / "a.yaml").write_text("source:\n  uri: x.mp4\n  fps: 2\n  end: 9.5\noutputs:\n  srt: a.srt\n")
    a, b = load_config(str(tmp_path / "a.toml")), load_config(str(tmp_path / "a.yaml"))
    assert a == b and a.source.fps == 2.0 and a.outputs.srt == "a.srt"


def test_presets_load_by_name_and_cli_overrides_win():
    assert {"camera-narration", "recorded-analysis", "mqtt"} <= set(preset_names())
    cfg = load_config("recorded-analysis", {"source.uri": "talk.mp4", "outputs.srt": None, "change.threshold": 0.2})
    assert cfg.source.uri == "talk.mp4" and cfg.source.realtime is False  # from the preset
    assert cfg.outputs.srt is None and cfg.change.threshold == 0.2
    assert resolve_config_path("camera-narration").name == "camera-narration.toml"


@pytest.mark.parametrize("text,expected", [
    ("[source]\nfps = 0\n", "source.fps = 0: Input should be greater than 0"),
    ("[source]\nstart = 5\nend = 2\n", "source.end = 2: must be after source.start (5)"),
    ('[source]\nstream_id = "a/b"\n', "source.stream_id = 'a/b': stream ids use 1-64 of [A-Za-z0-9_.-]"),
    ('[narration]\npolicy = "always"\n', "narration.policy = 'always': Input should be"),
    ("[change]\nsize = 2\n", "change.size = 2: Input should be greater than or equal to 8"),
    ("[outputs]\nconsole = 3\n", "outputs.console = 3: Input should be a valid boolean"),
    ("[sourec]\nuri = 1\n", "unknown key 'sourec' = {'uri': 1}"),
    ("[runtime]\nedge = 4\n", "unknown key 'runtime.edge' = 4"),
    ("[source\n", "cannot parse"),
    ("source = 5\n", "source = 5: Input should be a valid dictionary"),
])
def test_bad_files_raise_one_line_naming_file_key_and_value(tmp_path, text, expected):
    p = tmp_path / "c.toml"
    p.write_text(text)
    with pytest.raises(ConfigError) as e:
        load_config(str(p))
    msg = str(e.value)
    assert msg.startswith(f"{p}: ") and expected in msg and "\n" not in msg and e.value.exit_code == 2


def test_missing_unknown_format_and_unknown_preset(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(str(tmp_path / "none.toml"))
    (tmp_path / "c.ini").write_text("[source]\n")
    with pytest.raises(ConfigError, match="unsupported config format '.ini'"):
        load_config(str(tmp_path / "c.ini"))
    with pytest.raises(ConfigError, match="no such config file or preset .presets: "):
        load_config("not-a-preset")
    (tmp_path / "list.yaml").write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="top level must be a table"):
        load_config(str(tmp_path / "list.yaml"))


def test_override_errors_name_the_command_line():
    with pytest.raises(ConfigError) as e:
        load_config(None, {"source.max_frames": 0})
    assert str(e.value) == "command line: source.max_frames = 0: Input should be greater than or equal to 1"


# ---------------------------------------------------------------- environment variables


@pytest.fixture
def env(monkeypatch):
    """Set FRAMECAST_* variables for one test (monkeypatch undoes them)."""
    def set_(**values):
        for name, value in values.items():
            monkeypatch.setenv(name, value)
    return set_


def test_every_key_has_an_environment_variable(env):
    from framecast.config import env_var

    env(FRAMECAST_SOURCE__FPS="2.5", FRAMECAST_SOURCE__STREAM_ID="cam1", FRAMECAST_SOURCE__REALTIME="false",
        FRAMECAST_MQTT__URL="mqtt://broker:1883", FRAMECAST_MQTT__PROTOCOL="5", FRAMECAST_SESSION__KV_BITS="8",
        FRAMECAST_NARRATION__PROMPT="yes", FRAMECAST_OUTPUTS__SRT="null", FRAMECAST_RUNTIME__EDGE_SIZE="16",
        framecast_change__threshold="0.1", FRAMECAST_KERNELS="reference")  # (not a config key: ignored)
    cfg = load_config()
    assert cfg.source.fps == 2.5 and cfg.source.stream_id == "cam1" and cfg.source.realtime is False
    assert cfg.mqtt.url == "mqtt://broker:1883" and cfg.mqtt.protocol == "5" and cfg.session.kv_bits == 8
    assert cfg.narration.prompt == "yes" and cfg.outputs.srt is None and cfg.runtime.edge_size == 16
    assert cfg.change.threshold == 0.1  # names are case-insensitive
    assert env_var("mqtt", "ha_discovery") == "FRAMECAST_MQTT__HA_DISCOVERY"
    assert load_config(env=False) == RunConfig()


def test_precedence_flag_over_env_over_file_over_defaults(env, tmp_path):
    p = tmp_path / "c.toml"
    p.write_text('[source]\nuri = "file.mp4"\nfps = 1\nmax_frames = 5\n[mqtt]\nprefix = "from-file"\n')
    env(FRAMECAST_SOURCE__FPS="3", FRAMECAST_SOURCE__MAX_FRAMES="7", FRAMECAST_MQTT__PREFIX="from-env")
    cfg = load_config(str(p), {"source.max_frames": 9})
    assert cfg.source.uri == "file.mp4"  # file over default
    assert cfg.source.fps == 3.0 and cfg.mqtt.prefix == "from-env"  # env over file
    assert cfg.source.max_frames == 9  # flag over env
    assert cfg.source.width == 448  # default


@pytest.mark.parametrize("name,value,expected", [
    ("FRAMECAST_SOURCE__FPS", "-3", "environment: FRAMECAST_SOURCE__FPS = '-3': Input should be greater than 0"),
    ("FRAMECAST_SESSION__KV_BITS", "5", "environment: FRAMECAST_SESSION__KV_BITS = 5: Input should be 4 or 8"),
    ("FRAMECAST_OUTPUTS__CONSOLE", "maybe", "environment: FRAMECAST_OUTPUTS__CONSOLE = 'maybe': Input should be a valid boolean"),
    ("FRAMECAST_MQTT__PREFIX", "a/#", "environment: FRAMECAST_MQTT__PREFIX = 'a/#': topic prefixes may not contain"),
    ("FRAMECAST_SOURCE__FSP", "2", "environment: FRAMECAST_SOURCE__FSP: unknown key 'source.fsp'"),
    ("FRAMECAST_SORCE__FPS", "2", "environment: FRAMECAST_SORCE__FPS: unknown config group 'sorce'"),
    ("FRAMECAST_SOURCE", '{"fps": 2}', "environment: FRAMECAST_SOURCE: set keys one by one, as FRAMECAST_SOURCE__KEY"),
    ("FRAMECAST_OPENBLAS", "bogus", "environment: FRAMECAST_OPENBLAS = 'bogus': expected 0"),
    ("FRAMECAST_OPENBLAS", "yes", "environment: FRAMECAST_OPENBLAS = 'yes': expected 0"),
])
def test_bad_variables_raise_one_line_naming_the_variable(env, name, value, expected):
    env(**{name: value})
    with pytest.raises(ConfigError) as e:
        load_config()
    msg = str(e.value)
    assert msg.startswith(expected) and "\n" not in msg and e.value.exit_code == 2


def test_cli_reports_a_bad_variable_as_one_line_and_exit_2(env, capsys):
    from framecast.stages.cli import main

    env(FRAMECAST_NARRATION__MAX_TOKENS="0")
    assert main(["config", "show"]) == 2
    assert capsys.readouterr().err == ("framecast: environment: FRAMECAST_NARRATION__MAX_TOKENS = '0': "
                                       "Input should be greater than or equal to 1\n")
