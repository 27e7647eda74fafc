"""Stage 5: checkpoints that are either complete or ignored.

Layout: ``<output>/checkpoints/step-NNNNNNNN/`` holding

* ``model.safetensors`` (full fine-tune) or ``adapter_model.safetensors`` (adapter methods): the
  trainable parameters by name;
* ``optimizer.pt``, ``scheduler.pt`` (and ``scaler.pt`` under fp16);
* ``rng_state_rank<R>.pt`` for every rank: python, numpy, torch and cuda generator states, as plain
  numbers and tensors;
* ``trainer_state.json``: step, data position (epoch + micro-batch index within the epoch), early
  stopping state, best metric, loss/eval history;
* ``manifest.json``, written LAST, with every other file's size and sha256.

A checkpoint is written to a local folder first and uploaded by a background thread while training
goes on (``wait()`` joins it before the next save and at exit). Only global rank 0 writes: the other
ranks send it their RNG states in one collective at save time (and, under FSDP, their shards of the
weights and optimizer state: see :class:`.parallel.ModelState`). A folder without a valid manifest is an
interrupted upload: it is never resumed from, and is deleted when the next run starts.

Nothing read back is unpickled: a checkpoint prefix is writable by whoever can write the bucket, and
the manifest beside the files proves only that they were not cut short, not who wrote them. Every
``.pt`` is read with ``torch.load(weights_only=True)`` (tensors, numbers, strings, containers) and
every state is saved in that form; a file that needs anything else is refused as a CheckpointError
(:func:`safe_load`), so resuming skips it like a corrupt one.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import pickle
import random
import re
import shutil
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from . import distributed
from .distributed import DistInfo
from .errors import CheckpointError, InvalidConfig

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
TRAINER_STATE = "trainer_state.json"
_STEP_DIR = re.compile(r"/checkpoints/step-(\d{8,})/")


def step_dir_name(step: int) -> str:
    return f"step-{step:08d}"


def weights_file(is_adapter: bool) -> str:
    return "adapter_model.safetensors" if is_adapter else "model.safetensors"


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


# ------------------------------------------------------------------------------------------- RNG


def rng_state() -> dict[str, Any]:
    """Every generator's state as tensors and plain numbers only, so :func:`safe_load` reads it back
    (numpy's own state is a tuple holding an ndarray, which only a full unpickler rebuilds)."""
    name, keys, pos, has_gauss, cached_gaussian = np.random.get_state()
    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": {"name": str(name), "keys": torch.from_numpy(np.asarray(keys, dtype=np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "cached_gaussian": float(cached_gaussian)},
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _numpy_state(saved: Any) -> tuple[Any, ...]:
    """``np.random.set_state``'s tuple from what :func:`rng_state` saved (or, from a checkpoint of an
    older trainer, numpy's own tuple)."""
    if isinstance(saved, tuple):
        return saved
    keys = np.asarray(saved["keys"].numpy(), dtype=np.uint32)
    return (saved["name"], keys, saved["pos"], saved["has_gauss"], saved["cached_gaussian"])


def _old_numpy_globals() -> list[Any]:
    """What the weights-only unpickler needs to rebuild a plain numpy array (an older trainer saved
    numpy's RNG state as one): the array type, its dtype and numpy's array constructor, which build
    data and call nothing else. Allowed only while an RNG file is read."""
    from numpy._core.multiarray import _reconstruct

    return [np.ndarray, np.dtype, type(np.dtype(np.uint32)), _reconstruct, (_reconstruct, "numpy.core.multiarray._reconstruct")]


def _rng_from_file(path: Path, uri: str) -> dict[str, Any]:
    with torch.serialization.safe_globals(_old_numpy_globals()):
        state = safe_load(path, uri)
    before = rng_state()
    try:  # a trial, so a malformed state is refused here, before anything is restored
        set_rng_state(state)
    except (TypeError, ValueError, KeyError, IndexError, AttributeError, RuntimeError):
        raise CheckpointError(f"{uri} is not an RNG state this trainer can restore: the checkpoint is corrupt") from None
    finally:
        set_rng_state(before)
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    np.random.set_state(_numpy_state(state["numpy"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _first_line(exc: BaseException) -> str:
    """The line of a weights-only refusal that names the global it would have called."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    named = [line for line in lines if "Unsupported global" in line or "GLOBAL" in line]
    return (named or lines or [type(exc).__name__])[0][:300]


def safe_load(path: Path, uri: str) -> Any:
    """``torch.load(weights_only=True)``, with any refusal turned into a CheckpointError.

    The weights-only unpickler builds tensors, numbers, strings and containers and nothing else; a
    pickle that names any other callable (``os.system``, a class whose ``__reduce__`` runs code) is
    refused before the callable is looked up, so a tampered file cannot run code in the pod."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        raise CheckpointError(
            f"{uri} holds pickled objects other than tensors and plain values ({_first_line(exc)}): refusing to "
            "unpickle it, since that can run code. The checkpoint was tampered with or written by another tool: "
            "delete that checkpoint folder, or resume from another one"
        ) from None
    except Exception as exc:  # noqa: BLE001 - a truncated or foreign file: same verdict as a bad sha256
        raise CheckpointError(f"{uri} cannot be read as a checkpoint file ({type(exc).__name__}: {_first_line(exc)}): the checkpoint is corrupt") from None


def _to_bytes(obj: Any) -> bytes:
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


# --------------------------------------------------------------------------------------- manager


@dataclass(frozen=True)
class CheckpointRef:
    step: int
    uri: str


class CheckpointManager:
    """Save, list, prune and load checkpoints under ``<output>/checkpoints``."""

    def __init__(self, storage: Any, output_uri: str, local_dir: str | Path, dist: DistInfo, *, keep_last: int, is_adapter: bool, join: Any):
        self.storage = storage
        self.join = join
        self.root = join(output_uri, "checkpoints")
        self.local_dir = Path(local_dir)
        self.dist = dist
        self.keep_last = keep_last
        self.is_adapter = is_adapter
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None
        self.last_save_seconds: float | None = None
        self.last_save_bytes: int | None = None
        self.on_complete: Any = None  # callback(step, uri, seconds, bytes) run in the upload thread

    def uri_for(self, step: int) -> str:
        return self.join(self.root, step_dir_name(step))

    # ---------------------------------------------------------------------------------- listing

    def _listing(self) -> dict[int, set[str]]:
        """step -> file names present, for every step folder under checkpoints/."""
        try:
            uris = self.storage.list(self.root.rstrip("/") + "/")
        except FileNotFoundError:
            return {}
        out: dict[int, set[str]] = {}
        for uri in uris:
            m = _STEP_DIR.search(uri)
            if m:
                out.setdefault(int(m.group(1)), set()).add(uri[m.end():])
        return out

    def complete(self) -> list[CheckpointRef]:
        """Checkpoints with a manifest, oldest first (content is verified on load)."""
        return [CheckpointRef(s, self.uri_for(s)) for s, files in sorted(self._listing().items()) if MANIFEST in files]

    def incomplete(self) -> list[CheckpointRef]:
        return [CheckpointRef(s, self.uri_for(s)) for s, files in sorted(self._listing().items()) if MANIFEST not in files]

    def cleanup_incomplete(self) -> list[int]:
        """Delete step folders that have no manifest (rank 0, at start, before anything is saved)."""
        removed = []
        for ref in self.incomplete():
            log.warning("removing incomplete checkpoint %s (no manifest: its upload was interrupted)", ref.uri)
            self.storage.delete_prefix(ref.uri.rstrip("/") + "/")
            removed.append(ref.step)
        return removed

    # ----------------------------------------------------------------------------------- saving

    def save(self, step: int, *, model_state: Any, scheduler: Any, scaler: Any, state: dict[str, Any], best_step: int | None) -> str:
        """Collective: every rank calls it at the same step. Returns the checkpoint URI."""
        self.wait()
        started = time.monotonic()
        # Under FSDP gathering the full weights and optimizer state is itself a collective.
        weights = model_state.gather_weights()
        optimizer_state = model_state.gather_optimizer()
        rng_blobs = distributed.gather_objects(_to_bytes(rng_state()))
        uri = self.uri_for(step)
        if not self.dist.is_main:
            return uri
        local = self.local_dir / step_dir_name(step)
        shutil.rmtree(local, ignore_errors=True)
        local.mkdir(parents=True)
        from safetensors.torch import save_file

        save_file(weights, str(local / weights_file(self.is_adapter)))
        torch.save(optimizer_state, local / "optimizer.pt")
        del weights, optimizer_state
        torch.save(scheduler.state_dict(), local / "scheduler.pt")
        if scaler is not None:
            torch.save(scaler.state_dict(), local / "scaler.pt")
        for rank, blob in enumerate(rng_blobs):
            (local / f"rng_state_rank{rank}.pt").write_bytes(blob)
        (local / TRAINER_STATE).write_text(json.dumps(state, indent=1, default=float))
        self._thread = threading.Thread(target=self._upload, args=(step, local, uri, best_step, started), name=f"ckpt-upload-{step}", daemon=True)
        self._thread.start()
        return uri

    def _upload(self, step: int, local: Path, uri: str, best_step: int | None, started: float) -> None:
        try:
            files = sorted(p for p in local.iterdir() if p.is_file())
            manifest = {"step": step, "files": {}, "world_size": self.dist.world_size}
            total = 0
            for p in files:
                manifest["files"][p.name] = {"size": p.stat().st_size, "sha256": sha256_file(p)}
                total += p.stat().st_size
            if self.storage.exists(uri):
                # Re-saving a step (a resumed run reaching it again): drop the old manifest with the old
                # files so the folder is never "complete" with mismatched contents.
                self.storage.delete_prefix(uri.rstrip("/") + "/")
            for p in files:
                self.storage.upload_file(str(p), self.join(uri, p.name))
            manifest["created_at"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
            self.storage.write_json(self.join(uri, MANIFEST), manifest)  # last: marks the checkpoint complete
            shutil.rmtree(local, ignore_errors=True)
            self.last_save_seconds = time.monotonic() - started
            self.last_save_bytes = total
            log.info("checkpoint %s complete (%d files, %.1f MB, %.1fs)", uri, len(files), total / 1e6, self.last_save_seconds)
            self.prune(best_step)
            if self.on_complete is not None:
                self.on_complete(step, uri, self.last_save_seconds, total)
        except BaseException as e:  # noqa: BLE001 - re-raised in the training thread by wait()
            self._error = e

    def wait(self) -> None:
        """Join the upload in flight; raise CheckpointError if it failed."""
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        if self._error is not None:
            e, self._error = self._error, None
            if isinstance(e, CheckpointError):
                raise e
            raise CheckpointError(f"checkpoint upload failed: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}") from e

    def prune(self, best_step: int | None) -> list[int]:
        """Keep the newest ``keep_last`` complete checkpoints plus the best one; delete the rest."""
        complete = [c.step for c in self.complete()]
        keep = set(complete[-self.keep_last:])
        if best_step is not None:
            keep.add(best_step)
        removed = []
        for s in complete:
            if s not in keep:
                self.storage.delete_prefix(self.uri_for(s).rstrip("/") + "/")
                removed.append(s)
        return removed

    # ---------------------------------------------------------------------------------- loading

    def find_resume(self, resume: str) -> str | None:
        """URI of the checkpoint to resume from, or None to start fresh."""
        if resume == "none":
            return None
        if resume != "latest":
            if not self.storage.exists(self.join(resume, MANIFEST)):
                raise InvalidConfig(f"checkpoint.resume {resume} has no {MANIFEST}: it is incomplete or not a checkpoint; use latest, none or a complete checkpoint")
            return resume
        complete = self.complete()
        return complete[-1].uri if complete else None

    def download_verified(self, uri: str, dest: Path, names: list[str] | None = None) -> dict[str, Any]:
        """Fetch the manifest and the listed files (all by default); check sizes and sha256."""
        try:
            manifest = self.storage.read_json(self.join(uri, MANIFEST))
        except Exception as e:  # noqa: BLE001
            raise CheckpointError(f"cannot read {self.join(uri, MANIFEST)}: {e}") from None
        files = manifest.get("files", {})
        wanted = names if names is not None else list(files)
        shutil.rmtree(dest, ignore_errors=True)
        dest.mkdir(parents=True)
        for name in wanted:
            if name not in files:
                raise CheckpointError(f"{uri}: {name} is not in the manifest")
            path = dest / name
            self.storage.download(self.join(uri, name), str(path))
            meta = files[name]
            if path.stat().st_size != meta["size"] or sha256_file(path) != meta["sha256"]:
                raise CheckpointError(f"{uri}/{name} does not match its manifest (size or sha256): the checkpoint is corrupt")
        return manifest

    def load(self, uri: str, *, model_state: Any, scheduler: Any, scaler: Any) -> dict[str, Any]:
        """Restore weights, optimizer, scheduler, this rank's RNG; return the trainer state.

        Collective under FSDP: rank 0 alone downloads weights and optimizer state and broadcasts them.
        Every file is read (safely) before anything is restored, so a refused file leaves the model
        as it was and the caller can fall back to an older checkpoint.
        """
        dest = self.local_dir / f"resume-rank{self.dist.rank}"
        try:
            manifest = self.storage.read_json(self.join(uri, MANIFEST))
        except Exception as e:  # noqa: BLE001
            raise CheckpointError(f"cannot read {self.join(uri, MANIFEST)}: {e}") from None
        files = manifest.get("files", {})
        rng_name = f"rng_state_rank{self.dist.rank}.pt"
        heavy = [weights_file(self.is_adapter), "optimizer.pt"]
        names = ["scheduler.pt", TRAINER_STATE]
        names += heavy if (self.dist.is_main or not model_state.sharded) else []
        names += [n for n in ("scaler.pt",) if n in files]
        names += [rng_name] if rng_name in files else []
        self.download_verified(uri, dest, names)
        loaded = self._read_files(uri, dest, heavy, rng_name)
        model_state.restore_weights(loaded.get("weights"))
        model_state.restore_optimizer(loaded.get("optimizer"))
        try:
            scheduler.load_state_dict(loaded["scheduler"])
            if scaler is not None and "scaler" in loaded:
                scaler.load_state_dict(loaded["scaler"])
        except (TypeError, ValueError, KeyError, AttributeError) as e:
            raise CheckpointError(f"{uri}: the scheduler or scaler state does not fit this run ({type(e).__name__}): the checkpoint is corrupt") from None
        if "rng" in loaded:
            set_rng_state(loaded["rng"])
        else:
            log.warning("%s has no RNG state for rank %d (it was written by fewer ranks): this rank's dropout stream starts fresh", uri, self.dist.rank)
        state = json.loads((dest / TRAINER_STATE).read_text())
        state.setdefault("world_size", manifest.get("world_size"))
        shutil.rmtree(dest, ignore_errors=True)
        return state

    def _read_files(self, uri: str, dest: Path, heavy: list[str], rng_name: str) -> dict[str, Any]:
        """Every downloaded file of a checkpoint, deserialised without unpickling anything (safetensors
        for weights, :func:`safe_load` for the rest); raises CheckpointError naming the file refused."""
        from safetensors.torch import load_file

        where = lambda name: self.join(uri, name)  # noqa: E731
        loaded: dict[str, Any] = {}
        if (dest / heavy[0]).exists():
            try:
                loaded["weights"] = load_file(str(dest / heavy[0]))
            except Exception as e:  # noqa: BLE001
                raise CheckpointError(f"{where(heavy[0])} is not a readable safetensors file ({type(e).__name__}): the checkpoint is corrupt") from None
            loaded["optimizer"] = safe_load(dest / heavy[1], where(heavy[1]))
        loaded["scheduler"] = safe_load(dest / "scheduler.pt", where("scheduler.pt"))
        if (dest / "scaler.pt").exists():
            loaded["scaler"] = safe_load(dest / "scaler.pt", where("scaler.pt"))
        if (dest / rng_name).exists():
            loaded["rng"] = _rng_from_file(dest / rng_name, where(rng_name))
        return loaded

    def load_weights(self, uri: str, model_state: Any) -> None:
        """Only the weights (used to put the best checkpoint back before the final test/export); collective under FSDP."""
        dest = self.local_dir / f"best-rank{self.dist.rank}"
        weights = None
        if self.dist.is_main or not model_state.sharded:
            self.download_verified(uri, dest, [weights_file(self.is_adapter)])
            from safetensors.torch import load_file

            weights = load_file(str(dest / weights_file(self.is_adapter)))
        model_state.restore_weights(weights)
        shutil.rmtree(dest, ignore_errors=True)
