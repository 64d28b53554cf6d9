"""An admin-editable blocklist of words and patterns, matched case- and accent-insensitively.

Text and patterns are both normalised the same way before matching: Unicode NFKD with combining
marks dropped (é -> e, ｆｕｌｌ-width -> ascii), invisible format characters (zero-width spaces and
joiners) removed, then case-folded. So "Crème", "CREME" and "cr\u200beme" all meet a pattern "creme".
Each entry is a regular expression; a plain word is matched as a whole word.
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Iterable
from dataclasses import dataclass

from engine.errors import InvalidRequest

MAX_PATTERN_CHARS = 200
PLAIN_WORD = re.compile(r"^[\w\s'-]+$")


def normalise(text: str) -> str:
    decomposed = unicodedata.normalize("NFKD", text)
    kept = (c for c in decomposed if not unicodedata.combining(c) and unicodedata.category(c) != "Cf")
    return "".join(kept).casefold()


@dataclass(frozen=True)
class Blocklist:
    entries: tuple[str, ...]
    _compiled: tuple[re.Pattern[str], ...]

    @classmethod
    def parse(cls, entries: Iterable[str]) -> Blocklist:
        """Compile every entry, refusing the first that is empty, too long or not a valid pattern."""
        kept: list[str] = []
        compiled: list[re.Pattern[str]] = []
        for raw in entries:
            entry = raw.strip()
            if not entry:
                continue
            if len(entry) > MAX_PATTERN_CHARS:
                raise InvalidRequest(f"blocklist entry '{entry[:40]}...' is longer than {MAX_PATTERN_CHARS} characters")
            pattern = normalise(entry)
            if PLAIN_WORD.match(pattern):
                pattern = r"\b" + re.escape(pattern).replace(r"\ ", r"\s+") + r"\b"
            try:
                compiled.append(re.compile(pattern))
            except re.error as exc:
                raise InvalidRequest(f"blocklist entry '{entry}' is not a valid pattern: {exc}") from None
            kept.append(entry)
        return cls(tuple(kept), tuple(compiled))

    def first_match(self, text: str) -> str | None:
        """The entry that `text` hits, or None."""
        plain = normalise(text)
        for entry, pattern in zip(self.entries, self._compiled, strict=True):
            if pattern.search(plain):
                return entry
        return None
