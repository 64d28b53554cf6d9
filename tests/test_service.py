"""`emaki bot` as a service: a bad token is one line and exit 2 before any model loads, trivial commands
never import torch, and SIGTERM mid-render stops cleanly with the job resumed (once) at the next start."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace

import discord
import pytest
from aiohttp import web

from bot.client import EmakiBot, create_bot
from bot.service import check_token, stop_signals
from engine.errors import InvalidRequest
from engine.events import FrameDone
from engine.models import Models
from engine.settings import Settings, load_settings
from engine.store import open_store

ROOT = Path(__file__).resolve().parent.parent
# Shaped like a bot token (id.timestamp.hmac), but no Discord ever issued it.
WELL_SHAPED = "MTIzNDU2Nzg5MDEyMzQ1Njc4OTA.GAbCdE.abcdefghijklmnopqrstuvwxyz0123456789AB"

# Runs `emaki` in a fresh interpreter, then reports which heavy libraries it imported (on stderr's last line).
PROBE = """
import json, sys
from emaki.cli import main
try:
    rc = main(sys.argv[1:])
except SystemExit as exc:
    rc = exc.code
heavy = [m for m in ("torch", "diffusers", "transformers") if m in sys.modules]
print(json.dumps({"rc": rc, "heavy": heavy}), file=sys.stderr)
"""


def emaki(args: list[str], env: dict[str, str], cwd: Path, timeout: float = 120) -> SimpleNamespace:
    """`emaki ARGS` in a subprocess: its exit code, stdout, stderr lines (less the probe's) and the heavy
    libraries it imported."""
    full = {k: v for k, v in os.environ.items() if not k.startswith("EMAKI_") and k != "DISCORD_TOKEN"}
    full |= {"PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"} | env
    done = subprocess.run(
        [sys.executable, "-c", PROBE, *args], env=full, cwd=cwd, capture_output=True, text=True, timeout=timeout
    )
    *err, last = done.stderr.strip().splitlines() or [""]
    report = json.loads(last)
    return SimpleNamespace(rc=report["rc"], heavy=report["heavy"], out=done.stdout, err=err)


# --- the token, checked before any model loads -------------------------------------------------------
@pytest.mark.parametrize("token", ["garbage", "Bot " + WELL_SHAPED, "a.b.c", WELL_SHAPED.replace(".", "")])
def test_malformed_token_is_refused_locally(token: str) -> None:
    with pytest.raises(InvalidRequest) as refused:
        check_token(token)
    assert token not in str(refused.value)  # a secret is never echoed back


def test_a_well_shaped_token_passes_the_local_check() -> None:
    assert check_token(f"  {WELL_SHAPED}\n") == WELL_SHAPED  # as pasted from a file or a shell


@pytest.mark.parametrize(
    ("token", "expected"),
    [
        ("", "error: DISCORD_TOKEN is not set: create a bot at https://discord.com/developers/applications"),
        ("garbage", "error: DISCORD_TOKEN is not a Discord bot token (7 characters; a bot token is three"),
    ],
)
def test_missing_or_garbage_token_is_one_line_without_torch(tmp_path: Path, token: str, expected: str) -> None:
    run = emaki(["bot", "--profile", "tiny"], {"DISCORD_TOKEN": token, "EMAKI_DATA_DIR": str(tmp_path)}, tmp_path)
    assert run.rc == 2 and len(run.err) == 1 and run.err[0].startswith(expected), run.err
    assert run.heavy == [] and run.out == ""
    assert not (tmp_path / "emaki.db").exists()  # refused before the store was opened


class FakeDiscordRest:
    """A local HTTP server standing in for Discord's REST API, answering GET /users/@me with `status`."""

    def __init__(self, status: int) -> None:
        self.status = status
        self.requests: list[tuple[str, str | None]] = []
        self.port = free_port()
        self.ready = threading.Event()
        self.loop: asyncio.AbstractEventLoop | None = None

    async def answer(self, request: web.Request) -> web.Response:
        self.requests.append((request.path, request.headers.get("Authorization")))
        body = {"message": "401: Unauthorized", "code": 0} if self.status == 401 else {"message": "nope", "code": 0}
        return web.json_response(body, status=self.status)

    def serve(self) -> None:
        async def main() -> None:
            app = web.Application()
            app.router.add_route("*", "/{tail:.*}", self.answer)
            runner = web.AppRunner(app)
            await runner.setup()
            await web.TCPSite(runner, "127.0.0.1", self.port).start()
            self.stopped = asyncio.Event()
            self.loop = asyncio.get_running_loop()
            self.ready.set()
            await self.stopped.wait()
            await runner.cleanup()

        asyncio.run(main())

    def __enter__(self) -> FakeDiscordRest:
        self.thread = threading.Thread(target=self.serve, daemon=True)
        self.thread.start()
        assert self.ready.wait(10)
        return self

    def __exit__(self, *exc: object) -> None:
        assert self.loop is not None
        self.loop.call_soon_threadsafe(self.stopped.set)
        self.thread.join(10)

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.port}/api/v10"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_token_discord_rejects_is_one_line_and_exit_2_before_any_model_loads(tmp_path: Path) -> None:
    with FakeDiscordRest(401) as discord_api:
        env = {
            "DISCORD_TOKEN": WELL_SHAPED,
            "EMAKI_DATA_DIR": str(tmp_path),
            "EMAKI_DISCORD_API_BASE": discord_api.base,
        }
        run = emaki(["bot", "--profile", "tiny"], env, tmp_path)
    assert run.rc == 2, run.err
    assert run.err == [
        "error: Discord refused DISCORD_TOKEN (401 Unauthorized): it was reset or mistyped; copy the current "
        "token from the Bot page of your application at https://discord.com/developers/applications"
    ]
    assert discord_api.requests == [("/api/v10/users/@me", f"Bot {WELL_SHAPED}")]  # asked once, really
    assert run.heavy == [] and WELL_SHAPED not in run.out + "".join(run.err)
    assert not (tmp_path / "emaki.db").exists()


def test_unreachable_discord_is_one_line_and_exit_2(tmp_path: Path) -> None:
    closed = f"http://127.0.0.1:{free_port()}/api/v10"  # nothing listens there: connection refused
    env = {"DISCORD_TOKEN": WELL_SHAPED, "EMAKI_DATA_DIR": str(tmp_path), "EMAKI_DISCORD_API_BASE": closed}
    run = emaki(["bot", "--profile", "tiny"], env, tmp_path)
    assert run.rc == 2 and len(run.err) == 1, run.err
    assert run.err[0].startswith(f"error: cannot reach Discord at {closed}: Cannot connect to host 127.0.0.1")
    assert run.heavy == []


# --- trivial commands never import torch ----------------------------------------------------------------
def test_trivial_commands_do_not_import_torch(tmp_path: Path, settings: Settings) -> None:
    from engine.worker import holding_job_lock

    store = open_store(settings.data_dir)  # jobs to list: one done, one left running by a crash
    for idea in ("a fox runs", "an owl sleeps"):
        store.add_job(kind="animate", idea=idea, params={"frames": 1})
    store.update_job(1, status="done")
    store.update_job(2, status="running")
    with holding_job_lock(settings.data_dir, 2):
        pass  # its lock file exists and is free: `emaki jobs` must look at it to say "interrupted"
    env = {"EMAKI_DATA_DIR": str(settings.data_dir), "EMAKI_PROFILE": "tiny"}
    jobs = emaki(["jobs"], env, tmp_path)
    assert jobs.rc == 0 and jobs.heavy == [], jobs.err
    assert [line.split("\t")[:2] for line in jobs.out.splitlines()[1:]] == [["2", "interrupted"], ["1", "done"]]
    for args in (["styles"], ["--help"], ["jobs", "--help"]):
        run = emaki(args, env, tmp_path)
        assert run.rc == 0 and run.heavy == [] and run.out, (args, run.err)


# --- SIGTERM mid-render ---------------------------------------------------------------------------------
@pytest.fixture
def bot_settings(tmp_path: Path) -> Settings:
    return load_settings(
        profile="tiny",
        data_dir=tmp_path / "data",
        steps=4,
        strength=0.5,
        progress_edit_interval_s=0.0,
        position_edit_interval_s=0.0,
    )


@pytest.fixture
def simcord_bot(bot_settings: Settings, shared_tiny_models: Models) -> EmakiBot:
    shared_tiny_models.use_style(None)
    bot = create_bot(bot_settings, models=shared_tiny_models)
    bot.post_retry_delays = (0.01, 0.01)
    bot.outbox.retry_base_s = 0.01
    return bot


def results(channel) -> list[discord.Message]:
    return [m for m in channel.history() if m.attachments and m.attachments[0].filename.endswith(".gif")]


def signal_after_first_frame(bot: EmakiBot, signum: int) -> None:
    """The process gets a real `signum` right after the job's first frame is stored; the render thread
    then waits until the bot's handler has run, so the stop lands mid-render, never after the last frame."""
    real_run = bot.engine.run

    def run(job_id: int, *args: object, **kwargs: object) -> Iterator[object]:
        for event in real_run(job_id, *args, **kwargs):
            yield event
            if isinstance(event, FrameDone) and event.index == 0:
                os.kill(os.getpid(), signum)
                assert bot.engine.stopping.wait(30), "the stop signal never reached the bot"

    bot.engine.run = run  # type: ignore[method-assign]


@pytest.mark.simcord(settle_timeout=120)
@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
async def test_signal_mid_render_stops_cleanly_and_the_job_resumes_exactly_once(
    simcord_env, bot_settings: Settings, shared_tiny_models: Models, signum: int
) -> None:
    env = simcord_env
    guild = env.create_guild("ghibli fans")
    channel = guild.create_text_channel("animations")
    alice = guild.add_member(env.create_user("alice"))
    bot: EmakiBot = env.bot
    signal_after_first_frame(bot, signum)
    with stop_signals(bot) as stop:
        await alice.slash(channel, "animate", prompt="a lantern floats up", frames=3, seed=6)
        assert stop.is_set()
        await bot.shutdown(grace_s=5)
    assert bot.is_closed()

    job = bot.store.job(1)
    assert job["status"] == "running" and job["error"] is None  # not cancelled, not failed: as after a crash
    frames = bot.store.frames(1)
    assert [bool(f["path"]) for f in frames] == [True, False, False]  # stopped at the step after frame 1
    first = Path(frames[0]["path"]).read_bytes()
    assert results(channel) == []

    await env.restart_bot(create_bot(bot_settings, models=shared_tiny_models))  # the next start
    restarted: EmakiBot = env.bot
    job = restarted.store.job(1)
    assert job["status"] == "done" and job["post_state"] == "posted"
    [posted] = results(channel)  # 0 lost, 0 doubled
    assert posted.attachments[0].filename == "emaki-1.gif" and posted.id == job["result_message_id"]
    assert Path(restarted.store.frames(1)[0]["path"]).read_bytes() == first  # resumed, not redone
    assert len(restarted.store.recent_jobs(10)) == 1


# --- `emaki jobs` says where each result stands in Discord ------------------------------------------
@pytest.mark.simcord(settle_timeout=120)
async def test_jobs_shows_a_result_discord_refused(
    simcord_env, bot_settings: Settings, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from emaki.cli import main

    env = simcord_env
    guild = env.create_guild("ghibli fans")
    channel = guild.create_text_channel("animations")
    alice = guild.add_member(env.create_user("alice"))
    await alice.slash(channel, "animate", prompt="a windmill turns", frames=1, seed=2)
    env.inject_error("POST", "/channels/*/messages", status=403, code=50013, message="Missing Permissions", times=None)
    await alice.slash(channel, "animate", prompt="rain on a pond", frames=1, seed=3)
    assert results(channel) != [] and env.bot.store.job(2)["post_state"] == "refused"

    monkeypatch.setenv("EMAKI_DATA_DIR", str(bot_settings.data_dir))
    capsys.readouterr()
    assert main(["jobs", "--profile", "tiny"]) == 0
    rows = [line.split("\t") for line in capsys.readouterr().out.splitlines()]
    assert rows[0][:3] == ["id", "status", "post"]
    assert [row[:3] for row in rows[1:]] == [
        ["2", "done", "refused: 403 Missing Permissions"],  # stranded: not a plain `done`
        ["1", "done", "posted"],
    ]
