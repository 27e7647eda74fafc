"""PII redaction: every type replaced and counted, checksums reject look-alikes, ordinary numbers survive."""

from __future__ import annotations

from collections import Counter

import pytest

from finetune_trainer.data.pii import iban_valid, luhn_valid, redact


@pytest.mark.parametrize(
    "text, expected, kind",
    [
        ("write to jane.doe+news@example.co.uk today", "write to [EMAIL] today", "EMAIL"),
        ("card 4111 1111 1111 1111 expires", "card [CREDIT_CARD] expires", "CREDIT_CARD"),
        ("card 5500-0000-0000-0004.", "card [CREDIT_CARD].", "CREDIT_CARD"),
        ("amex 378282246310005", "amex [CREDIT_CARD]", "CREDIT_CARD"),
        ("pay to GB82 WEST 1234 5698 7654 32 now", "pay to [IBAN] now", "IBAN"),
        ("iban DE89370400440532013000", "iban [IBAN]", "IBAN"),
        ("ssn 123-45-6789 on file", "ssn [SSN] on file", "SSN"),
        ("server 192.168.10.1.", "server [IP].", "IP"),
        ("v6 2001:db8::ff00:42:8329 and", "v6 [IP] and", "IP"),
        ("link-local fe80::1%", "link-local [IP]%", "IP"),
        ("call +1 415 555 2671", "call [PHONE]", "PHONE"),
        ("call (415) 555-2671 or", "call [PHONE] or", "PHONE"),
        ("office 415.555.2671", "office [PHONE]", "PHONE"),
        ("berlin +49 30 1234567", "berlin [PHONE]", "PHONE"),
    ],
)
def test_each_type_is_redacted_and_counted(text, expected, kind):
    counts: Counter[str] = Counter()
    assert redact(text, counts) == expected
    assert counts == Counter({kind: 1})


def test_several_in_one_text_counted_per_type():
    counts: Counter[str] = Counter()
    text = "a@b.io and c@d.org, card 4111111111111111, ip 10.0.0.1 and 10.0.0.2"
    assert redact(text, counts) == "[EMAIL] and [EMAIL], card [CREDIT_CARD], ip [IP] and [IP]"
    assert counts == Counter({"EMAIL": 2, "CREDIT_CARD": 1, "IP": 2})


def test_luhn():
    assert luhn_valid("4111111111111111")
    assert luhn_valid("79927398713")
    assert not luhn_valid("4111111111111112")
    assert not luhn_valid("1234567812345678")


def test_iban_mod97():
    assert iban_valid("GB82 WEST 1234 5698 7654 32")
    assert iban_valid("FR1420041010050500013M02606")
    assert not iban_valid("GB82 WEST 1234 5698 7654 33")  # one digit off
    assert not iban_valid("XX00 0000 0000 0000")


@pytest.mark.parametrize(
    "text",
    [
        "order 1234 5678 9012 3456 shipped",  # 16 digits failing Luhn: an order number, not a card
        "tracking 4111111111111112",
        "born 1985-04-12, joined 2024/01/15, at 12:30:45",
        "population 8123456789 and 1234567",
        "price 1,299.99 for 3 items, ratio 3:4",
        "version 1.2.3.4.5 and 10.0.0.300",
        "zip 90210-1234 and isbn 978-3-16-148410-0",
        "std::vector<int> and a[1::2]",
        "GB82 WEST 1234 5698 7654 33 is a bad iban",
        "ssn-like 000-12-3456 and 666-12-3456 are never issued",
        "0000 0000 0000 0000",
    ],
)
def test_no_false_positives_on_ordinary_numbers(text):
    counts: Counter[str] = Counter()
    assert redact(text, counts) == text
    assert sum(counts.values()) == 0
