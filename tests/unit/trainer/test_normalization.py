"""preprocessing.normalize: the default (safe) form never changes what the text means; the aggressive
form is opt-in; duplicate detection compares the aggressive form whatever the training text keeps."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from finetune_api.spec import FineTuneJobSpec, Normalization, PreprocessingSpec
from finetune_trainer.data import PreparedData, prepare_data
from finetune_trainer.data.cleaning import dedupe_key, normalize_aggressive, normalize_safe
from finetune_trainer.storage import Storage

CODE = "def f(x):\n    if x:\n\treturn 1\n    return 2"


def test_safe_form_keeps_indentation_tabs_and_compatibility_characters():
    assert normalize_safe(CODE) == CODE
    assert normalize_safe("x² + ½ = ﬁne") == "x² + ½ = ﬁne"
    assert normalize_safe("你好，世界！（测试）") == "你好，世界！（测试）"  # full-width CJK punctuation
    assert normalize_safe("a   b") == "a   b"
    assert normalize_safe("  leading") == "  leading"
    assert normalize_safe("👨\u200d👩\u200d👧 and فارسی\u200cها") == "👨\u200d👩\u200d👧 and فارسی\u200cها"  # ZWJ / ZWNJ kept


def test_safe_form_removes_what_carries_no_meaning():
    assert normalize_safe("cafe\u0301") == "café" and len(normalize_safe("cafe\u0301")) == 4  # NFC composes
    assert normalize_safe("one\r\ntwo\rthree") == "one\ntwo\nthree"
    assert normalize_safe("a\u200bb\ufeffc\u2060d\u00ade") == "abcde"
    assert normalize_safe("bell\x07 char\x00") == "bell char"
    assert normalize_safe("line   \nnext\t\n\nlast  ") == "line\nnext\n\nlast"


def test_aggressive_form_is_what_the_dedupe_key_compares():
    assert normalize_aggressive(CODE) == "def f(x):\n if x:\n return 1\n return 2"
    assert normalize_aggressive("x²") == "x2"
    assert normalize_aggressive("你好，世界！") == "你好,世界!"
    assert dedupe_key("ＨＥＬＬＯ,   World\t!") == dedupe_key("hello, world !")
    assert dedupe_key("a\u200db") == dedupe_key("ab")


def test_normalize_option_and_its_old_boolean_form():
    assert PreprocessingSpec().normalize == "safe"
    assert PreprocessingSpec.model_validate({"normalize": True}).normalize == "safe"
    assert PreprocessingSpec.model_validate({"normalize": False}).normalize == "none"
    assert PreprocessingSpec.model_validate({"normalize": "aggressive"}).normalize == Normalization.aggressive.value
    with pytest.raises(ValueError):
        PreprocessingSpec.model_validate({"normalize": "nfkc"})
    description = PreprocessingSpec.model_fields["normalize"].description or ""
    assert "x² becomes x2" in description and "indentation" in description


def _prepare(tmp_path: Path, rows: list[dict], **pre) -> PreparedData:
    """prepare_data on prompt-completion ``rows`` with the byte tokenizer below."""
    path = tmp_path / "train.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    spec = FineTuneJobSpec.model_validate({
        "model": {"uri": "/models/base"},
        "dataset": {"train": str(path), "format": "prompt-completion", "split": {"validation": 0, "test": 0},
                    "leakageCheck": "off", "preprocessing": pre},
        "output": {"uri": "/out"},
        "hyperparameters": {"maxSeqLength": 512},
    })
    return prepare_data(spec, Storage(), _ByteTokenizer(), cache_dir=tmp_path / "cache")


class _ByteTokenizer:
    """One token per UTF-8 byte, so the stored ids decode back to exactly the text that was kept."""

    eos_token_id = 0
    eos_token = "\x00"
    chat_template = None

    def __call__(self, texts, add_special_tokens=True, **_):
        return {"input_ids": [list(t.encode("utf-8")) for t in texts]}

    @staticmethod
    def decode(ids) -> str:
        return bytes(i for i in ids if i).decode("utf-8")


def _completions(data) -> list[str]:
    return [_ByteTokenizer.decode([i for i, label in zip(row["input_ids"], row["labels"]) if label != -100]) for row in data.train]


ROWS = [
    {"prompt": "Write f.", "completion": CODE},
    {"prompt": "Square of x?", "completion": "x²"},
    {"prompt": "Greet in Chinese.", "completion": "你好，世界！"},
]


def test_default_preparation_keeps_the_text_users_send(tmp_path):
    data = _prepare(tmp_path, ROWS)
    assert _completions(data) == [CODE, "x²", "你好，世界！"]
    assert data.report["preprocessing"]["normalize"] == "safe"


def test_aggressive_preparation_is_explicit(tmp_path):
    data = _prepare(tmp_path, ROWS, normalize="aggressive")
    assert _completions(data) == ["def f(x):\n if x:\n return 1\n return 2", "x2", "你好,世界!"]


def test_dedupe_still_catches_rows_differing_only_in_spacing_and_width(tmp_path):
    rows = ROWS + [
        {"prompt": "Write   f.", "completion": CODE.replace("    ", "  ")},  # spacing only
        {"prompt": "Ｓｑｕａｒｅ of x?", "completion": "x2"},  # full-width letters and a folded superscript
        {"prompt": "greet IN chinese.", "completion": "你好,世界!"},  # case and ASCII punctuation
    ]
    data = _prepare(tmp_path, rows)
    counts = data.report["inputs"]["train"]
    assert (counts["rows_kept"], counts["exact_duplicates"]) == (3, 3)
    assert _completions(data) == [CODE, "x²", "你好，世界！"]  # the first of each, unchanged
