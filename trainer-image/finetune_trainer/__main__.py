"""``python -m finetune_trainer --config job.yaml [--output-override URI]`` (console script ``finetune-trainer``).

Exit codes are the contract with the operator: 0 done; a :class:`~finetune_trainer.errors.TrainerError`'s
own code (its one-line ``Reason: message`` also goes to the termination-message file, which Kubernetes
copies into the pod status); :data:`~finetune_trainer.errors.EXIT_PREEMPTED` (143) on SIGTERM, after a
clean checkpoint when training had started (a ``Preempted: ...`` line in the termination message
says which); 1 for anything unexpected (with the traceback on stderr).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import traceback

from finetune_api import env as pod_env
from finetune_api.failures import PREEMPTED_REASON, termination_line

from .errors import EXIT_PREEMPTED, OutOfMemory, TrainerError

DEFAULT_TERMINATION_LOG = pod_env.DEFAULT_TERMINATION_LOG


def write_termination_message(line: str) -> None:
    """Write ``line`` as the pod's termination message, unless it would hide the real cause.

    All local ranks of a pod share the file. When one rank fails, torchrun SIGTERMs the others, which
    then exit with ``Preempted: ...``: that line must not replace the failing rank's reason, which is
    what the operator reads to decide between a retry and a permanent failure.
    """
    path = os.environ.get(pod_env.TERMINATION_LOG, DEFAULT_TERMINATION_LOG)
    try:
        if line.startswith(f"{PREEMPTED_REASON}:"):
            try:
                with open(path) as f:
                    current = f.read().strip()
            except OSError:
                current = ""
            if current and not current.startswith(f"{PREEMPTED_REASON}:"):
                return
        with open(path, "w") as f:
            f.write(line + "\n")
    except OSError:
        pass  # not in a pod, or the file is not writable: stderr still has the line


def fail(line: str, code: int) -> int:
    write_termination_message(line)
    print(line, file=sys.stderr, flush=True)
    return code


def _setup_logging() -> None:
    rank = os.environ.get("RANK", "0")
    logging.basicConfig(
        level=os.environ.get(pod_env.LOG_LEVEL, "INFO").upper(),
        format=f"%(asctime)s [rank {rank}] %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    for noisy in ("urllib3", "botocore", "s3transfer", "filelock", "datasets", "httpx"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="finetune-trainer", description="Fine-tune a language model from a FineTuneJob config.")
    p.add_argument("--config", required=True, help="FineTuneJob manifest or bare spec (YAML or JSON)")
    p.add_argument("--output-override", default=None, help="write to this URI instead of spec.output.uri")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    _setup_logging()
    try:
        from .config import load_config

        config = load_config(args.config, output_override=args.output_override)
        from .output_claim import claim_output_from_env

        claim_output_from_env(config)  # before anything is read or written under the output (issue 9 §5)
        from .train import Preempted, run

        try:
            run(config)
        except Preempted as e:
            # Not a failure, but the pod's termination message should still say why it stopped.
            return fail(termination_line(PREEMPTED_REASON, e).rstrip(), EXIT_PREEMPTED)
        return 0
    except TrainerError as e:
        return fail(e.line(), e.exit_code)
    except Exception as e:  # noqa: BLE001 - the last line of defence: always leave a reason behind
        import torch

        if isinstance(e, torch.cuda.OutOfMemoryError):
            err = OutOfMemory(f"CUDA out of memory ({str(e).splitlines()[0][:200]}); lower hyperparameters.batchSize or maxSeqLength, or enable gradientCheckpointing")
            return fail(err.line(), err.exit_code)
        traceback.print_exc()
        first = str(e).strip().splitlines()[0][:500] if str(e).strip() else ""
        return fail(f"{type(e).__name__}: {first}".rstrip(": "), 1)


if __name__ == "__main__":
    sys.exit(main())
