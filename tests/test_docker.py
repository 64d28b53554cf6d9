"""The Dockerfile and compose.yaml, read (docker cannot build here): the base image's CUDA is the locked
torch wheel's, the Python is the lock's, the bot runs as a non-root user that collides with nothing,
SIGTERM reaches it, and the HEALTHCHECK is a command that answers without importing torch."""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
import time
import tomllib
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent

# The CUDA major of PyPI's Linux x86-64 torch wheel, per release. The lock pins torch without its local tag
# (tools/lock.sh runs on a CPU machine), so the wheel's CUDA is read from its metadata, without downloading it:
#   pip --isolated install --dry-run --no-deps --ignore-installed --only-binary=:all: --python-version 3.11 \
#     --platform manylinux_2_28_x86_64 --target /tmp/x --index-url https://pypi.org/simple \
#     --report - torch==X | grep -o 'cuda-toolkit[^"]*\|nvidia-[a-z]*-cu[0-9]*'
# For 2.13.0 that gives cuda-toolkit[...]==13.0.3 and nvidia-cudnn-cu13 / nvidia-nccl-cu13: CUDA 13, which
# needs an NVIDIA driver >= 580. A torch bump fails here until its CUDA major is added (and the base image
# follows it).
TORCH_WHEEL_CUDA_MAJOR = {"2.13.0": 13}


def instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, continuation lines joined, comments dropped."""
    text = re.sub(
        r"\\\n", " ", "\n".join(line for line in path.read_text().splitlines() if not line.lstrip().startswith("#"))
    )
    pairs = []
    for line in text.splitlines():
        if line.strip():
            word, _, rest = line.strip().partition(" ")
            pairs.append((word.upper(), rest.strip()))
    return pairs


@pytest.fixture(scope="module")
def dockerfile() -> list[tuple[str, str]]:
    return instructions(ROOT / "Dockerfile")


def only(dockerfile: list[tuple[str, str]], word: str) -> str:
    found = [rest for w, rest in dockerfile if w == word]
    assert len(found) == 1, f"expected one {word}, found {found}"
    return found[0]


def runs(dockerfile: list[tuple[str, str]]) -> str:
    return "\n".join(rest for w, rest in dockerfile if w == "RUN")


def lock_pins() -> dict[str, str]:
    lines = (ROOT / "requirements.lock").read_text().splitlines()
    return dict(line.lower().split("==", 1) for line in lines if "==" in line and not line.startswith("#"))


def lock_python() -> str:
    match = re.search(r"\(Python (\d+\.\d+),", (ROOT / "requirements.lock").read_text())
    assert match, "requirements.lock's header no longer says which Python it was made with"
    return match.group(1)


def test_base_image_cuda_major_is_the_locked_torch_wheels(dockerfile) -> None:
    base = only(dockerfile, "FROM")
    match = re.fullmatch(r"nvidia/cuda:(\d+)\.(\d+)\.(\d+)-(base|runtime|cudnn-runtime)-ubuntu(\d+\.\d+)", base)
    assert match, f"unexpected base image {base}"
    torch_pin = lock_pins()["torch"]
    assert torch_pin in TORCH_WHEEL_CUDA_MAJOR, f"add torch {torch_pin}'s wheel CUDA major (see the comment)"
    assert int(match.group(1)) == TORCH_WHEEL_CUDA_MAJOR[torch_pin]
    assert f"pip install torch=={torch_pin}" in runs(dockerfile)  # the image installs the locked torch


def test_python_is_the_locks(dockerfile) -> None:
    python = lock_python()
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert project["tool"]["ruff"]["target-version"] == "py" + python.replace(".", "")
    commands = runs(dockerfile)
    assert f"python{python}-venv" in commands and f"python{python} -m venv /opt/venv" in commands
    # No other interpreter makes the venv, and the packages go into that venv.
    assert re.findall(r"python3(?:\.\d+)? -m venv", commands) == [f"python{python} -m venv"]
    assert "PATH=/opt/venv/bin:$PATH" in " ".join(rest for w, rest in dockerfile if w == "ENV")
    assert "-c requirements.lock" in commands  # every other package at the lock's version


def exec_form(arguments: str) -> list[str]:
    value = json.loads(arguments)  # exec form is a JSON array: no shell in between to swallow SIGTERM
    assert isinstance(value, list) and all(isinstance(v, str) for v in value)
    return value


def test_sigterm_reaches_the_bot(dockerfile) -> None:
    assert exec_form(only(dockerfile, "ENTRYPOINT")) == ["/usr/bin/tini", "--"]  # PID 1 forwards, reaps
    assert "tini" in runs(dockerfile)
    assert exec_form(only(dockerfile, "CMD")) == ["emaki", "bot"]


def test_runs_as_a_non_root_user_that_collides_with_nothing(dockerfile) -> None:
    user = only(dockerfile, "USER")
    assert user not in ("root", "0") and not user.startswith("0:")
    [useradd] = [cmd for cmd in runs(dockerfile).split("&&") if "useradd" in cmd]
    words = shlex.split(useradd)
    assert words[-1] == user
    uid = int(words[words.index("--uid") + 1])
    assert uid >= 10000  # clear of system accounts, of Ubuntu 24.04's `ubuntu` (1000) and of the host's users
    # The bot's own files are only its data dir: code and libraries are installed as root, before USER.
    order = [w for w, _ in dockerfile]
    last_pip = max(i for i, (w, rest) in enumerate(dockerfile) if w == "RUN" and "pip install" in rest)
    assert order.index("USER") > last_pip


def test_healthcheck_is_a_light_command(dockerfile, tmp_path: Path) -> None:
    check = only(dockerfile, "HEALTHCHECK")
    options, _, command = check.partition("CMD ")
    assert "--start-period=" in options and "--interval=" in options
    argv = exec_form(command)
    assert argv[0] == "emaki"

    from bot.service import HEARTBEAT_FILE

    env = {k: v for k, v in os.environ.items() if not k.startswith("EMAKI_")}
    env |= {"PYTHONPATH": str(ROOT), "EMAKI_DATA_DIR": str(tmp_path)}
    probe = (
        "import sys\nfrom emaki.cli import main\nrc = main(sys.argv[1:])\n"
        "print('heavy:', [m for m in ('torch', 'discord', 'diffusers') if m in sys.modules])\nsys.exit(rc)"
    )

    def health() -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-c", probe, *argv[1:]], env=env, capture_output=True, text=True, timeout=60
        )

    missing = health()
    assert missing.returncode == 1  # Docker's "unhealthy" (it reserves 2)
    assert missing.stderr.startswith("unhealthy: no heartbeat in") and "heavy: []" in missing.stdout
    (tmp_path / HEARTBEAT_FILE).write_text(json.dumps({"at": time.time() - 5, "user": "emaki#0001", "guilds": 2}))
    fresh = health()
    assert fresh.returncode == 0 and fresh.stdout.startswith("healthy: connected as emaki#0001 to 2 server(s)")
    (tmp_path / HEARTBEAT_FILE).write_text(json.dumps({"at": time.time() - 600, "user": "emaki#0001"}))
    stale = health()
    assert stale.returncode == 1 and stale.stderr.startswith("unhealthy: last heartbeat 600 s ago")


def test_the_image_gets_the_code_and_never_the_secrets(dockerfile) -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    packages = {p.rstrip("*") for p in project["tool"]["setuptools"]["packages"]["find"]["include"]}
    copied = {rest.split()[0] for w, rest in dockerfile if w == "COPY"}
    assert packages <= copied and all((ROOT / path).exists() for path in copied if path != "./")
    ignored = (ROOT / ".dockerignore").read_text().splitlines()
    assert ".env" in ignored and ".git" in ignored and "data" in ignored


def test_compose_runs_the_bot_with_a_gpu_env_file_and_data_volume() -> None:
    compose = yaml.safe_load((ROOT / "compose.yaml").read_text())
    bot = compose["services"]["bot"]
    assert bot["build"] == "." and bot["env_file"] == ".env"
    [device] = bot["deploy"]["resources"]["reservations"]["devices"]
    assert device["driver"] == "nvidia" and device["capabilities"] == ["gpu"]
    [volume] = bot["volumes"]
    name, target = volume.split(":")
    assert target == "/data" == bot["environment"]["EMAKI_DATA_DIR"] and name in compose["volumes"]
    assert bot["stop_signal"] == "SIGTERM" and bot["stop_grace_period"] == "30s"
    assert "command" not in bot and "entrypoint" not in bot  # the image's tini + `emaki bot`
