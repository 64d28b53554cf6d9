"""An admin-editable blocklist of words and patterns, matched case- and accent-insensitively.

Text is normalised before matching: Unicode NFKD with combining marks dropped (é -> e, ｆｕｌｌ-width
-> ascii), every default-ignorable (invisible) character removed, Cyrillic and Greek lookalikes of
Latin letters folded to them, then case-folded. So "Crème", "CREME", "cr\u200beme", "cr\u034feme"
and "сreme" (a Cyrillic с) all meet an entry "creme". Entries get the same accent and width
treatment but are never case-folded (that would turn `\\S` into `\\s` and `\\A` into a bell), and are
compiled case-insensitively instead. A plain word is matched as a whole word; anything else is a
regular expression.

Matching uses the `regex` package (already installed with transformers) rather than `re` for one
reason: it takes a timeout. A pattern like `(a+)+$` backtracks exponentially; an admin typo must not
freeze the bot for every server. A pattern that is slow on a probe string is refused when it is
added, and a match that still runs out of time counts as a hit (fail closed), so a prompt is never
let through because the check gave up.
"""

from __future__ import annotations

import logging
import time
import unicodedata
from collections.abc import Iterable
from dataclasses import dataclass

import regex

from engine.errors import InvalidRequest

log = logging.getLogger(__name__)

MAX_PATTERN_CHARS = 200
PLAIN_WORD = regex.compile(r"^[\w\s'-]+$")
MATCH_TIMEOUT_S = 0.05  # per entry and text: a sane pattern takes microseconds on a prompt
TOTAL_TIMEOUT_S = 0.25  # for all entries on one text, however many there are
PROBE_LENGTH = 64  # "aaaa...!" of this length makes a catastrophic pattern take seconds


# Unicode's Default_Ignorable_Code_Point: every character a renderer may draw as nothing (U+034F
# combining grapheme joiner, U+FE0F variation selector, U+3164 and U+115F Hangul fillers, U+17B4,
# U+180B, zero-width spaces and joiners, soft hyphens...). Format characters (Cf) are not all of them.
INVISIBLE = regex.compile(r"[\p{Default_Ignorable_Code_Point}\p{Cf}]+")

# Lookalikes of Latin letters (Unicode TR39 calls them confusables) from the Cyrillic and Greek
# alphabets, folded to the Latin letter: with `ogre` blocked, `оgre` (Cyrillic о) is `ogre`. A small
# table of our own, not TR39's full skeleton: no maintained PyPI package computes skeletons without
# new dependencies (confusable-homoglyphs detects but does not fold; confusables is unmaintained since
# 2021). NFKD already folds full-width and mathematical letters. Only used to match, never shown.
CONFUSABLES = str.maketrans(
    {
        # Cyrillic, lower and upper case (an admin's entry is not case-folded before its own fold)
        **dict.fromkeys("аА", "a"), **dict.fromkeys("вВ", "b"), **dict.fromkeys("сСϲϹ", "c"),
        **dict.fromkeys("ԁ", "d"), **dict.fromkeys("еЕёЁ", "e"), **dict.fromkeys("һҺнН", "h"),
        **dict.fromkeys("іІӏӀ", "i"), **dict.fromkeys("јЈ", "j"), **dict.fromkeys("кК", "k"),
        **dict.fromkeys("мМ", "m"), **dict.fromkeys("оО", "o"), **dict.fromkeys("рР", "p"),
        **dict.fromkeys("ԛԚ", "q"), **dict.fromkeys("ѕЅ", "s"), **dict.fromkeys("тТ", "t"),
        **dict.fromkeys("уУүҮ", "y"), **dict.fromkeys("ԝԜ", "w"), **dict.fromkeys("хХ", "x"),
        **dict.fromkeys("ѵѴ", "v"), **dict.fromkeys("ɡ", "g"), **dict.fromkeys("ı", "i"),
        # Greek
        **dict.fromkeys("αΑ", "a"), **dict.fromkeys("βΒ", "b"), **dict.fromkeys("εΕ", "e"),
        **dict.fromkeys("ζΖ", "z"), **dict.fromkeys("ηΗ", "h"), **dict.fromkeys("ιΙ", "i"),
        **dict.fromkeys("κΚ", "k"), **dict.fromkeys("μΜ", "m"), **dict.fromkeys("νΝ", "n"),
        **dict.fromkeys("οΟσ", "o"), **dict.fromkeys("ρΡ", "p"), **dict.fromkeys("τΤ", "t"),
        **dict.fromkeys("υΥ", "y"), **dict.fromkeys("χΧ", "x"),
    }
)  # fmt: skip


def _strip_marks(text: str) -> str:
    """NFKD without combining marks, invisible characters removed, lookalike letters folded to Latin."""
    decomposed = INVISIBLE.sub("", unicodedata.normalize("NFKD", text))
    return "".join(c for c in decomposed if not unicodedata.combining(c)).translate(CONFUSABLES)


def normalise(text: str) -> str:
    """Text as the blocklist reads it: no accents, no invisible characters, no lookalikes, case-folded."""
    return _strip_marks(text).casefold()


def _compile(entry: str) -> regex.Pattern[str]:
    source = _strip_marks(entry)
    if not source.strip():
        raise InvalidRequest("the entry has no visible characters")
    if PLAIN_WORD.match(source):
        source = r"\b" + regex.escape(source.casefold()).replace(r"\ ", r"\s+") + r"\b"
    try:
        pattern = regex.compile(source, regex.IGNORECASE | regex.V0)
    except regex.error as exc:
        raise InvalidRequest(f"blocklist entry '{entry}' is not a valid pattern: {exc}") from None
    if pattern.search("") is not None:
        raise InvalidRequest(f"blocklist entry '{entry}' matches empty text, so it would refuse every prompt")
    return pattern


def _too_slow(pattern: regex.Pattern[str]) -> bool:
    """Whether the pattern backtracks catastrophically on runs of the characters it names."""
    letters = {c for c in pattern.pattern if c.isalnum()} | {"a"}
    for letter in sorted(letters)[:16]:
        try:
            pattern.search(letter * PROBE_LENGTH + "!", timeout=MATCH_TIMEOUT_S)
        except TimeoutError:
            return True
    return False


@dataclass(frozen=True)
class Blocklist:
    entries: tuple[str, ...]
    _compiled: tuple[regex.Pattern[str], ...]

    @classmethod
    def parse(cls, entries: Iterable[str], probe: bool = False) -> Blocklist:
        """Compile every entry, refusing the first that is too long, invisible, not a valid pattern,
        matches empty text, or (with `probe`, when an admin adds one) backtracks catastrophically."""
        kept: list[str] = []
        compiled: list[regex.Pattern[str]] = []
        for raw in entries:
            entry = raw.strip()
            if not entry:
                continue
            if len(entry) > MAX_PATTERN_CHARS:
                raise InvalidRequest(f"blocklist entry '{entry[:40]}...' is longer than {MAX_PATTERN_CHARS} characters")
            pattern = _compile(entry)
            if probe and _too_slow(pattern):
                raise InvalidRequest(
                    f"blocklist entry '{entry}' is too slow to match (nested repetition such as `(a+)+`): simplify it"
                )
            kept.append(entry)
            compiled.append(pattern)
        return cls(tuple(kept), tuple(compiled))

    def first_match(self, text: str) -> str | None:
        """The entry that `text` hits, or None. An entry that runs out of time counts as a hit."""
        plain = normalise(text)
        deadline = time.monotonic() + TOTAL_TIMEOUT_S  # the bot matches on its event loop: bounded
        for entry, pattern in zip(self.entries, self._compiled, strict=True):
            budget = min(MATCH_TIMEOUT_S, deadline - time.monotonic())
            try:
                if budget <= 0 or pattern.search(plain, timeout=budget):
                    return entry
            except TimeoutError:
                log.warning("blocklist entry %r timed out on %d characters; counted as a match", entry, len(plain))
                return entry
        return None


def same_entry(a: str, b: str) -> bool:
    """Whether two entries are one for the admin (`cat`, `CAT` and `Cat` are one word)."""
    return normalise(a.strip()) == normalise(b.strip())
