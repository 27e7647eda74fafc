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


# ------------------------------------------------------------------ wider coverage (issue 10 §7)
# Each case below was missed (or, for the negatives, wrongly redacted) by the hand-written regexes.

AWS_KEY = "AKIAIOSFODNN7EXAMPLE"
GITHUB_TOKEN = "ghp_" + "A1b2C3d4E5f6G7h8I9j0K1l2M3n4O5p6Q7r8"
SLACK_TOKEN = "xoxb-123456789012-1234567890123-" + "abcdefghijklmnopqrstuvwx"
STRIPE_KEY = "sk_live_" + "4eC39HqLyjWDarjtT1zdp7dc"
JWT = ("eyJhbGciOiJIUzI1NiIsInR5cCI6IkpXVCJ9.eyJzdWIiOiIxMjM0NTY3ODkwIiwibmFtZSI6IkpvaG4gRG9lIn0."
       "SflKxwRJSMeKKF2QT4fwpMeJf36POk6yJV_adQssw5c")
PEM = "-----BEGIN RSA PRIVATE KEY-----\nMIIEowIBAAKCAQEA7Zq\n9fL2k+Qx1/ab==\n-----END RSA PRIVATE KEY-----"


@pytest.mark.parametrize(
    "text, expected, kind",
    [
        ("call 020 7946 0958 now", "call [PHONE] now", "PHONE"),  # GB national format
        ("appelez le 06 12 34 56 78.", "appelez le [PHONE].", "PHONE"),  # FR national format
        ("Tel. 030 1234567 (Büro)", "Tel. [PHONE] (Büro)", "PHONE"),  # DE national format
        ("+33 6 12 34 56 78 mobile", "[PHONE] mobile", "PHONE"),
        ("phone: 0612345678", "phone: [PHONE]", "PHONE"),  # one digit run: a phone after a keyword
        ("SSN 123456789 on file", "SSN [SSN] on file", "SSN"),  # no dashes, after a keyword
        ("social security number 123 45 6789", "social security number [SSN]", "SSN"),  # spaces
        ("NI number QQ123456C", "NI number QQ123456C", None),  # QQ: never allocated by HMRC
        ("NI number AB 12 34 56 C", "NI number [NATIONAL_ID]", "NATIONAL_ID"),
        ("NIR 2 55 08 14 168 025 38", "NIR [NATIONAL_ID]", "NATIONAL_ID"),  # FR, mod-97 key
        ("Steuer-ID 65929970489", "Steuer-ID [NATIONAL_ID]", "NATIONAL_ID"),  # DE, after a keyword
        (f"export AWS_ACCESS_KEY_ID={AWS_KEY}", "export AWS_ACCESS_KEY_ID=[SECRET]", "SECRET"),
        (f"token {GITHUB_TOKEN} in CI", "token [SECRET] in CI", "SECRET"),
        (f"bot {SLACK_TOKEN}", "bot [SECRET]", "SECRET"),
        (f"stripe {STRIPE_KEY}.", "stripe [SECRET].", "SECRET"),
        (f"Authorization: Bearer {JWT}", "Authorization: Bearer [SECRET]", "SECRET"),
        (f"key:\n{PEM}\nend", "key:\n[SECRET]\nend", "SECRET"),
        ("db postgres://admin:hunter2@db.internal/app", "db postgres://admin:[SECRET]@db.internal/app", "SECRET"),
        ("HF_TOKEN=hf_" + "aBcDeFgHiJkLmNoPqRsTuVwXyZ01234567", "HF_TOKEN=[SECRET]", "SECRET"),
        ("card 4111 1111 1111 1111 123 (cvv)", "card [CREDIT_CARD] 123 (cvv)", "CREDIT_CARD"),  # ran on into the CVV
    ],
)
def test_issue_examples_are_redacted(text, expected, kind):
    counts: Counter[str] = Counter()
    assert redact(text, counts) == expected
    assert counts == (Counter({kind: 1}) if kind else Counter())


@pytest.mark.parametrize(
    "text",
    [
        "pip install foo==1.2.3.4",  # the issue's example: a version pin, not an IP
        "requires bar>=10.0.0.1 and baz~=2.3.4.5",
        "see section 1.2.3.4 of the spec, version 4.3.2.1",
        "pkg-1.2.3.4.tar.gz and v1.2.3.4",
        "population 8123456789 and 1234567",  # bare digit runs with no phone keyword
        "order #20240115-0042, invoice 2024-000123",
        "sha1 3f786850e387550fdab836ed7e6dc881de23001b, uuid 123e4567-e89b-12d3-a456-426614174000",
        "ts 1700000000 and 1700000000123",
        "AKIA is a prefix; AKIAIOSFODNN7 is too short",
    ],
)
def test_hard_negatives_are_left_alone(text):
    counts: Counter[str] = Counter()
    assert redact(text, counts) == text
    assert sum(counts.values()) == 0


def test_a_real_ip_beside_a_version_pin_is_still_redacted():
    assert redact("foo==1.2.3.4 served from 10.0.0.7") == "foo==1.2.3.4 served from [IP]"


def test_regions_choose_the_national_formats_and_ids():
    fr = "appelez le 06 12 34 56 78"
    assert redact(fr, regions=["US"]) == fr  # not a US number
    assert redact(fr, regions=["FR"]) == "appelez le [PHONE]"
    assert redact("+33 6 12 34 56 78", regions=["US"]) == "[PHONE]"  # international format: any region
    dni = "DNI 12345678Z"
    assert redact(dni) == dni  # ES not in the default regions
    assert redact(dni, regions=["ES"]) == "DNI [NATIONAL_ID]"
    assert redact("SSN 123-45-6789", regions=["GB"]) == "SSN 123-45-6789"


def test_lowercasing_after_redaction_keeps_placeholders():
    from finetune_trainer.data.pii import lower_keeping_placeholders

    assert lower_keeping_placeholders(redact(f"Key {AWS_KEY} From A@B.IO")) == "key [SECRET] from [EMAIL]"


def test_coverage_lists_what_was_and_was_not_looked_for():
    from finetune_trainer.data.pii import KINDS, coverage

    cov = coverage(["US", "GB", "FR", "DE"])
    assert [i["kind"] for i in cov["looked_for"]] == list(KINDS)
    assert "US, GB, FR, DE" in next(i["what"] for i in cov["looked_for"] if i["kind"] == "PHONE")
    assert any(s.startswith("person names") for s in cov["not_looked_for"])
    assert any(s.startswith("postal addresses") for s in cov["not_looked_for"])
    assert "SSN" not in [i["kind"] for i in coverage(["GB"])["looked_for"]]
    assert coverage(["US"], enabled=False)["looked_for"] == []


def test_pii_regions_in_the_spec():
    from pydantic import ValidationError

    from finetune_api.spec import PreprocessingSpec

    assert PreprocessingSpec().pii_regions == ["US", "GB", "FR", "DE"]
    assert PreprocessingSpec.model_validate({"piiRegions": ["es", "ES", "it"]}).pii_regions == ["ES", "IT"]
    with pytest.raises(ValidationError, match="two-letter"):
        PreprocessingSpec.model_validate({"piiRegions": ["USA"]})


# ------------------------------------------------------------- the data report and the model card


def test_pipeline_redacts_keys_before_lowercasing_and_reports_coverage(tmp_path):
    """The report says which kinds were looked for and which were not; a key survives lowercasing's order."""
    from test_data_pipeline import make_spec, make_tokenizer, prepare, write_jsonl

    from finetune_api.documents import DataReport, undeclared_keys
    from finetune_trainer.data import format_report

    rows = [{"text": f"w1 w2 {AWS_KEY} w3"}, {"text": "w4 call 020 7946 0958 w5"}, {"text": "w6 foo==1.2.3.4 w7"}]
    spec = make_spec(write_jsonl(tmp_path / "t.jsonl", rows), preprocessing={"lowercase": True, "dedupe": {"near": False}},
                     leakageCheck="off")
    data = prepare(spec, make_tokenizer(), tmp_path)
    assert data.report["inputs"]["train"]["pii"] == {"PHONE": 1, "SECRET": 1}
    coverage = data.report["pii_coverage"]
    assert coverage["regions"] == ["US", "GB", "FR", "DE"]
    assert {"SECRET", "PHONE", "NATIONAL_ID", "SSN", "IBAN"} <= {i["kind"] for i in coverage["looked_for"]}
    assert any(s.startswith("person names") for s in coverage["not_looked_for"])
    assert undeclared_keys(DataReport.model_validate(data.report)) == []
    log = format_report(data.report)
    assert "pii looked for: SECRET, EMAIL, IBAN" in log and "pii not looked for: person names" in log


def test_the_model_card_says_what_pii_was_and_was_not_looked_for():
    from finetune_api.spec import parse_spec
    from finetune_trainer.model_card import build_model_card
    from test_model_card import _summary

    body = {"model": {"uri": "s3://models/m"}, "dataset": {"train": "s3://data/t.jsonl"}, "output": {"uri": "s3://out/x"}}
    card, readme = build_model_card(_summary(parse_spec(body)))
    looked = next(line for line in readme.splitlines() if line.startswith("| PII looked for"))
    assert "SECRET: cloud keys" in looked and "PHONE: phone numbers" in looked and "US, GB, FR, DE" in looked
    missed = next(line for line in readme.splitlines() if line.startswith("| PII not looked for"))
    assert "person names" in missed and "postal addresses" in missed
    assert any("PII redaction did not look for person names" in note for note in card["limitations"])
    assert card["piiCoverage"]["not_looked_for"][0].startswith("person names")

    body["dataset"]["preprocessing"] = {"redactPii": False}
    card, readme = build_model_card(_summary(parse_spec(body)))
    assert card["piiCoverage"]["looked_for"] == []
    assert any("PII redaction was off" in note for note in card["limitations"])
