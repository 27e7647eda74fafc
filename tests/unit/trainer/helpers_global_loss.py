"""One data-parallel rank of the global-loss test (tests/unit/trainer/test_global_loss.py), run as a script.

    python helpers_global_loss.py OUT WORLD RANK PORT [ALPHA]

Builds the same tiny Llama on every rank, takes this rank's micro-batches of a fixed global batch in which
rank 0's rows have long completions and rank 1's short ones, and runs one accumulation window the way
the trainer does (finetune_trainer.loss.WindowLoss; DDP over gloo, gradients synchronised on the last
micro-batch only). Rank 0 saves the synchronised gradients and the all-reduced mean window loss to OUT.
With WORLD 1 the one process holds every rank's micro-batches: the single-process reference. With ALPHA, a
second tiny Llama (seed 1) is the distillation teacher (finetune_trainer.distill.Teacher, T = 2).
"""

from __future__ import annotations

import contextlib
import os
import sys

import torch

ACCUMULATION = 2


def global_batch() -> list[list[list[dict[str, list[int]]]]]:
    """[rank][micro-batch][row]: rank 0's completions are 30 tokens long, rank 1's are 2 (prompts of 4)."""
    g = torch.Generator().manual_seed(0)

    def row(completion: int) -> dict[str, list[int]]:
        ids = torch.randint(4, 60, (4 + completion,), generator=g).tolist()
        return {"input_ids": ids, "labels": [-100] * 4 + ids[4:]}

    return [[[row(30), row(30)] for _ in range(ACCUMULATION)], [[row(2), row(2)] for _ in range(ACCUMULATION)]]


def main(out: str, world: int, rank: int, port: int, alpha: float | None = None) -> None:
    from transformers import LlamaConfig, LlamaForCausalLM

    from finetune_trainer import distributed
    from finetune_trainer.collate import PaddedLMCollator
    from finetune_trainer.loss import WindowLoss

    if world > 1:
        torch.distributed.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, max_position_embeddings=64, attention_dropout=0.0)
    model = LlamaForCausalLM(config)
    ddp = torch.nn.parallel.DistributedDataParallel(model) if world > 1 else model
    ranks = global_batch()
    micro = ranks[rank] if world > 1 else [mb for r in ranks for mb in r]
    collate = PaddedLMCollator(pad_token_id=0)
    batches = [collate(rows) for rows in micro]
    teacher = None
    if alpha is not None:
        from finetune_trainer.distill import Teacher

        torch.manual_seed(1)
        teacher = Teacher(LlamaForCausalLM(config).eval().requires_grad_(False), "/teacher", "fp32", 2.0, alpha)
    loss_fn = WindowLoss(classification=False, teacher=teacher)
    denominator = loss_fn.denominator(batches)
    window_loss = torch.zeros(())
    for i, batch in enumerate(batches):
        sync = contextlib.nullcontext() if i == len(batches) - 1 or world == 1 else ddp.no_sync()
        with sync:
            loss = loss_fn(ddp, batch, denominator)
            loss.backward()
        window_loss += loss.detach()
    logged = distributed.all_reduce_sum(float(window_loss)) / distributed.world_size()  # what the trainer logs
    if rank == 0:
        torch.save({"grads": {n: p.grad.clone() for n, p in model.named_parameters()}, "loss": logged,
                    "tokens": [[int((torch.tensor(r["labels"][1:]) != -100).sum()) for mb in rk for r in mb] for rk in ranks]}, out)
    if world > 1:
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    main(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), float(sys.argv[5]) if len(sys.argv) > 5 else None)
