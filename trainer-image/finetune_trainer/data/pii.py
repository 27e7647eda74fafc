"""PII redaction: replace personal data with typed placeholders before anything is tokenised or deduplicated.

Each detector is a regular expression that finds candidates plus, where a checksum exists, a validator
that rejects look-alikes: card numbers must pass the Luhn check, IBANs the ISO 13616 mod-97 check, IP
addresses must parse with :mod:`ipaddress`. The patterns are deliberately conservative where no checksum
exists: a phone number needs a leading ``+`` country code or the ``(NNN) NNN-NNNN`` / ``NNN-NNN-NNNN``
shape, and an SSN needs its dashes, so ordinary numbers, years and dates are left alone.

Detectors run in a fixed order (most specific first) on text that earlier ones already redacted, so a
card number is never half-eaten by the phone pattern. Placeholders contain no digits, so nothing matches
them again.
"""

from __future__ import annotations

import ipaddress
import re
from collections import Counter
from dataclasses import dataclass
from typing import Callable

PLACEHOLDERS = {
    "EMAIL": "[EMAIL]",
    "IBAN": "[IBAN]",
    "CREDIT_CARD": "[CREDIT_CARD]",
    "SSN": "[SSN]",
    "IP": "[IP]",
    "PHONE": "[PHONE]",
}


def luhn_valid(digits: str) -> bool:
    """The Luhn checksum used by payment card numbers."""
    total = 0
    for i, ch in enumerate(reversed(digits)):
        d = int(ch)
        if i % 2 == 1:
            d *= 2
            if d > 9:
                d -= 9
        total += d
    return total % 10 == 0


def iban_valid(candidate: str) -> bool:
    """ISO 13616: move the first four characters to the end, letters to numbers (A=10), mod 97 == 1."""
    iban = candidate.replace(" ", "").upper()
    if not 15 <= len(iban) <= 34 or not iban[:2].isalpha() or not iban[2:4].isdigit():
        return False
    rearranged = iban[4:] + iban[:4]
    return int("".join(str(int(ch, 36)) for ch in rearranged)) % 97 == 1


def _card_valid(candidate: str) -> bool:
    digits = re.sub(r"[ -]", "", candidate)
    # A run of one repeated digit passes Luhn for some lengths but is no card.
    return 13 <= len(digits) <= 19 and len(set(digits)) > 1 and luhn_valid(digits)


def _ipv4_valid(candidate: str) -> bool:
    try:
        ipaddress.IPv4Address(candidate)
    except ValueError:
        return False
    return True


def _ipv6_valid(candidate: str) -> bool:
    # "::" or "1::" would be valid addresses but are far more often code (C++ scopes, Python slices).
    if sum(ch in "0123456789abcdefABCDEF" for ch in candidate) < 4:
        return False
    try:
        ipaddress.IPv6Address(candidate)
    except ValueError:
        return False
    return True


@dataclass(frozen=True)
class Detector:
    kind: str
    pattern: re.Pattern[str]
    valid: Callable[[str], bool] | None = None
    needs: str = "digit"  # a cheap precondition: "@", ":" or "digit" must occur in the text at all


DETECTORS: tuple[Detector, ...] = (
    Detector("EMAIL", re.compile(r"(?<![\w.+-])[A-Za-z0-9._%+-]+@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*\.[A-Za-z]{2,}\b"), needs="@"),
    Detector("IBAN", re.compile(r"\b[A-Z]{2}\d{2}(?: ?[A-Z0-9]){11,30}\b"), iban_valid),
    # 13-19 digits, optionally grouped by single spaces or dashes.
    Detector("CREDIT_CARD", re.compile(r"(?<![\d-])\d(?:[ -]?\d){12,18}(?![\d-])"), _card_valid),
    # US SSN with dashes; area 000, 666 and 9xx, group 00 and serial 0000 are never issued.
    Detector("SSN", re.compile(r"(?<![\d-])(?!000|666|9\d\d)\d{3}-(?!00)\d{2}-(?!0000)\d{4}(?![\d-])")),
    Detector(
        "IP",
        re.compile(r"(?<![\w:])(?:[0-9A-Fa-f]{0,4}:){2,7}(?:[0-9A-Fa-f]{1,4}|(?:\d{1,3}\.){3}\d{1,3})?(?![\w:])"),
        _ipv6_valid,
        needs=":",
    ),
    Detector("IP", re.compile(r"(?<![\w.])(?:\d{1,3}\.){3}\d{1,3}(?!\.?\d)(?![\w])"), _ipv4_valid),
    Detector(
        "PHONE",
        re.compile(
            r"(?:(?<![\w+])\+\d{1,3}[ .-]?(?:\(\d{1,4}\)[ .-]?)?\d{1,4}(?:[ .-]?\d{2,4}){1,4}(?!\d)"  # +44 20 7946 0958
            r"|(?<![\w(])\(\d{3}\)[ .-]?\d{3}[ .-]\d{4}(?!\d)"  # (555) 123-4567
            r"|(?<![\w-])\d{3}[.-]\d{3}[.-]\d{4}(?![\w-]))"  # 555-123-4567, 555.123.4567
        ),
    ),
)


_DIGIT = re.compile(r"\d")


def redact(text: str, counts: Counter[str] | None = None) -> str:
    """``text`` with every detected PII span replaced by its placeholder; ``counts[kind]`` += spans replaced."""
    has_digit = _DIGIT.search(text) is not None
    for detector in DETECTORS:
        if (not has_digit) if detector.needs == "digit" else (detector.needs not in text):
            continue  # cannot match: skip the regex (most rows have no PII)
        placeholder = PLACEHOLDERS[detector.kind]

        def replace(match: re.Match[str], detector: Detector = detector, placeholder: str = placeholder) -> str:
            if detector.valid is not None and not detector.valid(match.group(0)):
                return match.group(0)
            if counts is not None:
                counts[detector.kind] += 1
            return placeholder

        text = detector.pattern.sub(replace, text)
    return text
