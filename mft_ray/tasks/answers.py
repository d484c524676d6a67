"""Reading a final answer out of a model's reply, and comparing numbers: shared by the tasks' graders."""

from __future__ import annotations

import re
from decimal import Decimal, InvalidOperation
from fractions import Fraction
from typing import NamedTuple

_BOX_RE = re.compile(r"\\(?:boxed|fbox)(?![A-Za-z])")
_OLD_BOX_TOKEN_RE = re.compile(r"[^\s$]+")


def last_boxed(text: str) -> str | None:
    r"""Content of the last ``\boxed{...}`` (or ``\fbox{...}``) in ``text``, found by brace matching.

    Nested braces work (``\boxed{\frac{1}{2}}`` gives ``\frac{1}{2}``). An occurrence whose braces never
    close is skipped in favour of the one before it. The old ``\boxed 5`` form is read up to the next
    whitespace or ``$``. Returns None when there is no usable box.
    """
    for match in reversed(list(_BOX_RE.finditer(text))):
        content = _box_content(text, match.end())
        if content is not None:
            return content
    return None


def _box_content(text: str, start: int) -> str | None:
    i = start
    while i < len(text) and text[i].isspace():
        i += 1
    if i < len(text) and text[i] == "{":
        return _match_braces(text, i)
    if i == start:
        return None  # e.g. "\boxed5" or "\boxed" at the end: not a form we read
    token = _OLD_BOX_TOKEN_RE.match(text, i)
    if token is None:
        return None
    # "$\boxed 2.$" style: the full stop ends the sentence, it is not part of the answer.
    content = token.group(0).rstrip(".")
    return content or None


def _match_braces(text: str, open_at: int) -> str | None:
    depth = 0
    i = open_at
    while i < len(text):
        char = text[i]
        if char == "\\":
            i += 2  # escaped character such as \{ or \}: not a grouping brace
            continue
        if char == "{":
            depth += 1
        elif char == "}":
            depth -= 1
            if depth == 0:
                return text[open_at + 1 : i]
        i += 1
    return None


# ---------------------------------------------------------------------------------------------
# Numeric answers (arithmetic, GSM8K)

_TEXT_RE = re.compile(r"\\(?:text|textbf|mathrm|mbox)\{([^{}]*)\}")
_FRAC_RE = re.compile(r"([-+]?)\\[dt]?frac\{?([-+]?\d+)\}?\{?(\d+)\}?")
_SLASH_RE = re.compile(r"([-+]?\d+)\s*/\s*(\d+)")
_DECIMAL_RE = re.compile(r"[-+]?(?:\d+(?:\.\d*)?|\.\d+)")
_THOUSANDS_RE = re.compile(r"(?<=\d),(?=\d{3}(?!\d))")
_WORDS_RE = re.compile(r"[A-Za-z\s=:]*")
_REL_TOL = Fraction(1, 10**6)


def parse_number(text: str) -> Fraction | None:
    r"""Read ``text`` as one number: ``1,000``, ``$5``, ``5.0``, ``-3``, ``\frac{1}{2}``, ``3/4``, ``18 dollars``.

    Returns None when the text holds no number or more than one (``10-3`` is not read as a number).
    """
    s = _TEXT_RE.sub(r" \1 ", text)
    for junk in ("\\$", "$", "\\!", "\\,", "\\;", "\\%", "%", "{,}", "\\left", "\\right"):
        s = s.replace(junk, " " if junk in ("\\,", "\\;") else "")
    s = _THOUSANDS_RE.sub("", s).strip().rstrip(".").strip()
    if _DECIMAL_RE.fullmatch(s):
        return _to_fraction(s)
    frac = _FRAC_RE.fullmatch(s)
    if frac:
        sign, num, den = frac.groups()
        value = _ratio(num, den)
        return -value if value is not None and sign == "-" else value
    slash = _SLASH_RE.fullmatch(s)
    if slash:
        return _ratio(slash.group(1), slash.group(2))
    # Units or words around the number ("18 dollars", "x = 5"): accept exactly one number and nothing
    # else that could be maths ("\sqrt{2}" or "2\pi" must not read as 2).
    numbers = _DECIMAL_RE.findall(s)
    if len(numbers) == 1 and _WORDS_RE.fullmatch(s.replace(numbers[0], " ", 1)):
        return _to_fraction(numbers[0])
    return None


def _ratio(num: str, den: str) -> Fraction | None:
    try:
        numerator, denominator = int(num), int(den)
    except ValueError:  # more digits than Python converts from a string
        return None
    return None if denominator == 0 else Fraction(numerator, denominator)


def _to_fraction(s: str) -> Fraction | None:
    try:
        return Fraction(Decimal(s))
    except (InvalidOperation, ValueError):
        return None


def numbers_equal(a: str, b: str) -> bool:
    """Numeric equivalence (relative tolerance 1e-6); answers that are not numbers compare as text."""
    x, y = parse_number(a), parse_number(b)
    if x is not None and y is not None:
        return abs(x - y) <= _REL_TOL * max(Fraction(1), abs(x), abs(y))
    if x is not None or y is not None:
        return False
    sa, sb = squash(a).lower(), squash(b).lower()
    return bool(sa) and sa == sb


def squash(text: str) -> str:
    """``text`` without any whitespace, for exact comparisons that ignore spacing."""
    return "".join(text.split())


# ---------------------------------------------------------------------------------------------
# Which rule read the answer (real models rarely box)

BOXED, ANSWER_IS, EQUALS, LAST_NUMBER = "boxed", "answer_is", "equals", "last_number"
PAREN_LETTER, OPTION_LETTER = "paren_letter", "option_letter"


class ParsedAnswer(NamedTuple):
    """A reply's final answer (None: unparseable, so it never votes and is never correct) and the rule
    that read it (``boxed``, ``answer_is``, ``equals``, ``last_number``, ``paren_letter``, ``option_letter``;
    None if none did)."""

    answer: str | None
    rule: str | None = None


NONE = ParsedAnswer(None, None)
# A number as replies write it: "$1,234.50", "-7", "3/4". A minus right after a digit or ")" is subtraction.
_NUMBER = r"(?:\$\s?)?(?:(?<![\w)])[-−])?(?:\$\s?)?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?(?:\s?/\s?\d+)?"
_NUMBER_RE = re.compile(_NUMBER)
# "the answer is 42", "Final answer: $42", "answer = 42" (the last such statement wins)
_ANSWER_IS_RE = re.compile(r"answer\s*(?:is|:|=)\s*:?\s*\**\s*(" + _NUMBER + ")", re.IGNORECASE)
# "... = 42." closing the reply
_EQUALS_END_RE = re.compile(r"=\s*\**\s*(" + _NUMBER + r")\s*\**\s*[.!]?\s*$")


def _clean_number(raw: str) -> str:
    return raw.replace("−", "-").replace("$", "").replace(" ", "").replace(",", "")


def numeric_answer(text: str) -> ParsedAnswer:
    r"""A numeric reply's answer, by the first rule that finds one: the last ``\boxed{}`` holding a number;
    else the last explicit "answer is X" / "answer: X"; else "= X" ending the reply; else the last number in
    the reply (what Du et al. read)."""
    content = last_boxed(text)
    # A box holding no number ("\boxed{answer}", copied from the instruction) is no answer: read on.
    if content is not None and parse_number(content) is not None:
        return ParsedAnswer(content.strip(), BOXED)
    stated = _ANSWER_IS_RE.findall(text)
    if stated:
        return ParsedAnswer(_clean_number(stated[-1]), ANSWER_IS)
    closing = _EQUALS_END_RE.search(text.rstrip())
    if closing:
        return ParsedAnswer(_clean_number(closing.group(1)), EQUALS)
    numbers = _NUMBER_RE.findall(text)
    if numbers:
        return ParsedAnswer(_clean_number(numbers[-1]), LAST_NUMBER)
    return NONE
