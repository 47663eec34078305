"""`framecast run --help` / `ask --help`: every flag says what it does and its default, each
subcommand shows examples; `framecast ask` takes a client certificate like `run` does and says a
refused connection in one line that names the broker once."""

from __future__ import annotations

import argparse

import pytest

from broker import Broker
from framecast.stages.cli import build_parser, main
from framecast.stages.mqtt.ask import ask_over_mqtt


def _subparser(name: str) -> argparse.ArgumentParser:
    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    return sub.choices[name]


@pytest.mark.parametrize("command", ["run", "ask"])
def test_every_flag_has_help_with_its_default_and_the_epilog_has_examples(command):
    parser = _subparser(command)
    for action in parser._actions:
        if isinstance(action, argparse._HelpAction):
            continue
        name = action.option_strings[-1] if action.option_strings else action.dest
        assert action.help, f"{command} {name}: no help text"
        if action.option_strings:
            assert "(default:" in action.help or "(required)" in action.help, f"{command} {name}: no default"
    text = parser.format_help()
    assert "examples:" in text and text.count(f"framecast {command} ") >= 3
    assert "%(" not in text


def test_run_help_defaults_come_from_the_config():
    from framecast.config import RunConfig

    cfg = RunConfig()
    helps = {a.option_strings[-1]: a.help for a in _subparser("run")._actions if a.option_strings}
    assert f"(default: {cfg.narration.interval_s:g})" in helps["--interval"]
    assert f"(default: {cfg.narration.policy})" in helps["--policy"]
    assert f"(default: {cfg.mqtt.prefix})" in helps["--mqtt-prefix"]


def test_ask_with_client_certificate_and_a_refusal_in_one_line(tmp_path, capsys):
    b = Broker(tmp_path / "tls", tls=True, users=None).start()
    try:
        url = f"mqtts://127.0.0.1:{b.tls_port}"
        # the broker requires a client certificate: with one, ask connects (and, nobody
        # answering, times out); without, the connection is refused
        rc = main(["ask", "--mqtt", url, "--mqtt-ca", str(b.tls.ca), "--mqtt-cert", str(b.tls.client_cert),
                   "--mqtt-key", str(b.tls.client_key), "--stream", "nobody", "--timeout", "0.5", "hello?"])
        err = capsys.readouterr().err
        assert rc == 1 and "no answer from stream 'nobody'" in err, err
        rc = ask_over_mqtt(url, "nobody", "hello?", timeout=0.5, ca_file=str(b.tls.ca))
        err = capsys.readouterr().err
        assert rc == 1 and "no answer" not in err and len(err.strip().splitlines()) == 1, err
    finally:
        b.stop()
    a = Broker(tmp_path / "auth", users={"cam": "s3cret"}).start()
    try:
        rc = main(["ask", "--mqtt", f"mqtt://cam:nope@127.0.0.1:{a.port}", "hello?"])
        err = capsys.readouterr().err.strip()
        assert rc == 1 and len(err.splitlines()) == 1 and "refused the connection for user 'cam'" in err
        assert err.count(f"127.0.0.1:{a.port}") == 1 and "nope" not in err, err
        clip = tmp_path / "clip.mp4"
        clip.write_bytes(b"")
        for argv in (["submit", "--mqtt", f"mqtt://cam:nope@127.0.0.1:{a.port}", str(clip)],
                     ["submit", "--mqtt", f"mqtt://cam:nope@127.0.0.1:{a.port}", "--stream", "cam1=demo"]):
            rc = main(argv)
            err = capsys.readouterr().err.strip()
            assert rc == 1 and len(err.splitlines()) == 1 and "refused the connection for user 'cam'" in err, err
            assert err.count(f"127.0.0.1:{a.port}") == 1 and "nope" not in err, err
    finally:
        a.stop()
