"""PII redaction: replace personal data and credentials with typed placeholders before anything is tokenised or
deduplicated.

What is looked for, and with what (the same list, :func:`coverage`, goes into the data report and the model card):

- ``SECRET``: cloud keys and API tokens, by the regular expressions of the ``detect-secrets`` plugins listed in
  :data:`_SECRET_PLUGINS` (AWS access keys, GitHub/GitLab/Slack/Stripe/Twilio/SendGrid/npm/PyPI/OpenAI/... tokens,
  passwords in ``scheme://user:password@host`` URLs), JWTs (``header.payload.signature`` whose header and payload
  decode to JSON: detect-secrets' check), plus
  :data:`_EXTRA_SECRETS` for formats that release does not know (GitHub fine-grained tokens, Google API keys,
  Hugging Face tokens, Slack app tokens, Stripe test keys) and whole PEM/OpenSSH private-key blocks (the plugin only
  sees the ``BEGIN`` line). detect-secrets' entropy and keyword plugins are not used: they flag hashes and code.
- ``EMAIL``: a regular expression.
- ``IBAN``: candidates validated by ``stdnum.iban`` (country length and format, ISO 13616 mod-97).
- ``CREDIT_CARD``: 13-19 digits, optionally grouped, with a card network's prefix and length (:data:`_CARD_NETWORKS`)
  and a valid Luhn checksum (``stdnum.luhn``).
- ``SSN`` (US, region ``US``): ``123-45-6789`` or ``123 45 6789``, and nine bare digits only after a keyword such as
  "SSN" or "social security"; validated by ``stdnum.us.ssn`` (never-issued areas, groups and serials rejected).
- ``NATIONAL_ID``: per configured region, the identity numbers in :data:`_NATIONAL_IDS`, each validated by its
  ``stdnum`` checksum; the ones that are plain digit runs (DE tax id, GB NHS number, NL BSN) need a keyword before
  them, since any 9-11 digit number passes a mod-11 check one time in ten.
- ``IP``: IPv4 and IPv6 addresses that parse with :mod:`ipaddress`; a dotted quad after ``==``, ``>=``, ``~=``, ``-``,
  ``v``, "version", "section" and the like is a version or section number, not an address.
- ``PHONE``: ``phonenumbers.PhoneNumberMatcher`` (Google's libphonenumber metadata) run once per configured region
  at leniency ``STRICT_GROUPING`` (a valid number, its digit groups where the region writes them), so national
  formats (``020 7946 0958`` in GB, ``06 12 34 56 78`` in FR) are found, and ``+``-prefixed international numbers
  in any country. A national number written as one run of digits with no
  separator counts only after a keyword ("tel", "phone", "call", ...): ``population 8123456789`` is a number; nor
  does one right after "zip"/"postcode"/"PLZ", or glued to a code (``SKU ABC-04272-333``).

Not looked for (:data:`NOT_DETECTED`): person names and postal addresses (no NER model ships with the image, and
Presidio without one finds neither; spaCy's maintainers do not publish their models on PyPI, and third-party
re-uploads are not a dependency to trust with this), dates of birth, passport and driving-licence numbers, identity numbers of
regions that are not configured, and secrets without a recognisable prefix or structure.

All detectors run on the original text; where their spans overlap, the more specific kind (the order of
:data:`KINDS`) and then the longer span wins, so a card number is never half-eaten by the phone matcher. Placeholders
contain no digits, so nothing matches them again.
"""

from __future__ import annotations

import copy
import ipaddress
import re
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from functools import lru_cache
from typing import Any, Callable

import hyperscan
import phonenumbers
from detect_secrets.plugins.aws import AWSKeyDetector
from detect_secrets.plugins.azure_storage_key import AzureStorageKeyDetector
from detect_secrets.plugins.basic_auth import BasicAuthDetector
from detect_secrets.plugins.discord import DiscordBotTokenDetector
from detect_secrets.plugins.github_token import GitHubTokenDetector
from detect_secrets.plugins.gitlab_token import GitLabTokenDetector
from detect_secrets.plugins.jwt import JwtTokenDetector
from detect_secrets.plugins.mailchimp import MailchimpDetector
from detect_secrets.plugins.npm import NpmDetector
from detect_secrets.plugins.openai import OpenAIDetector
from detect_secrets.plugins.pypi_token import PypiTokenDetector
from detect_secrets.plugins.sendgrid import SendGridDetector
from detect_secrets.plugins.slack import SlackDetector
from detect_secrets.plugins.square_oauth import SquareOAuthDetector
from detect_secrets.plugins.stripe import StripeDetector
from detect_secrets.plugins.telegram_token import TelegramBotTokenDetector
from detect_secrets.plugins.twilio import TwilioKeyDetector
from stdnum import iban as std_iban
from stdnum import luhn
from stdnum.de import idnr as de_idnr
from stdnum.es import dni as es_dni
from stdnum.es import nie as es_nie
from stdnum.fr import nir as fr_nir
from stdnum.gb import nhs as gb_nhs
from stdnum.it import codicefiscale as it_cf
from stdnum.nl import bsn as nl_bsn
from stdnum.us import ssn as us_ssn

from finetune_api.spec import PII_REGIONS_DEFAULT

# Most specific first: where spans overlap, the earlier kind wins.
KINDS: tuple[str, ...] = ("SECRET", "EMAIL", "IBAN", "CREDIT_CARD", "NATIONAL_ID", "SSN", "IP", "PHONE")
PLACEHOLDERS = {kind: f"[{kind}]" for kind in KINDS}
DEFAULT_REGIONS: tuple[str, ...] = PII_REGIONS_DEFAULT

NOT_DETECTED: tuple[str, ...] = (
    "person names (no NER model is available to the trainer; Presidio without one finds none)",
    "postal addresses (same reason)",
    "dates of birth",
    "passport and driving-licence numbers",
    "national identity numbers of regions not listed in preprocessing.piiRegions",
    "secrets without a recognisable prefix or structure (passwords in prose, random high-entropy strings)",
)


@dataclass(frozen=True, order=True)
class Span:
    start: int
    end: int
    kind: str


# ------------------------------------------------------------------------------------------- helpers

_CONTEXT_WINDOW = 40  # characters before a match searched for its keyword


def _keyword_before(text: str, start: int, keyword: re.Pattern[str]) -> bool:
    return keyword.search(text, max(0, start - _CONTEXT_WINDOW), start) is not None


def _alnum(text: str, i: int) -> bool:
    return 0 <= i < len(text) and text[i].isalnum()


def _digits(s: str) -> str:
    return re.sub(r"\D", "", s)


# ------------------------------------------------------------------------------------------- secrets

_SECRET_PLUGINS = (
    AWSKeyDetector, AzureStorageKeyDetector, BasicAuthDetector, DiscordBotTokenDetector, GitHubTokenDetector,
    GitLabTokenDetector, MailchimpDetector, NpmDetector, OpenAIDetector, PypiTokenDetector, SendGridDetector,
    SlackDetector, SquareOAuthDetector, StripeDetector, TelegramBotTokenDetector, TwilioKeyDetector,
)
# Documented formats detect-secrets 1.5 has no plugin for.
_EXTRA_SECRETS = (
    re.compile(r"github_pat_[A-Za-z0-9_]{22,255}"),  # GitHub fine-grained personal access token
    re.compile(r"AIza[0-9A-Za-z_-]{35}"),  # Google API key
    re.compile(r"hf_[A-Za-z0-9]{34,}"),  # Hugging Face access token
    re.compile(r"xapp-\d-[A-Z0-9]+-\d+-[a-z0-9]+"),  # Slack app-level token
    re.compile(r"(?:sk|rk)_test_[0-9a-zA-Z]{24,}"),  # Stripe test-mode secret / restricted key
    re.compile(r"sk-(?:proj|ant)-[A-Za-z0-9_-]{20,}"),  # OpenAI project key, Anthropic key
)
_JWT = re.compile(r"eyJ[A-Za-z0-9_-]+\.eyJ[A-Za-z0-9_-]+\.[A-Za-z0-9_-]*")
_PRIVATE_KEY = re.compile(
    r"-----BEGIN (?:[A-Z0-9]+ )*PRIVATE KEY(?: BLOCK)?-----"
    r"(?:[\s\S]*?-----END (?:[A-Z0-9]+ )*PRIVATE KEY(?: BLOCK)?-----|(?:[ \t]*\r?\n[ \t]*[A-Za-z0-9+/=:,-][A-Za-z0-9+/=:, -]*)*)"
    r"|PuTTY-User-Key-File-\d: [^\n]*(?:\n[A-Za-z-]+: [^\n]*|\n[A-Za-z0-9+/=]+)*"
)


# Plugins whose patterns capture the secret inside its context (aws ... key = "...", ://user:password@, //reg/:_authToken=...):
# the captured group is redacted, the context kept. Other plugins' groups are parts of the token (ghp|gho|...).
_CONTEXT_PLUGINS = (AWSKeyDetector, BasicAuthDetector, NpmDetector)
_PLUGIN_PATTERNS: list[tuple[re.Pattern[str], bool]] = [
    (pattern, plugin in _CONTEXT_PLUGINS) for plugin in _SECRET_PLUGINS for pattern in plugin.denylist  # type: ignore[attr-defined]
]


class _Prefilter:
    """Which of several regular expressions may match a text, from one Hyperscan scan of it.

    The patterns are compiled in Hyperscan's prefilter mode, which may report a pattern that then does not match
    but never misses one that does; so running Python's ``re`` for only the reported patterns finds exactly the
    matches that running every pattern would, and most texts (no secret in them) need no ``re`` scan at all.
    A text that is not valid UTF-8 (a lone surrogate) gets every pattern."""

    def __init__(self, patterns: Sequence[re.Pattern[str]]):
        self.count = len(patterns)
        flags = []
        for pattern in patterns:
            flag = hyperscan.HS_FLAG_PREFILTER | hyperscan.HS_FLAG_SINGLEMATCH | hyperscan.HS_FLAG_UTF8 | hyperscan.HS_FLAG_UCP | hyperscan.HS_FLAG_ALLOWEMPTY
            if pattern.flags & re.IGNORECASE:
                flag |= hyperscan.HS_FLAG_CASELESS
            flags.append(flag)
        sources = [("(?x)" if p.flags & re.VERBOSE else "") + ("(?m)" if p.flags & re.MULTILINE else "") + ("(?s)" if p.flags & re.DOTALL else "")
                   + p.pattern for p in patterns]
        self._db = hyperscan.Database()
        self._db.compile(expressions=[src.encode("utf-8") for src in sources], ids=list(range(len(patterns))), flags=flags)

    def candidates(self, text: str) -> set[int]:
        try:
            data = text.encode("utf-8")
        except UnicodeEncodeError:
            return set(range(self.count))
        hits: set[int] = set()

        def on_match(pattern_id: int, start: int, end: int, flags: int, context: object) -> None:
            hits.add(pattern_id)

        self._db.scan(data, match_event_handler=on_match)
        return hits


# Every secret pattern, by index: the private-key block, the JWT, the extra formats, then the plugins'.
_SECRET_PATTERNS: list[re.Pattern[str]] = [_PRIVATE_KEY, _JWT, *_EXTRA_SECRETS, *(pattern for pattern, _ in _PLUGIN_PATTERNS)]
_SECRET_PREFILTER = _Prefilter(_SECRET_PATTERNS)


def _secret_spans(text: str) -> Iterator[tuple[int, int]]:
    hits = _SECRET_PREFILTER.candidates(text)
    if not hits:
        return
    if 0 in hits:
        for match in _PRIVATE_KEY.finditer(text):
            yield match.span()
    if 1 in hits:
        for match in _JWT.finditer(text):
            if JwtTokenDetector.is_formally_valid(match.group(0)) and not _alnum(text, match.start() - 1):
                yield match.span()
    for i, pattern in enumerate(_EXTRA_SECRETS, start=2):
        if i not in hits:
            continue
        for match in pattern.finditer(text):
            if not _alnum(text, match.start() - 1) and not _alnum(text, match.end()):
                yield match.span()
    for i, (pattern, in_context) in enumerate(_PLUGIN_PATTERNS, start=2 + len(_EXTRA_SECRETS)):
        if i not in hits:
            continue
        for match in pattern.finditer(text):
            groups = [g for g in range(1, pattern.groups + 1) if match.group(g)] if in_context else []
            if groups:
                yield match.span(groups[0])
            elif not _alnum(text, match.start() - 1) and not _alnum(text, match.end()):
                yield match.span()


# ------------------------------------------------------------------------------------ email, iban, cards

_EMAIL = re.compile(r"(?<![\w.+-])[A-Za-z0-9._%+-]+@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*\.[A-Za-z]{2,}\b")
_IBAN = re.compile(r"\b[A-Z]{2}\d{2}(?: ?[A-Z0-9]){11,30}\b")


def _valid_prefix_spans(pattern: re.Pattern[str], text: str, valid: Callable[[str], bool], separators: str) -> Iterator[tuple[int, int]]:
    """Matches of ``pattern`` that ``valid`` accepts, each cut back group by group (at ``separators``) until it does:
    a pattern can run on into what follows ("DE89... 00 AB", a card number and then its CVV "4111 ... 1111 123")."""
    for match in pattern.finditer(text):
        candidate = match.group(0)
        while candidate:
            if valid(candidate):
                yield match.start(), match.start() + len(candidate)
                break
            cut = max(candidate.rfind(sep) for sep in separators)
            candidate = candidate[:cut] if cut > 0 else ""


def iban_valid(candidate: str) -> bool:
    """ISO 13616 (country length and format, mod 97 == 1), by ``stdnum.iban``."""
    return bool(std_iban.is_valid(candidate))


def luhn_valid(digits: str) -> bool:
    """The Luhn checksum used by payment card numbers, by ``stdnum.luhn``."""
    return bool(luhn.is_valid(digits))


_CARD = re.compile(r"(?<![\d-])\d(?:[ -]?\d){12,18}(?![\d-])")
# Issuer identification numbers and card lengths of the networks (a number of another length with the prefix is no card).
_CARD_NETWORKS: tuple[tuple[re.Pattern[str], range], ...] = (
    (re.compile(r"4"), range(13, 20)),  # Visa (13, 16, 19 in use)
    (re.compile(r"5[1-5]|2(?:22[1-9]|2[3-9]\d|[3-6]\d\d|7[01]\d|720)"), range(16, 17)),  # Mastercard
    (re.compile(r"3[47]"), range(15, 16)),  # American Express
    (re.compile(r"30[0-5]|3[689]"), range(14, 20)),  # Diners Club
    (re.compile(r"6011|64[4-9]|65"), range(16, 20)),  # Discover
    (re.compile(r"35(?:2[89]|[3-8]\d)"), range(16, 20)),  # JCB
    (re.compile(r"62"), range(16, 20)),  # UnionPay
    (re.compile(r"5[0678]|6"), range(13, 20)),  # Maestro
)


def _card_valid(candidate: str) -> bool:
    digits = _digits(candidate)
    return (len(set(digits)) > 1 and any(p.match(digits) and len(digits) in lengths for p, lengths in _CARD_NETWORKS)
            and luhn_valid(digits))


# ------------------------------------------------------------------------------------- national ids

_SSN = re.compile(r"(?<![\d-])\d{3}([- ]?)\d{2}\1\d{4}(?![\d-])")
_SSN_KEYWORD = re.compile(r"\b(?:ssn|social security|ss#)", re.IGNORECASE)


def _ssn_spans(text: str) -> Iterator[tuple[int, int]]:
    for match in _SSN.finditer(text):
        if not match.group(1) and not _keyword_before(text, match.start(), _SSN_KEYWORD):
            continue  # nine bare digits: an SSN only after a keyword
        if us_ssn.is_valid(_digits(match.group(0))):
            yield match.span()


@dataclass(frozen=True)
class NationalId:
    region: str
    name: str
    pattern: re.Pattern[str]
    valid: Callable[[str], bool]
    keyword: re.Pattern[str] | None = None  # required before the match when the format alone is too common


def _compact_valid(module: Any) -> Callable[[str], bool]:
    return lambda s: bool(module.is_valid(re.sub(r"[\s.-]", "", s).upper()))


_NATIONAL_IDS: tuple[NationalId, ...] = (
    # National Insurance number: HMRC's unallocated prefix letters and pairs excluded; no checksum exists.
    NationalId("GB", "National Insurance number",
               re.compile(r"\b(?!BG|GB|KN|NK|NT|TN|ZZ)[A-CEGHJ-PR-TW-Z][A-CEGHJ-NPR-TW-Z] ?\d{2} ?\d{2} ?\d{2} ?[A-D]\b"),
               lambda s: True),
    NationalId("GB", "NHS number", re.compile(r"(?<![\d-])\d{3}[ -]?\d{3}[ -]?\d{4}(?![\d-])"), _compact_valid(gb_nhs),
               re.compile(r"\bnhs\b", re.IGNORECASE)),
    NationalId("FR", "NIR (numéro de sécurité sociale)",
               re.compile(r"(?<![\d-])[12] ?\d{2} ?\d{2} ?(?:\d{2}|2[AB]) ?\d{3} ?\d{3} ?\d{2}(?![\d-])"), _compact_valid(fr_nir)),
    NationalId("DE", "Steuer-Identifikationsnummer", re.compile(r"(?<![\d-])\d{2} ?\d{3} ?\d{3} ?\d{3}(?![\d-])"),
               _compact_valid(de_idnr), re.compile(r"steuer|\bidnr|identifikationsnummer|\btax\s*id|\btin\b", re.IGNORECASE)),
    NationalId("ES", "DNI", re.compile(r"\b\d{8}-?[A-Za-z]\b"), _compact_valid(es_dni)),
    NationalId("ES", "NIE", re.compile(r"\b[XYZxyz]-?\d{7}-?[A-Za-z]\b"), _compact_valid(es_nie)),
    NationalId("IT", "codice fiscale", re.compile(r"\b[A-Za-z]{6}\d{2}[A-Za-z]\d{2}[A-Za-z]\d{3}[A-Za-z]\b"), _compact_valid(it_cf)),
    NationalId("NL", "BSN", re.compile(r"(?<![\d-])\d{4}\.?\d{2}\.?\d{3}(?![\d-])"), _compact_valid(nl_bsn),
               re.compile(r"\bbsn\b|burgerservicenummer|sofi", re.IGNORECASE)),
)


def _national_id_spans(text: str, regions: Sequence[str]) -> Iterator[tuple[int, int]]:
    for nid in _NATIONAL_IDS:
        if nid.region not in regions:
            continue
        for match in nid.pattern.finditer(text):
            if nid.keyword is not None and not _keyword_before(text, match.start(), nid.keyword):
                continue
            if nid.valid(match.group(0)):
                yield match.span()


# ------------------------------------------------------------------------------------------------ ip

_IPV6 = re.compile(r"(?<![\w:])(?:[0-9A-Fa-f]{0,4}:){2,7}(?:[0-9A-Fa-f]{1,4}|(?:\d{1,3}\.){3}\d{1,3})?(?![\w:])")
# Not after a character that makes it a version (==, >=, ~=, ^, -, a letter or digit) or part of a longer dotted run.
_IPV4 = re.compile(r"(?<![\w.=<>~^!@+-])(?:\d{1,3}\.){3}\d{1,3}(?![\w.+-]*\w)(?!\.\d)")
_VERSION_KEYWORD = re.compile(r"\b(?:version|ver|release|rel|build|section|sect|chapter|clause|rule|article|art|§)\.?\s*$",
                              re.IGNORECASE)


def _ipv6_valid(candidate: str) -> bool:
    # "::" or "1::" would be valid addresses but are far more often code (C++ scopes, Python slices).
    if sum(ch in "0123456789abcdefABCDEF" for ch in candidate) < 4:
        return False
    try:
        ipaddress.IPv6Address(candidate)
    except ValueError:
        return False
    return True


def _ip_spans(text: str) -> Iterator[tuple[int, int]]:
    if ":" in text:
        for match in _IPV6.finditer(text):
            if _ipv6_valid(match.group(0)):
                yield match.span()
    for match in _IPV4.finditer(text):
        if _VERSION_KEYWORD.search(text, max(0, match.start() - 12), match.start()):
            continue
        try:
            ipaddress.IPv4Address(match.group(0))
        except ValueError:
            continue
        yield match.span()


# --------------------------------------------------------------------------------------------- phone

_PHONE_KEYWORD = re.compile(
    r"\b(?:tel|tél|telephone|téléphone|telefon|phone|mobile|mobil|cell|call|fax|portable|handy|whatsapp|sms|numéro|"
    r"rufnummer)\b\.?|☎|📞",
    re.IGNORECASE,
)
_NOT_PHONE_KEYWORD = re.compile(r"\b(?:zip|zip code|postcode|postal code|plz|cp)\b\W{0,3}$", re.IGNORECASE)
_SEVEN_DIGITS = re.compile(r"\d(?:\D{0,3}\d){6}")  # fewer digits than this are never a phone number


def _phone_spans(text: str, regions: Sequence[str]) -> Iterator[tuple[int, int]]:
    if _SEVEN_DIGITS.search(text) is None:
        return
    for region in regions:
        for match in phonenumbers.PhoneNumberMatcher(text, region, leniency=phonenumbers.Leniency.STRICT_GROUPING):
            raw = match.raw_string
            before = text[match.start - 1 : match.start]
            if before.isalnum() or (before in "-_/#" and before and _alnum(text, match.start - 2)):
                continue  # the tail of a code (SKU ABC-04272-333, ref #A-1234567), not a number on its own
            if _NOT_PHONE_KEYWORD.search(text, max(0, match.start - 16), match.start):
                continue  # a US ZIP+4 such as 08026-0754 is also a valid German number
            international = raw.startswith("+") or raw.startswith("00")
            if not international and raw.isdigit() and not _keyword_before(text, match.start, _PHONE_KEYWORD):
                continue  # one bare run of digits: a phone number only after a keyword
            yield match.start, match.end


# ------------------------------------------------------------------------------------------ combined


def _validated(pattern: re.Pattern[str], text: str, valid: Callable[[str], bool] | None = None) -> Iterator[tuple[int, int]]:
    for match in pattern.finditer(text):
        if valid is None or valid(match.group(0)):
            yield match.span()


_DIGIT = re.compile(r"\d")


def find(text: str, regions: Sequence[str] = DEFAULT_REGIONS) -> list[Span]:
    """The PII spans of ``text``, sorted and non-overlapping (overlaps resolved by :data:`KINDS` order, then length)."""
    has_digit = _DIGIT.search(text) is not None
    candidates: dict[str, Iterable[tuple[int, int]]] = {"SECRET": _secret_spans(text)}
    if "@" in text:
        candidates["EMAIL"] = _validated(_EMAIL, text)
    if has_digit:
        candidates["IBAN"] = _valid_prefix_spans(_IBAN, text, iban_valid, " ")
        candidates["CREDIT_CARD"] = _valid_prefix_spans(_CARD, text, _card_valid, " -")
        candidates["NATIONAL_ID"] = _national_id_spans(text, regions)
        if "US" in regions:
            candidates["SSN"] = _ssn_spans(text)
        candidates["IP"] = _ip_spans(text)
        candidates["PHONE"] = _phone_spans(text, regions)
    elif ":" in text:
        candidates["IP"] = _ip_spans(text)
    rank = {kind: i for i, kind in enumerate(KINDS)}
    spans = sorted(
        {Span(start, end, kind) for kind, found in candidates.items() for start, end in found if end > start},
        key=lambda s: (rank[s.kind], s.start - s.end, s.start),
    )
    taken: list[Span] = []
    for span in spans:
        if all(span.end <= t.start or span.start >= t.end for t in taken):
            taken.append(span)
    return sorted(taken)


def redact(text: str, counts: Counter[str] | None = None, regions: Sequence[str] = DEFAULT_REGIONS) -> str:
    """``text`` with every detected PII span replaced by its placeholder; ``counts[kind]`` += spans replaced."""
    spans = find(text, regions)
    if not spans:
        return text
    out, last = [], 0
    for span in spans:
        out += [text[last : span.start], PLACEHOLDERS[span.kind]]
        last = span.end
        if counts is not None:
            counts[span.kind] += 1
    out.append(text[last:])
    return "".join(out)


_PLACEHOLDER = re.compile("|".join(re.escape(p) for p in PLACEHOLDERS.values()))


def lower_keeping_placeholders(text: str) -> str:
    """``text.lower()`` except the placeholders, which keep their case (``preprocessing.lowercase`` runs after
    redaction: the secret, IBAN and identity-number formats are case-sensitive)."""
    out, last = [], 0
    for match in _PLACEHOLDER.finditer(text):
        out += [text[last : match.start()].lower(), match.group(0)]
        last = match.end()
    out.append(text[last:].lower())
    return "".join(out)


# ------------------------------------------------------------------------------------------ coverage


@lru_cache(maxsize=16)
def _coverage(regions: tuple[str, ...]) -> dict[str, Any]:
    ids = [f"{n.region} {n.name}" for n in _NATIONAL_IDS if n.region in regions]
    looked_for = {
        "SECRET": "cloud keys and API tokens (AWS, Azure storage, GitHub, GitLab, Slack, Stripe, Twilio, SendGrid, npm, PyPI, "
                  "OpenAI, Anthropic, Google, Hugging Face, Discord, Telegram, Mailchimp, Square), JWTs, URL passwords, "
                  "private-key blocks",
        "EMAIL": "email addresses",
        "IBAN": "IBANs (mod-97 checked)",
        "CREDIT_CARD": "payment card numbers (issuer prefix and Luhn checked)",
        "NATIONAL_ID": "national identity numbers: " + ", ".join(ids) if ids else None,
        "SSN": "US social security numbers" if "US" in regions else None,
        "IP": "IPv4 and IPv6 addresses",
        "PHONE": "phone numbers in international format and in the national formats of " + ", ".join(regions)
                 if regions else "phone numbers in international format",
    }
    return {
        "regions": list(regions),
        "looked_for": [{"kind": kind, "what": what} for kind, what in looked_for.items() if what],
        "not_looked_for": list(NOT_DETECTED),
    }


def coverage(regions: Sequence[str] = DEFAULT_REGIONS, enabled: bool = True) -> dict[str, Any]:
    """Which kinds of PII redaction looks for with ``regions`` and which it does not: the one list the data report
    (``pii_coverage``) and the model card show. With redaction off nothing is looked for."""
    if not enabled:
        return {"regions": list(regions), "looked_for": [], "not_looked_for": ["all PII: preprocessing.redactPii is off"]}
    return copy.deepcopy(_coverage(tuple(regions)))
