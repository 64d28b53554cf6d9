"""Models as they come (hub cache, folder, single file, fp16 variant), `emaki models`, memory modes, quiet output.

The hub cache here is real in layout (`models--org--name/{blobs,refs,snapshots}`, snapshot files linked to
blobs, checked with huggingface_hub's own `scan_cache_dir`) and holds real saved models: the narrow SD1.5
pipeline of tests/sd15_layout.py, its ControlNet and a tiny DPT.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import subprocess
import sys
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlparse

import numpy as np
import pytest
import torch
from huggingface_hub import scan_cache_dir
from safetensors.torch import save_file

from emaki.cli import main
from engine.errors import InvalidRequest, ModelLoadError, ResourceError
from engine.render import memory, model_files, tiny, tiny_video
from engine.render.models import Models, load_base_model
from engine.settings import PROFILES, Settings, load_settings
from tests.sd15_layout import SD15Models, ldm_checkpoint, put_in_hub_cache, save_sd15_pipeline, sd15_models

SD15_REPO = PROFILES["sd15"]["base_model"]
ROOT = Path(__file__).resolve().parent.parent

# The file list of the real `stable-diffusion-v1-5/stable-diffusion-v1-5` repo (weights and configs).
SD15_REPO_FILES = [
    "model_index.json",
    "v1-5-pruned.ckpt",
    "v1-5-pruned.safetensors",
    "v1-5-pruned-emaonly.safetensors",
    "feature_extractor/preprocessor_config.json",
    "safety_checker/config.json",
    "safety_checker/model.safetensors",
    "safety_checker/model.fp16.safetensors",
    "safety_checker/pytorch_model.bin",
    "scheduler/scheduler_config.json",
    "text_encoder/config.json",
    "text_encoder/model.safetensors",
    "text_encoder/model.fp16.safetensors",
    "text_encoder/pytorch_model.bin",
    "tokenizer/merges.txt",
    "tokenizer/special_tokens_map.json",
    "tokenizer/tokenizer_config.json",
    "tokenizer/vocab.json",
    "unet/config.json",
    "unet/diffusion_pytorch_model.safetensors",
    "unet/diffusion_pytorch_model.fp16.safetensors",
    "unet/diffusion_pytorch_model.bin",
    "vae/config.json",
    "vae/diffusion_pytorch_model.safetensors",
    "vae/diffusion_pytorch_model.fp16.safetensors",
    "vae/diffusion_pytorch_model.bin",
    "README.md",
    "v1-inference.yaml",
]


# --- fixtures ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def sd15() -> SD15Models:
    """A private copy of the narrow SD1.5 models: other modules may add adapters to the shared one."""
    return sd15_models()


@pytest.fixture(scope="module")
def hub(sd15: SD15Models, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Saved models: the base pipeline with full and fp16 weights, a ControlNet, a tiny DPT, a tiny BLIP,
    a single-file checkpoint; and a hub cache holding the base pipeline under the profile's repo id."""
    root = tmp_path_factory.mktemp("models")
    base = save_sd15_pipeline(sd15, root / "base")
    save_sd15_pipeline(sd15, root / "base", variant="fp16")
    sd15.controlnet.save_pretrained(str(root / "controlnet"), safe_serialization=True)
    tiny.save_depth(root / "depth")
    tiny.save_captioner(root / "captioner")
    tiny.save_safety_checker(root / "safety")
    tiny.save_clip(root / "clip")
    tiny_video.save_tiny_video(root / "video")
    single = root / "community-model.safetensors"
    checkpoint = ldm_checkpoint(sd15)
    save_file(checkpoint, str(single))
    torch.save({"state_dict": checkpoint}, root / "community-model.ckpt")  # the older pickled form
    cache = root / "hub"
    put_in_hub_cache(base, cache, SD15_REPO)
    return {"root": root, "base": base, "single": single, "cache": cache}


@pytest.fixture
def local_models(hub: dict[str, Path], monkeypatch: pytest.MonkeyPatch) -> dict[str, Path]:
    """The sd15 profile pointed at the saved models, the hub cache in HF_HUB_CACHE."""
    monkeypatch.setenv("HF_HUB_CACHE", str(hub["cache"]))
    monkeypatch.setenv("EMAKI_CONTROLNET_MODEL", str(hub["root"] / "controlnet"))
    monkeypatch.setenv("EMAKI_DEPTH_MODEL", str(hub["root"] / "depth"))
    monkeypatch.setenv("EMAKI_CAPTIONER_MODEL", str(hub["root"] / "captioner"))
    monkeypatch.setenv("EMAKI_SAFETY_MODEL", str(hub["root"] / "safety"))
    monkeypatch.setenv("EMAKI_CLIP_MODEL", str(hub["root"] / "clip"))
    monkeypatch.setenv("EMAKI_VIDEO_MODEL", str(hub["root"] / "video"))
    return hub


@pytest.fixture
def hub_server() -> Iterator[tuple[ThreadingHTTPServer, dict[str, Path], list[str]]]:
    """A minimal Hugging Face hub over HTTP on localhost: repo info, the file tree and `resolve` downloads
    (what `list_repo_files` and `snapshot_download` ask for), serving folders put in the dict it yields."""
    repos: dict[str, Path] = {}
    requests: list[str] = []
    commit = "0" * 40

    class Hub(BaseHTTPRequestHandler):
        def log_message(self, *args: object) -> None:  # no access log on stderr
            pass

        def reply(self, body: bytes, headers: dict[str, str], code: int = 200) -> None:
            self.send_response(code)
            for key, value in headers.items():
                self.send_header(key, value)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(body)

        def do_GET(self) -> None:
            path = unquote(urlparse(self.path).path)
            requests.append(f"{self.command} {path}")
            for repo, folder in repos.items():
                files = sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file())
                as_json = {"Content-Type": "application/json"}
                if path == f"/api/models/{repo}/revision/main":
                    info = {"id": repo, "sha": commit, "siblings": [{"rfilename": f} for f in files]}
                    return self.reply(json.dumps(info).encode(), as_json)
                if path.startswith(f"/api/models/{repo}/tree/"):
                    tree = [
                        {"type": "file", "path": f, "size": (folder / f).stat().st_size, "oid": f"{i:040x}"}
                        for i, f in enumerate(files)
                    ]
                    return self.reply(json.dumps(tree).encode(), as_json)
                if path.startswith(f"/{repo}/resolve/{commit}/"):
                    name = path[len(f"/{repo}/resolve/{commit}/") :]
                    if name in files:
                        data = (folder / name).read_bytes()
                        etag = f'"{hashlib.sha256(data).hexdigest()}"'
                        return self.reply(data, {"X-Repo-Commit": commit, "ETag": etag})
            return self.reply(b'{"error": "not found"}', {"X-Error-Code": "EntryNotFound"}, code=404)

        do_HEAD = do_GET

    server = ThreadingHTTPServer(("127.0.0.1", 0), Hub)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield server, repos, requests
    server.shutdown()


def _same_weights(loaded: torch.nn.Module, saved: torch.nn.Module, dtype: torch.dtype = torch.float32) -> bool:
    """`loaded` holds exactly `saved`'s weights as stored in `dtype` (without touching `saved`)."""
    a, b = loaded.state_dict(), saved.state_dict()
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k].to(dtype)) for k in a if b[k].is_floating_point())


# --- which files --------------------------------------------------------------------------------


def test_the_real_sd15_repo_gives_its_fp16_files_for_half_and_full_files_for_fp32() -> None:
    half, variant, missing = model_files.select_files(SD15_REPO_FILES, pipeline=True, want_fp16=True)
    assert variant == "fp16" and not missing
    weights = [f for f in half if not f.endswith(model_files.CONFIG_SUFFIXES)]
    assert weights == [
        "text_encoder/model.fp16.safetensors",
        "unet/diffusion_pytorch_model.fp16.safetensors",
        "vae/diffusion_pytorch_model.fp16.safetensors",
    ]
    # Configs and tokenizer come along; the safety checker, the top-level checkpoints and the docs do not.
    assert "tokenizer/vocab.json" in half and "model_index.json" in half
    assert not [f for f in half if f.startswith("safety_checker/") or f.startswith("v1-5") or f == "README.md"]
    full, variant, _ = model_files.select_files(SD15_REPO_FILES, pipeline=True, want_fp16=False)
    assert variant is None and "unet/diffusion_pytorch_model.safetensors" in full
    assert not [f for f in full if ".fp16." in f or f.endswith(".bin")]


def test_a_repo_without_the_variant_falls_back_and_one_without_weights_is_named() -> None:
    files = ["config.json", "diffusion_pytorch_model.bin"]
    chosen, variant, missing = model_files.select_files(files, pipeline=False, want_fp16=True)
    assert chosen == files and variant is None and not missing
    only_half = ["config.json", "model.fp16.safetensors"]
    assert model_files.select_files(only_half, pipeline=False, want_fp16=False)[1] == "fp16"
    _, _, missing = model_files.select_files(["model_index.json", "unet/config.json"], pipeline=True, want_fp16=True)
    assert missing == ["text_encoder", "unet", "vae"]


# --- loading --------------------------------------------------------------------------------------


def test_hub_id_loads_from_the_cache_with_the_fp16_variant_on_half(
    local_models: dict[str, Path],
    sd15: SD15Models,
    recwarn: pytest.WarningsRecorder,
) -> None:
    settings = load_settings(dtype="fp16")
    spec = model_files.profile_models(settings, half=True)[0]
    found = model_files.resolve(spec)
    assert found.variant == "fp16" and found.path.parent.parent.name == "models--" + SD15_REPO.replace("/", "--")
    pipe = load_base_model(spec, settings.base_model_config, torch.float16)
    assert pipe.unet.dtype == torch.float16 and pipe.safety_checker is None
    assert _same_weights(pipe.unet, sd15.pipe.unet, torch.float16)
    spec32 = model_files.profile_models(load_settings(dtype="fp32"), half=False)[0]
    assert model_files.resolve(spec32).variant is None
    pipe32 = load_base_model(spec32, "", torch.float32)
    assert pipe32.unet.dtype == torch.float32 and _same_weights(pipe32.unet, sd15.pipe.unet)
    # No deprecated argument in our calls (diffusers' `deprecate` warns with a FutureWarning).
    assert not [str(w.message) for w in recwarn if "deprecat" in str(w.message).lower()]


def test_single_file_checkpoints_load_with_a_local_config_or_the_cached_profile_repo(
    local_models: dict[str, Path],
    sd15: SD15Models,
    recwarn: pytest.WarningsRecorder,
) -> None:
    safetensors, ckpt = str(local_models["single"]), str(local_models["root"] / "community-model.ckpt")
    base = str(local_models["base"])
    # A local config folder; the default config (the profile's repo, from the hub cache); a .ckpt.
    for single, config in ((safetensors, base), (safetensors, ""), (ckpt, base)):
        settings = load_settings(base_model=single, base_model_config=config or None)
        assert settings.base_model_config == (config or SD15_REPO)
        spec = model_files.profile_models(settings, half=False)[0]
        pipe = load_base_model(spec, settings.base_model_config, torch.float32)
        for part in ("unet", "vae", "text_encoder"):
            assert _same_weights(getattr(pipe, part), getattr(sd15.pipe, part)), part
    assert not [str(w.message) for w in recwarn if "deprecat" in str(w.message).lower()]


def test_an_uncached_model_fails_with_one_line_naming_it_where_and_what_to_run(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    with pytest.raises(ModelLoadError) as caught:
        Models(load_settings(device="cpu")).load()
    message = str(caught.value)
    assert "\n" not in message and SD15_REPO in message
    assert str(tmp_path / "empty-cache") in message and "emaki models pull" in message
    # The same line through the CLI, with exit code 2 and nothing written.
    out = tmp_path / "a.gif"
    code = main(["animate", "a cat", "--out", str(out), "--data-dir", str(tmp_path / "data"), "--frames", "1"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and err[-1].startswith("error: base model") and "emaki models pull" in err[-1]
    assert not out.exists()
    # A single file whose config is not cached says so, and how to give one.
    single = tmp_path / "model.safetensors"  # readable (an unreadable one is said first: test_sdxl_hostile.py)
    save_file({}, str(single))
    with pytest.raises(ModelLoadError, match=r"config '.*' for base model .* EMAKI_BASE_MODEL_CONFIG"):
        model_files.resolve(model_files.profile_models(load_settings(base_model=str(single)), False)[0], SD15_REPO)


def test_local_paths_that_are_missing_or_incomplete_are_named(local_models: dict[str, Path], tmp_path: Path) -> None:
    def refusal(ref: Path, pipeline: bool = True) -> str:
        spec = model_files.ModelSpec("base model", "base_model", str(ref), pipeline=pipeline, half=False)
        with pytest.raises(ModelLoadError) as caught:
            model_files.resolve(spec)
        return str(caught.value)

    assert refusal(tmp_path / "nope") == f"cannot load base model: local path '{tmp_path / 'nope'}' does not exist"
    assert "local path" in refusal(tmp_path / "nope.ckpt")
    assert refusal(tmp_path).endswith(f"no model_index.json in {tmp_path}")
    partial = tmp_path / "partial"
    for name in ("model_index.json", "unet/config.json", "vae/config.json"):
        (partial / name).parent.mkdir(parents=True, exist_ok=True)
        (partial / name).write_text("{}")
    assert refusal(partial).endswith(f"no weights in text_encoder/, unet/, vae/ in {partial}")
    assert "only the base model can be one file" in refusal(local_models["single"], pipeline=False)


# --- emaki models ---------------------------------------------------------------------------------


def test_models_check_reports_versions_device_and_what_is_cached_with_sizes(
    local_models: dict[str, Path], monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("EMAKI_CONTROLNET_MODEL", "lllyasviel/sd-controlnet-depth")  # not in the cache
    code = main(["models", "check", "--device", "cpu"])
    out = capsys.readouterr().out
    info = scan_cache_dir(local_models["cache"])  # huggingface_hub agrees the cache is valid and sized so
    (repo,) = [r for r in info.repos if r.repo_id == SD15_REPO]
    assert code == 1  # something the profile needs is missing
    assert re.search(rf"versions emaki \S+, torch {re.escape(torch.__version__)}, diffusers \S+, transformers", out)
    assert "device   cpu" in out and "dtype    fp32" in out and "memory setting auto" in out
    base_line = next(line for line in out.splitlines() if line.strip().startswith("base model"))
    assert f"ready, {model_files.human_size(repo.size_on_disk)} on disk" in base_line
    controlnet_line = next(line for line in out.splitlines() if "depth ControlNet" in line)
    assert "NOT READY" in controlnet_line and "is not downloaded" in controlnet_line
    assert "emaki models pull" in controlnet_line
    assert "depth estimator" in out and "ready" in next(line for line in out.splitlines() if "depth estimator" in line)
    assert "fits     no GPU" in out


def test_doctor_on_the_tiny_profile_reports_the_built_in_models(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["doctor", "--profile", "tiny"]) == 0
    out = capsys.readouterr().out
    # Every model the profile can load, each a repo on disk in emaki's tiny cache, found by the user's path.
    assert out.count("ready,") == 7 and out.count("random weights in emaki's tiny cache") == 7
    assert "NOT READY" not in out and "fits     yes" in out


def test_models_check_and_pull_include_the_motion_adapter_when_one_is_configured(
    local_models: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("EMAKI_MOTION_ADAPTER", "tiny")
    assert main(["doctor", "--profile", "tiny"]) == 0
    line = next(x for x in capsys.readouterr().out.splitlines() if "motion adapter (motion mode)" in x)
    assert "ready," in line and "tiny cache" in line
    monkeypatch.setenv("EMAKI_BASE_MODEL", str(local_models["base"]))
    monkeypatch.setenv("EMAKI_MOTION_ADAPTER", str(tmp_path / "adapter"))  # not there yet
    assert main(["models", "check", "--device", "cpu"]) == 1
    line = next(x for x in capsys.readouterr().out.splitlines() if "motion adapter (motion mode)" in x)
    assert "NOT READY" in line
    tiny.save_motion_adapter(tmp_path / "adapter")
    main(["models", "check", "--device", "cpu"])
    line = next(x for x in capsys.readouterr().out.splitlines() if "motion adapter (motion mode)" in x)
    assert "ready," in line and "NOT READY" not in line
    assert main(["models", "pull", "--device", "cpu"]) == 0
    assert capsys.readouterr().err.count("is local, nothing to download") == 8


def test_models_pull_verifies_local_models_and_refuses_offline_in_one_line(
    local_models: dict[str, Path], monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("EMAKI_BASE_MODEL", str(local_models["base"]))
    assert main(["models", "pull", "--device", "cpu"]) == 0
    err = capsys.readouterr().err
    assert err.count("is local, nothing to download") == 7 and "verified" in err
    monkeypatch.delenv("EMAKI_BASE_MODEL")  # the profile's hub repo again, with HF_HUB_OFFLINE=1 (conftest)
    assert main(["models", "pull"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: HF_HUB_OFFLINE is set") and "\n" not in err


def test_models_pull_downloads_only_what_loads_with_a_bar_then_verifies(
    local_models: dict[str, Path],
    hub_server: tuple[ThreadingHTTPServer, dict[str, Path], list[str]],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    import huggingface_hub.constants

    if huggingface_hub.constants.HF_HUB_OFFLINE:
        pytest.skip("huggingface_hub was imported with HF_HUB_OFFLINE set: it refuses even a local hub")
    server, repos, requests = hub_server
    repo = shutil.copytree(local_models["base"], tmp_path / "repo")  # fp32 and fp16 weights
    (repo / "safety_checker").mkdir()
    (repo / "safety_checker" / "model.safetensors").write_bytes(b"never fetched")
    (repo / "v1-5-pruned.ckpt").write_bytes(b"never fetched either")
    repos["org/narrow-sd15"] = repo
    cache = tmp_path / "cache"
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{server.server_port}")
    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("EMAKI_BASE_MODEL", "org/narrow-sd15")
    monkeypatch.setenv("EMAKI_DTYPE", "fp16")  # what CUDA gets by default
    assert main(["models", "pull", "--device", "cpu"]) == 0
    err = capsys.readouterr().err
    served = model_files.relative_files(repo)
    expected, variant, _ = model_files.select_files(served, pipeline=True, want_fp16=True)
    assert variant == "fp16" and len(expected) < len(served)
    snapshot = model_files.cached_snapshot("org/narrow-sd15", cache)
    assert snapshot is not None and sorted(model_files.relative_files(snapshot)) == expected
    assert not [r for r in requests if r.startswith("GET") and ("safety_checker" in r or r.endswith(".ckpt"))]
    assert f"downloading {len(expected)} files (fp16 weights)" in err
    assert re.search(rf"Fetching {len(expected)} files: 100%", err)  # emaki's bar, on although hub bars are off
    assert "all models downloaded and verified" in err


def test_parameter_counts_are_read_from_the_files(local_models: dict[str, Path], sd15: SD15Models) -> None:
    spec = model_files.profile_models(load_settings(), half=True)[0]
    counts = model_files.parameter_counts(model_files.resolve(spec))
    assert counts is not None
    for part in ("unet", "vae", "text_encoder"):
        assert counts.parts[part] == sum(p.numel() for p in getattr(sd15.pipe, part).parameters())
    single = load_settings(base_model=str(local_models["single"]), base_model_config=str(local_models["base"]))
    counts1 = model_files.parameter_counts(
        model_files.resolve(model_files.profile_models(single, False)[0], single.base_model_config)
    )
    assert counts1 is not None and counts1.parts["unet"] == counts.parts["unet"]


# --- memory ---------------------------------------------------------------------------------------

GIB = 2**30
# SD1.5 + depth ControlNet + DPT-hybrid in fp16, from bench/archs.py's parameter counts.
SD15_FP16 = memory.footprint_from_counts(
    {"unet": 859_520_964, "vae": 83_653_863, "text_encoder": 123_060_480},
    controlnet=361_279_120,
    depth=122_377_985,
    largest_tensor=37_945_344,
    dtype=torch.float16,
)


@pytest.mark.parametrize(
    ("free_gib", "expected"),
    [(24.0, "high"), (4.7, "high"), (4.5, "medium"), (3.8, "medium"), (3.7, "low"), (1.0, "low")],
)
def test_auto_picks_the_first_mode_that_fits_the_free_vram(free_gib: float, expected: str) -> None:
    assert memory.choose("auto", torch.device("cuda"), SD15_FP16, free_bytes=int(free_gib * GIB)) == expected


def test_the_needs_are_the_resident_weights_plus_the_margin() -> None:
    assert round(SD15_FP16.resident("high") / GIB, 2) == 3.11  # unet+vae+te+controlnet fp16, DPT fp32
    assert round(SD15_FP16.resident("medium") / GIB, 2) == 2.27  # unet+controlnet
    assert SD15_FP16.need("low") == 37_945_344 * 2 + memory.WORKING_MARGIN
    assert memory.choose("low", torch.device("cuda"), SD15_FP16, free_bytes=100 * GIB) == "low"  # explicit wins


def test_memory_modes_are_a_logged_no_op_on_cpu_and_the_setting_is_validated(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.INFO, logger="engine.render.memory"):
        assert memory.choose("low", torch.device("cpu"), SD15_FP16) == "high"
    assert "memory mode 'low' has no effect on cpu" in caplog.text
    monkeypatch.setenv("EMAKI_MEMORY", "medium")
    assert load_settings().memory == "medium"
    monkeypatch.setenv("EMAKI_MEMORY", "tiny-gpu")
    with pytest.raises(InvalidRequest, match="unknown memory 'tiny-gpu': use auto, high, medium, low"):
        load_settings()


def _frames(models: Models) -> list[np.ndarray]:
    generator = lambda: torch.Generator("cpu").manual_seed(3)  # noqa: E731
    first = models.txt2img("a hill", num_inference_steps=2, height=64, width=64, generator=generator()).images[0]
    second = models.img2img(
        "a hill",
        image=first,
        control_image=models.depth_map(first),
        strength=0.5,
        num_inference_steps=2,
        height=64,
        width=64,
        generator=generator(),
    ).images[0]
    return [np.asarray(first), np.asarray(second)]


def test_model_offload_serves_both_pipelines_and_changes_no_pixel() -> None:
    """Hooks are set on the shared modules; each pipeline re-arms its own after a call. On the CPU the
    'GPU' is the CPU, so this checks the plumbing (both pipelines, the depth model), not the saving."""
    models = Models(Settings(profile="tiny", device="cpu")).load()
    expected = _frames(models)
    memory.apply("medium", models.txt2img, models.img2img, models.depth_model, torch.device("cpu"))
    assert models.txt2img.unet is models.img2img.unet and hasattr(models.img2img.controlnet, "_hf_hook")
    assert all(np.array_equal(a, b) for a, b in zip(expected, _frames(models), strict=True))


def test_low_mode_sets_sequential_offload_on_the_shared_modules_and_tiles_the_vae() -> None:
    models = Models(Settings(profile="tiny", device="cpu")).load()
    memory.apply("low", models.txt2img, models.img2img, models.depth_model, torch.device("cpu"))
    for part in ("unet", "vae", "text_encoder"):
        module = getattr(models.txt2img, part)
        assert module is getattr(models.img2img, part)
        hooked = [m for m in module.modules() if getattr(getattr(m, "_hf_hook", None), "offload", False)]
        assert hooked, part  # weights live on the CPU and visit the device layer by layer
    assert models.txt2img.vae.use_tiling and models.txt2img.vae.use_slicing
    assert any(hasattr(m, "_hf_hook") for m in models.depth_model.modules())
    # Suspending gives back real weights (sequential offload keeps them on `meta`) and no hooks, so a
    # style's adapter layers can be injected; leaving sets the offload again, new layers included.
    models.memory = "low"
    with models.memory_suspended():
        unet = models.txt2img.unet
        assert not [n for n, p in unet.named_parameters() if p.device.type == "meta"]
        assert not [m for m in unet.modules() if hasattr(m, "_hf_hook")]
        unet.extra = torch.nn.Linear(2, 2)  # stands for an injected adapter layer
    assert hasattr(models.txt2img.unet.extra, "_hf_hook")


# --- quiet output ---------------------------------------------------------------------------------

# What emaki itself writes on stderr while animating: its bars (story, frame i/N, the format) and the story.
EMAKI_LINE = re.compile(r"^(story|frame \d+/\d+|gif|webp|mp4):|^  \d+\. |^$")


def test_a_terminal_shows_only_emakis_own_lines(local_models: dict[str, Path], tmp_path: Path) -> None:
    """A real run that loads models through from_pretrained (the sd15 profile on saved narrow models), in
    a fresh process so that import-time warnings count too."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("EMAKI_", "TRANSFORMERS_", "DIFFUSERS_"))}
    env |= {
        "PYTHONPATH": str(ROOT),
        "HF_HUB_CACHE": str(local_models["cache"]),
        "HF_HUB_OFFLINE": "1",
        "EMAKI_CONTROLNET_MODEL": str(local_models["root"] / "controlnet"),
        "EMAKI_DEPTH_MODEL": str(local_models["root"] / "depth"),
        "EMAKI_DTYPE": "fp32",
    }
    out = tmp_path / "hill.gif"
    args = ["animate", "a hill, then a windmill", "--frames", "1", "--width", "256", "--height", "256"]
    args += ["--steps", "1", "--device", "cpu", "--out", str(out), "--data-dir", str(tmp_path)]
    done = subprocess.run(
        [sys.executable, "-m", "emaki", *args], env=env, capture_output=True, text=True, timeout=300, check=False
    )
    assert done.returncode == 0, done.stderr[-2000:]
    lines = re.split(r"[\r\n]+", done.stderr)
    foreign = [line for line in lines if not EMAKI_LINE.match(line.replace("\x1b[A", "").rstrip())]
    assert not foreign, foreign[:5]
    assert any(line.startswith("frame 1/1:") for line in lines) and out.exists()


def test_the_fit_verdict_uses_the_counts_read_from_the_files(local_models: dict[str, Path]) -> None:
    from emaki.models_cmd import _fit_line

    settings = load_settings(dtype="fp16")
    counts = {}
    for spec in model_files.profile_models(settings, half=True)[:3]:
        counts[spec.setting] = model_files.parameter_counts(model_files.resolve(spec, settings.base_model_config))
    cuda = torch.device("cuda")
    assert _fit_line(settings, cuda, torch.float16, 8 * GIB, counts).startswith("fits     yes, auto will use high")
    # The narrow models need little more than the activation allowance; below it nothing fits.
    assert "not even with EMAKI_MEMORY=low" in _fit_line(settings, cuda, torch.float16, GIB, counts)
    explicit = load_settings(dtype="fp16", memory="high")
    assert _fit_line(explicit, cuda, torch.float16, 8 * GIB, counts).startswith("fits     yes (")


def test_auto_on_a_cuda_device_this_machine_lacks_is_one_clear_line() -> None:
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    with pytest.raises(ResourceError, match="no usable CUDA GPU"):
        memory.choose("auto", torch.device("cuda"), SD15_FP16)


# --- a base of another family ----------------------------------------------------------------------
def test_a_base_of_another_family_is_one_line_naming_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """An SD3 folder or a Flux single file as EMAKI_BASE_MODEL: refused from its files (model_index.json; a
    single file's key names), never guessed from its name. (SDXL-class bases render: tests/test_sdxl.py.)"""
    import json

    folder = tmp_path / "my-model"
    for part in ("transformer", "vae", "text_encoder"):
        (folder / part).mkdir(parents=True)
        (folder / part / "config.json").write_text("{}")
        save_file({"w": torch.zeros(1)}, str(folder / part / "diffusion_pytorch_model.safetensors"))
    (folder / "unet").mkdir()
    (folder / "unet" / "config.json").write_text("{}")
    save_file({"w": torch.zeros(1)}, str(folder / "unet" / "diffusion_pytorch_model.safetensors"))
    index = {"_class_name": "StableDiffusion3Pipeline", "transformer": ["diffusers", "SD3Transformer2DModel"]}
    (folder / "model_index.json").write_text(json.dumps(index))
    monkeypatch.setenv("EMAKI_DATA_DIR", str(tmp_path / "data"))
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("EMAKI_BASE_MODEL", str(folder))
    assert main(["animate", "a fox", "--frames", "1", "-q", "--device", "cpu"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: base model") and "SD3 family" in err and "StableDiffusion3Pipeline" in err
    assert "renders SD1.5 and SDXL-class models" in err
    assert "\n" not in err and not (tmp_path / "data").exists()  # nothing written
    single = tmp_path / "flux-like.safetensors"
    save_file({"double_blocks.0.img_attn.qkv.weight": torch.zeros(2, 2)}, str(single))
    monkeypatch.setenv("EMAKI_BASE_MODEL", str(single))
    assert main(["models", "check", "--device", "cpu"]) == 1
    line = next(x for x in capsys.readouterr().out.splitlines() if "base model" in x)
    assert "NOT READY" in line and "Flux family" in line and "double_blocks.*" in line


# --- what a hostile review of the real path found ------------------------------------------------------
def test_a_folder_of_another_kind_of_model_is_not_taken_as_the_safety_checker(
    local_models: dict[str, Path], tmp_path: Path
) -> None:
    """A DPT folder given as the checker used to load with every checker weight random ("passes" all)."""
    from engine.coordinator.safety import SafetyChecker

    settings = load_settings(data_dir=tmp_path, safety_model=str(local_models["root"] / "depth"))
    with pytest.raises(ModelLoadError, match=r"safety checker .* lack \d+ of the weights .* EMAKI_SAFETY_MODEL"):
        SafetyChecker.load(settings)
    from PIL import Image

    checker = SafetyChecker.load(load_settings(data_dir=tmp_path))  # the right folder still loads
    assert checker.flagged([Image.new("RGB", (32, 32))]) == [False]


def test_check_reports_unreadable_or_partial_files_in_one_line(
    local_models: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes((local_models["single"]).read_bytes()[:5000])
    monkeypatch.setenv("EMAKI_BASE_MODEL", str(truncated))
    monkeypatch.setenv("EMAKI_BASE_MODEL_CONFIG", str(local_models["base"]))
    assert main(["models", "check", "--device", "cpu"]) == 1
    line = next(x for x in capsys.readouterr().out.splitlines() if "base model" in x)
    assert "NOT READY" in line and "not a readable .safetensors" in line
    partial = shutil.copytree(local_models["base"], tmp_path / "partial")
    (partial / "unet" / "config.json").unlink()
    monkeypatch.setenv("EMAKI_BASE_MODEL", str(partial))
    assert main(["models", "check", "--device", "cpu"]) == 1
    line = next(x for x in capsys.readouterr().out.splitlines() if "base model" in x)
    assert "NOT READY" in line and "no config in unet/" in line
    monkeypatch.setenv("EMAKI_BASE_MODEL", "/")  # a wrong folder is refused before it is walked
    assert main(["models", "check", "--device", "cpu"]) == 1
    assert "no model_index.json" in next(x for x in capsys.readouterr().out.splitlines() if "base model" in x)


def test_a_controlnet_made_for_another_base_is_one_line_at_load(local_models: dict[str, Path], tmp_path: Path) -> None:
    settings = load_settings(data_dir=tmp_path, base_model=str(local_models["base"]), controlnet_model="tiny")
    with pytest.raises(ModelLoadError, match=r"depth ControlNet 'tiny' does not fit .* EMAKI_CONTROLNET_MODEL"):
        Models(settings).load()


def test_an_explicit_transformers_story_backend_needs_its_model(
    local_models: dict[str, Path], monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("EMAKI_BASE_MODEL", str(local_models["base"]))
    monkeypatch.setenv("EMAKI_STORY_BACKEND", "transformers")  # its model, Mistral, is not downloaded here
    assert main(["models", "check", "--device", "cpu"]) == 1
    line = next(x for x in capsys.readouterr().out.splitlines() if "story LLM" in x)
    assert "NOT READY" in line and "only" not in line and "emaki models pull" in line
