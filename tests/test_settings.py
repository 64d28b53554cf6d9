from __future__ import annotations

from pathlib import Path

import pytest

from engine.errors import InvalidRequest
from engine.settings import load_settings


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
    config = tmp_path / "emaki.toml"
    config.write_text('discord_token = "from-file"\n')
    monkeypatch.setenv("DISCORD_TOKEN", "MTIz.secret.token")
    monkeypatch.setenv("HF_TOKEN", "hf_secret")
    settings = load_settings(config_file=config)
    assert settings.discord_token == "MTIz.secret.token" and settings.hf_token == "hf_secret"
    shown = repr(settings) + str(settings.public_dict())
    assert "secret" not in shown and "from-file" not in shown


@pytest.mark.parametrize(
    ("env", "message"),
    [({"EMAKI_PROFILE": "sdxl-turbo"}, "unknown profile 'sdxl-turbo'"), ({"EMAKI_STEPS": "many"}, "EMAKI_STEPS")],
)
def test_bad_settings_are_named(env: dict[str, str], message: str, monkeypatch: pytest.MonkeyPatch) -> None:
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    with pytest.raises(InvalidRequest, match=message):
        load_settings()
