"""One house: the wheel installs only `framecast` and works from a directory holding `pipeline.py`.

Builds the wheel (`pip wheel . --no-deps`), checks its top level, installs it with `--no-deps`
into a fresh venv that sees this interpreter's site-packages (for mlx, numpy, ...), then runs
the installed commands from a temporary directory whose `pipeline.py` / `stages.py` would break
any run that imported them (the collision the old top-level names had).
"""

from __future__ import annotations

import importlib.metadata
import os
import shutil
import subprocess
import sys
import venv
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.slow  # ~30-60 s on the 2-core CI machine (a build, an install, a demo run)


def _can_build_offline() -> bool:
    """setuptools >= 70.1 builds wheels itself (no `wheel` package): no build isolation needed."""
    try:
        major, minor = (int(x) for x in importlib.metadata.version("setuptools").split(".")[:2])
    except (importlib.metadata.PackageNotFoundError, ValueError):
        return False
    return (major, minor) >= (70, 1)


def _run(cmd: list[str], *, cwd: Path, env: dict[str, str], timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    # A clean copy: pip builds in the source tree, and a stale build/ there would leak files
    # deleted since into the wheel.
    src = tmp_path_factory.mktemp("src") / "framecast"
    shutil.copytree(ROOT, src, ignore=shutil.ignore_patterns(
        ".git", ".venv", "build", "dist", "*.egg-info", "__pycache__", ".*_cache", ".device", ".whl"))
    out = tmp_path_factory.mktemp("wheel")
    cmd = [sys.executable, "-m", "pip", "wheel", str(src), "--no-deps", "-q", "-w", str(out)]
    if _can_build_offline():
        cmd.append("--no-build-isolation")
    res = _run(cmd, cwd=out, env={**os.environ, "PIP_DISABLE_PIP_VERSION_CHECK": "1"})
    assert res.returncode == 0, res.stdout + res.stderr
    (built,) = out.glob("framecast-*.whl")
    return built


def test_wheel_top_level_holds_only_framecast(wheel):
    with zipfile.ZipFile(wheel) as z:
        names = z.namelist()
    tops = {n.split("/", 1)[0] for n in names}
    dist_info = {t for t in tops if t.endswith(".dist-info")}
    assert tops - dist_info == {"framecast"} and len(dist_info) == 1
    # presets and the demo model ship as package data; tests and scripts do not ship
    assert {"framecast/configs/recorded-analysis.toml", "framecast/configs/camera-narration.toml",
            "framecast/configs/mqtt.toml", "framecast/demo_model/config.json", "framecast/__main__.py",
            "framecast/stages/cli.py", "framecast/engine/generate.py", "framecast/model/lm/decoder.py"} <= set(names)
    top_level = next(n for n in names if n.endswith(".dist-info/top_level.txt"))
    with zipfile.ZipFile(wheel) as z:
        assert z.read(top_level).decode().split() == ["framecast"]


def test_installed_wheel_runs_beside_a_users_pipeline_py(wheel, tmp_path):
    env_dir = tmp_path / "venv"
    venv.EnvBuilder(system_site_packages=True, with_pip=False).create(env_dir)
    py, script = env_dir / "bin" / "python", env_dir / "bin" / "framecast"
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("FRAMECAST_", "PYTHON", "VIRTUAL_ENV"))}
    clean["PIP_DISABLE_PIP_VERSION_CHECK"] = "1"
    res = _run([sys.executable, "-m", "pip", "--python", str(py), "install", "-q", "--no-deps", str(wheel)],
               cwd=tmp_path, env=clean)
    assert res.returncode == 0, res.stdout + res.stderr

    work = tmp_path / "work"
    work.mkdir()
    for name in ("pipeline.py", "stages.py", "configs.py"):  # a user's own modules of those names
        (work / name).write_text(f"raise SystemExit('the user module {name} was imported')\n")

    res = _run([str(py), "-c", "import framecast, framecast.stages.cli; print(framecast.__file__)"], cwd=work, env=clean)
    assert res.returncode == 0, res.stderr
    assert Path(res.stdout.strip()).resolve().is_relative_to(env_dir.resolve())  # the wheel's, not the checkout's

    res = _run([str(py), "-m", "framecast", "config", "list"], cwd=work, env=clean)
    assert res.returncode == 0, res.stderr
    assert {"camera-narration", "recorded-analysis", "mqtt"} <= set(res.stdout.split())

    res = _run([str(script), "config", "check", "recorded-analysis"], cwd=work, env=clean)
    assert res.returncode == 0 and "ok" in res.stdout, res.stderr

    res = _run([str(script), "run", "--source", "demo", "--max-frames", "20"], cwd=work, env=clean)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-2000:]
    assert "eof after 20 frames" in res.stdout + res.stderr
