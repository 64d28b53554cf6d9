from __future__ import annotations

from pathlib import Path

import pytest
import torch

from engine.errors import InvalidRequest
from engine.settings import SCHEDULER_NAMES, Settings, load_settings


def test_env_over_toml_over_profile(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    config = tmp_path / "emaki.toml"
    config.write_text('profile = "tiny"\nsteps = 20\nframes = 7\nbase_model = "/models/sd15"\n')
    monkeypatch.setenv("EMAKI_CONFIG", str(config))
    monkeypatch.setenv("EMAKI_STEPS", "30")
    settings = load_settings()
    assert settings.profile == "tiny" and settings.steps == 30 and settings.frames == 7
    assert settings.base_model == "/models/sd15" and settings.controlnet_model == "tiny"
    assert settings.width == 64  # profile default


def test_secrets_from_env_only_and_never_shown(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DISCORD_TOKEN", "MTIz.secret.token")
    monkeypatch.setenv("HF_TOKEN", "hf_secret")
    settings = load_settings()
    assert settings.discord_token == "MTIz.secret.token" and settings.hf_token == "hf_secret"
    shown = repr(settings) + str(settings.public_dict())
    assert "secret" not in shown


def test_a_secret_in_the_config_file_is_refused_without_echoing_it(tmp_path: Path) -> None:
    config = tmp_path / "emaki.toml"
    config.write_text('discord_token = "from-file-MTIz"\nsteps = 20\n')
    with pytest.raises(InvalidRequest, match="secrets belong in the environment") as info:
        load_settings(config_file=config)
    assert "DISCORD_TOKEN" in str(info.value) and "from-file" not in str(info.value)


NO_CUDA = not torch.cuda.is_available()
BAD_SETTINGS = [
    # (TOML text, env, keyword overrides, expected message part)
    ('steps = "abc"', {}, {}, "steps must be a whole number (got 'abc')"),
    ("frames = 2.5", {}, {}, "frames must be a whole number (got 2.5)"),
    ("data_dir = 5", {}, {}, "data_dir must be a folder path (got 5)"),
    ('color_coherence = "no"', {}, {}, "color_coherence must be true or false (got 'no')"),
    ("strength = nan", {}, {}, "strength must be a finite number"),
    ("steps = 151", {}, {}, "steps must be between 1 and 150 (got 151)"),
    ("strength = 0", {}, {}, "strength must be above 0 and at most 1"),
    ("guidance = -1", {}, {}, "guidance must be between 0 and 30"),
    ('llm_base_url = "localhost:8000"', {}, {}, "llm_base_url must be an http(s)://"),
    ("nonsense = 1", {}, {}, "unknown keys in config file"),
    ("steps = ", {}, {}, "cannot read config file"),
    ("frames = 17", {}, {}, "frames must be between 1 and max_frames (16)"),
    ("width = 60", {}, {"profile": "tiny"}, "width must be a multiple of 8 between 32 and 256"),
    ("", {"EMAKI_COLOR_COHERENCE": "maybe"}, {}, "EMAKI_COLOR_COHERENCE='maybe': color_coherence must be true"),
    ("", {"EMAKI_SCHEDULER": "bogus"}, {}, "EMAKI_SCHEDULER='bogus': unknown scheduler 'bogus': use default, dpm++"),
    ("", {"EMAKI_STEPS": "many"}, {}, "EMAKI_STEPS='many': steps must be a whole number"),
    ("", {"EMAKI_PROFILE": "sdxl-turbo"}, {}, "unknown profile 'sdxl-turbo'"),
    ("", {"EMAKI_DTYPE": "fp8"}, {}, "unknown dtype 'fp8'"),
    ("", {"EMAKI_MAX_PENDING_PER_MEMBER": "0"}, {}, "max_pending_per_member must be between 1 and 1000"),
    ("", {}, {"device": "bogus"}, "unknown device 'bogus': use auto, cpu, mps, cuda or cuda:N"),
    ("", {}, {"story_backend": "bogus"}, "--story-backend: unknown story_backend 'bogus'"),
    ("", {}, {"data_dir": "pyproject.toml"}, "data_dir pyproject.toml is a file, not a folder"),
]
if NO_CUDA:
    BAD_SETTINGS.append(("", {}, {"device": "cuda"}, "device cuda is not available: torch sees no CUDA device"))


@pytest.mark.parametrize(("toml", "env", "overrides", "message"), BAD_SETTINGS, ids=[b[3] for b in BAD_SETTINGS])
def test_bad_settings_are_named_with_their_source(
    toml: str, env: dict[str, str], overrides: dict[str, str], message: str, tmp_path: Path, monkeypatch
) -> None:
    monkeypatch.chdir(Path(__file__).parent.parent)  # where pyproject.toml is a file
    config = tmp_path / "emaki.toml"
    config.write_text(toml + "\n")
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    with pytest.raises(InvalidRequest) as info:
        load_settings(config_file=config, **overrides)
    assert message in str(info.value)
    cross_field = ("unknown keys", "cannot read", "max_frames", "multiple of 8")  # about the whole file
    if toml.strip() and not any(part in message for part in cross_field):
        assert str(config) in str(info.value)  # which file to fix


def test_env_booleans_and_direct_construction_are_checked(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("EMAKI_COLOR_COHERENCE", "off")
    assert load_settings().color_coherence is False
    with pytest.raises(InvalidRequest, match="steps must be between 1 and 150"):
        Settings(steps=0)  # the bot and the trainer build Settings too: the same checks apply


def test_scheduler_choices_match_the_models_table() -> None:
    from engine.render.models import SCHEDULERS

    assert set(SCHEDULER_NAMES) == {"default", *SCHEDULERS}
