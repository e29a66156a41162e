"""Pronounceable, syllable-built names: people, places, companies.

Every name is made here from syllables (consonant onset + vowel nucleus + optional coda),
so no text is copied from anywhere and a seed fixes them all. Uniqueness is the caller's
job (a `NamePool` keeps a set of what it has handed out).
"""

from __future__ import annotations

import random

ONSETS = ["b", "br", "c", "d", "dr", "f", "g", "gr", "h", "j", "k", "kr", "l", "m", "n",
          "p", "pr", "r", "s", "sh", "st", "t", "th", "tr", "v", "w", "z", "ch", "bl", "fl"]
NUCLEI = ["a", "e", "i", "o", "u", "a", "e", "o", "ai", "ea", "ei", "ou", "ia"]
CODAS = ["", "", "", "", "n", "r", "l", "s", "m", "k", "nd", "rt", "th", "st"]

FEMALE_ENDINGS = ["a", "ia", "ine", "elle", "ena", "ora", "is", "ey", "ette", "ara"]
MALE_ENDINGS = ["o", "an", "er", "us", "el", "in", "ek", "or", "as", "im"]
SURNAME_ENDINGS = ["son", "ova", "wick", "berg", "ley", "ton", "ani", "ez", "mann", "ard",
                   "ski", "ford", "ell", "ic", "ros", "well", "dal", "ino", "sen", "ov"]
CITY_ENDINGS = ["burg", "ford", "haven", "ton", "mouth", "vale", "stead", "port", "field",
                "bridge", "holm", "wick", "minster", "by", "dale", "gate"]
COUNTRY_ENDINGS = ["ia", "land", "stan", "ora", "avia", "mark", "onia", "ador"]
RIVER_ENDINGS = ["e", "a", "en", "is", "ar", "uin"]


def _syllable(rng: random.Random, coda: bool = True) -> str:
    return rng.choice(ONSETS) + rng.choice(NUCLEI) + (rng.choice(CODAS) if coda else "")


def _stem(rng: random.Random, syllables: int) -> str:
    # Only the last syllable may take a coda: keeps clusters like "rtst" out of names.
    parts = [_syllable(rng, coda=False) for _ in range(syllables - 1)]
    parts.append(_syllable(rng, coda=True))
    return "".join(parts)


def _join(stem: str, ending: str) -> str:
    # Avoid doubled vowels at the seam ("Mara" + "a"): drop the stem's last vowel.
    if stem[-1] in "aeiouy" and ending[0] in "aeiouy":
        stem = stem[:-1] or stem
    return (stem + ending).capitalize()


def first_name(rng: random.Random, gender: str) -> str:
    endings = FEMALE_ENDINGS if gender == "female" else MALE_ENDINGS
    return _join(_stem(rng, rng.choice([1, 1, 2])), rng.choice(endings))


def last_name(rng: random.Random) -> str:
    return _join(_stem(rng, rng.choice([1, 2, 2])), rng.choice(SURNAME_ENDINGS))


def place_name(rng: random.Random, endings: list[str]) -> str:
    return _join(_stem(rng, rng.choice([1, 2])), rng.choice(endings))


def plain_name(rng: random.Random) -> str:
    """A bare capitalised stem, for company brands and rivers."""
    return _stem(rng, rng.choice([2, 2, 3])).capitalize()


class NamePool:
    """Hands out names from `make` that were never handed out before (by any pool sharing `taken`)."""

    def __init__(self, taken: set[str] | None = None):
        self.taken = taken if taken is not None else set()

    def unique(self, make, tries: int = 10_000) -> str:
        for _ in range(tries):
            name = make()
            if name not in self.taken:
                self.taken.add(name)
                return name
        raise RuntimeError("name space exhausted: too many entities for the syllable inventory")
