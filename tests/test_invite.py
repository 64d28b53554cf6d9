"""`emaki invite` and the permission list it reads: the URL, its one-line errors, and a job that goes
through in a channel where the bot holds exactly those permissions (SimCord enforces channel overwrites)."""

from __future__ import annotations

import base64
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import discord
import pytest

from bot.permissions import BOT_PERMISSIONS, SCOPES, bot_permissions
from emaki.cli import main
from engine.settings import Settings, load_settings
from tests import test_bot

APP_ID = 1234567890123456789


def token_for(user_id: int) -> str:
    # The shape of a bot token: base64(user id) . timestamp . HMAC (only the first part is read).
    return base64.urlsafe_b64encode(str(user_id).encode()).decode().rstrip("=") + ".GhJkLm.secret-part_xyz"


def invite(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(["invite", *argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_url_has_the_scopes_and_exactly_the_listed_permissions(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = invite(capsys, "--application-id", str(APP_ID))
    assert code == 0 and err == ""
    url = urlsplit(out.strip())
    assert (url.scheme, url.netloc, url.path) == ("https", "discord.com", "/oauth2/authorize")
    query = parse_qs(url.query)
    assert query["client_id"] == [str(APP_ID)]
    assert query["scope"] == [" ".join(SCOPES)] == ["bot applications.commands"]
    granted = discord.Permissions(int(query["permissions"][0]))
    assert all(getattr(granted, p.flag) for p in BOT_PERMISSIONS)
    assert granted.value.bit_count() == len(BOT_PERMISSIONS)  # and nothing else
    # View Channels, Send Messages, Attach Files, Read Message History, Add Reactions; no Manage Messages.
    assert granted.value == 101440 and not granted.manage_messages


def test_application_id_comes_from_the_token_and_the_token_is_never_printed(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("DISCORD_TOKEN", token_for(APP_ID))
    code, out, err = invite(capsys, "-v")
    assert code == 0 and f"client_id={APP_ID}&" in out
    assert all(f"{p.label}: {p.why}" in out for p in BOT_PERMISSIONS)  # -v says why each one is asked for
    assert "secret-part" not in out + err and "GhJkLm" not in out + err
    # An explicit id wins over the token's.
    code, out, _ = invite(capsys, "--application-id", "42")
    assert code == 0 and "client_id=42&" in out


@pytest.mark.parametrize("bad", ["abc", "-5", "0", "12.5", "１２３", str(2**64), ""])
def test_an_invalid_application_id_is_one_error_line(capsys: pytest.CaptureFixture[str], bad: str) -> None:
    code, out, err = invite(capsys, "--application-id", bad)
    assert code == 2 and out == ""
    assert err.count("\n") == 1 and err.startswith("error: application id must be a Discord id")


def test_no_id_and_a_token_that_is_not_one_are_one_error_line(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    code, out, err = invite(capsys)
    assert (code, out) == (2, "") and err.startswith("error: no application id: pass --application-id")
    monkeypatch.setenv("DISCORD_TOKEN", "not-a-token!.x.y")
    code, out, err = invite(capsys)
    assert (code, out) == (2, "") and err.count("\n") == 1
    assert err.startswith("error: DISCORD_TOKEN does not look like a bot token") and "not-a-token" not in err


# --- the bot with exactly these permissions -------------------------------------------------------


@pytest.fixture
def bot_settings(tmp_path: Path) -> Settings:
    return load_settings(
        profile="tiny",
        data_dir=tmp_path / "data",
        steps=2,
        strength=0.5,
        progress_edit_interval_s=0.0,
        position_edit_interval_s=0.0,
    )


simcord_bot = test_bot.simcord_bot  # the same bot over the shared tiny models, with these settings


def only(allowed: discord.Permissions) -> discord.PermissionOverwrite:
    """An overwrite that leaves the bot `allowed` and nothing else in the channel."""
    return discord.PermissionOverwrite.from_pair(
        allowed, discord.Permissions(discord.Permissions.all().value & ~allowed.value)
    )


@pytest.mark.simcord(settle_timeout=120)
async def test_a_job_goes_through_with_exactly_the_listed_permissions(simcord_env) -> None:
    guild = simcord_env.create_guild("minimal")
    alice = guild.add_member(simcord_env.create_user("alice"))
    channel = guild.create_text_channel("animations", overwrites={guild.me: only(bot_permissions())})
    await alice.slash(channel, "animate", prompt="a paper boat drifts downstream", frames=1, seed=3)
    [result] = [m for m in channel.history() if m.attachments and m.attachments[0].filename.endswith(".gif")]
    assert [str(r.emoji) for r in result.reactions] == ["🔁", "1️⃣", "❌"]
    # The requester's ❌ removes the result: the bot deletes its own post, which needs no Manage Messages.
    await alice.react(result, "❌")
    assert all(m.id != result.id for m in channel.history())

    # Without Send Messages the same job cannot be posted: SimCord enforces the overwrite, so the run above
    # shows the list is enough rather than that nothing is checked. (SimCord checks Send Messages, Read
    # Message History and Add Reactions on these routes; Attach Files it does not check on a plain send,
    # which Discord does.)
    lacking = discord.Permissions(bot_permissions().value)
    lacking.send_messages = False
    bare = guild.create_text_channel("read-only", overwrites={guild.me: only(lacking)})
    await alice.slash(bare, "animate", prompt="a paper boat drifts upstream", frames=1, seed=4)
    assert not [m for m in bare.history() if m.attachments]
    job = simcord_env.bot.store.job(2)
    assert job["status"] == "done" and job["posted"] != 1 and job["post_state"] != "posted"
