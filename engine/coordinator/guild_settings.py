"""Per-server settings: what a server's admins changed with /settings, over the operator's settings.

The operator's settings (env/TOML) stay the defaults and the hard bounds: a server may lower a
maximum, never raise it, and its values are clamped again whenever they are read, so an operator
who lowers a limit later is obeyed at once. Values are validated with the settings' own rules
(engine/settings.py `check_value`), so a server hears the same words for the same mistake as the
operator. No discord import: the bot resolves channel and role names to ids before calling here.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from engine.coordinator.blocklist import Blocklist, same_entry
from engine.coordinator.store import Store
from engine.errors import InvalidRequest
from engine.settings import FALSE_WORDS, TRUE_WORDS, Settings, check_value, rule_of

NSFW_POLICIES = rule_of("nsfw_policy").choices
MAX_BLOCKLIST_ENTRIES = 200
MAX_CHANNELS = 25
RESET_WORDS = ("default", "reset")


@dataclass(frozen=True)
class Key:
    name: str
    kind: str  # int | channels | role | choice | bool
    help: str
    bound: str = ""  # the operator's field a server may lower but never exceed


KEYS: dict[str, Key] = {
    k.name: k
    for k in (
        Key("animate_channels", "channels", "channels where /animate may be used (none: everywhere)"),
        Key("train_channels", "channels", "channels where /train may be used (none: everywhere)"),
        Key("frames", "int", "frames when a member does not say"),
        Key("max_frames", "int", "the most frames a member may ask for", bound="max_frames"),
        Key("steps", "int", "denoising steps when a member does not say"),
        Key("max_steps", "int", "the most steps a member may ask for", bound="max_steps"),
        Key("width", "int", "frame width in pixels (a multiple of 8)"),
        Key("height", "int", "frame height in pixels (a multiple of 8)"),
        Key("max_size", "int", "the largest width or height", bound="max_size"),
        Key("max_pending_per_member", "int", "jobs one member may have waiting", bound="max_pending_per_member"),
        Key("moderator_role", "role", "the role that approves datasets and removes styles (besides Manage Server)"),
        Key("nsfw_policy", "choice", "age-restricted channels: screen (check frames) or allow (do not)"),
        Key("other_styles", "bool", "whether styles other servers share are listed and usable here"),
    )
}


@dataclass(frozen=True)
class GuildSettings:
    """One server's own values; None (or empty) means "the operator's"."""

    animate_channels: tuple[int, ...] = ()
    train_channels: tuple[int, ...] = ()
    frames: int | None = None
    max_frames: int | None = None
    steps: int | None = None
    max_steps: int | None = None
    width: int | None = None
    height: int | None = None
    max_size: int | None = None
    max_pending_per_member: int | None = None
    moderator_role: str | None = None
    nsfw_policy: str | None = None
    other_styles: bool = True
    blocklist: tuple[str, ...] = ()

    @classmethod
    def from_values(cls, values: dict[str, Any]) -> GuildSettings:
        """From the store's rows. Keys this version does not know (a newer version wrote them) are skipped."""
        names = {f.name for f in dataclasses.fields(cls)}
        kept = {k: tuple(v) if isinstance(v, list) else v for k, v in values.items() if k in names}
        return cls(**kept)

    @property
    def blocked(self) -> Blocklist:
        return Blocklist.parse(self.blocklist)

    def limits(self, settings: Settings) -> Settings:
        """The operator's settings with this server's defaults and limits, each clamped to the operator's
        bounds (a default above a lowered maximum follows the maximum)."""
        max_frames = min(self.max_frames or settings.max_frames, settings.max_frames)
        max_steps = min(self.max_steps or settings.max_steps, settings.max_steps)
        max_size = max(min(self.max_size or settings.max_size, settings.max_size), settings.min_size)
        cap = min(self.max_pending_per_member or settings.max_pending_per_member, settings.max_pending_per_member)
        return dataclasses.replace(
            settings,
            max_frames=max_frames,
            frames=min(self.frames or settings.frames, max_frames),
            max_steps=max_steps,
            steps=min(self.steps or settings.steps, max_steps),
            max_size=max_size,
            width=max(min(self.width or settings.width, max_size), settings.min_size),
            height=max(min(self.height or settings.height, max_size), settings.min_size),
            max_pending_per_member=cap,
            moderator_role=self.moderator_role if self.moderator_role is not None else settings.moderator_role,
            nsfw_policy=self.nsfw_policy or settings.nsfw_policy,
        )

    def changed(self, key: str, value: Any, settings: Settings) -> GuildSettings:
        """A copy with `key` set to `value` (already typed: ints, a tuple of channel ids, a role), or reset
        with None; InvalidRequest naming the key and what it may hold when the value does not fit."""
        if key not in KEYS:
            raise InvalidRequest(f"unknown setting {_echo(key)}: use one of {', '.join(KEYS)}")
        if value is None:
            default = GuildSettings()
            return dataclasses.replace(self, **{key: getattr(default, key)})
        spec = KEYS[key]
        if spec.kind == "int":
            if isinstance(value, bool) or not isinstance(value, int):
                raise InvalidRequest(f"{key} must be a whole number (got {value!r})")
            _check_int(key, value, self.limits(settings), settings)
            value = check_value(key, value)  # every int key is also a Settings field: the same words
        elif spec.kind == "channels":
            if len(value) > MAX_CHANNELS:
                raise InvalidRequest(f"{key}: at most {MAX_CHANNELS} channels")
            value = tuple(dict.fromkeys(value))
        elif spec.kind == "choice":
            value = check_value(key, value)
        return dataclasses.replace(self, **{key: value})

    def with_pattern(self, pattern: str) -> GuildSettings:
        """The blocklist with one more entry; a pattern that does not compile is refused."""
        entry = pattern.strip()
        if not entry:
            raise InvalidRequest("the pattern is empty")
        if any(same_entry(entry, kept) for kept in self.blocklist):
            raise InvalidRequest(f"'{entry}' is already on the blocklist")
        if len(self.blocklist) >= MAX_BLOCKLIST_ENTRIES:
            raise InvalidRequest(f"the blocklist holds {MAX_BLOCKLIST_ENTRIES} entries at most: remove one first")
        Blocklist.parse([entry], probe=True)
        return dataclasses.replace(self, blocklist=(*self.blocklist, entry))

    def without_pattern(self, pattern: str) -> GuildSettings:
        """The blocklist less the entry that is `pattern` folded the way adding folds it (`Ogre` added,
        `ogre` removed): otherwise an entry refused as a duplicate could not be removed by that name."""
        entry = pattern.strip()
        kept = tuple(e for e in self.blocklist if not same_entry(entry, e))
        if len(kept) == len(self.blocklist):
            raise InvalidRequest(f"'{entry}' is not on the blocklist (see /settings blocklist list)")
        return dataclasses.replace(self, blocklist=kept)

    def values(self) -> dict[str, Any]:
        """What the store keeps: only what differs from the defaults."""
        default = GuildSettings()
        return {
            f.name: list(v) if isinstance(v, tuple) else v
            for f in dataclasses.fields(self)
            if (v := getattr(self, f.name)) != getattr(default, f.name)
        }


def _check_int(key: str, value: int, current: Settings, operator: Settings) -> None:
    """Ranges that depend on other values: a default within this server's maximum, a maximum within
    the operator's, a size a multiple of 8 within the size limits."""
    if KEYS[key].bound and value > getattr(operator, key):
        limit = getattr(operator, key)
        raise InvalidRequest(f"{key} must be between 1 and {limit}, the bot operator's limit (got {value})")
    if key == "frames" and not 1 <= value <= current.max_frames:
        raise InvalidRequest(f"frames must be between 1 and max_frames ({current.max_frames}) (got {value})")
    if key == "steps" and not 1 <= value <= current.max_steps:
        raise InvalidRequest(f"steps must be between 1 and max_steps ({current.max_steps}) (got {value})")
    if key in ("steps", "max_steps") and int(value * operator.strength) < 1:
        # img2img runs int(steps x strength) steps: below one, every default /animate would be refused.
        least = math.ceil(1 / operator.strength)
        raise InvalidRequest(
            f"{key} must be at least {least}: at the default strength {operator.strength} fewer steps leave "
            f"frames after the first no denoising step (got {value})"
        )
    if key in ("width", "height", "max_size"):
        high = operator.max_size if key == "max_size" else current.max_size
        if value % 8 or not operator.min_size <= value <= high:
            raise InvalidRequest(f"{key} must be a multiple of 8 between {operator.min_size} and {high} (got {value})")


def parse_scalar(key: str, raw: str) -> Any:
    """A /settings value typed as text, as its key holds it (channels and roles: the bot's job)."""
    spec = KEYS.get(key)
    if spec is None:
        raise InvalidRequest(f"unknown setting {_echo(key)}: use one of {', '.join(KEYS)}")
    text = raw.strip()
    if spec.kind == "int":
        # ASCII digits only and at most 9 of them: int() would take "٣", "1_0" and 5000-digit numbers.
        if not re.fullmatch(r"[+-]?[0-9]{1,9}", text):
            raise InvalidRequest(f"{key} must be a whole number (got {_echo(raw)})")
        return int(text)
    if spec.kind == "bool":
        word = text.lower()
        if word in TRUE_WORDS or word in FALSE_WORDS:
            return word in TRUE_WORDS
        raise InvalidRequest(f"{key} must be on or off (got {_echo(raw)})")
    return text


def _echo(raw: str, limit: int = 40) -> str:
    """A member's value quoted back, cut short: the answer must fit Discord's 2,000 characters."""
    return repr(raw if len(raw) <= limit else raw[:limit] + "…")


def load(store: Store, guild_id: int | None) -> GuildSettings:
    if guild_id is None:
        return GuildSettings()
    return GuildSettings.from_values(store.guild_settings(guild_id))


def save(store: Store, guild_id: int, before: GuildSettings, after: GuildSettings) -> None:
    """Write only the keys that changed (one row per key)."""
    old, new = before.values(), after.values()
    for key in set(old) | set(new):
        if old.get(key) != new.get(key):
            store.set_guild_setting(guild_id, key, new.get(key))


def check_steps(limits: Settings, steps: int | None) -> None:
    if steps is not None and not 1 <= steps <= limits.max_steps:
        raise InvalidRequest(f"steps must be between 1 and {limits.max_steps} (got {steps})")


def must_screen(age_restricted: bool, policy: str) -> bool:
    """Discord's rule: outside age-restricted channels every frame is screened; inside them the
    server's policy decides."""
    return not age_restricted or policy == "screen"


def allowed_in(channels: Iterable[int], channel_id: int, parent_id: int | None = None) -> bool:
    """Whether a command may run in a channel (or a thread of one); no channels listed: everywhere."""
    listed = set(channels)
    return not listed or channel_id in listed or (parent_id is not None and parent_id in listed)


def visible_style(store: Store, guild_id: int | None, name: str, shared_from_others: bool) -> dict[str, Any] | None:
    """The style row if this server may use it; None for unknown names and other servers' private styles
    alike, so a name from another server is never confirmed to exist."""
    row = store.style(name)
    if row is None:
        return None
    owner = row.get("guild_id")
    if owner is None or owner == guild_id or (shared_from_others and row.get("shared")):
        return row
    return None
