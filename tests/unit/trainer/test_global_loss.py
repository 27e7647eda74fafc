"""The training loss is the per-token mean over the whole global batch, across ranks (issue 10 §4).

Two gloo processes on CPU whose rows have very different completion lengths (30 loss tokens per row on
rank 0, 2 on rank 1) must produce, after DDP's gradient averaging, the same gradients and the same
logged loss as one process that accumulates the same global batch. With a per-rank denominator a
token on rank 1 would weigh 1/(2 x 4) instead of 1/N_global = 1/128, and the gradients would differ.
"""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from helpers_assets import HERE, REPO, free_port, trainer_env

pytestmark = pytest.mark.slow

WORKER = HERE / "helpers_global_loss.py"


def _run(tmp_path, world: int) -> dict:
    out = tmp_path / f"world{world}.pt"
    port = free_port()
    procs = [subprocess.Popen([sys.executable, str(WORKER), str(out), str(world), str(rank), str(port)], env=trainer_env(tmp_path),
                              cwd=str(REPO), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for rank in range(world)]
    for p in procs:
        output, _ = p.communicate(timeout=300)
        assert p.returncode == 0, output[-3000:]
    return torch.load(out)


def test_two_ranks_with_different_completion_lengths_get_the_single_process_gradients(tmp_path):
    two, one = _run(tmp_path, 2), _run(tmp_path, 1)
    tokens = one["tokens"]
    assert sum(tokens[0]) == 4 * 30 and sum(tokens[1]) == 4 * 2  # the ranks' loss-token counts differ 15x
    assert set(two["grads"]) == set(one["grads"])
    for name, g in one["grads"].items():
        torch.testing.assert_close(two["grads"][name], g, rtol=1e-4, atol=1e-7, msg=name)
    assert two["loss"] == pytest.approx(one["loss"], rel=1e-6)  # the logged loss is the global per-token mean

    # And the single process's window loss is the plain mean token loss of the global batch.
    from transformers import LlamaConfig, LlamaForCausalLM

    from helpers_global_loss import global_batch
    from finetune_trainer.collate import PaddedLMCollator

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                                         num_key_value_heads=2, max_position_embeddings=64, attention_dropout=0.0))
    rows = [row for rank in global_batch() for mb in rank for row in mb]
    batch = PaddedLMCollator(pad_token_id=0)(rows)
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    mean = F.cross_entropy(logits[:, :-1].reshape(-1, 64), batch["labels"][:, 1:].reshape(-1), ignore_index=-100)
    assert one["loss"] == pytest.approx(mean.item(), rel=1e-5)
