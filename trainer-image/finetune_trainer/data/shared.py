"""Prepare the data once per node, not once per process.

A pod runs one trainer process per GPU, and :func:`~finetune_trainer.data.prepare_data` is
deterministic, so every local rank would compute the same datasets: the same reads, PII scans, MinHash
signatures and tokenisation, eight times over on an 8-GPU node, with eight duplicate indexes in RAM.
Instead local rank 0 prepares them into a folder all local ranks share (the pod's work volume) and
publishes ``prepared.json`` (labels, class weights, the data report and the Arrow file of each split)
followed by a ``.complete`` marker; the other local ranks wait for the marker and memory-map the same
files. If preparation fails with a user-caused error, local rank 0 writes ``.failed`` with the reason,
and every local rank raises the same error, so the whole pod exits with one reason and one exit code.

The folder is named after the torchrun agent (the parent process all local ranks share) and its restart
count, so a marker left by an earlier run is never mistaken for this one's.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from pathlib import Path
from typing import TYPE_CHECKING

import datasets

from finetune_trainer import errors
from finetune_trainer.data.prepare import PreparedData, prepare_data
from finetune_trainer.storage import Storage

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

    from finetune_api.spec import FineTuneJobSpec

log = logging.getLogger(__name__)

COMPLETE, FAILED, MANIFEST = ".complete", ".failed", "prepared.json"
SPLITS = ("train", "validation", "test", "retention")


def group_key() -> str:
    """The same on every local rank of one torchrun launch, different for the next launch."""
    return f"{os.getppid()}-{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}"


def prepare_data_per_node(spec: FineTuneJobSpec, storage: Storage, tokenizer: PreTrainedTokenizerBase, *, root: Path, local_rank: int, local_world_size: int,
                          poll_seconds: float = 0.5) -> PreparedData:
    if local_world_size <= 1:
        return prepare_data(spec, storage, tokenizer, cache_dir=root / "data")
    folder = root / f"data-node-{group_key()}"
    if local_rank == 0:
        return _prepare_and_publish(spec, storage, tokenizer, root, folder)
    return _wait_and_load(folder, poll_seconds)


def _prepare_and_publish(spec: FineTuneJobSpec, storage: Storage, tokenizer: PreTrainedTokenizerBase, root: Path, folder: Path) -> PreparedData:
    for stale in root.glob("data-node-*"):  # earlier launches' folders (a fresh pod has none)
        if stale != folder:
            shutil.rmtree(stale, ignore_errors=True)
    folder.mkdir(parents=True, exist_ok=True)
    try:
        data = prepare_data(spec, storage, tokenizer, cache_dir=folder)
    except errors.TrainerError as e:
        _write_atomic(folder / FAILED, json.dumps({"reason": e.reason, "message": e.message}))
        raise
    except Exception as e:  # noqa: BLE001 - the other ranks must not wait forever; the error itself propagates here
        _write_atomic(folder / FAILED, json.dumps({"reason": "TrainerError", "message": f"data preparation failed on local rank 0: {type(e).__name__}: {e}"}))
        raise
    files = {name: (getattr(data, name).cache_files[0]["filename"] if getattr(data, name) is not None else None) for name in SPLITS}
    manifest = {"files": files, "labels": data.labels, "class_weights": data.class_weights, "report": data.report}
    _write_atomic(folder / MANIFEST, json.dumps(manifest, default=str))
    _write_atomic(folder / COMPLETE, "")
    return data


def _wait_and_load(folder: Path, poll_seconds: float) -> PreparedData:
    waited = time.monotonic()
    while not (folder / COMPLETE).exists():
        if (folder / FAILED).exists():
            failure = json.loads((folder / FAILED).read_text())
            cls = getattr(errors, failure["reason"], None)
            if not (isinstance(cls, type) and issubclass(cls, errors.TrainerError)):
                cls = errors.TrainerError
            raise cls(failure["message"])
        time.sleep(poll_seconds)  # a SIGTERM here raises Preempted, as anywhere before the loop
    manifest = json.loads((folder / MANIFEST).read_text())
    loaded = {name: (datasets.Dataset.from_file(path) if path else None) for name, path in manifest["files"].items()}
    log.info("using the data local rank 0 prepared in %s (waited %.1fs)", folder, time.monotonic() - waited)
    return PreparedData(labels=manifest["labels"], class_weights=manifest["class_weights"], report=manifest["report"], **loaded)


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)
