"""The one metric table: what each task computes, which way is better, and the names each consumer uses."""

from finetune_api import metric_catalogue as mc


def test_every_judged_metric_has_one_direction_and_counts_have_none():
    assert mc.judged("max") == ("token_accuracy", "accuracy", "f1_macro", "precision_macro", "recall_macro", "bleu", "rouge_1",
                                "rouge_2", "rouge_l", "label_accuracy", "reward_accuracy", "reward_margin", "chosen_reward", "logp_accuracy")
    assert mc.judged("min") == ("eval_loss", "perplexity", "ece", "rejected_reward")
    assert [m.name for m in mc.METRICS if m.direction is None] == ["eval_tokens", "eval_samples", "generation_samples", "eval_pairs"]
    assert mc.direction("f1_macro") == "max" and mc.direction("eval_samples") is None and mc.direction("nope") is None
    assert len(mc.BY_NAME) == len(mc.METRICS)


def test_what_each_task_computes():
    assert mc.monitorable("sequence-classification") == ("eval_loss", "accuracy", "f1_macro", "precision_macro", "recall_macro", "ece")
    assert mc.monitorable("causal-lm") == ("eval_loss", "perplexity", "token_accuracy")
    assert mc.monitorable("causal-lm", ["rouge"]) == ("eval_loss", "perplexity", "token_accuracy", "rouge_l")
    assert mc.GENERATION_METRICS == {"bleu": "bleu", "rouge": "rouge_l"}
    # An encoder-decoder computes every causal-LM metric, and with rouge also ROUGE-1 and ROUGE-2.
    assert mc.monitorable("seq2seq-lm") == mc.monitorable("causal-lm")
    assert mc.monitorable("seq2seq-lm", ["bleu", "rouge"]) == ("eval_loss", "perplexity", "token_accuracy", "bleu", "rouge_1", "rouge_2",
                                                               "rouge_l")
    # A causal LM trained on preference pairs (objective dpo/simpo): the pair metrics, no perplexity/token accuracy.
    assert mc.monitorable("preference") == ("eval_loss", "reward_accuracy", "reward_margin", "chosen_reward", "rejected_reward",
                                            "logp_accuracy")
    # label_accuracy exists only when the references are labels: reported and judged, never watched.
    assert mc.direction("label_accuracy") == "max" and "label_accuracy" not in mc.monitorable("causal-lm", ["bleu", "rouge"])


def test_titles_and_exported_names():
    assert mc.title("f1_macro") == "F1 (macro)" and mc.title("unknown") == "unknown"
    assert {m.name for m in mc.exported()} == set(mc.judged("min") + mc.judged("max"))
