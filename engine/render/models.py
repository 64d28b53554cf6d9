"""Loads the models once and keeps them warm across jobs.

txt2img and depth-ControlNet img2img are two diffusers pipelines over ONE set of UNet/VAE/text-encoder
weights (`from_pipe`), so memory holds one copy. Styles are peft-backed LoRA adapters loaded by name
into that shared UNet and switched with `set_adapters`, never reloading the base model.

What differs between model families (SD1.5, SDXL: their pipeline classes, loading, conditioning, text
encoders) is asked of the base model's family (engine/render/families/), read from its files.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from diffusers import (
    ControlNetModel,
    DPMSolverMultistepScheduler,
    EulerAncestralDiscreteScheduler,
    UniPCMultistepScheduler,
)
from PIL import Image

from engine.errors import InvalidRequest, ModelLoadError
from engine.render import memory, model_files
from engine.render.families import NO_SAFETY_CHECKER, Family, configured_base, family_of_found
from engine.render.loading import load_model, pick_device, pick_dtype
from engine.settings import Settings

log = logging.getLogger(__name__)

SCHEDULERS = {
    "dpm++": DPMSolverMultistepScheduler,
    "euler_a": EulerAncestralDiscreteScheduler,
    "unipc": UniPCMultistepScheduler,
}


@dataclass
class Components:
    """What a model set is made of, however it was obtained (hub, local folders, built in-process)."""

    txt2img: Any  # the family's txt2img pipeline (StableDiffusionPipeline, StableDiffusionXLPipeline)
    controlnet: ControlNetModel
    depth_model: Any
    depth_processor: Any


def load_components(s: Settings, dtype: torch.dtype) -> Components:
    """The profile's models, from local folders, a single file or a hub cache (the tiny profile's too:
    its repos live in emaki's own cache); never downloads (`emaki models pull` does). The depth estimator
    loads in fp32 (see `_load_pipelines`)."""
    from transformers import AutoImageProcessor, AutoModelForDepthEstimation

    base, controlnet_spec, depth_spec = model_files.profile_models(s, half=dtype in HALF_DTYPES)[:3]
    for spec in (base, controlnet_spec, depth_spec):
        log.info("loading %s: %s", spec.role, spec.ref)
    family, found = configured_base(s, base)  # of the profile's family, or one line naming the profile to use
    txt2img = family.load_base(base, found, dtype)
    controlnet = load_model(controlnet_spec, ControlNetModel.from_pretrained, dtype=dtype)
    depth_model = load_model(depth_spec, AutoModelForDepthEstimation.from_pretrained, dtype=torch.float32).eval()
    depth_processor = load_model(depth_spec, AutoImageProcessor.from_pretrained)
    return Components(txt2img, controlnet, depth_model, depth_processor)


HALF_DTYPES = (torch.float16, torch.bfloat16)
__all__ = ["NO_SAFETY_CHECKER", "family_of_pipeline", "load_base_model"]


def load_base_model(spec: model_files.ModelSpec, config_ref: str, dtype: torch.dtype) -> Any:
    """The txt2img pipeline of the family the base model's files show (engine/render/families/): from a diffusers
    folder (or cached hub repo), or one `.safetensors`/`.ckpt` in the original LDM/SGM layout described by the
    configs of `config_ref` (a diffusers folder or a cached hub repo)."""
    found = model_files.resolve(spec, config_ref)
    return family_of_found(found).load_base(spec, found, dtype)


def family_of_pipeline(pipe: Any) -> Family:
    """The family of a loaded (or built) txt2img pipeline: by its second text encoder (SDXL's)."""
    from engine.render.families import by_name

    return by_name("sdxl" if getattr(pipe, "text_encoder_2", None) is not None else "sd15")


@dataclass(frozen=True)
class StyleRef:
    """What the engine needs of a style row: where its adapter file is and how strongly to apply it."""

    name: str
    path: str
    trigger: str = ""
    weight: float = 1.0
    adapter: str = "lora"  # lora | loha | lokr | ia3
    version: str = ""  # the file's content hash: a style replaced at the same path is loaded again

    @property
    def key(self) -> str:
        """What a loaded style is recognised by: its file and that file's content."""
        return f"{self.path}#{self.version}"


def check_controlnet_fits(controlnet: Any, unet: Any, s: Settings) -> None:
    """A ControlNet adds its residuals to the UNet's blocks: one made for another base (another family, or
    another width) fails at the first frame with a tensor-size error. Said at load, in one line."""
    from engine.render.families import by_name

    mine, base = controlnet.config, unet.config
    ours = (list(mine.block_out_channels), mine.cross_attention_dim)
    theirs = (list(base.block_out_channels), base.cross_attention_dim)
    # SDXL's UNet and its ControlNets take the `text_time` size conditioning; SD1.5's have none.
    made_for, base_family = (
        by_name("sdxl" if config.get("addition_embed_type") == "text_time" else "sd15") for config in (mine, base)
    )
    if made_for is not base_family:  # the usual mistake: one line naming both families and the fitting one
        raise ModelLoadError(
            f"the depth ControlNet '{s.controlnet_model}' is made for {made_for.title}: it does not fit the base "
            f"model '{s.base_model}', which is {base_family.title}; set EMAKI_CONTROLNET_MODEL to an "
            f"{base_family.title} depth ControlNet (e.g. {base_family.real_models['controlnet_model']})"
        )
    if ours != theirs:
        raise ModelLoadError(
            f"the depth ControlNet '{s.controlnet_model}' does not fit the base model '{s.base_model}' (blocks "
            f"{ours[0]} vs {theirs[0]}, cross-attention {ours[1]} vs {theirs[1]}): set EMAKI_CONTROLNET_MODEL to "
            "a depth ControlNet made for this base"
        )


class Models:
    """The warm model set. Thread-safe to load; used by one worker thread at a time."""

    def __init__(self, settings: Settings, components: Components | None = None) -> None:
        """`components` replaces loading by profile (the benchmark builds full-size random ones)."""
        self.settings = settings
        self._components = components
        self.device = pick_device(settings.device)
        self.dtype = pick_dtype(settings.dtype, self.device)
        self._lock = threading.Lock()
        self.txt2img: Any = None  # the family's txt2img pipeline
        self.img2img: Any = None  # the family's depth-ControlNet img2img pipeline, over txt2img's modules
        self.family: Family | None = None  # known once loaded
        self.depth_model: Any = None
        self.depth_processor: Any = None
        self.loaded_styles: dict[str, str] = {}  # adapter name -> StyleRef.key it was loaded from
        self.memory = "high"  # the memory mode in use (engine/render/memory.py), known once loaded
        self.compiled: Any = None  # engine.render.compiled.CompiledUNet when EMAKI_COMPILE is on and compiling worked
        self._style_layers: dict[str, Any] = {}  # style file -> its parsed layers (compiled mode reads them once)
        self._motion: Any = None  # engine.render.motion.MotionRenderer, built the first time motion mode renders

    @property
    def family_name(self) -> str:
        """The base model's family ("sd15", "sdxl"): the loaded one's, else read from the configured base's files
        without loading it (once per process); "" when the base cannot be found."""
        if self.family is not None:
            return self.family.name
        from engine.render.families import family_name

        return family_name(self.settings.base_model, self.settings.base_model_config)

    # --- loading ---------------------------------------------------------------------------
    def load(self) -> Models:
        with self._lock:
            if self.txt2img is None:
                self._load_pipelines()
            return self

    def _load_pipelines(self) -> None:
        s = self.settings
        parts = self._components if self._components is not None else load_components(s, self.dtype)
        txt2img, controlnet = parts.txt2img, parts.controlnet
        family = family_of_pipeline(txt2img)
        check_controlnet_fits(controlnet, txt2img.unet, s)
        self.depth_model, self.depth_processor = parts.depth_model, parts.depth_processor
        if s.scheduler != "default":
            if s.scheduler not in SCHEDULERS:
                raise InvalidRequest(f"unknown scheduler '{s.scheduler}': use default, {', '.join(SCHEDULERS)}")
            txt2img.scheduler = SCHEDULERS[s.scheduler].from_config(txt2img.scheduler.config)
        self.memory = memory.choose(
            s.memory,
            self.device,
            memory.footprint(txt2img, controlnet, self.depth_model, self.dtype, margin=family.working_margin),
        )
        txt2img.set_progress_bar_config(disable=True)
        # Shares unet/vae/text_encoder/tokenizer/scheduler objects: one copy of the weights. from_pipe casts
        # every module it is given to `dtype` (fp32 when not told), on the CPU; `memory.apply` then places
        # them. The depth estimator stays fp32: it runs once per frame and fp16 DPT loses depth detail.
        img2img = family.img2img(txt2img, controlnet, self.dtype)
        img2img.set_progress_bar_config(disable=True)
        memory.apply(self.memory, txt2img, img2img, self.depth_model, self.device)
        self.txt2img, self.img2img, self.family = txt2img, img2img, family
        if s.compile != "off":
            self._compile()
        log.info(
            "models ready on %s (%s, memory %s), profile %s, %s family",
            self.device,
            self.dtype,
            self.memory,
            s.profile,
            family.title,
        )

    def _compile(self) -> None:
        """Compile the shared UNet and warm both pipelines up, so the first member does not pay for it.
        Anything that goes wrong leaves the eager UNet in place, with one log line."""
        from engine.render.compiled import SLOT, CompiledUNet, use_compile_cache
        from engine.render.style_files import delete_from, one_line

        assert self.txt2img is not None and self.img2img is not None
        if self.memory != "high":
            log.warning("EMAKI_COMPILE needs the models resident (memory 'high', not %r): running eager", self.memory)
            return
        use_compile_cache(self.settings.data_dir)
        eager = self.txt2img.unet
        try:
            compiled = CompiledUNet(self.txt2img, self.settings.compile_max_rank, self.settings.compile)
            self.img2img.unet = self.txt2img.unet
            self.compiled = compiled
            self._warm_up()
        except Exception as exc:  # noqa: BLE001 - a compiler failure must not stop the bot: eager still renders
            log.warning("torch.compile failed, running eager: %s", one_line(f"{type(exc).__name__}: {exc}"))
            self.compiled = None
            self.txt2img.unet = self.img2img.unet = eager
            delete_from([eager], SLOT)

    def _warm_up(self) -> None:
        """One tiny txt2img and one img2img call at the default size: both UNet graphs compile now."""
        assert self.txt2img is not None and self.img2img is not None
        s = self.settings
        blank = Image.new("RGB", (s.width, s.height))
        generator = torch.Generator("cpu").manual_seed(0)
        assert self.family is not None
        conditioning = self.family.conditioning(s.height, s.width)
        self.txt2img(
            "warm-up",
            num_inference_steps=1,
            width=s.width,
            height=s.height,
            output_type="latent",
            generator=generator,
            **conditioning,
        )
        self.img2img(
            "warm-up",
            image=blank,
            control_image=blank,
            strength=0.5,
            num_inference_steps=2,
            output_type="latent",
            generator=generator,
            **conditioning,
        )

    def motion_renderer(self) -> Any:
        """The AnimateDiff renderer (motion mode, engine/render/motion.py) over these weights, built on first use:
        its UNet shares the 2D UNet's modules, so styles loaded into that UNet apply to it as they are."""
        from engine.render import motion

        self.load()
        with self._lock:
            if self._motion is None:
                assert self.txt2img is not None and self.img2img is not None and self.family is not None
                if self.family.name != "sd15":  # AnimateDiff's SD1.5 motion modules fit SD1.5's UNet only
                    raise InvalidRequest(
                        f"motion mode renders with SD1.5's motion adapter: this bot renders {self.family.title}; "
                        "use the frame chain (motion 'chain')"
                    )
                if self.compiled is not None or self.memory != "high":
                    motion.check_request(self.settings)  # says which setting excludes motion mode
                    raise InvalidRequest(f"motion mode needs the models resident (memory 'high', not {self.memory!r})")
                adapter = motion.load_adapter(self.settings, self.device, self.dtype)
                self._motion = motion.MotionRenderer(
                    self.txt2img, adapter, self.settings.motion_fewstep, controlnet=self.img2img.controlnet
                )
            return self._motion

    def memory_suspended(self) -> Any:
        """A context in which the models carry no offload hooks (for changing their modules, e.g. loading
        a peft adapter under EMAKI_MEMORY=medium/low); the memory mode is applied again on exit."""
        assert self.txt2img is not None
        return memory.suspended(self.memory, self.txt2img, self.img2img, self.depth_model, self.device)

    # --- styles ----------------------------------------------------------------------------
    def use_style(self, style: StyleRef | None) -> None:
        """Activate one style (loading it the first time) or none; the base weights stay loaded.

        Every style file (diffusers/peft/kohya LoRA, LyCORIS LoHa/LoKr, IA3; see engine/style_files) is read
        as peft layers and injected into the UNet (and the text encoder where it has layers) under its own
        adapter name; styles are switched with peft's layer API, which all four kinds implement
        (diffusers' `set_adapters` assumes LoRA)."""
        from engine.render.style_files import StyleOfAnotherFamily, delete_from, one_line

        pipe = self.load().txt2img
        assert pipe is not None and self.family is not None
        if self.compiled is not None:
            self._use_style_compiled(style)
            return
        models = self.family.style_models(pipe)
        if style is None:
            _activate(list(models.values()), None, 1.0)
            return
        adapter = _adapter_name(style.name)
        if self.loaded_styles.get(adapter) != style.key:
            path = Path(style.path)
            if not path.exists():
                raise InvalidRequest(f"style '{style.name}': its weights file {path} is missing")
            try:
                # Offload hooks (EMAKI_MEMORY=medium/low) would miss layers injected under them.
                with self.memory_suspended():
                    self._load_style_layers(path, adapter, models, style.name)
            except StyleOfAnotherFamily:  # read before anything was injected: its one line as it is
                raise
            except Exception as exc:  # a broken style file must not take the bot down; one line
                delete_from(list(models.values()), adapter)  # nothing half-loaded stays behind
                raise ModelLoadError(one_line(f"style '{style.name}' could not be loaded: {exc}")) from exc
            self.loaded_styles[adapter] = style.key
        _activate(list(models.values()), adapter, style.weight)

    def _use_style_compiled(self, style: StyleRef | None) -> None:
        """Compiled UNet: the style's LoRA is hot-swapped into the UNet's one slot (its scale and weight
        folded into B), its text-encoder layers (that model is not compiled) load as usual."""
        from engine.render.compiled import NotHotSwappable
        from engine.render.style_files import (
            KIND_NAMES,
            Architecture,
            StyleLayers,
            delete_from,
            load_into,
            one_line,
            read_style,
        )

        assert self.txt2img is not None and self.compiled is not None and self.family is not None
        text_encoders = {k: v for k, v in self.family.style_models(self.txt2img).items() if k != "unet"}
        if style is None:
            self.compiled.use(None)
            _activate(list(text_encoders.values()), None, 1.0)
            return
        layers = self._style_layers.get(style.key)
        if layers is None:
            layers = read_style(
                Path(style.path),
                Architecture.of({"unet": self.compiled.eager_unet, **text_encoders}),
                family=self.family.name,
                style_name=style.name,
            )
            self._style_layers[style.key] = layers
        if layers.kind != "lora":
            raise InvalidRequest(
                f"style '{style.name}' is a {KIND_NAMES[layers.kind]}: with EMAKI_COMPILE on only LoRA styles can be "
                "swapped into the compiled model; the admin can set EMAKI_COMPILE=off to use it"
            )
        unet_state = {
            f"unet.{layer}.{param}": tensor * (weights.scale * style.weight if param.startswith("lora_B") else 1.0)
            for layer, weights in layers.models.get("unet", {}).items()
            for param, tensor in weights.params.items()
        }
        try:
            self.compiled.use(unet_state, 1.0, key=f"{style.key}@{style.weight}")
        except NotHotSwappable as exc:
            raise InvalidRequest(one_line(f"style '{style.name}' cannot be used with EMAKI_COMPILE on: {exc}")) from exc
        adapter = _adapter_name(style.name)
        text_layers = {name: layers.models[name] for name in text_encoders if layers.models.get(name)}
        if text_layers and self.loaded_styles.get(adapter) != style.key:
            delete_from(list(text_encoders.values()), adapter)
            load_into(
                StyleLayers(layers.kind, layers.source, text_layers),
                {name: text_encoders[name] for name in text_layers},
                adapter,
            )
            self.loaded_styles[adapter] = style.key
        _activate(list(text_encoders.values()), adapter if text_layers else None, style.weight)

    def _load_style_layers(
        self, path: Path, adapter: str, models: dict[str, torch.nn.Module], style_name: str = ""
    ) -> None:
        """Read the file as peft layers and inject them; kinds that cannot nest start from plain models. A style
        made for another family is refused by the file's own keys, in one line, before anything is injected."""
        from engine.render.style_files import Architecture, delete_from, kinds_loaded, load_into, read_style, unload_all

        assert self.family is not None
        layers = read_style(path, Architecture.of(models), family=self.family.name, style_name=style_name)
        if adapter in self.loaded_styles:  # replaced or retrained under the same name: reload
            delete_from(list(models.values()), adapter)
            del self.loaded_styles[adapter]
        if kinds_loaded(list(models.values())) - {layers.kind}:  # kinds must not nest: start plain
            unload_all(list(models.values()))
            self.loaded_styles.clear()
        load_into(layers, models, adapter)

    # --- depth -----------------------------------------------------------------------------
    @torch.inference_mode()
    def depth_map(self, image: Image.Image) -> Image.Image:
        """Depth of `image` as a 3-channel image of the same size, normalised to 0..255."""
        self.load()
        inputs = self.depth_processor(images=image, return_tensors="pt").to(self.device)
        predicted = self.depth_model(**inputs).predicted_depth  # (1, h, w)
        depth = torch.nn.functional.interpolate(
            predicted[:, None].float(), size=(image.height, image.width), mode="bicubic", align_corners=False
        )[0, 0]
        low, high = depth.min(), depth.max()
        depth = (depth - low) / (high - low + 1e-8)
        array = (depth.clamp(0, 1) * 255).round().to(torch.uint8).cpu().numpy()
        return Image.fromarray(np.stack([array] * 3, axis=-1))


def _activate(models: list[torch.nn.Module], adapter: str | None, weight: float) -> None:
    """Make `adapter` the only active one (or none) in every model, scaled by `weight` where the kind
    has a scale. A style may carry text-encoder layers too, so both models are switched."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    for module in (m for model in models for m in model.modules()):
        if isinstance(module, BaseTunerLayer):
            module.enable_adapters(adapter is not None)
            if adapter is not None:
                module.set_adapter(adapter)
                if hasattr(module, "set_scale"):  # IA3 learns its scale; it has none to set
                    module.set_scale(adapter, weight)


def _adapter_name(style_name: str) -> str:
    # peft adapter names become module attribute keys: keep them identifier-like.
    return "style_" + "".join(c if c.isalnum() else "_" for c in style_name)
