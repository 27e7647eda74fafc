"""How the processes of a training group hold the model: one process, DDP, or FSDP2.

``hyperparameters.distributedStrategy`` picks it (:func:`choose_strategy`):

* **ddp** — every process holds the whole model and optimizer; gradients are all-reduced. Right for
  adapters (few trainable parameters) and small full fine-tunes.
* **fsdp** — FSDP2 (``torch.distributed.fsdp.fully_shard``, applied by :func:`shard`): parameters, gradients
  and optimizer state are sharded over the processes, one unit per transformer block
  (``model._no_split_modules``), so a full fine-tune needs about ``16 bytes x params / world size`` of
  optimizer memory per GPU instead of ``16 bytes x params``.
* **auto** — fsdp for a full fine-tune of a model with at least
  :data:`~finetune_api.spec.FSDP_AUTO_MIN_PARAMS` parameters on more than one process, ddp otherwise.

:class:`ModelState` is the one place that knows the difference when state leaves or enters the model:
checkpoint save/resume, putting the best checkpoint back, export, and the final checksum. Under FSDP
each of those is a collective (every rank calls it) built on ``torch.distributed.checkpoint.state_dict``:
full, CPU-offloaded state dicts gathered to rank 0, which alone writes them. Every strategy writes
the same files (full weights by name; optimizer state keyed by parameter name, the layout of
``torch.distributed.checkpoint``), so a checkpoint does not depend on the strategy or the number of
processes that wrote it. On load rank 0 reads them and broadcasts (``broadcast_from_rank0``), so no
other rank downloads or holds a full copy; the base weights likewise are read by rank 0 only (see
:func:`shard`).

Known limit: rank 0 holds the whole model in CPU memory while it loads, shards and broadcasts it, and
while it gathers a checkpoint; a model whose fp32 weights and optimizer state do not fit in one node's
RAM needs sharded (per-rank) checkpoint files, which this trainer does not write yet.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from finetune_api.spec import FSDP_AUTO_MIN_PARAMS

from . import distributed
from .model import load_trainable_state_dict, trainable_state_dict

log = logging.getLogger(__name__)

SINGLE, DDP, FSDP = "single", "ddp", "fsdp"


def choose_strategy(requested: str, *, method: str, world_size: int, total_params: int) -> str:
    """'single' (one process), 'ddp' or 'fsdp' for this run."""
    if world_size <= 1:
        return SINGLE
    if requested == FSDP:
        return FSDP
    if requested == "auto" and method == "full" and total_params >= FSDP_AUTO_MIN_PARAMS:
        return FSDP
    return DDP


def make_accelerator(precision: str) -> Any:
    """The Accelerator (creating it joins the process group under torchrun: NCCL on GPU, gloo on CPU).

    accelerate's own FSDP integration is GPU-only, so FSDP2 is applied by :func:`shard` instead, the
    same way on CPU and GPU; accelerate then prepares only the optimizer of a sharded model.
    """
    from accelerate import Accelerator

    return Accelerator(mixed_precision={"fp32": "no"}.get(precision, precision), cpu=not torch.cuda.is_available())


def shard(model: Any, precision: str, *, is_main: bool) -> Any:
    """Apply FSDP2 in place: one unit per transformer block (``model._no_split_modules``), then the root.

    Parameters are moved to this rank's device and become DTensors sharded on dim 0; forward/backward
    all-gather a block's parameters just in time and free them after (``reshard_after_forward``).
    Under bf16 the gathered parameters are bf16 and gradients are reduced in fp32.

    Only global rank 0 reads the weights from disk; every other rank built the model on the meta
    device (``load_model(empty=True)``), so a node's CPU memory holds one copy of the model, not one per
    GPU. After sharding, rank 0's full state dict is broadcast and each rank keeps its shard; buffers
    (e.g. rotary frequencies, which no state dict holds) are broadcast as well.
    """
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    if precision == "fp16":
        from .errors import InvalidConfig

        raise InvalidConfig("distributedStrategy fsdp does not support precision fp16 (no sharded loss scaler); use bf16 or auto")
    device_type = "cuda" if torch.cuda.is_available() else "cpu"
    mesh = init_device_mesh(device_type, (dist.get_world_size(),))
    kwargs: dict[str, Any] = {"mesh": mesh, "reshard_after_forward": True}
    if precision == "bf16":
        kwargs["mp_policy"] = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    blocks = set(getattr(model, "_no_split_modules", None) or [])
    units = [m for m in model.modules() if type(m).__name__ in blocks]
    if not units:
        log.warning("fsdp: %s names no transformer blocks (_no_split_modules); sharding the model as one unit", type(model).__name__)
    full = {k: v for k, v in model.state_dict().items()} if is_main else {}  # rank 0's weights, still on CPU
    for module in units:
        fully_shard(module, **kwargs)
    fully_shard(model, **kwargs)
    device = torch.device(device_type, torch.cuda.current_device()) if device_type == "cuda" else torch.device("cpu")
    if not is_main:
        model.to_empty(device=device)  # meta -> real (uninitialised) storage, filled just below
    _dcp().set_model_state_dict(model, full, options=_dcp().StateDictOptions(full_state_dict=True, broadcast_from_rank0=True))
    del full
    with torch.no_grad():
        for buf in model.buffers():
            dist.broadcast(buf, src=0)
    return model


def _dcp() -> Any:
    import torch.distributed.checkpoint.state_dict as dcp_sd

    return dcp_sd


class ModelState:
    """Weights and optimizer state in and out of the (possibly sharded) model.

    ``gather_*`` return the state on global rank 0 and None elsewhere; ``restore*`` take it on rank 0
    (other ranks may pass None). Under FSDP every rank must call them together.
    """

    def __init__(self, strategy: str, model: Any, raw_model: Any, optimizer: Any, *, is_main: bool):
        self.strategy = strategy
        self.model = model
        self.raw_model = raw_model
        self.optimizer = getattr(optimizer, "optimizer", optimizer)  # the torch optimizer inside accelerate's wrapper
        self.is_main = is_main
        if self.sharded:
            local = sum(p.to_local().numel() for p in raw_model.parameters() if hasattr(p, "to_local"))
            full = sum(p.numel() for p in raw_model.parameters())
            log.info("fsdp: this rank holds %d of %d parameters (%.1f%%)", local, full, 100 * local / max(full, 1))

    @property
    def sharded(self) -> bool:
        return self.strategy == FSDP

    def _trainable_names(self) -> set[str]:
        # named_parameters() lists a tied weight once; the state dict lists it under every name.
        return {n for n, p in self.raw_model.named_parameters() if p.requires_grad}

    def _full_options(self, **extra: Any) -> Any:
        return _dcp().StateDictOptions(full_state_dict=True, cpu_offload=True, **extra)

    # -------------------------------------------------------------------------------------- out

    def gather_weights(self) -> dict[str, torch.Tensor] | None:
        """The trainable parameters by name (what checkpoints store)."""
        if not self.sharded:
            return trainable_state_dict(self.raw_model) if self.is_main else None
        full = _dcp().get_model_state_dict(self.model, options=self._full_options())
        if not self.is_main:
            return None
        names = self._trainable_names()
        return {n: t.contiguous() for n, t in full.items() if n in names}

    def _param_names(self) -> list[str]:
        """Parameter names in the optimizer's own order (param_groups, then params): index -> name."""
        by_id = {id(p): n for n, p in self.raw_model.named_parameters()}
        return [by_id[id(p)] for group in self.optimizer.param_groups for p in group["params"]]

    def gather_optimizer(self) -> dict[str, Any] | None:
        """Optimizer state keyed by parameter name (torch.distributed.checkpoint's layout), whatever the strategy."""
        if not self.sharded:
            return optimizer_state_by_name(self.optimizer.state_dict(), self._param_names()) if self.is_main else None
        state = _dcp().get_optimizer_state_dict(self.model, self.optimizer, options=self._full_options())
        return state if self.is_main else None

    def gather_full_model(self) -> dict[str, torch.Tensor] | None:
        """Every weight, unsharded, for ``save_pretrained(state_dict=...)`` (None: use the model as is)."""
        if not self.sharded:
            return None
        full = _dcp().get_model_state_dict(self.model, options=self._full_options())
        return full if self.is_main else None

    # --------------------------------------------------------------------------------------- in

    def restore_weights(self, weights: dict[str, torch.Tensor] | None) -> None:
        if not self.sharded:
            assert weights is not None
            load_trainable_state_dict(self.raw_model, weights)
            return
        if self.is_main:
            names = self._trainable_names()
            missing, unexpected = names - set(weights or {}), set(weights or {}) - names
            if missing or unexpected:
                from .errors import CheckpointError

                raise CheckpointError(f"checkpoint weights do not match the model: {len(missing)} missing, {len(unexpected)} unexpected")
        _dcp().set_model_state_dict(self.model, weights if self.is_main else {},
                                    options=self._full_options(broadcast_from_rank0=True, strict=False))

    def restore_optimizer(self, state: dict[str, Any] | None) -> None:
        if not self.sharded:
            assert state is not None
            self.optimizer.load_state_dict(optimizer_state_by_index(state, self._param_names()))
            return
        _dcp().set_optimizer_state_dict(self.model, self.optimizer, state if self.is_main else {},
                                        options=self._full_options(broadcast_from_rank0=True))

    # ----------------------------------------------------------------------------------- steps

    def no_sync(self, accelerator: Any) -> Any:
        """Skip the gradient all-reduce / reduce-scatter for a micro-batch that is not the window's last."""
        if not self.sharded:
            return accelerator.no_sync(self.model)
        return _fsdp_no_sync(self.model)

    def clip_grad_norm(self, accelerator: Any, max_norm: float) -> Any:
        """Clip to ``max_norm``; returns the total norm before clipping (global over shards)."""
        if not self.sharded:
            return accelerator.clip_grad_norm_(self.model.parameters(), max_norm)
        params = [p for p in self.model.parameters() if p.grad is not None]
        norm = torch.nn.utils.get_total_norm([p.grad for p in params], 2.0)
        if hasattr(norm, "full_tensor"):  # a DTensor holding this rank's partial norm
            norm = norm.full_tensor()
        torch.nn.utils.clip_grads_with_norm_(params, max_norm, norm)
        return norm

    # ----------------------------------------------------------------------------------- checks

    def checksum(self) -> float:
        """Sum of every trainable parameter: equal on every rank when the replicas agree."""
        total = 0.0
        for p in self.raw_model.parameters():
            if p.requires_grad:
                local = p.to_local() if hasattr(p, "to_local") else p
                total += float(local.detach().double().sum())
        if self.sharded:
            total = distributed.all_reduce_sum(total)
        return total


def optimizer_state_by_name(state: dict[str, Any], names: list[str]) -> dict[str, Any]:
    """``optimizer.state_dict()`` (parameters by index) -> the same keyed by parameter name."""
    return {
        "state": {names[i]: v for i, v in state["state"].items()},
        "param_groups": [{**g, "params": [names[i] for i in g["params"]]} for g in state["param_groups"]],
    }


def optimizer_state_by_index(state: dict[str, Any], names: list[str]) -> dict[str, Any]:
    """The inverse, for ``optimizer.load_state_dict``; a state already keyed by index passes through."""
    if all(isinstance(k, int) for k in state["state"]) and all(isinstance(i, int) for g in state["param_groups"] for i in g["params"]):
        return state
    index = {n: i for i, n in enumerate(names)}
    missing = [n for g in state["param_groups"] for n in g["params"] if n not in index]
    if missing or len(index) != sum(len(g["params"]) for g in state["param_groups"]):
        from .errors import CheckpointError

        raise CheckpointError(f"checkpoint optimizer state does not match the model's parameters (e.g. {missing[:2]})")
    return {
        "state": {index[n]: v for n, v in state["state"].items()},
        "param_groups": [{**g, "params": [index[n] for n in g["params"]]} for g in state["param_groups"]],
    }


class _fsdp_no_sync:
    def __init__(self, model: Any):
        self.model = model

    def __enter__(self) -> None:
        self.model.set_requires_gradient_sync(False)

    def __exit__(self, *exc: Any) -> None:
        self.model.set_requires_gradient_sync(True)
