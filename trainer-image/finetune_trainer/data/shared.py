"""Prepare the data once per node, not once per process.

A pod runs one trainer process per GPU, and :func:`~finetune_trainer.data.prepare_data` is
deterministic, so every local rank would compute the same datasets: the same reads, PII scans, MinHash
signatures and tokenisation, eight times over on an 8-GPU node, with eight duplicate indexes in RAM.
Instead local rank 0 prepares them into a folder all local ranks share (the pod's work volume) and
publishes ``prepared.json`` (labels, class weights, the data report and the Arrow file of each split);
the other local ranks memory-map the same files. The waiting and the failure handling are the
trainer's one "local rank 0 works, the others wait" helper
(:func:`finetune_trainer.distributed.local_main_works`): if preparation fails, every local rank raises
the same error, so the whole pod exits with one reason and one exit code.

The folder is named after the torchrun launch (:func:`~finetune_trainer.distributed.launch_key`), so a
marker left by an earlier run is never mistaken for this one's.
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

from finetune_trainer.data.folds import Fold
from finetune_trainer.data.prepare import PreparedData, prepare_data
from finetune_trainer.distributed import DistInfo, launch_key, local_main_works
from finetune_trainer.storage import Storage

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

    from finetune_api.spec import FineTuneJobSpec

log = logging.getLogger(__name__)

COMPLETE, FAILED, MANIFEST = ".complete", ".failed", "prepared.json"
SPLITS = ("train", "validation", "test", "retention")
# Preparing a large dataset can take hours; the waiters only give up when something is badly wrong.
WAIT_SECONDS = 24 * 3600.0


def prepare_data_per_node(spec: FineTuneJobSpec, storage: Storage, tokenizer: PreTrainedTokenizerBase, *, root: Path, local_rank: int, local_world_size: int,
                          poll_seconds: float = 0.5) -> PreparedData:
    if local_world_size <= 1:
        return prepare_data(spec, storage, tokenizer, cache_dir=root / "data")
    folder = root / f"data-node-{launch_key()}"
    waited = time.monotonic()

    def load() -> PreparedData:
        data = _load(folder)
        log.info("using the data local rank 0 prepared in %s (waited %.1fs)", folder, time.monotonic() - waited)
        return data

    return local_main_works(DistInfo(local_rank=local_rank, local_world_size=local_world_size),
                            lambda: _prepare_and_publish(spec, storage, tokenizer, root, folder), load,
                            done=folder / COMPLETE, failed=folder / FAILED, what="prepare the data",
                            timeout_s=WAIT_SECONDS, poll_s=poll_seconds)


def _prepare_and_publish(spec: FineTuneJobSpec, storage: Storage, tokenizer: PreTrainedTokenizerBase, root: Path, folder: Path) -> PreparedData:
    for stale in root.glob("data-node-*"):  # earlier launches' folders (a fresh pod has none)
        if stale != folder:
            shutil.rmtree(stale, ignore_errors=True)
    folder.mkdir(parents=True, exist_ok=True)
    data = prepare_data(spec, storage, tokenizer, cache_dir=folder)
    files = {name: (getattr(data, name).cache_files[0]["filename"] if getattr(data, name) is not None else None) for name in SPLITS}
    manifest = {"files": files, "labels": data.labels, "class_weights": data.class_weights, "report": data.report,
                "folds": [f.wire() for f in data.folds] if data.folds is not None else None}
    _write_atomic(folder / MANIFEST, json.dumps(manifest, default=str))
    return data  # local_main_works writes the .complete marker


def _load(folder: Path) -> PreparedData:
    manifest = json.loads((folder / MANIFEST).read_text())
    loaded = {name: (datasets.Dataset.from_file(path) if path else None) for name, path in manifest["files"].items()}
    folds = [Fold.from_wire(f) for f in manifest["folds"]] if manifest.get("folds") is not None else None
    return PreparedData(labels=manifest["labels"], class_weights=manifest["class_weights"], report=manifest["report"], folds=folds, **loaded)


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)
