"""The trainer's choices, in a module that imports nothing heavy: the CLI builds its parser (and
`emaki --help`) from these without importing torch or diffusers."""

from __future__ import annotations

ADAPTERS = ("lora", "loha", "lokr", "ia3")
# On an SDXL base: IA3 has no SDXL export that LyCORIS and A1111 agree on (training/sdxl.py).
SDXL_ADAPTERS = ("lora", "loha", "lokr")
OPTIMIZERS = ("adamw", "prodigy")
LR_SCHEDULERS = ("constant", "cosine", "linear")
GRADIENT_CHECKPOINTING = ("auto", "on", "off")
# AdamW learning rates that move each kind on a few hundred steps. LyCORIS' guidance: LoRA ~1e-4,
# LoHa/LoKr several times higher (their products of small factors start tiny), iA3 5e-3..1e-2 (it
# learns one scale per channel). Prodigy estimates its own step size: 1.0 means "as estimated".
DEFAULT_LR = {"lora": 1e-4, "loha": 1e-3, "lokr": 1e-3, "ia3": 5e-3}
