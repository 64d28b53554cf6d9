"""Style files people bring: detect their format and kind by their keys, convert them to peft adapters,
check them against the base model's layers, and load them.

Formats read (never guessed from the file name):
- diffusers LoRA (`unet.<layer>.lora_A.weight` / `.lora.down.weight`, `text_encoder.<layer>...`),
- peft LoRA/LoHa/LoKr/IA3 (`base_model.model.<layer>.lora_A.weight`, or a folder with `adapter_config.json`
  and `adapter_model.safetensors`: what emaki itself trains for LoHa/LoKr/IA3),
- the old attention-processor LoRA (`<block>.attn1.processor.to_q_lora.down.weight`),
- kohya/A1111 names (`lora_unet_<layer>` / `lora_te_<layer>`; SDXL's `lora_te1_`/`lora_te2_`; `.alpha`) for
  LoRA (`lora_down`/`lora_up`), LyCORIS LoHa (`hada_w1_a`...), LoKr (`lokr_w1`...) and IA3 (`weight` +
  `on_input`); a kohya name is looked up among the base model's own layer names (`.` as `_`, as ComfyUI maps
  them), and LDM spellings (`input_blocks_4_1`, `in_layers_2`) are mapped the way diffusers' kohya conversion
  maps them.

A style is made for one model family (SD1.5 or SDXL, engine/render/families/); its family is read from its keys
(`style_family`), else from what its header says (emaki's trainer writes `emaki_family` into every style it trains;
kohya writes `ss_base_model_version`), and a style of another family than the base's is refused in one line before
anything else.

Every file becomes a `StyleLayers`: per model (`unet`, `text_encoder`, SDXL's `text_encoder_2`) and per layer,
the tensors under peft's parameter names and the layer's scale (alpha / rank, as the tool that wrote the file
applies it). That one form is both what is checked at `styles add` and what is loaded, so a file that passed the
check loads the same way.

Checking needs the base model's layer names and shapes, not its weights: the models are built from their configs
on the meta device (a second or less even for SD1.5), the adapter is injected there by peft, and its parameter
shapes are compared with the file's.
"""

from __future__ import annotations

import functools
import json
import math
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from engine.errors import InvalidRequest, ModelLoadError

if TYPE_CHECKING:
    from peft import PeftConfig

KINDS = ("lora", "loha", "lokr", "ia3")
KIND_NAMES = {"lora": "LoRA", "loha": "LoHa", "lokr": "LoKr", "ia3": "IA3"}
MAX_ABS_WEIGHT = 1e3  # trained adapter weights are O(1); anything this large is broken or not an adapter
MESSAGE_CAP = 300
PEFT_CONFIG_NAME = "adapter_config.json"
TEXT_ENCODER_DIR = "text_encoder"  # emaki-trained peft styles: the text encoder's half, beside the UNet's
PEFT_WEIGHTS_NAME = "adapter_model.safetensors"
MODELS = ("unet", "text_encoder", "text_encoder_2")
FAMILY_TITLES = {"sd15": "SD1.5", "sdxl": "SDXL"}  # engine/render/families/ `title`s
# kohya prefixes -> the model they adapt (SD1.5 files say `lora_te_`, SDXL files `lora_te1_`/`lora_te2_`).
KOHYA_MODELS = (
    ("lora_unet_", "unet"),
    ("lora_te1_", "text_encoder"),
    ("lora_te2_", "text_encoder_2"),
    ("lora_te_", "text_encoder"),
)

# kohya/LyCORIS per-layer parameter names -> adapter kind. `alpha` and `on_input` are read with them.
KOHYA_PARAMS = {
    "lora_down.weight": "lora",
    "lora_up.weight": "lora",
    "hada_w1_a": "loha",
    "hada_w1_b": "loha",
    "hada_w2_a": "loha",
    "hada_w2_b": "loha",
    "hada_t1": "loha",
    "hada_t2": "loha",
    "lokr_w1": "lokr",
    "lokr_w1_a": "lokr",
    "lokr_w1_b": "lokr",
    "lokr_w2": "lokr",
    "lokr_w2_a": "lokr",
    "lokr_w2_b": "lokr",
    "lokr_t2": "lokr",
    "weight": "ia3",
}
PEFT_PARAM = re.compile(r"\.(lora_[AB]\.weight|hada_(?:w[12]_[ab]|t[12])|lokr_(?:w[12](?:_[ab])?|t2)|ia3_l)$")


class StyleFileError(InvalidRequest):
    """A style file that cannot be used; the message is one line naming the file and the reason."""

    def __init__(self, message: str) -> None:
        super().__init__(one_line(message))


class StyleOfAnotherFamily(StyleFileError):
    """A style made for another model family than the base's: `'ink' is an SDXL style; this bot renders SD1.5`."""


# Evidence in a style file's own key names (any format: kohya, diffusers, peft) of the family it was made for,
# most telling first. SDXL's UNet has no attention in its first down block and its first up level, three
# levels instead of four, and 2 or 10 transformer layers per attention block (SD1.5 has one).
FAMILY_EVIDENCE = (
    (re.compile(r"(^lora_te2_|(^|\.)text_encoder_2\.)"), "sdxl", "it has layers for a second text encoder"),
    (re.compile(r"^lora_te1_"), "sdxl", "kohya's SDXL text-encoder names (lora_te1_)"),
    (re.compile(r"transformer_blocks[._][1-9]"), "sdxl", "its UNet layers include transformer_blocks.1+"),
    (re.compile(r"^lora_te_"), "sd15", "kohya's SD1.5 text-encoder names (lora_te_)"),
    (
        re.compile(r"down_blocks[._]0[._]attentions|up_blocks[._]3[._]|input_blocks_[12]_1_|output_blocks_(9|1[01])_"),
        "sd15",
        "its UNet layers include SD1.5-only blocks",
    ),
)
# safetensors header entries that name the family a style was trained on: emaki's own (training/lora.py and
# training/sdxl.py write it) and kohya's base model version (`sdxl_base_v1-0` for SDXL: library/sdxl_model_util.py).
FAMILY_METADATA_KEY = "emaki_family"
KOHYA_VERSION_KEY = "ss_base_model_version"
# The width a cross-attention key/value projection reads: the text encoder's (SD1.5 768, SDXL 768 + 1280).
CROSS_ATTENTION_WIDTHS = {768: "sd15", 2048: "sdxl"}
CROSS_ATTENTION_INPUT = re.compile(r"attn2[._]to_[kv].*(lora_down\.weight|lora_A\.weight|hada_w[12]_b)$")


def style_family(tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> tuple[str, str]:
    """(family, the evidence) a style file's keys show, else its header (`metadata`), else its cross-attention
    width; ("", "") when none says (then whether its layers fit the base model decides, as for any file). Small
    models (the tiny sets) can have keys and widths that say nothing: what the trainer wrote then tells."""
    keys = [k.removeprefix("base_model.model.") for k in tensors]
    for pattern, family, evidence in FAMILY_EVIDENCE:
        if any(pattern.search(k) for k in keys):
            return family, evidence
    metadata = metadata or {}
    named = metadata.get(FAMILY_METADATA_KEY, "")
    if named in FAMILY_TITLES:
        return named, f"its header says it was trained on {FAMILY_TITLES[named]}"
    if metadata.get(KOHYA_VERSION_KEY, "").startswith("sdxl"):
        return "sdxl", f"its header says {KOHYA_VERSION_KEY} {metadata[KOHYA_VERSION_KEY]}"
    for key, tensor in tensors.items():
        width = int(tensor.shape[-1]) if tensor.ndim == 2 else 0
        if CROSS_ATTENTION_INPUT.search(key) and width in CROSS_ATTENTION_WIDTHS:
            return CROSS_ATTENTION_WIDTHS[width], f"its cross-attention reads {width}-wide text embeddings"
    return "", ""


def refuse_other_family(
    tensors: dict[str, torch.Tensor],
    family: str,
    style_name: str,
    file_name: str = "",
    metadata: dict[str, str] | None = None,
) -> str:
    """The style's family (its own file's, else `family`'s); a style of another family than `family` is one line."""
    found, evidence = style_family(tensors, metadata)
    if family and found and found != family:
        where = f"{file_name}: " if file_name else ""
        raise StyleOfAnotherFamily(
            f"'{style_name}' is an {FAMILY_TITLES.get(found, found)} style; this bot renders "
            f"{FAMILY_TITLES.get(family, family)} ({where}{evidence})"
        )
    return found or family


def one_line(text: str, cap: int = MESSAGE_CAP) -> str:
    """The first line of a message, capped: library errors can list thousands of keys in one "line"."""
    lines = str(text).strip().splitlines()
    first = lines[0].strip() if lines else ""
    return first if len(first) <= cap else first[: cap - 1] + "…"


@dataclass
class LayerWeights:
    params: dict[str, torch.Tensor]  # under peft's parameter names: lora_A.weight, hada_w1_a, lokr_w1, ia3_l
    scale: float = 1.0  # what multiplies the layer's product (alpha / rank), before the style's weight


@dataclass
class StyleLayers:
    kind: str  # lora | loha | lokr | ia3
    source: str  # the format it was read from, for messages
    models: dict[str, dict[str, LayerWeights]] = field(default_factory=dict)  # model -> layer name -> weights
    family: str = ""  # the model family it was made for ("sd15", "sdxl"), where known

    @property
    def n_layers(self) -> int:
        return sum(len(layers) for layers in self.models.values())


@dataclass
class Architecture:
    """The base model's adaptable layers: per model, layer name -> (linear | conv, weight shape)."""

    layers: dict[str, dict[str, tuple[str, tuple[int, ...]]]]
    build: Callable[[], dict[str, nn.Module]] | None = None  # fresh (meta) models to check injection on
    unet_config: Any = None

    @classmethod
    def of(cls, models: dict[str, nn.Module], build: Callable[[], dict[str, nn.Module]] | None = None) -> Architecture:
        layers: dict[str, dict[str, tuple[str, tuple[int, ...]]]] = {}
        for key, model in models.items():
            found = {}
            for name, module in model.named_modules():
                base = module.get_base_layer() if hasattr(module, "get_base_layer") else module
                if isinstance(base, nn.Linear | nn.Conv2d) and not _is_adapter_part(name):
                    found[name] = ("conv" if isinstance(base, nn.Conv2d) else "linear", tuple(base.weight.shape))
            layers[key] = found
        # diffusers' config object: LDM block numbers depend on its `layers_per_block`
        unet_config = getattr(models.get("unet"), "config", None)
        return cls(layers, build, unet_config)

    @functools.cached_property
    def flat(self) -> dict[str, dict[str, str]]:
        """kohya's names: the layer name with every `.` as `_` (exact, since it is built from the model).
        Text-encoder layers are also known by their other spelling (see `text_encoder_alias`)."""
        flat = {key: {name.replace(".", "_"): name for name in layers} for key, layers in self.layers.items()}
        for model in ("text_encoder", "text_encoder_2"):
            text = flat.get(model, {})
            for name in list(self.layers.get(model, {})):
                text.setdefault(text_encoder_alias(name).replace(".", "_"), name)
        return flat

    def canonical(self, model: str, layer: str) -> str:
        """The base model's own name for a style's layer name: CLIP's layers are `text_model.encoder...`
        in files made with transformers 4 (every SD1.5 LoRA in the wild) and `encoder...` in a
        transformers-5 model, so a text-encoder name is tried in both spellings."""
        known = self.layers.get(model, {})
        if model.startswith("text_encoder") and layer not in known and text_encoder_alias(layer) in known:
            return text_encoder_alias(layer)
        return layer

    def model_of(self, layer: str) -> str | None:
        return next((key for key in MODELS if layer in self.layers.get(key, {})), None)


def text_encoder_alias(name: str) -> str:
    """A CLIP text-encoder layer name in the other transformers generation's spelling."""
    return name.removeprefix("text_model.") if name.startswith("text_model.") else f"text_model.{name}"


def _is_adapter_part(name: str) -> bool:
    return bool(re.search(r"\.(lora_[AB]|lora_embedding_[AB]|base_layer)(\.|$)", name))


# --- the base model's architecture, without its weights ---------------------------------------------
def meta_models(base_model: str, config_ref: str = "") -> dict[str, nn.Module]:
    """The UNet and text encoder(s) built from their configs on the meta device: names and shapes, no weights."""
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    with torch.device("meta"):
        configs = _configs(base_model, config_ref)
        models: dict[str, nn.Module] = {
            "unet": UNet2DConditionModel.from_config(configs["unet"]),
            "text_encoder": CLIPTextModel(CLIPTextConfig.from_dict(configs["text_encoder"])),
        }
        if "text_encoder_2" in configs:  # SDXL: OpenCLIP bigG with its projection
            models["text_encoder_2"] = CLIPTextModelWithProjection(CLIPTextConfig.from_dict(configs["text_encoder_2"]))
        return models


@functools.lru_cache(maxsize=4)
def _configs(base_model: str, config_ref: str = "") -> dict[str, dict]:
    from engine.render import model_files
    from engine.render.families import sd15, sdxl

    spec = model_files.ModelSpec("base model", "base_model", base_model, pipeline=True, half=False)
    if base_model.lower().endswith((".safetensors", ".ckpt")):
        # A single-file checkpoint carries no config: the config folder it loads with (EMAKI_BASE_MODEL_CONFIG),
        # when that is on disk and of the file's family, else its family's real configs.
        family, _ = model_files.base_family(Path(base_model).expanduser(), single_file=True)
        try:
            folder = model_files.resolve_config(spec, config_ref, model_files.hub_cache_dir()) if config_ref else None
        except ModelLoadError:
            folder = None
        if folder is not None and family and model_files.base_family(folder, single_file=False)[0] == family:
            return _folder_configs(base_model, folder)
        if family == "sdxl":
            return {"unet": sdxl.UNET_CONFIG, "text_encoder": sdxl.TEXT_CONFIG, "text_encoder_2": sdxl.TEXT_2_CONFIG}
        return {"unet": dict(sd15.UNET_CONFIG), "text_encoder": dict(sd15.TEXT_CONFIG)}
    try:
        # The folder the base model loads from (a hub id's cached snapshot, the tiny cache's repo): no download.
        folder = model_files.resolve(spec).path
    except Exception as exc:  # offline, not downloaded, not a diffusers folder: one line
        raise StyleFileError(
            f"cannot check styles against the base model '{base_model}': its config could not be read "
            f"({one_line(exc, 120)}); download the base model first"
        ) from exc
    return _folder_configs(base_model, folder)


def _folder_configs(base_model: str, ref: Path) -> dict[str, dict]:
    """The UNet's and text encoders' configs of a diffusers folder."""
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextConfig

    try:
        configs = {
            "unet": dict(UNet2DConditionModel.load_config(str(ref), subfolder="unet")),
            "text_encoder": CLIPTextConfig.from_pretrained(str(ref), subfolder="text_encoder").to_dict(),
        }
        if (ref / "text_encoder_2").is_dir():
            configs["text_encoder_2"] = CLIPTextConfig.from_pretrained(str(ref), subfolder="text_encoder_2").to_dict()
    except Exception as exc:  # offline, not downloaded, not a diffusers folder: one line
        raise StyleFileError(
            f"cannot check styles against the base model '{base_model}': its config could not be read "
            f"({one_line(exc, 120)}); download the base model first"
        ) from exc
    return configs


@functools.lru_cache(maxsize=4)
def base_architecture(base_model: str, config_ref: str = "") -> Architecture:
    """The architecture of a profile's base model (`tiny`, a hub id, a local folder, or a single file described
    by the config folder `config_ref`), cached per process."""
    return Architecture.of(
        meta_models(base_model, config_ref), build=functools.partial(meta_models, base_model, config_ref)
    )


# --- reading a file ---------------------------------------------------------------------------------
def locate(path: Path) -> tuple[Path, dict | None]:
    """The weights file to read and, for a peft adapter, its config. A folder must be a peft adapter."""
    display = path.name or str(path)
    if path.is_dir():
        weights, config = path / PEFT_WEIGHTS_NAME, path / PEFT_CONFIG_NAME
        if not (weights.is_file() and config.is_file()):
            raise StyleFileError(
                f"{display}: a folder is only read as a peft adapter ({PEFT_CONFIG_NAME} + {PEFT_WEIGHTS_NAME})"
            )
    elif path.is_file():
        weights, config = path, path.parent / PEFT_CONFIG_NAME
        if path.name != PEFT_WEIGHTS_NAME:
            config = Path("/nonexistent")  # a config beside some other file says nothing about it
    else:
        raise StyleFileError(f"{display}: no such file")
    if not config.is_file():
        return weights, None
    try:
        return weights, json.loads(config.read_text())
    except (OSError, ValueError) as exc:
        raise StyleFileError(f"{display}: {PEFT_CONFIG_NAME} is not readable JSON ({one_line(exc, 80)})") from exc


def load_tensors(weights: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The tensors and the safetensors header metadata (diffusers keeps a LoRA's alphas there)."""
    from safetensors import safe_open

    try:
        with safe_open(str(weights), framework="pt") as handle:
            metadata = handle.metadata() or {}
            tensors = {key: handle.get_tensor(key) for key in handle.keys()}  # noqa: SIM118 - not a dict
    except Exception as exc:  # random bytes, a pickle, a truncated download
        raise StyleFileError(
            f"{weights.name}: not a safetensors file ({one_line(exc, 80)}); "
            "only .safetensors style files are read (pickled .ckpt/.pt files can run code)"
        ) from exc
    if not tensors:
        raise StyleFileError(f"{weights.name}: the file holds no tensors")
    return tensors, metadata


def read_style(
    path: Path, arch: Architecture, check: bool = True, family: str = "", style_name: str = ""
) -> StyleLayers:
    """Read any supported style file as peft layers; with `check`, refuse it unless it fits `arch` and would
    change the output. Every refusal is a StyleFileError with one line naming the file. With `family` (the
    base's), a style whose keys show another family is refused first (StyleOfAnotherFamily, naming
    `style_name`)."""
    weights, config = locate(path)
    name = path.name
    tensors, metadata = load_tensors(weights)
    style_family_name = refuse_other_family(tensors, family, style_name or name, name, metadata)
    try:
        layers = _parse(tensors, config, metadata, arch)
        for model, named in layers.models.items():
            layers.models[model] = {arch.canonical(model, layer): w for layer, w in named.items()}
        text_half = weights.parent / TEXT_ENCODER_DIR
        if config is not None and (text_half / PEFT_WEIGHTS_NAME).is_file():
            # emaki's trainer keeps a LoHa/LoKr/IA3 text encoder's half in a peft folder of its own.
            _, text_config = locate(text_half)
            text_tensors, _ = load_tensors(text_half / PEFT_WEIGHTS_NAME)
            text_layers = _from_peft({f"text_encoder.{k}": v for k, v in text_tensors.items()}, text_config, arch)
            if text_layers.kind != layers.kind:
                raise StyleFileError(f"its {TEXT_ENCODER_DIR}/ half is {text_layers.kind}, the UNet's {layers.kind}")
            layers.models.setdefault("text_encoder", {}).update(text_layers.models.get("text_encoder", {}))
        if check:
            _check_values(layers)
            _check_layers(layers, arch)
        layers.family = style_family_name
    except StyleFileError as exc:
        raise StyleFileError(f"{name}: {exc}") from exc
    except Exception as exc:  # a conversion or peft failure on an odd file: still one line
        raise StyleFileError(f"{name}: cannot be read as a style ({type(exc).__name__}: {exc})") from exc
    return layers


def _parse(
    tensors: dict[str, torch.Tensor], config: dict | None, metadata: dict[str, str], arch: Architecture
) -> StyleLayers:
    keys = list(tensors)
    if "text_encoder_2" not in arch.layers and any(k.startswith(("lora_te2_", "text_encoder_2.")) for k in keys):
        raise StyleFileError("is an SDXL style (it has layers for a second text encoder); this base model is not")
    if config is not None:
        return _from_peft(tensors, config, arch)
    if all(k.startswith(tuple(prefix for prefix, _ in KOHYA_MODELS)) for k in keys):
        return _from_kohya(tensors, arch)
    if all(".processor." in k and re.search(r"_lora\.(down|up)\.weight$", k) for k in keys):
        return _from_attention_processors(tensors)
    if all(k.startswith(("unet.", "text_encoder.", "text_encoder_2.")) for k in keys):
        return _from_diffusers(tensors, metadata)
    if all(PEFT_PARAM.search(k) for k in keys):
        return _from_peft(tensors, None, arch)
    unknown = next(k for k in keys if not PEFT_PARAM.search(k))
    raise StyleFileError(f"unknown keys: not a LoRA/LyCORIS/IA3 style file (e.g. '{unknown}')")


def _alpha(value: torch.Tensor | None) -> float | None:
    return None if value is None else float(value.float().reshape(-1)[0])


def _from_kohya(tensors: dict[str, torch.Tensor], arch: Architecture) -> StyleLayers:
    groups: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in tensors.items():
        layer, _, param = key.partition(".")
        groups.setdefault(layer, {})[param] = tensor
    kinds = set()
    result = StyleLayers(kind="", source="kohya")
    for layer, params in groups.items():
        extra = set(params) - set(KOHYA_PARAMS) - {"alpha", "on_input"}
        if "dora_scale" in extra:
            raise StyleFileError("a DoRA file (dora_scale): DoRA styles are not supported")
        if extra:
            raise StyleFileError(f"unknown keys: '{layer}.{sorted(extra)[0]}'")
        layer_kinds = {KOHYA_PARAMS[p] for p in params if p in KOHYA_PARAMS}
        if len(layer_kinds) != 1:
            raise StyleFileError(f"unknown keys: layer '{layer}' has no complete adapter weights")
        kind = layer_kinds.pop()
        kinds.add(kind)
        prefix, model = next((p, m) for p, m in KOHYA_MODELS if layer.startswith(p))
        flat = layer[len(prefix) :]
        if model == "unet":
            layer = _ldm_to_diffusers_blocks(layer, arch)
            flat = layer[len("lora_unet_") :]
        name = arch.flat.get(model, {}).get(flat) or (_diffusers_unet_layer(layer) if model == "unet" else None)
        if name is None or name not in arch.layers.get(model, {}):
            name = f"?{layer}"  # not in the base model: reported by the check
        result.models.setdefault(model, {})[name] = _kohya_layer(kind, params, layer)
    if len(kinds) > 1:
        raise StyleFileError(f"mixes adapter kinds ({', '.join(sorted(kinds))}) in one file; emaki loads one kind")
    result.kind = kinds.pop()
    result.source = f"kohya {KIND_NAMES[result.kind]}"
    return result


LDM_BLOCK = re.compile(r"^lora_unet_(input_blocks|output_blocks)_(\d+)_(\d+)_(.+)$")
LDM_MIDDLE = re.compile(r"^lora_unet_middle_block_(\d+)_(.+)$")


def _ldm_to_diffusers_blocks(layer: str, arch: Architecture) -> str:
    """`input_blocks_4_1_…` (the original LDM checkpoint's block numbering) -> `down_blocks_1_attentions_0_…`,
    with the indices diffusers' `_maybe_map_sgm_blocks_to_diffusers` uses. That function itself cannot be used
    for SD1.5: it finds a block's keys by substring, so `input_blocks_1` also takes `input_blocks_10`'s."""
    per_block = int(getattr(arch.unet_config, "layers_per_block", 2)) + 1
    if match := LDM_MIDDLE.match(layer):
        index, rest = int(match[1]), match[2]
        inner = {0: "resnets_0", 1: "attentions_0", 2: "resnets_1"}.get(index)
        return f"lora_unet_mid_block_{inner}_{rest}" if inner else layer
    match = LDM_BLOCK.match(layer)
    if match is None or (match[1] == "input_blocks" and match[2] == "0"):  # input_blocks_0_0 is conv_in
        return layer
    blocks, number, part, rest = match[1], int(match[2]), int(match[3]), match[4]
    if blocks == "input_blocks":
        if rest.startswith("op"):
            return f"lora_unet_down_blocks_{(number - 1) // per_block}_downsamplers_0_{rest}"
        inner = ("resnets", "attentions")[min(part, 1)]
        return f"lora_unet_down_blocks_{(number - 1) // per_block}_{inner}_{(number - 1) % per_block}_{rest}"
    inner = ("resnets", "attentions", "upsamplers")[min(part, 2)]
    index = number % per_block if part < 2 else 0
    return f"lora_unet_up_blocks_{number // per_block}_{inner}_{index}_{rest}"


def _diffusers_unet_layer(layer: str) -> str | None:
    """A kohya UNet name that is not a plain dotted layer name (LDM spellings such as `input_blocks_1_1`,
    `in_layers_2`, `skip_connection`), mapped with diffusers' own kohya key converter."""
    from diffusers.loaders.lora_conversion_utils import _convert_unet_lora_key
    from diffusers.utils.state_dict_utils import convert_unet_state_dict_to_peft

    converted = _convert_unet_lora_key(f"{layer}.lora_down.weight")  # string rewrites only
    peft_key = next(iter(convert_unet_state_dict_to_peft({converted: None})))
    if not peft_key.endswith(".lora_A.weight"):
        return None
    return peft_key.replace(".processor.", ".").removesuffix(".lora_A.weight").removeprefix("unet.")


def _kohya_layer(kind: str, params: dict[str, torch.Tensor], layer: str) -> LayerWeights:
    """One kohya/LyCORIS layer under peft's names, with the scale A1111/ComfyUI give it (alpha / rank; 1 where
    the file has no alpha, or for a LoKr whose factors are both full matrices)."""
    alpha = _alpha(params.get("alpha"))
    try:
        if kind == "lora":
            down, up = params["lora_down.weight"], params["lora_up.weight"]
            rank = down.shape[0]
            return LayerWeights({"lora_A.weight": down, "lora_B.weight": up}, 1.0 if alpha is None else alpha / rank)
        if kind == "loha":
            weights = {p: params[p] for p in params if p.startswith("hada_")}
            lacking = [p for p in ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b") if p not in weights]
            if lacking:
                raise KeyError(lacking[0])
            rank = weights["hada_w1_b"].shape[0]
            return LayerWeights(weights, 1.0 if alpha is None else alpha / rank)
        if kind == "lokr":
            weights = {p: params[p] for p in params if p.startswith("lokr_")}
            rank = None
            if "lokr_w2_b" in weights:
                rank = weights["lokr_w2_b"].shape[0]
            elif "lokr_w1_b" in weights:
                rank = weights["lokr_w1_b"].shape[0]
            if not ("lokr_w1" in weights or "lokr_w1_a" in weights) or not (
                "lokr_w2" in weights or "lokr_w2_a" in weights
            ):
                raise KeyError("lokr_w1/lokr_w2")
            return LayerWeights(weights, 1.0 if alpha is None or rank is None else alpha / rank)
        # IA3 (LyCORIS/A1111): `weight` is added to 1 and scales the layer's output rows, or its input
        # columns when `on_input`; peft's IA3 holds the factor itself.
        vector = params["weight"].reshape(-1)
        on_input = bool(params["on_input"].reshape(-1)[0]) if "on_input" in params else False
        factor = 1 + vector.float()
        return LayerWeights({"ia3_l": factor.reshape(1, -1) if on_input else factor.reshape(-1, 1)})
    except KeyError as exc:
        raise StyleFileError(f"layer '{layer}' lacks '{exc.args[0]}'") from None


def _from_attention_processors(tensors: dict[str, torch.Tensor]) -> StyleLayers:
    """The old `unet.load_attn_procs` format: `<block>.attn1.processor.to_q_lora.down.weight`, no prefix.
    diffusers' own key map turns `to_q_lora.down` into `to_q.lora_A`; the `processor.` level goes."""
    from diffusers.utils.state_dict_utils import convert_unet_state_dict_to_peft

    converted = convert_unet_state_dict_to_peft({k.removeprefix("unet."): v for k, v in tensors.items()})
    layers = _group_peft({k.replace(".processor.", "."): v for k, v in converted.items()})
    return StyleLayers("lora", "attention-processor LoRA", {"unet": layers})


def _from_diffusers(tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> StyleLayers:
    """diffusers' LoRA format (what `save_lora_weights` writes, and its older `lora.down` spelling), converted
    with diffusers' own key maps, as its loader does. Alphas come from `.alpha` keys or from the LoRA config
    diffusers writes into the header (`lora_adapter_metadata`); without either, alpha = rank."""
    from diffusers.utils.state_dict_utils import (
        convert_state_dict_to_diffusers,
        convert_state_dict_to_peft,
        convert_unet_state_dict_to_peft,
    )

    try:
        adapter_metadata = json.loads(metadata.get("lora_adapter_metadata") or "{}")
    except ValueError:
        adapter_metadata = {}
    result = StyleLayers("lora", "diffusers LoRA")
    for model in MODELS:
        config = {k[len(model) + 1 :]: v for k, v in adapter_metadata.items() if k.startswith(model + ".")}
        part = {k[len(model) + 1 :]: v for k, v in tensors.items() if k.startswith(model + ".")}
        alphas = {k.removesuffix(".alpha"): v for k, v in part.items() if k.endswith(".alpha")}
        part = {k: v for k, v in part.items() if not k.endswith(".alpha")}
        if not part:
            continue
        if model == "unet":
            part = {k.replace(".processor.", "."): v for k, v in convert_unet_state_dict_to_peft(part).items()}
        else:
            part = convert_state_dict_to_peft(convert_state_dict_to_diffusers(part))
        layers = _group_peft(part)
        for name, weights in layers.items():
            alpha = _alpha(alphas.get(name))
            if "lora_A.weight" not in weights.params:
                continue
            if alpha is not None:
                weights.scale = alpha / weights.params["lora_A.weight"].shape[0]
            elif config:
                weights.scale = _peft_scale("lora", name, weights, config)
        result.models[model] = layers
    return result


def _group_peft(state: dict[str, torch.Tensor]) -> dict[str, LayerWeights]:
    layers: dict[str, LayerWeights] = {}
    for key, tensor in state.items():
        match = PEFT_PARAM.search(key)
        if match is None:
            raise StyleFileError(f"unknown keys: '{key}'")
        layers.setdefault(key[: match.start()], LayerWeights({})).params[match.group(1)] = tensor
    return layers


def _from_peft(tensors: dict[str, torch.Tensor], config: dict | None, arch: Architecture) -> StyleLayers:
    """peft's own format: `base_model.model.<layer>.<param>` (PeftModel) or `<layer>.<param>` (a bare
    `get_peft_model_state_dict`); the layer's model is the one that has it. Scales follow peft: alpha / r,
    with the config's per-layer patterns (alpha = r where there is no config)."""
    state = {k.removeprefix("base_model.model."): v for k, v in tensors.items()}
    grouped = _group_peft(state)
    kinds = {_peft_kind(next(iter(w.params))) for w in grouped.values()}
    if len(kinds) != 1:
        raise StyleFileError(f"mixes adapter kinds ({', '.join(sorted(kinds))}) in one file; emaki loads one kind")
    kind = kinds.pop()
    peft_type = str((config or {}).get("peft_type", kind)).lower()
    if peft_type != kind:
        raise StyleFileError(f"{PEFT_CONFIG_NAME} says {peft_type} but the weights are {kind}")
    result = StyleLayers(kind, f"peft {KIND_NAMES[kind]}")
    for name, weights in grouped.items():
        model = next((m for m in MODELS if name.startswith(m + ".")), None)
        layer = name[len(model) + 1 :] if model else name
        model = model or arch.model_of(layer) or "unet"
        if kind != "ia3":
            weights.scale = _peft_scale(kind, layer, weights, config)
        result.models.setdefault(model, {})[layer] = weights
    return result


def _peft_kind(param: str) -> str:
    return {"lora_": "lora", "hada_": "loha", "lokr_": "lokr", "ia3_l": "ia3"}[
        next(p for p in ("lora_", "hada_", "lokr_", "ia3_l") if param.startswith(p))
    ]


def _peft_scale(kind: str, layer: str, weights: LayerWeights, config: dict | None) -> float:
    from peft.utils.other import get_pattern_key

    p = weights.params
    shape_rank = (
        p["lora_A.weight"].shape[0]
        if kind == "lora"
        else p["hada_w1_b"].shape[0]
        if kind == "loha"
        else p.get("lokr_w2_b", p.get("lokr_w1_b", torch.empty(0))).shape[0] or None
    )
    if config is None:
        return 1.0
    rank_pattern, alpha_pattern = config.get("rank_pattern") or {}, config.get("alpha_pattern") or {}
    rank_key = get_pattern_key(list(rank_pattern), layer)
    rank = rank_pattern.get(rank_key, config.get("r", shape_rank or 8))
    alpha_key = get_pattern_key(list(alpha_pattern), layer)
    alpha = alpha_pattern.get(alpha_key, config.get("lora_alpha" if kind == "lora" else "alpha", rank))
    if kind == "lora" and config.get("use_rslora"):
        return alpha / math.sqrt(rank)
    return alpha / rank


# --- checking -------------------------------------------------------------------------------------
def _check_values(layers: StyleLayers) -> None:
    for model, named in layers.models.items():
        for name, weights in named.items():
            if not math.isfinite(weights.scale):
                raise StyleFileError(f"layer '{name}' has a non-finite alpha")
            for param, tensor in weights.params.items():
                values = tensor.float()
                if not torch.isfinite(values).all():
                    raise StyleFileError(f"weights are not finite (NaN or inf in {model} layer '{name}.{param}')")
                largest = float(values.abs().max()) if values.numel() else 0.0
                if largest > MAX_ABS_WEIGHT:
                    raise StyleFileError(
                        f"weights outside a sane range (|w| = {largest:.3g} > {MAX_ABS_WEIGHT:g} in layer "
                        f"'{name}.{param}'): not a trained style"
                    )
    if not any(_changes_output(layers.kind, w) for named in layers.models.values() for w in named.values()):
        raise StyleFileError("its weights are all zero (or alpha 0): it would change nothing")


def _changes_output(kind: str, weights: LayerWeights) -> bool:
    if kind == "ia3":
        return bool((weights.params["ia3_l"] != 1).any())
    return weights.scale != 0 and all(bool(t.any()) for t in weights.params.values())


def _check_layers(layers: StyleLayers, arch: Architecture) -> None:
    """Every layer of the file exists in the base model and its weights have the shapes peft gives that layer."""
    total = layers.n_layers
    missing = [
        (model, name)
        for model, named in layers.models.items()
        for name in named
        if name not in arch.layers.get(model, {})
    ]
    if len(missing) == total:
        example = missing[0][1].lstrip("?")
        raise StyleFileError(
            f"zero layers match the base model (e.g. '{example}'): a style for another model architecture?"
        )
    if missing:
        example = missing[0][1].lstrip("?")
        raise StyleFileError(
            f"{len(missing)} of {total} layers are not in the base model (e.g. '{example}'): "
            "a style for another model architecture?"
        )
    if arch.build is None:
        return
    models = arch.build()
    inject(layers, models, "check", low_cpu_mem_usage=True)
    from peft.utils import get_peft_model_state_dict

    for model, named in layers.models.items():
        expected = get_peft_model_state_dict(models[model], adapter_name="check")
        for name, weights in named.items():
            for param, tensor in list(weights.params.items()):
                wanted = expected.get(f"{name}.{param}")
                if wanted is None:
                    raise StyleFileError(
                        f"layer '{name}' has '{param}', which a {KIND_NAMES[layers.kind]} of this layer does not have"
                    )
                if tuple(tensor.shape) != tuple(wanted.shape):
                    if tensor.numel() == wanted.numel() and tensor.squeeze().shape == wanted.squeeze().shape:
                        weights.params[param] = tensor.reshape(wanted.shape)  # 1x1 conv vs linear spelling
                        continue
                    raise StyleFileError(
                        f"shapes do not fit the base model: '{name}.{param}' is {tuple(tensor.shape)}, the layer "
                        f"needs {tuple(wanted.shape)} (a style for another model architecture?)"
                    )


# --- peft configs and loading -----------------------------------------------------------------------
def peft_config(kind: str, layers: dict[str, LayerWeights]) -> PeftConfig:
    """A peft config that recreates exactly these layers: their names, per-layer ranks and scales."""
    from peft import IA3Config, LoHaConfig, LoKrConfig, LoraConfig

    names = sorted(layers)
    pattern = {name: re.escape(name) for name in names}
    if kind == "ia3":
        feedforward = [n for n in names if layers[n].params["ia3_l"].shape[0] == 1]
        return IA3Config(target_modules=names, feedforward_modules=feedforward)
    ranks = {name: _rank(kind, layers[name]) for name in names}
    rank_pattern = {pattern[n]: ranks[n] for n in names}
    alpha_pattern = {pattern[n]: layers[n].scale * ranks[n] for n in names}
    first = names[0]
    if kind == "lora":
        return LoraConfig(
            r=ranks[first],
            lora_alpha=alpha_pattern[pattern[first]],
            target_modules=names,
            rank_pattern=rank_pattern,
            alpha_pattern=alpha_pattern,
        )
    tucker = any("hada_t1" in w.params or "lokr_t2" in w.params for w in layers.values())
    if kind == "loha":
        return LoHaConfig(
            r=ranks[first],
            alpha=alpha_pattern[pattern[first]],
            target_modules=names,
            rank_pattern=rank_pattern,
            alpha_pattern=alpha_pattern,
            use_effective_conv2d=tucker,
        )
    return LoKrConfig(
        r=ranks[first],
        alpha=alpha_pattern[pattern[first]],
        target_modules=names,
        rank_pattern=rank_pattern,
        alpha_pattern=alpha_pattern,
        use_effective_conv2d=tucker,
        decompose_both=any("lokr_w1_a" in w.params for w in layers.values()),
    )


def _rank(kind: str, weights: LayerWeights) -> int:
    p = weights.params
    if kind == "lora":
        return p["lora_A.weight"].shape[0]
    if kind == "loha":
        return p["hada_w1_b"].shape[0]
    # LoKr: peft keeps a factor as a full matrix when r >= half its larger side, so a layer whose factors are
    # both full gets a rank at least that large (its scale, alpha / r, is then set through alpha).
    if "lokr_w2_b" in p:
        return p["lokr_w2_b"].shape[0]
    if "lokr_w1_b" in p:
        return p["lokr_w1_b"].shape[0]
    return max(max(t.shape) for t in p.values())


def inject(layers: StyleLayers, models: dict[str, nn.Module], adapter: str, low_cpu_mem_usage: bool = False) -> None:
    from peft import inject_adapter_in_model

    for model, named in layers.models.items():
        inject_adapter_in_model(
            peft_config(layers.kind, named), models[model], adapter_name=adapter, low_cpu_mem_usage=low_cpu_mem_usage
        )


def load_into(layers: StyleLayers, models: dict[str, nn.Module], adapter: str) -> None:
    """Inject the style's layers into the real models under `adapter` and load its weights."""
    from peft import set_peft_model_state_dict

    inject(layers, models, adapter)
    for model, named in layers.models.items():
        state = {f"{name}.{param}": t for name, w in named.items() for param, t in w.params.items()}
        result = set_peft_model_state_dict(models[model], state, adapter_name=adapter)
        unexpected = getattr(result, "unexpected_keys", None)
        if unexpected:
            raise StyleFileError(f"weights do not fit the base model (e.g. '{unexpected[0]}')")


def delete_from(models: list[nn.Module], adapter: str) -> None:
    """Remove an adapter from every layer that has it (a style being reloaded from a new file)."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    for model in models:
        for module in model.modules():
            if isinstance(module, BaseTunerLayer) and adapter in _adapter_names(module):
                module.delete_adapter(adapter)
        config = getattr(model, "peft_config", None)
        if isinstance(config, dict):
            config.pop(adapter, None)


def _adapter_names(module: nn.Module) -> set[str]:
    names: set[str] = set()
    for attr in getattr(module, "adapter_layer_names", ()):
        names.update(getattr(module, attr, {}).keys())
    return names


def kinds_loaded(models: list[nn.Module]) -> set[str]:
    """The adapter kinds injected into these models (peft records each adapter's config on the model)."""
    return {
        str(config.peft_type.value).lower()
        for model in models
        for config in (getattr(model, "peft_config", None) or {}).values()
    }


def unload_all(models: list[nn.Module]) -> None:
    """Put every adapted layer back to its plain base layer and forget every adapter. Layers of two kinds must
    not nest (peft's LoRA cannot wrap a LoHa-wrapped conv, for one), so a style of another kind than those
    loaded starts from the plain model."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    for model in models:
        wrapped = [name for name, module in model.named_modules() if isinstance(module, BaseTunerLayer)]
        outermost = [n for n in wrapped if not any(n.startswith(other + ".") for other in wrapped)]
        for name in outermost:
            parent_name, _, child = name.rpartition(".")
            parent = model.get_submodule(parent_name) if parent_name else model
            setattr(parent, child, model.get_submodule(name).get_base_layer())
        if hasattr(model, "peft_config"):
            del model.peft_config
