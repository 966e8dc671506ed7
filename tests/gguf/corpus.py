"""A corpus of varied strings for tokenizer comparisons: slices of the Python standard library's
sources (code, prose, docstrings) plus generated cases (whitespace runs, Unicode of many scripts,
emoji, numbers, special tokens alone and glued to text). Deterministic for a given seed.
"""

from __future__ import annotations

import random
import sysconfig
from pathlib import Path

SOURCES = ("textwrap.py", "json/decoder.py", "email/_header_value_parser.py", "difflib.py",
           "locale.py", "unicodedata.py", "turtle.py", "html/entities.py", "calendar.py",
           "encodings/cp1252.py", "fractions.py", "tomllib/_parser.py")
UNICODE = ["naïve café", "Grüße aus Köln", "日本語のテキスト", "中文分词测试", "한국어 문장입니다",
           "Привет, мир!", "مرحبا بالعالم", "שלום עולם", "γειά σου κόσμε", "हिन्दी पाठ",
           "ไทย ภาษา", "emoji 🎉🚀👩‍💻🏳️‍🌈", "e\u0301 combining", "zero\u200bwidth", "ﬁ ligature",
           "½ ¼ ² ³ ① Ⅻ ٣٤٥ ১২৩", "€100 and £5 and ¥9", "tab\tand\u00a0nbsp", "🙂" * 7,
           "\u202eRTL override", "𝔘𝔫𝔦𝔠𝔬𝔡𝔢 math", "a\u0000null"]
WHITESPACE = [" ", "  ", "   ", "\t", "\n", "\n\n", "\r\n", " \n ", "\t\t  \n", "    ", "\u3000"]


def stdlib_snippets(count: int, rng: random.Random) -> list[str]:
    """Slices of random length (1 to 400 characters) from several stdlib sources."""
    root = Path(sysconfig.get_paths()["stdlib"])
    texts = [(root / name).read_text(encoding="utf-8") for name in SOURCES
             if (root / name).is_file()]
    out = []
    for _ in range(count):
        text = rng.choice(texts)
        start = rng.randrange(len(text))
        out.append(text[start:start + rng.randint(1, 400)])
    return out


def generated(count: int, rng: random.Random, specials: list[str]) -> list[str]:
    """Pieces of text, Unicode, numbers, whitespace runs and special tokens, glued at random."""
    words = ["hello", "world", "The", "don't", "it's", "I'll", "x", "foo_bar", "camelCase",
             "URL", "http://example.com/a?b=c", "a.b.c", "...", "!!", "(1)", "#", "-->"]
    numbers = ["0", "7", "42", "3.14", "1,000,000", "2024-12-31", "0x1F", "1e-9", "-17", "٣"]
    pools = [words, numbers, UNICODE, WHITESPACE, specials, [chr(rng.randrange(32, 0x2FFF))]]
    out = []
    for _ in range(count):
        parts = [rng.choice(rng.choice(pools)) for _ in range(rng.randint(1, 8))]
        glue = rng.choice(["", " ", "  ", "\n", "\t"])
        out.append(glue.join(parts))
    return out


def corpus(specials: list[str], seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    fixed = [*UNICODE, *WHITESPACE, "", *specials, " ".join(specials), "".join(specials),
             *(f"<|{s.strip('<|>')}" for s in specials)]  # special tokens cut short
    return fixed + stdlib_snippets(700, rng) + generated(400, rng, specials)
