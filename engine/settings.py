"""One settings object for CLI, bot and trainer: env vars `EMAKI_*` over an optional TOML file.

Precedence (highest first): explicit keyword overrides, environment, TOML file, profile defaults.
Secrets (Discord token, HF token, LLM API key) are read from the environment only and never printed.
"""

from __future__ import annotations

import dataclasses
import os
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from engine.errors import InvalidRequest

PROFILES: dict[str, dict[str, Any]] = {
    "sd15": {
        "base_model": "stable-diffusion-v1-5/stable-diffusion-v1-5",
        "controlnet_model": "lllyasviel/sd-controlnet-depth",
        "depth_model": "Intel/dpt-hybrid-midas",
        "llm_model": "mistralai/Mistral-7B-Instruct-v0.3",
        "captioner_model": "Salesforce/blip-image-captioning-large",
        "width": 512,
        "height": 512,
        "min_size": 256,
        "max_size": 1024,
    },
    # Random-weight models built in-process from tiny configs (engine/tiny.py): no download,
    # the real pipeline code end to end, seconds on a CPU.
    "tiny": {
        "base_model": "tiny",
        "controlnet_model": "tiny",
        "depth_model": "tiny",
        "llm_model": "tiny",
        "captioner_model": "tiny",
        "width": 64,
        "height": 64,
        "min_size": 32,
        "max_size": 256,
    },
}

SECRET_FIELDS = ("discord_token", "hf_token", "llm_api_key")


@dataclass
class Settings:
    profile: str = "sd15"
    base_model: str = ""
    controlnet_model: str = ""
    depth_model: str = ""
    llm_model: str = ""
    captioner_model: str = ""  # BLIP, as the Ghibli paper captioned its dataset
    # auto: HF Inference API when an HF token is set, else OpenAI-compatible when llm_base_url is
    # set, else the deterministic fallback. Explicit: hf | openai | transformers | fallback.
    story_backend: str = "auto"
    llm_base_url: str = ""
    hf_inference_url: str = ""  # override the Inference API endpoint (a proxy, or tests)
    llm_timeout_s: float = 60.0
    device: str = "auto"
    dtype: str = "auto"
    scheduler: str = "default"
    data_dir: Path = Path("data")
    # Animation defaults: the Ghibli paper's parameters.
    frames: int = 5
    width: int = 0
    height: int = 0
    min_size: int = 0
    max_size: int = 0
    steps: int = 50
    guidance: float = 8.5
    strength: float = 0.15
    controlnet_scale: float = 1.0
    negative_prompt: str = "lowres, blurry, deformed, watermark, text, jpeg artifacts"
    frame_duration_ms: int = 100
    color_coherence: bool = True
    max_frames: int = 16
    max_idea_chars: int = 500
    min_free_bytes: int = 200 * 1024 * 1024
    upload_limit_bytes: int = 10 * 1024 * 1024
    # Bot
    discord_api_base: str = ""
    discord_gateway: str = ""
    max_pending_per_member: int = 3
    moderator_role: str = ""
    progress_edit_interval_s: float = 1.5
    position_edit_interval_s: float = 5.0  # a waiting member's position message: at most this often
    # Training
    min_dataset_images: int = 5
    max_dataset_bytes: int = 200 * 1024 * 1024
    max_dataset_files: int = 2000
    max_image_pixels: int = 4096 * 4096
    eval_samples: int = 100  # the anime paper's 100 generated images
    train_checkpoint_every: int = 100  # also where a training gives way to waiting animations
    # Secrets: environment only.
    discord_token: str = field(default="", repr=False)
    hf_token: str = field(default="", repr=False)
    llm_api_key: str = field(default="", repr=False)

    def __post_init__(self) -> None:
        if self.profile not in PROFILES:
            raise InvalidRequest(f"unknown profile '{self.profile}': choose one of {', '.join(PROFILES)}")
        for key, value in PROFILES[self.profile].items():
            if not getattr(self, key):
                setattr(self, key, value)
        self.data_dir = Path(self.data_dir).expanduser()

    @property
    def is_tiny(self) -> bool:
        return self.profile == "tiny"

    def public_dict(self) -> dict[str, Any]:
        """Settings without secrets, for logs and sidecars."""
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        for name in SECRET_FIELDS:
            out.pop(name)
        out["data_dir"] = str(self.data_dir)
        return out


def _coerce(raw: str, annotation: str) -> Any:
    if annotation == "int":
        return int(raw)
    if annotation == "float":
        return float(raw)
    if annotation == "bool":
        return raw.strip().lower() in ("1", "true", "yes", "on")
    if annotation == "Path":
        return Path(raw)
    return raw


def load_settings(config_file: str | Path | None = None, **overrides: Any) -> Settings:
    """Build settings from TOML (EMAKI_CONFIG or `config_file`), `EMAKI_*` env and overrides."""
    values: dict[str, Any] = {}
    path = config_file or os.environ.get("EMAKI_CONFIG")
    if path:
        try:
            values.update(tomllib.loads(Path(path).read_text()))
        except (OSError, tomllib.TOMLDecodeError) as exc:
            raise InvalidRequest(f"cannot read config file {path}: {exc}") from exc
    known = {f.name: f for f in dataclasses.fields(Settings)}
    unknown = set(values) - set(known) - set(SECRET_FIELDS)
    if unknown:
        raise InvalidRequest(f"unknown keys in config file {path}: {', '.join(sorted(unknown))}")
    for name, fld in known.items():
        if name in SECRET_FIELDS:
            values.pop(name, None)  # secrets never come from a file that may be committed
            continue
        env = os.environ.get(f"EMAKI_{name.upper()}")
        if env is not None and env != "":
            try:
                values[name] = _coerce(env, str(fld.type))
            except ValueError as exc:
                raise InvalidRequest(f"EMAKI_{name.upper()}={env!r} is not a valid {fld.type}") from exc
    values["discord_token"] = os.environ.get("DISCORD_TOKEN", "")
    values["hf_token"] = os.environ.get("HF_TOKEN") or os.environ.get("HUGGING_FACE_HUB_TOKEN", "")
    values["llm_api_key"] = os.environ.get("EMAKI_LLM_API_KEY", "")
    values.update({k: v for k, v in overrides.items() if v is not None})
    return Settings(**values)
