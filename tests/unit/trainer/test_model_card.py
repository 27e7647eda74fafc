"""Model card: the JSON and the README carry the numbers they were given, follow the Hugging Face card layout,
and still render when every optional part is missing."""

from __future__ import annotations

import json
import math

import pytest
from finetune_api.documents import BASELINES
import yaml

from finetune_api.spec import parse_spec
from finetune_trainer.model_card import build_model_card, fmt
from finetune_trainer.report import FinalEvaluation, RunSummary

SECTIONS = [
    "## Model details",
    "## Training data",
    "### Data report",
    "## Training procedure",
    "### Hyperparameters",
    "## Evaluation",
    "## Calibration",
    "## Retention (catastrophic forgetting)",
    "## Limitations",
]


def _front_matter(readme: str) -> dict:
    assert readme.startswith("---\n")
    head, _, _ = readme[4:].partition("\n---\n")
    return yaml.safe_load(head)


@pytest.fixture
def classification_spec():
    return parse_spec(
        {
            "model": {"uri": "hf://acme/tiny-bert", "task": "sequence-classification", "labels": ["neg", "pos|x", "neu"]},
            "method": "lora",
            "lora": {"r": 8, "alpha": 16},
            "dataset": {"train": "s3://data-bucket/train.jsonl", "format": "classification"},
            "hyperparameters": {"learningRate": 0.00031, "epochs": 2},
            "evaluation": {
                "earlyStopping": {"metric": "f1_macro", "mode": "max", "patience": 2},
                "retention": {"dataset": "/data/general.jsonl"},
            },
            "output": {"uri": "s3://out-bucket/jobs/a"},
        }
    )


def _summary(spec, *, job_name="job", data_report=None, baseline=None, final_eval=None, test_eval=None, calibration=None,
             retention=None, best_checkpoint=None, **run):
    """A RunSummary as the trainer builds it, from the pieces the tests vary."""
    facts = dict(steps=0, total_steps=0, stopped_early=False, best_step=None, best_metric=None, monitor="eval_loss")
    facts.update(run)
    return RunSummary(job=job_name, spec=spec, baseline=baseline, data_report=data_report or {}, best_checkpoint=best_checkpoint,
                      evaluation=FinalEvaluation(final=final_eval, test=test_eval, calibration=calibration, retention=retention),
                      **facts)


def _full_card(spec, **overrides):
    args = dict(
        job_name="sentiment-a",
        data_report={"rows": {"train": 1234, "validation": 150, "test": 149}, "dropped": {"exact_duplicates": 56}},
        baseline={"split": "test", "reference": "random_head",
                  "random_head": {"eval_loss": 1.0986, "accuracy": 0.3412, "f1_macro": 0.2101, "ece": 0.0456, "eval_samples": 1490.0},
                  "majority_class": {"accuracy": 0.4667, "f1_macro": 0.2121, "majority_class": 0.0},
                  "linear_probe": {"eval_loss": 0.6012, "accuracy": 0.7012, "f1_macro": 0.6803, "ece": 0.0611, "eval_samples": 1490.0,
                                   "train_samples": 1234.0}},
        final_eval={
            "eval_loss": 0.4567, "accuracy": 0.8123, "f1_macro": 0.7951, "ece": 0.0812, "eval_samples": 150.0,
            "per_class": {"neg": {"precision": 0.9, "recall": 0.85, "f1": 0.874, "support": 70}},
        },
        test_eval={
            "eval_loss": 0.4821, "accuracy": 0.8011, "f1_macro": 0.7813, "ece": 0.0342, "eval_samples": 1490.0,
            "per_class": {
                "neg": {"precision": 0.9137, "recall": 0.8642, "f1": 0.8883, "support": 710},
                "pos|x": {"precision": 0.7021, "recall": 0.7513, "f1": 0.7259, "support": 600},
                "neu": {"precision": 0.5123, "recall": 0.4011, "f1": 0.4499, "support": 180},
            },
        },
        calibration={"temperature": 1.734, "ece_before": 0.0812, "ece_after": 0.0231, "nll_before": 0.4567, "nll_after": 0.4102,
                     "test_ece_before": 0.0934, "test_ece_after": 0.0342, "test_nll_before": 0.5012, "test_nll_after": 0.4821},
        retention={"loss_before": 2.1, "loss_after": 2.2, "relative_increase": 0.047619, "threshold": 0.1, "passed": True},
        best_checkpoint={"step": 300, "value": 0.7951, "uri": "s3://out-bucket/jobs/a/checkpoints/step-00000300"},
        steps=450, total_steps=600, stopped_early=True, best_step=300, best_metric=0.3921, monitor="f1_macro",
        trainable_params=1234567, total_params=22713216, precision="fp32",
    )
    args.update(overrides)
    return build_model_card(_summary(spec, **args))


def test_card_contains_the_numbers_it_was_given(classification_spec):
    card, readme = _full_card(classification_spec)

    for number in [
        "1.0986", "0.3412", "0.2101",  # random head
        "0.6012", "0.7012", "0.6803",  # linear probe
        "0.0934", "0.5012",  # calibration on test, before
        "0.4567", "0.8123", "0.7951",  # final validation
        "0.4821", "0.8011", "0.7813", "1490",  # test
        "0.9137", "0.8642", "0.8883", "710", "0.4499",  # per class
        "1.7340", "0.0812", "0.0231", "0.4102",  # calibration
        "2.1000", "2.2000", "+4.76%", "+10.00%",  # retention
        "1234", "56", "00000300", "0.3921", "| `total_params` | 22713216 |", "| `steps` | 450 |",  # data report, best checkpoint, training
        "0.4667",  # majority class
        "| `learningRate` | 0.00031 |",  # learning rate
    ]:
        assert number in readme, number
    # Change = fine-tuned - random head, both on test: 0.7813 - 0.2101 (before: validation minus validation).
    assert "+0.5712 (+271.87%)" in readme
    assert ("| Metric | Random head (test) | Majority class (test) | Linear probe (test) | Fine-tuned (validation) | "
            "Fine-tuned (test) | Change vs random head (test) |") in readme
    assert "| Loss | 1.0986 | — | 0.6012 | 0.4567 | 0.4821 | -0.6165 (-56.12%) |" in readme
    assert "F1 (macro) on the test set: **0.7813** (random head: 0.2101; majority class: 0.2121; linear probe: 0.6803; all on test)." in readme
    # Which baseline is which, in words.
    for kind, title in (("random_head", "Random head"), ("majority_class", "Majority class"), ("linear_probe", "Linear probe")):
        assert f"- **{title}** (`{kind}`): {BASELINES[kind]}" in readme
    assert "| ECE (15 bins), test | 0.0934 | 0.0342 |" in readme and "| ECE (15 bins), validation | 0.0812 | 0.0231 |" in readme
    assert "pos\\|x" in readme  # a '|' in a label cannot break the table

    assert card["evaluation"]["test"]["f1_macro"] == 0.7813
    assert card["evaluation"]["final"] == {
        "eval_loss": 0.4567, "accuracy": 0.8123, "f1_macro": 0.7951, "ece": 0.0812, "eval_samples": 150.0,
    }
    assert card["evaluation"]["gain"]["f1_macro"]["delta"] == pytest.approx(0.5712)
    assert card["evaluation"]["baselineSplit"] == "test" and card["evaluation"]["gainFrom"] == "random_head"
    assert list(card["evaluation"]["baselines"]) == ["random_head", "majority_class", "linear_probe"]
    assert card["evaluation"]["baselines"]["linear_probe"]["accuracy"] == 0.7012
    assert card["evaluation"]["baselineDescriptions"]["random_head"] == BASELINES["random_head"]
    assert card["calibration"]["test_ece_before"] == 0.0934
    assert card["evaluation"]["gain"]["eval_loss"]["improved"] is True
    assert card["evaluation"]["perClass"]["neu"]["support"] == 180
    assert card["calibration"]["temperature"] == 1.734
    assert card["retention"]["passed"] is True
    assert card["dataReport"]["rows"]["train"] == 1234
    assert card["adapter"]["r"] == 8
    assert card["hyperparameters"]["learningRate"] == 0.00031
    json.dumps(card, allow_nan=False)


def test_readme_follows_hugging_face_card_conventions(classification_spec):
    _, readme = _full_card(classification_spec)
    meta = _front_matter(readme)
    assert meta["base_model"] == "acme/tiny-bert"
    assert meta["library_name"] == "peft"
    assert meta["pipeline_tag"] == "text-classification"
    assert {"finetune-operator", "lora", "sequence-classification"} <= set(meta["tags"])
    results = meta["model-index"][0]["results"][0]
    assert results["dataset"]["split"] == "test"
    assert {m["type"]: m["value"] for m in results["metrics"]}["accuracy"] == 0.8011
    positions = [readme.index(s) for s in SECTIONS]
    assert positions == sorted(positions)
    assert "### Per class (test set)" in readme


def test_card_renders_with_no_optional_parts():
    spec = parse_spec(
        {
            "model": {"uri": "s3://models/llama-tiny"},
            "method": "full",
            "dataset": {"train": "/data/train.jsonl"},
            "evaluation": {"baseline": False},
            "output": {"uri": "/out"},
        }
    )
    card, readme = build_model_card(_summary(
        spec,
        job_name="lm-b",
        final_eval={"eval_loss": 2.3456, "perplexity": 10.4392, "token_accuracy": 0.4123, "eval_tokens": 5120.0},
    ))
    for section in SECTIONS:
        assert section in readme, section
    meta = _front_matter(readme)
    assert meta["base_model"] == "s3://models/llama-tiny"
    assert meta["library_name"] == "transformers" and meta["pipeline_tag"] == "text-generation"
    assert meta["model-index"][0]["results"][0]["dataset"]["split"] == "validation"
    assert "| Loss | 2.3456 | — |" in readme and "10.4392" in readme and "5120" in readme
    assert "Loss on the validation set: **2.3456**." in readme
    assert "No test set was evaluated." in readme
    assert "No data report was recorded." in readme
    assert "Not applicable to causal language models." in readme
    assert "Not measured: no evaluation.retention dataset was configured." in readme
    limitations = readme.split("## Limitations")[1]
    assert "No test-set evaluation was run" in limitations
    assert "gain from fine-tuning is unknown" in limitations
    assert "No baseline was measured before training (evaluation.baseline is off)." in readme
    assert "Catastrophic forgetting was not measured" in limitations
    assert "Method." not in readme and "Task." not in readme  # spec defaults are enums; shown as plain values
    assert "`epochs` | 3 (default)" in readme
    assert card["evaluation"]["baselines"] == {} and card["evaluation"]["test"] is None
    assert card["evaluation"]["gain"] == {}
    assert card["task"] == "causal-lm" and card["method"] == "full"
    json.dumps(card, allow_nan=False)


def test_card_reports_problems_as_limitations(classification_spec):
    card, readme = _full_card(
        classification_spec,
        test_eval={"accuracy": 0.41, "f1_macro": 0.2, "eval_samples": 50.0, "perplexity": math.inf},
        calibration={"temperature": 0.9, "ece_before": 0.2, "ece_after": 0.02, "nll_before": 1.1, "nll_after": 1.0,
                     "test_ece_before": 0.2, "test_ece_after": 0.12, "test_nll_before": 1.2, "test_nll_after": 1.1},
        retention={"loss_before": 2.0, "loss_after": 2.5, "relative_increase": 0.25, "threshold": 0.1, "passed": False},
    )
    limitations = readme.split("## Limitations")[1]
    assert "does not beat always predicting the most frequent class (0.4667)" in limitations
    assert "small (50 examples)" in limitations
    assert "expected calibration error is 0.1200" in limitations  # on test, not the validation set it was fitted on
    assert "does not beat the linear probe baseline (0.7012): a logistic regression on the frozen base encoder does as well." in limitations
    assert "Retention check failed: loss on general data rose by +25.00% (allowed +10.00%)" in limitations
    assert "| 2.0000 | 2.5000 | +25.00% | +10.00% | **failed** |" in readme
    assert card["evaluation"]["test"]["perplexity"] is None  # inf is not JSON
    assert "inf" in readme
    json.dumps(card, allow_nan=False)


def test_long_data_report_is_truncated_in_the_readme_only(classification_spec):
    report = {"files": {f"part-{i:03d}.jsonl": i for i in range(100)}}
    card, readme = _full_card(classification_spec, data_report=report)
    assert "…and 40 more in `data-report.json`." in readme
    assert len(card["dataReport"]["files"]) == 100


@pytest.mark.parametrize(
    ("value", "text"),
    [(None, "—"), (True, "yes"), (7, "7"), (3.0, "3"), (0.123456, "0.1235"), (12345.67, "12345.7"), (2.5e-05, "2.5e-05"),
     (float("nan"), "nan"), (float("inf"), "inf")],
)
def test_fmt(value, text):
    assert fmt(value) == text


def test_fmt_real_keeps_decimals():
    assert fmt(2.0, real=True) == "2.0000"


# The shape data/prepare.py writes (trimmed), and the summary as train.py builds it: the majority-class baseline
# inside the baseline dict.
PIPELINE_REPORT = {
    "format": "classification",
    "inputs": {"train": {"uri": "s3://data-bucket/train.jsonl", "rows_read": 125, "rows_kept": 120}},
    "total": {
        "rows_read": 125, "malformed": 0, "empty": 2, "exact_duplicates": 5, "near_duplicates": 3, "rows_kept": 115,
        "truncated": 4, "tokens": 14400, "trainable_tokens": 14400, "pii_total": 9, "pii": {"EMAIL": 7, "PHONE": 2},
    },
    "leakage": {"policy": "drop", "validation": {"exact": 1, "near": 2, "total": 3}, "test": {"exact": 0, "near": 1, "total": 1}},
    "classes": {"labels": ["neg", "pos"], "train": {"counts": {"neg": 61, "pos": 31}, "imbalance_ratio": 1.967741935}},
    "final_sizes": {"train": 92, "validation": 12, "test": 11, "retention": None},
}


def test_card_from_the_data_pipeline_report_and_train_loop_arguments():
    spec = parse_spec(
        {
            "model": {"uri": "/models/base", "task": "sequence-classification"},
            "dataset": {"train": "s3://data-bucket/train.jsonl", "format": "classification"},
            "output": {"uri": "/out"},
        }
    )
    card, readme = build_model_card(_summary(
        spec,
        job_name="clf",
        data_report=PIPELINE_REPORT,
        baseline={"split": "validation", "reference": "random_head", "random_head": {"accuracy": 0.5, "f1_macro": 0.4},
                  "majority_class": {"accuracy": 0.6667, "f1_macro": 0.4, "majority_class": 0.0}},
        final_eval={"accuracy": 0.75, "f1_macro": 0.7},
        best_checkpoint={"uri": "/out/checkpoints/step-00000040"},
        steps=40, history=[{"step": 1, "loss": 0.7}] * 3,
    ))
    report = readme.split("### Data report")[1].split("## Training procedure")[0]
    for text in ["| train | 92 |", "| validation | 12 |", "| Rows read | 125 |", "| Exact duplicates | 5 |",
                 "| PII redacted | 9 |", "EMAIL 7, PHONE 2", "validation: 1 exact, 2 near; test: 0 exact, 1 near",
                 "| neg | 61 |", "| pos | 31 |", "1.9677", "data-report.json"]:
        assert text in report, text
    assert "retention" not in report  # a split that does not exist is not listed
    assert "| Labels | neg, pos |" in readme and card["labels"] == ["neg", "pos"]  # derived from the data
    assert "/out/checkpoints/step-00000040" in readme
    assert "| Accuracy | 0.5000 | 0.6667 | 0.7500 | — | +0.2500 (+50.00%) |" in readme
    assert card["evaluation"]["baselines"]["majority_class"] == {"accuracy": 0.6667, "f1_macro": 0.4}
    assert "the baselines and the gain are measured on the validation set that also chose the checkpoint" in readme
    assert card["bestCheckpoint"] == {"uri": "/out/checkpoints/step-00000040"}
    assert "`history` | 3 items" in readme
    assert "Confidence scores were not calibrated" in readme
    json.dumps(card, allow_nan=False)


def test_the_card_reads_the_direction_of_a_metric_given_without_mode():
    """earlyStopping {metric: f1_macro} used to be card mode 'min'; the gain verdict follows the metric table."""
    spec = parse_spec({"model": {"uri": "/m", "task": "sequence-classification"}, "output": {"uri": "/out"},
                       "dataset": {"train": "/d.jsonl", "format": "classification"},
                       "evaluation": {"earlyStopping": {"metric": "f1_macro"}}})
    baseline = {"split": "validation", "reference": "random_head", "random_head": {"f1_macro": 0.4}}
    card, readme = build_model_card(_summary(spec, baseline=baseline, final_eval={"f1_macro": 0.7}, monitor="f1_macro"))
    assert card["evaluation"]["primaryMetric"] == "f1_macro" and card["evaluation"]["mode"] == "max"
    assert card["evaluation"]["gain"]["f1_macro"]["improved"] is True
    assert "F1 (macro) on the validation set: **0.7000** (random head: 0.4000; all on validation)." in readme


def test_a_causal_lm_card_names_the_base_model_and_the_k_shot_baseline():
    spec = parse_spec({"model": {"uri": "/m"}, "dataset": {"train": "/d.jsonl", "format": "prompt-completion"}, "output": {"uri": "/out"},
                       "evaluation": {"metrics": ["bleu"], "earlyStopping": {"metric": "bleu"}}})
    baseline = {"split": "test", "reference": "base_model", "base_model": {"eval_loss": 3.1, "bleu": 2.5, "generation_samples": 64.0},
                "k_shot": {"bleu": 11.0, "generation_samples": 64.0, "prompts_shortened": 0.0}, "k": 4, "k_shot_train_rows": [17, 3, 40, 8]}
    card, readme = build_model_card(_summary(spec, baseline=baseline, final_eval={"eval_loss": 1.2, "bleu": 30.0},
                                             test_eval={"eval_loss": 1.3, "bleu": 9.0, "generation_samples": 64.0}, monitor="bleu"))
    assert "| Metric | Base model (test) | 4-shot base model (test) | Fine-tuned (validation) | Fine-tuned (test) | Change vs base model (test) |" in readme
    assert "| BLEU | 2.5000 | 11.0000 | 30.0000 | 9.0000 | +6.5000 (+260.00%) |" in readme
    assert "The examples shown are training rows 17, 3, 40, 8." in readme
    assert "does not beat the 4-shot base model baseline (11.0000): prompting the base model with a few examples does as well." in readme
    assert card["evaluation"]["kShot"] == {"k": 4, "trainRows": [17, 3, 40, 8]}
    assert card["evaluation"]["gain"]["bleu"]["baseline"] == 2.5  # test vs test, from the base model
    assert "prompts_shortened" not in card["evaluation"]["baselines"]["k_shot"]


def test_the_summary_keeps_the_keys_the_trainer_has_always_written():
    spec = parse_spec({"model": {"uri": "/m"}, "dataset": {"train": "/d.jsonl"}, "output": {"uri": "/out"}})
    summary = _summary(spec, steps=3, total_steps=4, precision="fp32", world_size=2)
    assert list(summary.to_dict()) == ["job", "steps", "total_steps", "stopped_early", "best_step", "best_metric", "monitor",
                                       "baseline", "final_eval", "test_eval", "calibration", "retention", "gain", "history", "evals"]
    training = summary.training()
    assert list(training) == ["steps", "total_steps", "stopped_early", "best_step", "best_metric", "monitor", "gain", "history",
                              "evals", "precision", "target_modules", "world_size", "distributed_strategy", "trainable_params",
                              "total_params"]
    assert (training["steps"], training["world_size"], training["precision"]) == (3, 2, "fp32")


@pytest.mark.parametrize(("normalize", "said", "unsaid"), [
    ("safe", "safe Unicode normalisation", "NFKC"),
    ("aggressive", "aggressive Unicode normalisation (NFKC", "safe Unicode"),
    ("none", None, "normalisation"),
])
def test_the_card_names_the_normalisation_that_ran(normalize, said, unsaid):
    """Before: "Unicode NFKC normalisation" whatever preprocessing.normalize said (the string none is truthy)."""
    spec = parse_spec({"model": {"uri": "s3://models/m"}, "dataset": {"train": "s3://data/t.jsonl", "preprocessing": {"normalize": normalize}},
                       "output": {"uri": "s3://out/x"}})
    _, readme = build_model_card(_summary(spec))
    cleaning = next(line for line in readme.splitlines() if line.startswith("| Cleaning"))
    if said:
        assert said in cleaning
    assert unsaid not in cleaning
    assert "key: turns" in cleaning and "label conflicts" not in cleaning  # not a classification job
