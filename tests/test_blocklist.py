"""Blocklist: case-, accent- and invisible-character-insensitive; bad patterns refused with one line."""

from __future__ import annotations

import pytest

from engine.blocklist import Blocklist
from engine.errors import InvalidRequest

CASES = [
    ("a creme brulee at dawn", "creme"),
    ("A CRÈME brûlée at dawn", "creme"),
    ("a cr\u200beme brulee", "creme"),  # a zero-width space does not hide a word
    ("ｃｒｅｍｅ in full width", "creme"),
    ("a creamery at dawn", None),  # plain words match whole words only
    ("a gorecki symphony", None),
    ("blood and GORE", "gore"),
    ("a bad    word here", "bad word"),
    ("nazi-era uniform", r"naz[i1]"),
    ("a fox naps", None),
]


@pytest.mark.parametrize(("text", "expected"), CASES)
def test_matching_ignores_case_accents_and_invisible_characters(text: str, expected: str | None) -> None:
    blocklist = Blocklist.parse(["creme", "gore", "bad word", r"naz[i1]", "  "])
    assert blocklist.first_match(text) == expected


@pytest.mark.parametrize(("entry", "message"), [("(unclosed", "not a valid pattern"), ("x" * 201, "longer than")])
def test_bad_entries_are_refused_with_one_line(entry: str, message: str) -> None:
    with pytest.raises(InvalidRequest, match=message) as caught:
        Blocklist.parse(["fine", entry])
    assert "\n" not in str(caught.value)
