"""Knowledge distillation (spec.distillation, finetune_trainer.distill): the KD term against a hand computation,
its place in the exact global-batch loss, the refusals, and (slow) the point of it: a student distilled from a
fine-tuned teacher against the same student trained on the labels alone."""

from __future__ import annotations

import math
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from finetune_trainer.distill import Teacher, check_labels, check_tokenizers, distillation_sum, kl_per_unit
from finetune_trainer.errors import InvalidConfig
from finetune_trainer.loss import WindowLoss
from helpers_assets import assets, build_tiny_llama, minilm_dir  # noqa: F401


def _kl_by_hand(student: list[float], teacher: list[float], t: float) -> float:
    """T^2 * sum_v p_v (log p_v - log q_v), p = softmax(teacher / T), q = softmax(student / T), in plain Python."""
    def softmax(xs):
        m = max(x / t for x in xs)
        e = [math.exp(x / t - m) for x in xs]
        return [x / sum(e) for x in e]

    p, q = softmax(teacher), softmax(student)
    return t * t * sum(pv * (math.log(pv) - math.log(qv)) for pv, qv in zip(p, q))


def test_the_kd_term_is_t_squared_kl_of_teacher_to_student_softened():
    g = torch.Generator().manual_seed(0)
    student, teacher = torch.randn(5, 4, generator=g) * 3, torch.randn(5, 4, generator=g) * 3
    for t in (1.0, 2.0, 4.5):
        got = kl_per_unit(student, teacher, t)
        want = [_kl_by_hand(s.tolist(), tt.tolist(), t) for s, tt in zip(student, teacher)]
        assert got.tolist() == pytest.approx(want, rel=1e-5, abs=1e-6)
    assert kl_per_unit(teacher, teacher, 2.0).abs().max() < 1e-6  # zero when the student matches
    # The direction: forward KL(teacher || student), not the reverse.
    forward = _kl_by_hand(student[0].tolist(), teacher[0].tolist(), 2.0)
    reverse = _kl_by_hand(teacher[0].tolist(), student[0].tolist(), 2.0)
    assert kl_per_unit(student[:1], teacher[:1], 2.0).item() == pytest.approx(forward, rel=1e-5) != pytest.approx(reverse, rel=1e-3)


def test_classification_kd_sum_weights_rows_like_the_task_loss():
    g = torch.Generator().manual_seed(1)
    student, teacher, labels = torch.randn(6, 3, generator=g), torch.randn(6, 3, generator=g), torch.tensor([0, 1, 2, 2, 1, 0])
    weights = torch.tensor([1.0, 4.0, 0.5])
    per_row = [_kl_by_hand(s.tolist(), t.tolist(), 2.0) for s, t in zip(student, teacher)]
    got = distillation_sum(student, teacher, labels, classification=True, temperature=2.0)
    assert got.item() == pytest.approx(sum(per_row), rel=1e-5)
    got = distillation_sum(student, teacher, labels, classification=True, temperature=2.0, class_weights=weights)
    assert got.item() == pytest.approx(sum(w * k for w, k in zip(weights[labels].tolist(), per_row)), rel=1e-5)


def test_causal_lm_kd_sum_covers_exactly_the_positions_that_predict_a_loss_token():
    g = torch.Generator().manual_seed(2)
    student, teacher = torch.randn(2, 5, 7, generator=g), torch.randn(2, 5, 7, generator=g)
    labels = torch.tensor([[-100, -100, 3, 4, 5], [-100, 1, 2, -100, -100]])
    # Position i predicts token i + 1: row 0 positions 1, 2, 3 and row 1 positions 0, 1 carry loss.
    want = sum(_kl_by_hand(student[r, i].tolist(), teacher[r, i].tolist(), 3.0) for r, i in [(0, 1), (0, 2), (0, 3), (1, 0), (1, 1)])
    got = distillation_sum(student, teacher, labels, classification=False, temperature=3.0)
    assert got.item() == pytest.approx(want, rel=1e-5)


def _tiny_llama(seed: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=40, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                         num_key_value_heads=1, max_position_embeddings=64, pad_token_id=0)
    return LlamaForCausalLM(config).eval()


def _window() -> list[dict[str, torch.Tensor]]:
    """Two micro-batches of a window: 3 loss tokens, then 9 (padded, prompt masked)."""
    ids0 = torch.tensor([[5, 6, 7, 8, 0, 0]])
    ids1 = torch.tensor([[9, 10, 11, 12, 13, 14], [15, 16, 17, 18, 19, 20]])
    return [{"input_ids": ids0, "attention_mask": (ids0 != 0).long(), "labels": torch.tensor([[-100, 6, 7, 8, -100, -100]])},
            {"input_ids": ids1, "attention_mask": torch.ones_like(ids1), "labels": torch.tensor([[-100, -100, 11, 12, 13, 14], [-100, 16, 17, 18, 19, 20]])}]


def test_the_mixed_loss_is_the_global_token_mean_of_task_and_kd_terms_and_the_teacher_gets_no_gradient():
    student, teacher_model = _tiny_llama(0), _tiny_llama(1)
    teacher_model.requires_grad_(False)
    window = _window()
    alpha, t = 0.3, 2.0
    loss = WindowLoss(classification=False, teacher=Teacher(teacher_model, "/teacher", "fp32", t, alpha))
    denominator = loss.denominator(window)
    assert denominator == 12  # loss tokens of the whole window (one process)
    total = sum(loss(student, b, denominator) for b in window)

    # Independently: every loss token's (1 - alpha) CE + alpha T^2 KL, averaged over the 12 tokens.
    terms = []
    for b in window:
        with torch.no_grad():
            s, tl = student(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits, teacher_model(
                input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits
        for r in range(b["labels"].shape[0]):
            for i in range(b["labels"].shape[1] - 1):
                target = int(b["labels"][r, i + 1])
                if target == -100:
                    continue
                ce = float(F.cross_entropy(s[r, i][None], torch.tensor([target])))
                terms.append((1 - alpha) * ce + alpha * _kl_by_hand(s[r, i].tolist(), tl[r, i].tolist(), t))
    assert len(terms) == 12
    assert total.item() == pytest.approx(sum(terms) / len(terms), rel=1e-5)

    total.backward()
    assert all(p.grad is None for p in teacher_model.parameters())
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in student.parameters())

    # alpha 0 is the plain task loss (the teacher is not even run); alpha 1 the KD term alone.
    plain = WindowLoss(classification=False)
    task_only = WindowLoss(classification=False, teacher=Teacher(teacher_model, "/teacher", "fp32", t, 0.0))
    with torch.no_grad():
        assert sum(task_only(student, b, 12) for b in window).item() == pytest.approx(sum(plain(student, b, 12) for b in window).item(), rel=1e-6)


def test_a_teacher_with_a_larger_padded_head_is_compared_over_the_shared_tokens():
    student_logits, teacher_logits = torch.randn(2, 4), torch.randn(2, 6)
    model = lambda **_: SimpleNamespace(logits=teacher_logits)  # noqa: E731
    teacher = Teacher(model, "/t", "fp32", 1.0, 1.0, vocab=4)
    labels = torch.tensor([0, 1])
    got = teacher.mix(torch.tensor(0.0), student_logits, {"input_ids": torch.zeros(2, 3, dtype=torch.long)}, labels, classification=True)
    want = sum(_kl_by_hand(s.tolist(), tt[:4].tolist(), 1.0) for s, tt in zip(student_logits, teacher_logits))
    assert got.item() == pytest.approx(want, rel=1e-5)


# ------------------------------------------------------------------------------------------- refusals


def test_a_teacher_with_another_tokenizer_is_refused_with_both_sizes_and_hashes(assets):  # noqa: F811
    from transformers import AutoTokenizer

    llama, minilm = AutoTokenizer.from_pretrained(assets["llama"]), AutoTokenizer.from_pretrained(assets["minilm"])
    check_tokenizers(llama, AutoTokenizer.from_pretrained(assets["llama"]), student_uri="/s", teacher_uri="/t")  # same: fine
    with pytest.raises(InvalidConfig) as err:
        check_tokenizers(llama, minilm, student_uri="/student", teacher_uri="/teacher")
    msg = err.value.message
    assert f"({len(minilm)} vs {len(llama)} tokens" in msg and "distillation.teacher.uri /teacher" in msg
    assert "must share one tokenizer" in msg and "vocabulary sha256" in msg


def test_a_classifier_teacher_must_have_the_students_labels_in_order():
    config = SimpleNamespace(num_labels=2, id2label={0: "negative", 1: "positive"})
    check_labels(config, ["negative", "positive"], 2, teacher_uri="/t")
    with pytest.raises(InvalidConfig, match=r"predicts 2 classes \(negative, positive\) but the student has 3"):
        check_labels(config, ["a", "b", "c"], 3, teacher_uri="/t")
    with pytest.raises(InvalidConfig, match=r"labels \[negative, positive\] in id order, the student \[positive, negative\]"):
        check_labels(config, ["positive", "negative"], 2, teacher_uri="/t")


def _load(spec_overrides: dict, assets, tmp_path: Path, labels=None):  # noqa: F811
    from finetune_api.spec import FineTuneJobSpec
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from finetune_trainer.distill import load_teacher
    from finetune_trainer.distributed import dist_info
    from finetune_trainer.storage import Storage
    from helpers_assets import deep_update

    base = {"model": {"uri": assets["minilm"], "task": "sequence-classification"}, "dataset": {"train": "/d.jsonl", "format": "classification"},
            "output": {"uri": str(tmp_path / "out")}}
    spec = FineTuneJobSpec.model_validate(deep_update(base, spec_overrides))
    tokenizer = AutoTokenizer.from_pretrained(spec.model.uri)
    student = AutoModelForSequenceClassification.from_pretrained(assets["minilm"], num_labels=2)
    return load_teacher(spec, Storage.from_spec(spec.storage), dist_info(), student_tokenizer=tokenizer, student_model=student,
                        labels=labels or ["negative", "positive"], num_labels=2, device=torch.device("cpu"), cache_dir=str(tmp_path))


def test_a_teacher_without_a_trained_head_or_as_an_adapter_folder_is_refused(assets, tmp_path):  # noqa: F811
    from finetune_trainer.errors import ModelNotFound

    with pytest.raises(InvalidConfig, match="is a BertModel, not a sequence classifier"):
        _load({"distillation": {"teacher": {"uri": assets["minilm"]}}}, assets, tmp_path)  # the bare encoder: no head
    # A classifier config whose weights lack the head (here: the encoder's weights under a classifier's config).
    import json
    import shutil

    headless = tmp_path / "headless"
    shutil.copytree(assets["minilm"], headless)
    config = json.loads((headless / "config.json").read_text())
    config.update(architectures=["BertForSequenceClassification"], id2label={"0": "negative", "1": "positive"},
                  label2id={"negative": 0, "positive": 1})
    (headless / "config.json").write_text(json.dumps(config))
    with pytest.raises(InvalidConfig, match=r"has no trained weights for 2 parameters of a sequence-classification .*classifier.bias"):
        _load({"distillation": {"teacher": {"uri": str(headless)}}}, assets, tmp_path)
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text("{}")
    with pytest.raises(ModelNotFound, match="an adapter folder is not enough"):
        _load({"distillation": {"teacher": {"uri": str(adapter)}}}, assets, tmp_path)


def test_a_trained_classifier_teacher_is_loaded_frozen_in_eval_mode(assets, tmp_path):  # noqa: F811
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    folder = tmp_path / "teacher"
    model = AutoModelForSequenceClassification.from_pretrained(assets["minilm"], num_labels=2, id2label={0: "negative", 1: "positive"},
                                                               label2id={"negative": 0, "positive": 1})
    model.save_pretrained(folder)
    AutoTokenizer.from_pretrained(assets["minilm"]).save_pretrained(folder)
    teacher = _load({"distillation": {"teacher": {"uri": str(folder)}, "temperature": 3.0, "alpha": 0.7}}, assets, tmp_path)
    assert (teacher.temperature, teacher.alpha, teacher.precision, teacher.vocab) == (3.0, 0.7, "fp32", None)
    assert not teacher.model.training and not any(p.requires_grad for p in teacher.model.parameters())
    with pytest.raises(InvalidConfig, match="same labels in the same order"):
        _load({"distillation": {"teacher": {"uri": str(folder)}}}, assets, tmp_path, labels=["positive", "negative"])


# ------------------------------------------------------------------------------------ end to end (slow)


def _lm_distill_spec(assets, teacher: str, out: Path, **distillation):  # noqa: F811
    from helpers_assets import lm_spec

    return lm_spec(assets, str(out), hyperparameters={"maxSteps": 8}, checkpoint={"everySteps": 4, "keepLast": 5},
                   evaluation={"everySteps": 4, "baseline": False},
                   distillation={"teacher": {"uri": teacher}, "temperature": 2.0, "alpha": 0.5, **distillation})


@pytest.mark.slow
def test_causal_lm_distillation_reports_the_teacher_and_resumes_exactly(assets, tmp_path):  # noqa: F811
    import json
    import shutil

    from helpers_assets import checkpoint_state, run_trainer, write_config

    teacher = str(build_tiny_llama(tmp_path / "teacher", seed=1))  # same tokenizer, other weights
    out = tmp_path / "out"
    config = write_config(tmp_path / "job.yaml", _lm_distill_spec(assets, teacher, out))
    r = run_trainer(config, tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "teacher " + teacher in r.stderr and "in fp32 on cpu, temperature 2, alpha 0.5" in r.stderr
    reference = [(h["step"], h["loss"]) for h in checkpoint_state(out, 8)["history"]]

    progress = json.loads((out / "progress.json").read_text())
    measured = progress["evaluation"]["teacher"]
    assert (measured["uri"], measured["precision"], measured["temperature"], measured["alpha"]) == (teacher, "fp32", 2.0, 0.5)
    student_test, teacher_test = progress["evaluation"]["test"], measured["test"]
    assert teacher_test["eval_tokens"] == student_test["eval_tokens"] > 0  # the same rows
    assert teacher_test["eval_loss"] != student_test["eval_loss"]
    card = json.loads((out / "model" / "model_card.json").read_text())
    assert card["evaluation"]["teacher"]["test"]["eval_loss"] == pytest.approx(teacher_test["eval_loss"])
    readme = (out / "model" / "README.md").read_text()
    assert "## Distillation" in readme and "| Teacher (validation) | Student (validation) | Teacher (test) | Student (test) |" in readme

    # Resume with the teacher on: drop the last checkpoint and the model, run again: steps 5-8 recomputed, same losses.
    resumed = tmp_path / "resumed"
    shutil.copytree(out, resumed)
    shutil.rmtree(resumed / "model")
    shutil.rmtree(resumed / "checkpoints" / "step-00000008")
    r = run_trainer(write_config(tmp_path / "resumed.yaml", _lm_distill_spec(assets, teacher, resumed)), tmp_path / "second")
    assert r.returncode == 0, r.stderr[-3000:]
    assert "resumed from" in r.stderr and " at step 4" in r.stderr
    assert [(h["step"], h["loss"]) for h in checkpoint_state(resumed, 8)["history"]] == reference


POINT_STEPS, POINT_NOISE, POINT_ALPHA = 24, 0.3, 0.8


def _flip_labels(rows: list[dict[str, str]], fraction: float, seed: int) -> list[dict[str, str]]:
    import random

    rng, other = random.Random(seed), {"positive": "negative", "negative": "positive"}
    return [dict(r, label=other[r["label"]]) if rng.random() < fraction else r for r in rows]


@pytest.mark.slow
def test_a_student_distilled_from_a_fine_tuned_teacher_beats_the_same_student_trained_on_its_labels_alone(tmp_path):
    """The point of distillation. Teacher: MiniLM (6 layers) fully fine-tuned on 240 clean sentiment rows (10 steps). Student:
    MiniLM cut to its first layer, trained on 32 other rows of which 30% carry the wrong label (weak labels, the
    usual reason to have a teacher), for the same 24 steps with the same seed, with and without the teacher; both
    students and the teacher are scored on the same 80 held-out rows, which neither training set contains.
    Measured on CPU (2026-12-02): plain student 0.850, distilled 0.975, teacher 1.000 (with a 15-step teacher: distilled
    1.000 at alpha 0.8, 0.900 at alpha 0.5)."""
    import json

    from finetune_devcluster.assets import build_minilm_student

    from helpers_assets import run_trainer, sentiment_rows, write_config, write_jsonl

    teacher_rows = sentiment_rows(240, seed=0)
    pool = [r for r in sentiment_rows(800, seed=11) if r["text"] not in {t["text"] for t in teacher_rows}]
    test = write_jsonl(tmp_path / "test.jsonl", pool[:80])
    student_train = write_jsonl(tmp_path / "student.jsonl", _flip_labels(pool[80:112], POINT_NOISE, seed=3))
    student_dir = build_minilm_student(tmp_path / "minilm-1-layer")  # what the example's student is
    clean = {"dedupe": {"near": False}, "redactPii": False}

    teacher_out = tmp_path / "teacher-out"
    teacher_spec = {
        "model": {"uri": minilm_dir(), "task": "sequence-classification"}, "method": "full",
        "dataset": {"train": write_jsonl(tmp_path / "teacher.jsonl", teacher_rows), "format": "classification",
                    "split": {"validation": 0.1, "test": 0.0}, "leakageCheck": "off", "preprocessing": clean},
        "hyperparameters": {"maxSteps": 10, "learningRate": 1e-4, "batchSize": 16, "maxSeqLength": 32, "warmupRatio": 0.0, "seed": 3},
        "evaluation": {"everySteps": 100, "baseline": False, "calibration": False, "useBestModel": False},
        "checkpoint": {"everySteps": 100}, "output": {"uri": str(teacher_out)},
    }
    r = run_trainer(write_config(tmp_path / "teacher.yaml", teacher_spec, name="teacher"), tmp_path / "t")
    assert r.returncode == 0, r.stderr[-3000:]

    def student(name: str, distillation: dict | None) -> dict:
        out = tmp_path / f"{name}-out"
        spec = {
            "model": {"uri": str(student_dir), "task": "sequence-classification"}, "method": "full",
            "dataset": {"train": student_train, "test": test, "format": "classification", "split": {"validation": 0.0, "test": 0.0},
                        "leakageCheck": "off", "preprocessing": clean},
            "hyperparameters": {"maxSteps": POINT_STEPS, "learningRate": 1e-3, "batchSize": 16, "maxSeqLength": 32, "warmupRatio": 0.0, "seed": 3},
            "evaluation": {"baseline": False, "calibration": False}, "checkpoint": {"everySteps": 1000}, "output": {"uri": str(out)},
        }
        if distillation:
            spec["distillation"] = distillation
        r = run_trainer(write_config(tmp_path / f"{name}.yaml", spec, name=name), tmp_path / name)
        assert r.returncode == 0, r.stderr[-3000:]
        progress = json.loads((out / "progress.json").read_text())
        assert progress["step"] == POINT_STEPS  # the same budget
        return progress["evaluation"]

    plain = student("plain", None)
    distilled = student("distilled", {"teacher": {"uri": str(teacher_out / "model")}, "temperature": 2.0, "alpha": POINT_ALPHA})
    teacher = distilled["teacher"]["test"]
    print(f"test accuracy: plain student {plain['test']['accuracy']:.3f}, distilled student {distilled['test']['accuracy']:.3f}, "
          f"teacher {teacher['accuracy']:.3f}")
    assert plain["test"]["eval_samples"] == distilled["test"]["eval_samples"] == teacher["eval_samples"] == 80
    assert "teacher" not in plain or plain["teacher"] is None
    assert teacher["accuracy"] >= 0.95  # a teacher worth learning from
    assert distilled["test"]["accuracy"] >= plain["test"]["accuracy"] + 0.1  # measured: 0.975 vs 0.850


def test_the_distillation_examples_are_valid_job_configs_and_the_student_reads_the_teachers_output():
    from finetune_trainer.config import load_config
    from helpers_assets import REPO

    teacher = load_config(REPO / "examples" / "distillation" / "sentiment-teacher.yaml")
    student = load_config(REPO / "examples" / "distillation" / "sentiment-student.yaml")
    import yaml

    teacher_name = yaml.safe_load((REPO / "examples" / "distillation" / "sentiment-teacher.yaml").read_text())["metadata"]["name"]
    # teacher.fromJob names the teacher job; a full fine-tune exports whole weights, which the operator resolves to
    # (finetune_operator.lineage.resolve_teacher: <its output>/model, tested in tests/unit/operator/test_lineage_resolution.py)
    assert student.spec.distillation.teacher.from_job.name == teacher_name and teacher.spec.method == "full"
    assert student.spec.model.labels == teacher.spec.model.labels
    assert (student.spec.dataset.train, student.spec.dataset.split) == (teacher.spec.dataset.train, teacher.spec.dataset.split)


def test_the_card_shows_the_teacher_beside_the_student_on_the_same_splits():
    from finetune_api.spec import parse_spec

    from finetune_trainer.model_card import build_model_card
    from finetune_trainer.report import FinalEvaluation, RunSummary

    spec = parse_spec({"model": {"uri": "/student", "task": "sequence-classification", "labels": ["neg", "pos"]},
                       "dataset": {"train": "/d.jsonl", "format": "classification"}, "output": {"uri": "/out"},
                       "distillation": {"teacher": {"uri": "/teacher"}, "alpha": 0.8}})
    teacher = {"uri": "/teacher", "precision": "bf16", "temperature": 2.0, "alpha": 0.8,
               "validation": {"accuracy": 0.97, "eval_samples": 50.0}, "test": {"accuracy": 0.96, "eval_samples": 80.0}}

    def card(teacher_eval):
        evaluation = FinalEvaluation(final={"accuracy": 0.91, "eval_samples": 50.0}, test={"accuracy": 0.9, "eval_samples": 80.0},
                                     teacher=teacher_eval)
        summary = RunSummary(job="j", spec=spec, steps=1, total_steps=1, stopped_early=False, best_step=None, best_metric=None,
                             monitor="eval_loss", baseline=None, evaluation=evaluation)
        return summary, *build_model_card(summary)

    summary, data, readme = card(teacher)
    assert data["evaluation"]["teacher"] == teacher and summary.to_dict()["teacher_eval"] == teacher
    section = readme.split("## Distillation")[1].split("\n## ")[0]
    assert "`/teacher` (held in bf16, never trained): loss = (1 - 0.8) x task loss + 0.8 x T^2 x KL(teacher || student)" in section
    assert "| Accuracy | 0.9700 | 0.9100 | 0.9600 | 0.9000 |" in section and "| Examples | 50 | 50 | 80 | 80 |" in section
    summary, data, readme = card(None)
    assert "## Distillation" not in readme and data["evaluation"]["teacher"] is None and "teacher_eval" not in summary.to_dict()


@pytest.mark.slow
def test_two_ddp_ranks_distilling_get_the_single_process_gradients(tmp_path):
    """The global-loss check of test_global_loss.py with a teacher: rank 0's rows carry 30 loss tokens each, rank 1's
    2; with the KD term summed over the same tokens and divided by the same global count, two gloo ranks under
    DDP must get the gradients and the logged loss of one process holding the whole window."""
    import subprocess
    import sys

    from helpers_assets import HERE, REPO, free_port, trainer_env

    def run(world: int, alpha: str) -> dict:
        out, port = tmp_path / f"world{world}-{alpha}.pt", free_port()
        procs = [subprocess.Popen([sys.executable, str(HERE / "helpers_global_loss.py"), str(out), str(world), str(rank), str(port), alpha],
                                  env=trainer_env(tmp_path), cwd=str(REPO), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
                 for rank in range(world)]
        for p in procs:
            output, _ = p.communicate(timeout=300)
            assert p.returncode == 0, output[-3000:]
        return torch.load(out)

    two, one = run(2, "0.5"), run(1, "0.5")
    for name, g in one["grads"].items():
        torch.testing.assert_close(two["grads"][name], g, rtol=1e-4, atol=1e-7, msg=name)
    assert two["loss"] == pytest.approx(one["loss"], rel=1e-6)

    # And the one process's loss is the global token mean of 0.5 CE + 0.5 T^2 KL (the teacher term is really in it).
    from transformers import LlamaConfig, LlamaForCausalLM

    from finetune_trainer.collate import PaddedLMCollator
    from helpers_global_loss import global_batch

    config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, max_position_embeddings=64, attention_dropout=0.0)
    torch.manual_seed(0)
    student = LlamaForCausalLM(config)
    torch.manual_seed(1)
    teacher = LlamaForCausalLM(config)
    batch = PaddedLMCollator(pad_token_id=0)([row for rank in global_batch() for mb in rank for row in mb])
    with torch.no_grad():
        s, t = (m(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1] for m in (student, teacher))
    keep = batch["labels"][:, 1:] != -100
    ce = F.cross_entropy(s[keep], batch["labels"][:, 1:][keep])
    kd = kl_per_unit(s[keep], t[keep], 2.0).mean()
    assert one["loss"] == pytest.approx((0.5 * ce + 0.5 * kd).item(), rel=1e-5) and kd.item() > 1e-3


def test_an_s3_teacher_is_downloaded_once_into_the_model_cache_like_the_base_model(assets, tmp_path, monkeypatch):  # noqa: F811
    import socket

    import boto3
    from finetune_api.spec import FineTuneJobSpec
    from moto.server import ThreadedMotoServer
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from finetune_trainer.distill import load_teacher
    from finetune_trainer.distributed import dist_info
    from finetune_trainer.storage import Storage

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port)
    server.start()
    try:
        for k, v in {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}.items():
            monkeypatch.setenv(k, v)
        endpoint = f"http://127.0.0.1:{port}"
        client = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1")
        client.create_bucket(Bucket="models")
        teacher_dir = build_tiny_llama(tmp_path / "teacher", seed=1)
        for f in teacher_dir.iterdir():
            client.upload_file(str(f), "models", f"teacher/{f.name}")
        spec = FineTuneJobSpec.model_validate({
            "model": {"uri": assets["llama"]}, "dataset": {"train": "/d.jsonl"}, "output": {"uri": "s3://results/x"},
            "storage": {"endpoint": endpoint, "region": "us-east-1"}, "distillation": {"teacher": {"uri": "s3://models/teacher"}}})
        student = AutoModelForCausalLM.from_pretrained(assets["llama"])
        teacher = load_teacher(spec, Storage.from_spec(spec.storage), dist_info(), student_tokenizer=AutoTokenizer.from_pretrained(assets["llama"]),
                               student_model=student, labels=None, num_labels=None, device=torch.device("cpu"), cache_dir=str(tmp_path / "cache"))
        cached = list((tmp_path / "cache" / "models").iterdir())
        assert len(cached) == 1 and (cached[0] / ".complete").exists() and (cached[0] / "config.json").exists()
        ids = torch.tensor([[2, 7, 8, 9]])
        reference = AutoModelForCausalLM.from_pretrained(teacher_dir).eval()
        with torch.no_grad():
            torch.testing.assert_close(teacher.logits({"input_ids": ids}), reference(input_ids=ids).logits)
    finally:
        server.stop()


@pytest.mark.skipif(torch.cuda.is_available(), reason="the refusal is for machines without a CUDA GPU")
def test_an_fp16_teacher_without_a_gpu_is_refused_naming_the_teacher_field():
    from finetune_trainer.distill import resolve_teacher_precision
    from finetune_trainer.errors import UnsupportedHardware

    assert resolve_teacher_precision("auto") == "fp32" and resolve_teacher_precision("bf16") == "bf16"
    with pytest.raises(UnsupportedHardware, match="distillation.teacher.precision fp16 needs a CUDA GPU"):
        resolve_teacher_precision("fp16")
