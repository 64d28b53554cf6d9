"""Retention on a clock the test sets: old jobs lose their files and keep their rows; queued, running,
recent and unposted ones are spared; regenerating from a purged job says why. Then `/stats`."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from simcord.backend.errors import SetupError

from bot import actions, admin
from bot.client import EmakiBot
from emaki.cli import main
from engine.coordinator.requests import build_params
from engine.coordinator.retention import DAY_S, sweep
from engine.coordinator.worker import Engine, job_dir
from engine.errors import InvalidRequest
from engine.settings import load_settings
from tests import test_bot as base
from tests.test_bot import last_answer, results

bot_settings = base.bot_settings
simcord_bot = base.simcord_bot
world = base.world

NOW = 2_000_000_000.0  # the sweep's clock: a fixed instant, whatever the machine's time
OLD = NOW - 31 * DAY_S
RECENT = NOW - 1 * DAY_S
SMALL = dict(frames=2, steps=4, strength=0.5, width=32, height=32)


def render(engine: Engine, seed: int, **fields) -> int:
    """A finished tiny job, then its row set as the test needs (when it ended, where it was posted)."""
    params = build_params(engine.settings, engine.store, f"a fox {seed}", seed=seed, **{**SMALL, "interpolate": 1})
    job_id = engine.create_job(params)
    assert engine.store.job(job_id) is not None
    list(engine.run_to_end(job_id))
    engine.store.update_job(job_id, **fields)
    return job_id


def files_of(engine: Engine, job_id: int) -> list[Path]:
    return [p for p in job_dir(engine.settings, job_id).rglob("*") if p.is_file()]


def cache_files(engine: Engine) -> set[Path]:
    return set((engine.settings.data_dir / "inbetweens").glob("*.png"))


def test_sweep_deletes_old_files_keeps_rows_and_spares_what_is_waited_for(engine: Engine) -> None:
    store = engine.store
    cache_before_old = cache_files(engine)
    old_cli = render(engine, 1, finished_at=OLD)  # made by the CLI: nothing to post
    actions.mp4_of(engine.settings, store.job(old_cli), store.frames(old_cli))  # an MP4 made on request
    old_posted = render(engine, 2, finished_at=OLD, channel_id=7, posted=1, post_state="posted")
    old_cache = cache_files(engine) - cache_before_old  # one in-between per job (2 keyframes, 1 between)
    old_unposted = render(engine, 3, finished_at=OLD, channel_id=7, post_state="refused", posted=-1)
    recent = render(engine, 4, finished_at=RECENT)
    resumed = render(engine, 5, finished_at=OLD, status="running")  # an old failed job resumed right now
    queued = store.add_job(kind="animate", idea="waiting", params=store.job(recent)["params"], channel_id=7)
    old_failed = store.add_job(kind="animate", idea="broke", params=store.job(recent)["params"])
    store.update_job(old_failed, status="failed", finished_at=OLD, error="boom")
    job_dir(engine.settings, old_failed).mkdir(parents=True)
    (job_dir(engine.settings, old_failed) / "frame_01.png").write_bytes(b"half a frame")
    assert (job_dir(engine.settings, old_cli) / actions.MP4_FILE).is_file() and len(old_cache) == 2

    report = sweep(engine.settings, store, NOW)

    assert sorted(report.jobs) == sorted([old_cli, old_posted, old_failed])
    assert report.bytes_freed > 0 and report.cache_files == len(old_cache)
    for job_id in report.jobs:
        assert files_of(engine, job_id) == [] and not job_dir(engine.settings, job_id).exists()
        row = store.job(job_id)
        assert row["purged_at"] == NOW and row["purged_days"] == 30  # the row stays, and says so
    assert store.job(old_cli)["status"] == "done" and len(store.frames(old_cli)) == 2  # recipes stay
    assert not (old_cache & cache_files(engine))  # the old job's in-betweens went with it...
    assert cache_files(engine)  # ...the others' stay
    for spared in (old_unposted, recent, resumed):
        assert store.job(spared)["purged_at"] is None
        assert all(Path(r["path"]).is_file() for r in store.frames(spared))
    assert store.job(queued)["status"] == "queued" and store.job(queued)["purged_at"] is None
    assert sweep(engine.settings, store, NOW).jobs == []  # nothing twice

    with pytest.raises(InvalidRequest, match=rf"^job {old_cli}'s frames were deleted after 30 days"):
        engine.create_regeneration(old_cli, 0, reseed_all=True)
    assert store.jobs_where("parent_job_id is not null", []) == []  # nothing stored for it
    with pytest.raises(InvalidRequest, match="frames were deleted after 30 days"):
        actions.mp4_of(engine.settings, store.job(old_cli), store.frames(old_cli))


def test_keep_days_zero_keeps_everything_and_the_setting_is_checked(engine: Engine) -> None:
    job_id = render(engine, 6, finished_at=OLD)
    engine.settings.keep_days = 0
    assert sweep(engine.settings, engine.store, NOW + 3650 * DAY_S).jobs == []
    assert files_of(engine, job_id)
    assert load_settings(profile="tiny").keep_days == 30
    for bad in (-1, 40000, 1.5):
        with pytest.raises(InvalidRequest, match="keep_days must be"):
            load_settings(profile="tiny", keep_days=bad)


def test_cli_purge_and_redo_of_a_purged_job(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], shared_tiny_models
) -> None:
    monkeypatch.setattr("emaki.animate_cmd.load_models", lambda settings: shared_tiny_models)
    monkeypatch.setenv("EMAKI_PROFILE", "tiny")
    monkeypatch.setenv("EMAKI_DATA_DIR", str(tmp_path / "data"))
    monkeypatch.setenv("EMAKI_KEEP_DAYS", "7")
    monkeypatch.chdir(tmp_path)
    small = ["--frames", "1", "--steps", "2", "--width", "32", "--height", "32", "-q"]
    assert main(["animate", "an owl", "--out", "owl.gif", *small]) == 0
    assert main(["animate", "a newt", "--out", "newt.gif", *small]) == 0
    from engine.coordinator.store import open_store

    store = open_store(tmp_path / "data")
    store.update_job(1, finished_at=time.time() - 8 * DAY_S)
    capsys.readouterr()
    assert main(["jobs", "--purge"]) == 0
    out = capsys.readouterr().out
    assert "deleted the files of 1 job(s) finished more than 7 days ago" in out and out.rstrip().endswith(": 1")
    assert (tmp_path / "owl.gif").is_file()  # the user's own output is theirs: never touched
    assert main(["jobs"]) == 0
    assert "done (files deleted)" in capsys.readouterr().out
    assert main(["redo", "1", "--from", "1"]) == 2
    assert capsys.readouterr().err.strip() == (
        "error: job 1's frames were deleted after 7 days (the bot keeps files for a while only): start a new one"
    )
    assert main(["redo", "2", "--from", "1", "--out", "newt2.gif"]) == 0  # the recent one still redoes


# --- in the bot ---------------------------------------------------------------------------------
simcord = pytest.mark.simcord(settle_timeout=120)


def bot_of(env) -> EmakiBot:
    return env.bot


@simcord
async def test_regenerating_a_purged_result_says_so_everywhere(world) -> None:
    env, channel, alice, bob = world.env, world.channel, world.alice, world.bob
    await alice.slash(channel, "animate", prompt="a windmill turns", frames=2, seed=4)
    [posted] = results(channel)
    bot = bot_of(env)
    report = await admin.sweep(bot, at=time.time() + 29 * DAY_S)
    assert report.jobs == []  # not old enough yet
    report = await admin.sweep(bot, at=time.time() + 31 * DAY_S)
    assert report.jobs == [1] and not job_dir(bot.settings, 1).exists()

    line = "job 1's frames were deleted after 30 days"
    clicked = await bob.click(posted, label="Reroll")
    assert clicked.ephemeral and line in clicked.response.content
    picked = await alice.select(posted, ["2"])
    assert picked.ephemeral and line in picked.response.content
    mp4 = await alice.click(posted, label="MP4")
    assert mp4.ephemeral and line in last_answer(mp4)
    await bob.react(posted, "🔁")  # reactions have no ephemeral reply: a short mention of bob alone
    assert line in channel.last_message.content and channel.last_message.content.startswith(f"<@{bob.id}>")
    details = await bob.click(posted, label="Details")  # the recipe is still in the rows
    assert "Files deleted after 30 days" in details.response.content and "1. seed `" in details.response.content
    assert bot.store.jobs_where("id > 1", []) == []  # nothing was queued
    await alice.click(posted, label="Delete")  # the post itself can still go
    assert results(channel) == []


@simcord
async def test_stats_for_admins_only(world) -> None:
    env, channel, alice, mod = world.env, world.channel, world.alice, world.mod
    await alice.slash(channel, "animate", prompt="a crane lands", frames=1)
    await mod.slash(channel, "pause")
    await alice.slash(channel, "animate", prompt="a crane waits", frames=1)
    shown = await mod.slash(channel, "stats")
    text = last_answer(shown)
    assert shown.ephemeral
    assert "**Queue** 1 waiting · 0 running" in text
    assert "**Jobs today** (UTC) 2 · 2 from this server" in text
    assert "**Median job time**" in text and "(last 1 finished jobs)" in text
    assert "**Disk used by emaki**" in text and "files kept 30 days" in text
    device = bot_of(env).engine.models.device
    if device.type == "cuda":
        import torch

        assert f"**GPU** {torch.cuda.get_device_name(device)}" in text
    else:
        assert "**GPU** CPU" in text
    assert "**Workers**" not in text  # in-process: no cluster workers to list
    # Cluster mode's renderers, as the coordinator records them, are listed too.
    bot_of(env).store.put_worker("renderer-0", node="10.0.0.7", gpu="0", state="busy", job_id=2, updated_at=0.0)
    text = last_answer(await mod.slash(channel, "stats"))
    assert "**Workers** 1" in text and "`renderer-0` 10.0.0.7 GPU 0 · busy · job #2" in text
    assert "stats" not in alice.available_commands(channel) and "stats" in mod.available_commands(channel)
    with pytest.raises(SetupError):
        await alice.slash(channel, "stats")
