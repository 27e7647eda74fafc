"""PII detection benchmark: precision and recall per kind of the trainer's redaction, against the hand-written regexes it
replaced, on a labelled set built here.

The set is generated in code from a fixed seed (no data is downloaded): a few hundred lines, each either carrying one
labelled PII span of a kind (email, national and international phone numbers of US/GB/FR/DE, payment cards with a
valid Luhn digit, IBANs with valid check digits, US SSNs with and without dashes, GB/FR/DE identity numbers, IPv4/IPv6
addresses, cloud keys and API tokens, and person names and postal addresses, which neither detector looks for) in
a varied sentence, or being a hard negative with no PII (version pins like ``foo==1.2.3.4``, section numbers, hashes,
UUIDs, dates, times, order and invoice numbers, random long numbers, ISBNs, coordinates, timestamps, code).

Scoring, per kind: a predicted span of kind K that overlaps a labelled span of kind K is a true positive; one that
overlaps none is a false positive of K; a labelled span that no K prediction overlaps is a false negative.
``redaction_recall`` counts a labelled span as protected when a prediction of *any* kind covers it (what matters for
privacy); ``negatives_redacted`` is the fraction of hard-negative lines in which anything was redacted.

- ``baseline``: the regexes of finetune_trainer/data/pii.py before it used phonenumbers/python-stdnum/detect-secrets
  (copied below, unchanged, as :data:`OLD_DETECTORS`); each runs on the original line, overlaps go to the earlier
  detector, as the old sequential substitution did.
- ``ours``: :func:`finetune_trainer.data.pii.find` with the default regions (US, GB, FR, DE).

Results: bench/results/pii-detection.json (or --out).

    python bench/pii_detection.py [--seed 0] [--per-kind 30] [--out PATH]
"""

from __future__ import annotations

import argparse
import base64
import ipaddress
import json
import platform
import random
import re
import string
import sys
import time
from pathlib import Path
from typing import Callable

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "operator"), str(ROOT / "trainer-image"), str(ROOT / "devcluster")]

from stdnum import iban as std_iban  # noqa: E402
from stdnum import luhn  # noqa: E402
from stdnum.de import idnr  # noqa: E402
from stdnum.fr import nir  # noqa: E402
from stdnum.iso7064 import mod_11_10  # noqa: E402

from finetune_trainer.data import pii  # noqa: E402

Gold = tuple[str, int, int]  # kind, start, end
Line = tuple[str, list[Gold]]

# ---------------------------------------------------------------------------------- the old regexes


def _old_luhn(digits: str) -> bool:
    total = 0
    for i, ch in enumerate(reversed(digits)):
        d = int(ch)
        if i % 2 == 1:
            d *= 2
            if d > 9:
                d -= 9
        total += d
    return total % 10 == 0


def _old_iban(candidate: str) -> bool:
    s = candidate.replace(" ", "").upper()
    if not 15 <= len(s) <= 34 or not s[:2].isalpha() or not s[2:4].isdigit():
        return False
    return int("".join(str(int(ch, 36)) for ch in s[4:] + s[:4])) % 97 == 1


def _old_card(c: str) -> bool:
    d = re.sub(r"[ -]", "", c)
    return 13 <= len(d) <= 19 and len(set(d)) > 1 and _old_luhn(d)


def _old_ipv4(c: str) -> bool:
    try:
        ipaddress.IPv4Address(c)
    except ValueError:
        return False
    return True


def _old_ipv6(c: str) -> bool:
    if sum(ch in "0123456789abcdefABCDEF" for ch in c) < 4:
        return False
    try:
        ipaddress.IPv6Address(c)
    except ValueError:
        return False
    return True


OLD_DETECTORS: tuple[tuple[str, re.Pattern[str], Callable[[str], bool] | None], ...] = (
    ("EMAIL", re.compile(r"(?<![\w.+-])[A-Za-z0-9._%+-]+@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*\.[A-Za-z]{2,}\b"), None),
    ("IBAN", re.compile(r"\b[A-Z]{2}\d{2}(?: ?[A-Z0-9]){11,30}\b"), _old_iban),
    ("CREDIT_CARD", re.compile(r"(?<![\d-])\d(?:[ -]?\d){12,18}(?![\d-])"), _old_card),
    ("SSN", re.compile(r"(?<![\d-])(?!000|666|9\d\d)\d{3}-(?!00)\d{2}-(?!0000)\d{4}(?![\d-])"), None),
    ("IP", re.compile(r"(?<![\w:])(?:[0-9A-Fa-f]{0,4}:){2,7}(?:[0-9A-Fa-f]{1,4}|(?:\d{1,3}\.){3}\d{1,3})?(?![\w:])"), _old_ipv6),
    ("IP", re.compile(r"(?<![\w.])(?:\d{1,3}\.){3}\d{1,3}(?!\.?\d)(?![\w])"), _old_ipv4),
    ("PHONE", re.compile(
        r"(?:(?<![\w+])\+\d{1,3}[ .-]?(?:\(\d{1,4}\)[ .-]?)?\d{1,4}(?:[ .-]?\d{2,4}){1,4}(?!\d)"
        r"|(?<![\w(])\(\d{3}\)[ .-]?\d{3}[ .-]\d{4}(?!\d)"
        r"|(?<![\w-])\d{3}[.-]\d{3}[.-]\d{4}(?![\w-]))"), None),
)


def old_find(text: str) -> list[pii.Span]:
    taken: list[pii.Span] = []
    for kind, pattern, valid in OLD_DETECTORS:
        for m in pattern.finditer(text):
            if (valid is None or valid(m.group(0))) and all(m.end() <= t.start or m.start() >= t.end for t in taken):
                taken.append(pii.Span(m.start(), m.end(), kind))
    return sorted(taken)


# ---------------------------------------------------------------------------------------- the set

FIRST = ["Alice", "Bernard", "Chloé", "Dieter", "Emma", "Farid", "Greta", "Hiroshi", "Inès", "James", "Katarzyna", "Liam"]
LAST = ["Martin", "Schmidt", "Dupont", "Smith", "Nowak", "Rossi", "García", "Müller", "Okafor", "Johnson", "Leroy", "Brown"]
STREETS = ["Baker Street", "Rue de Rivoli", "Hauptstraße", "Elm Avenue", "Station Road", "Avenue Foch", "Maple Drive"]
CITIES = ["London", "Paris", "Berlin", "Springfield, IL 62704", "Manchester M1 1AE", "Lyon 69002", "München 80331"]
DOMAINS = ["example.com", "mail.example.org", "corp.example.co.uk", "uni-example.de", "example.fr"]
SENTENCES = [
    "Please contact {} for the refund.", "The customer wrote from {} yesterday.", "My details: {}", "{} is on the form.",
    "Forwarding to {} as discussed.", "Note: {}, verified by the agent.", "Can you check {} again?", "Recorded value {} in CRM.",
]


def _digits(rng: random.Random, n: int) -> str:
    return "".join(rng.choice(string.digits) for _ in range(n))


def _alnum(rng: random.Random, n: int, alphabet: str = string.ascii_letters + string.digits) -> str:
    return "".join(rng.choice(alphabet) for _ in range(n))


def email(rng: random.Random) -> str:
    return f"{rng.choice(FIRST).lower().replace('é', 'e').replace('è', 'e')}.{rng.choice(LAST).lower()}{rng.randint(1, 99)}@{rng.choice(DOMAINS)}".replace(
        "ü", "u").replace("í", "i")


def phone(rng: random.Random) -> str:
    d = lambda n: _digits(rng, n)  # noqa: E731
    x = lambda: str(rng.randint(2, 9))  # noqa: E731
    choices = [
        lambda: f"020 7946 0{d(3)}", lambda: f"+44 20 7946 0{d(3)}", lambda: f"0161 496 0{d(3)}", lambda: f"0113 496 0{d(3)}",
        lambda: f"06 {d(2)} {d(2)} {d(2)} {d(2)}", lambda: f"01 {x()}{d(1)} {d(2)} {d(2)} {d(2)}", lambda: f"+33 6 {d(2)} {d(2)} {d(2)} {d(2)}",
        lambda: f"07.{d(2)}.{d(2)}.{d(2)}.{d(2)}", lambda: f"030 {x()}{d(6)}", lambda: f"089 {x()}{d(6)}", lambda: f"0171 {x()}{d(6)}",
        lambda: f"+49 30 {x()}{d(6)}", lambda: f"(212) {x()}{d(2)}-{d(4)}", lambda: f"415-{x()}{d(2)}-{d(4)}",
        lambda: f"+1 617 {x()}{d(2)} {d(4)}", lambda: f"646.{x()}{d(2)}.{d(4)}",
    ]
    return rng.choice(choices)()


def card(rng: random.Random) -> str:
    prefix, length = rng.choice([("4", 16), ("51", 16), ("55", 16), ("2221", 16), ("34", 15), ("37", 15), ("6011", 16)])
    body = prefix + _digits(rng, length - len(prefix) - 1)
    number = body + luhn.calc_check_digit(body)
    style = rng.choice(["space", "dash", "none"])
    if style == "none" or length == 15:
        return number if style == "none" else " ".join([number[:4], number[4:10], number[10:]])
    sep = " " if style == "space" else "-"
    return sep.join(number[i : i + 4] for i in range(0, 16, 4))


def iban(rng: random.Random) -> str:
    country, bban = rng.choice([("DE", lambda: _digits(rng, 18)), ("GB", lambda: _alnum(rng, 4, string.ascii_uppercase) + _digits(rng, 14)),
                                ("NL", lambda: _alnum(rng, 4, string.ascii_uppercase) + _digits(rng, 10))])
    b = bban()
    number = country + std_iban.calc_check_digits(country + "00" + b) + b
    return number if rng.random() < 0.5 else " ".join(number[i : i + 4] for i in range(0, len(number), 4))


def ssn(rng: random.Random) -> tuple[str, str]:
    while True:
        area = rng.randint(1, 899)
        if area != 666:
            break
    number = f"{area:03d}{rng.randint(1, 99):02d}{rng.randint(1, 9999):04d}"
    style = rng.choice(["dash", "space", "bare"])
    text = {"dash": f"{number[:3]}-{number[3:5]}-{number[5:]}", "space": f"{number[:3]} {number[3:5]} {number[5:]}", "bare": number}[style]
    return ("SSN " if style == "bare" else rng.choice(["SSN ", "social security number ", "", "ssn: "])), text


def national_id(rng: random.Random) -> tuple[str, str]:
    which = rng.choice(["nino", "nir", "idnr"])
    if which == "nino":
        first = rng.choice("ABCEGHJKLMNOPRSTWXYZ")
        second = rng.choice("ABCEGHJKLMNPRSTWXYZ")
        if first + second in ("BG", "GB", "KN", "NK", "NT", "TN", "ZZ"):
            first, second = "A", "B"
        return "NI number ", f"{first}{second}{_digits(rng, 6)}{rng.choice('ABCD')}" if rng.random() < 0.5 else \
            f"{first}{second} {_digits(rng, 2)} {_digits(rng, 2)} {_digits(rng, 2)} {rng.choice('ABCD')}"
    if which == "nir":
        body = f"{rng.randint(1, 2)}{rng.randint(40, 99):02d}{rng.randint(1, 12):02d}{rng.randint(1, 95):02d}{rng.randint(1, 999):03d}{rng.randint(1, 999):03d}"
        key = nir.calc_check_digits(body)
        return "numéro de sécurité sociale ", f"{body[0]} {body[1:3]} {body[3:5]} {body[5:7]} {body[7:10]} {body[10:13]} {key}"
    while True:
        body = str(rng.randint(1, 9)) + _digits(rng, 9)
        number = body + mod_11_10.calc_check_digit(body)
        if idnr.is_valid(number):
            return "Steuer-ID ", number


def ip(rng: random.Random) -> str:
    if rng.random() < 0.25:
        return f"2001:db8:{rng.randint(0, 65535):x}::{rng.randint(1, 65535):x}"
    return ".".join(str(rng.randint(1, 254)) for _ in range(4))


def _b64(obj: dict) -> str:
    return base64.urlsafe_b64encode(json.dumps(obj).encode()).decode().rstrip("=")


def secret(rng: random.Random) -> tuple[str, str, str]:
    """``(before, secret, after)``: the labelled span is the secret alone."""
    up = string.ascii_uppercase + string.digits
    kind = rng.choice(["aws", "github", "slack", "stripe", "jwt", "pem", "url", "hf", "gitlab", "sendgrid"])
    if kind == "aws":
        return "AWS_ACCESS_KEY_ID=", "AKIA" + _alnum(rng, 16, up), ""
    if kind == "github":
        return "token: ", "ghp_" + _alnum(rng, 36), ""
    if kind == "slack":
        return "SLACK_BOT_TOKEN ", f"xoxb-{_digits(rng, 12)}-{_digits(rng, 13)}-{_alnum(rng, 24, string.ascii_lowercase + string.digits)}", ""
    if kind == "stripe":
        return "stripe key ", "sk_live_" + _alnum(rng, 24), ""
    if kind == "jwt":
        token = f"{_b64({'alg': 'HS256', 'typ': 'JWT'})}.{_b64({'sub': _digits(rng, 6), 'iat': rng.randint(1, 2**31)})}.{_alnum(rng, 43, string.ascii_letters + string.digits + '_-')}"
        return "Authorization: Bearer ", token, ""
    if kind == "pem":
        body = "\n".join(_alnum(rng, 64, string.ascii_letters + string.digits + "+/") for _ in range(3))
        return "id_rsa:\n", f"-----BEGIN RSA PRIVATE KEY-----\n{body}\n-----END RSA PRIVATE KEY-----", "\n"
    if kind == "url":
        return "DATABASE_URL=postgres://app:", _alnum(rng, 14), "@db.internal:5432/prod"
    if kind == "hf":
        return "HF_TOKEN=", "hf_" + _alnum(rng, 34), ""
    if kind == "gitlab":
        return "CI token ", "glpat-" + _alnum(rng, 20, string.ascii_letters + string.digits + "_-"), ""
    return "SENDGRID_API_KEY=", f"SG.{_alnum(rng, 22)}.{_alnum(rng, 43)}", ""


def name(rng: random.Random) -> str:
    return f"{rng.choice(FIRST)} {rng.choice(LAST)}"


def address(rng: random.Random) -> str:
    return f"{rng.randint(1, 220)} {rng.choice(STREETS)}, {rng.choice(CITIES)}"


def negatives(rng: random.Random, n: int) -> list[str]:
    d = lambda k: _digits(rng, k)  # noqa: E731
    hexs = lambda k: _alnum(rng, k, "0123456789abcdef")  # noqa: E731
    v = lambda: ".".join(str(rng.randint(0, 20)) for _ in range(4))  # noqa: E731
    makers = [
        lambda: f"pip install foo=={v()}", lambda: f"requires numpy>={v()} and torch~={v()}", lambda: f"see section {v()} of the spec",
        lambda: f"release {v()} fixes the bug", lambda: f"package-{v()}.tar.gz was uploaded", lambda: f"tag v{v()} is latest",
        lambda: f"commit {hexs(40)} on main", lambda: f"short sha {hexs(7)} and {hexs(12)}", lambda: f"sha256:{hexs(64)}",
        lambda: f"uuid {hexs(8)}-{hexs(4)}-4{hexs(3)}-a{hexs(3)}-{hexs(12)}", lambda: f"md5 {hexs(32).upper()}",
        lambda: f"born {rng.randint(1950, 2005)}-{rng.randint(1, 12):02d}-{rng.randint(1, 28):02d}",
        lambda: f"due {rng.randint(1, 28):02d}/{rng.randint(1, 12):02d}/{rng.randint(2000, 2030)}",
        lambda: f"am {rng.randint(1, 28):02d}.{rng.randint(1, 12):02d}.{rng.randint(2000, 2030)} um {rng.randint(0, 23):02d}:{rng.randint(0, 59):02d}",
        lambda: f"order #{rng.randint(2019, 2026)}{d(4)}-{d(4)} shipped", lambda: f"invoice {rng.randint(2019, 2026)}-{d(6)}",
        lambda: f"order {d(4)} {d(4)} {d(4)} {d(4)} confirmed", lambda: f"reference {d(10)}", lambda: f"population {d(10)}",
        lambda: f"tracking 1Z{_alnum(rng, 16, string.ascii_uppercase + string.digits)}", lambda: f"ISBN 978-{d(1)}-{d(2)}-{d(6)}-{d(1)}",
        lambda: f"price {rng.randint(1, 9)},{d(3)}.{d(2)} EUR for {rng.randint(2, 9)} items", lambda: f"zip {d(5)}-{d(4)}",
        lambda: f"coordinates {rng.uniform(-90, 90):.4f}, {rng.uniform(-180, 180):.4f}", lambda: f"ts {rng.randint(1_600_000_000, 1_800_000_000)}",
        lambda: f"epoch ms {rng.randint(1_600_000_000_000, 1_800_000_000_000)}", lambda: "for (std::size_t i = 0; i < n; ++i) a[1::2] = b;",
        lambda: f"ratio {rng.randint(1, 9)}:{rng.randint(1, 9)} at {rng.randint(0, 23):02d}:{rng.randint(0, 59):02d}:{rng.randint(0, 59):02d}",
        lambda: f"blob {base64.b64encode(rng.randbytes(24)).decode()}", lambda: f"AKIA is the prefix of AWS key ids",
        lambda: f"SKU {_alnum(rng, 3, string.ascii_uppercase)}-{d(5)}-{d(3)}", lambda: f"{d(3)} {d(3)} {d(3)} units in stock",
    ]
    return [rng.choice(makers)() for _ in range(n)]


def build_set(seed: int, per_kind: int) -> list[Line]:
    rng = random.Random(seed)
    lines: list[Line] = []

    def put(kind: str, before: str, value: str, after: str = "") -> None:
        template = rng.choice(SENTENCES)
        head, _, tail = template.partition("{}")
        text = head + before + value + after + tail
        start = len(head) + len(before)
        lines.append((text, [(kind, start, start + len(value))]))

    for _ in range(per_kind):
        put("EMAIL", "", email(rng))
        put("PHONE", rng.choice(["", "tel. ", "call ", "phone "]), phone(rng))
        put("CREDIT_CARD", rng.choice(["", "card ", "Visa "]), card(rng))
        put("IBAN", rng.choice(["", "IBAN "]), iban(rng))
        put("SSN", *ssn(rng))
        put("NATIONAL_ID", *national_id(rng))
        put("IP", rng.choice(["", "server ", "from "]), ip(rng))
        put("SECRET", *secret(rng))
        put("PERSON_NAME", "", name(rng))
        put("POSTAL_ADDRESS", "", address(rng))
    lines += [(text, []) for text in negatives(rng, 4 * per_kind)]
    rng.shuffle(lines)
    return lines


# ------------------------------------------------------------------------------------------ scoring


def score(lines: list[Line], find: Callable[[str], list[pii.Span]]) -> dict:
    kinds = sorted({g[0] for _, gold in lines for g in gold} | set(pii.KINDS))
    tp = dict.fromkeys(kinds, 0)
    fp = dict.fromkeys(kinds, 0)
    fn = dict.fromkeys(kinds, 0)
    protected = dict.fromkeys(kinds, 0)
    support = dict.fromkeys(kinds, 0)
    negatives = negatives_hit = 0
    examples_fp: list[str] = []
    predicted = [find(text) for text, _ in lines]
    for (text, gold), spans in zip(lines, predicted):
        overlaps = lambda s, g: s.start < g[2] and g[1] < s.end  # noqa: E731
        for g in gold:
            support[g[0]] += 1
            if any(s.kind == g[0] and overlaps(s, g) for s in spans):
                tp[g[0]] += 1
            else:
                fn[g[0]] += 1
            if any(overlaps(s, g) for s in spans):
                protected[g[0]] += 1
        for s in spans:
            if not any(s.kind == g[0] and overlaps(s, g) for g in gold):
                fp[s.kind] = fp.get(s.kind, 0) + 1
                if len(examples_fp) < 12:
                    examples_fp.append(f"{s.kind}: {text[s.start:s.end]!r} in {text!r}")
        if not gold:
            negatives += 1
            negatives_hit += bool(spans)
    ratio = lambda a, b: round(a / b, 4) if b else None  # noqa: E731
    per_kind = {
        k: {"support": support[k], "tp": tp[k], "fp": fp[k], "fn": fn[k], "precision": ratio(tp[k], tp[k] + fp[k]),
            "recall": ratio(tp[k], support[k]), "redaction_recall": ratio(protected[k], support[k])}
        for k in kinds
    }
    total_tp, total_fp, total_support = sum(tp.values()), sum(fp.values()), sum(support.values())
    return {
        "per_kind": per_kind,
        "micro": {"precision": ratio(total_tp, total_tp + total_fp), "recall": ratio(total_tp, total_support),
                  "redaction_recall": ratio(sum(protected.values()), total_support)},
        "negatives_redacted": ratio(negatives_hit, negatives),
        "false_positive_examples": examples_fp,
        "lines_per_s": throughput(find, [text for text, _ in lines]),
    }


def throughput(find: Callable[[str], list[pii.Span]], texts: list[str], repeats: int = 5) -> float:
    """Lines per second, the best of ``repeats`` passes (the machine may be shared: the best pass is the least disturbed)."""
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        for text in texts:
            find(text)
        best = min(best, time.perf_counter() - t0)
    return round(len(texts) / best, 1)


def prose_throughput(find: Callable[[str], list[pii.Span]], n: int = 2000) -> float:
    """Lines per second on ordinary review sentences with no PII (finetune_devcluster's sentiment rows)."""
    from finetune_devcluster.assets import sentiment_rows

    return throughput(find, [r["text"] for r in sentiment_rows(n, seed=0, planted=False)])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--per-kind", type=int, default=30, help="labelled lines per kind (hard negatives: 4x this)")
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "pii-detection.json")
    args = ap.parse_args()
    lines = build_set(args.seed, args.per_kind)
    pii.find("warm up 020 7946 0958")  # phonenumbers loads its metadata on first use
    from importlib.metadata import version

    report = {
        "set": {"seed": args.seed, "lines": len(lines), "labelled": sum(bool(g) for _, g in lines),
                "hard_negatives": sum(not g for _, g in lines), "regions": list(pii.DEFAULT_REGIONS)},
        "libraries": {name: version(name) for name in ("phonenumbers", "python-stdnum", "detect-secrets")},
        "machine": {"python": platform.python_version(), "platform": platform.platform()},
        "baseline": {**score(lines, old_find), "prose_lines_per_s": prose_throughput(old_find)},
        "ours": {**score(lines, pii.find), "prose_lines_per_s": prose_throughput(pii.find)},
        "not_looked_for": list(pii.NOT_DETECTED),
        "notes": [
            "The labelled set is generated by this script, written alongside the detector: read the numbers as an "
            "optimistic estimate on well-formed PII, not as recall on real data (run other --seed values to vary it).",
            "PERSON_NAME and POSTAL_ADDRESS are in the set to show they are not detected (recall 0 by design).",
            "Generated FR numbers 06 9x xx xx xx are Réunion (+262) numbers, invalid in FR: libphonenumber misses "
            "them with region FR, which is where the PHONE misses come from.",
            "lines_per_s (best of 5 passes) is on this PII-dense set (almost every line has a 7-digit run, so the phone matcher runs "
            "for every region on every line); prose_lines_per_s is on ordinary sentences without PII.",
        ],
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2, ensure_ascii=False) + "\n")
    width = max(len(k) for k in report["ours"]["per_kind"])
    print(f"{'kind':<{width}}  support  baseline P/R      ours P/R")
    for k, o in report["ours"]["per_kind"].items():
        b = report["baseline"]["per_kind"][k]
        f = lambda x: "  -  " if x is None else f"{x:.2f}"  # noqa: E731
        print(f"{k:<{width}}  {o['support']:>7}  {f(b['precision'])} / {f(b['recall'])}    {f(o['precision'])} / {f(o['recall'])}")
    for side in ("baseline", "ours"):
        r = report[side]
        print(f"{side}: micro P {r['micro']['precision']} R {r['micro']['recall']}, redaction recall {r['micro']['redaction_recall']}, "
              f"hard negatives redacted {r['negatives_redacted']}, {r['lines_per_s']} lines/s ({r['prose_lines_per_s']} on prose)")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
