"""Attention over packed rows with memory linear in tokens, and the start-up check that packing is sound.

With ``hyperparameters.packing`` a micro-batch is one long row whose ``position_ids`` restart at 0 at
every original row (see :mod:`.collate`). Attention must stay inside each original row ("document"):

* With the ``flash_attn`` package on a CUDA GPU in 16-bit, transformers' ``flash_attention_2`` turns
  the position ids into a variable-length (varlen) kernel call (:func:`.model.attention_implementation`).
* Otherwise transformers' own ``sdpa`` path builds a dense block-diagonal mask of ``(batch x seq)^2``
  entries for the whole packed row (67M at 8x1024 tokens, 4.3G at 32x2048) and attends over the full
  square. Instead, :data:`PER_DOCUMENT_SDPA` cuts the packed row at every position-id restart and runs
  PyTorch's SDPA once per document, causal and unmasked: no mask is built (the mask function returns
  None) and the largest attention tensor is one document's, so memory grows linearly with the tokens of
  a micro-batch (times at most the longest row). Padded batches (evaluation, generation with a KV
  cache) still get transformers' sdpa mask and kernel unchanged.

  PyTorch's flex_attention with document masking was measured here first and rejected for CPU: torch
  2.15 raises "FlexAttention does not support backward on CPU", and its first forward compiles for
  about 47 s on this machine.

:func:`check_packing` runs once at start-up on the loaded model: two short rows packed must give the
same logits as each row alone. A model whose attention ignores the document boundaries (custom code
that drops ``position_ids``, an attention kernel without document masking) fails the job at once with
:class:`~.errors.InvalidConfig` that names ``hyperparameters.packing``, instead of training on rows
that see each other. Failing (rather than silently falling back to padded batches) keeps the spec the
single statement of what ran; the message says to set ``packing: false``.
"""

from __future__ import annotations

import logging
from typing import Any

import torch

from .errors import InvalidConfig

log = logging.getLogger(__name__)

PER_DOCUMENT_SDPA = "sdpa_per_document"
"""The attention implementation name registered with transformers for packed rows without flash-attn."""

CHECK_TOKENS = 12  # tokens per row in the start-up check


def document_lengths(position_ids: torch.Tensor) -> list[int]:
    """Lengths of the documents of one packed row: a new one starts wherever the position id does not go up by 1."""
    pos = position_ids.reshape(-1)
    if pos.numel() == 0:
        return []
    starts = torch.nonzero(torch.diff(pos, prepend=pos[:1] - 1) != 1).reshape(-1).tolist()
    bounds = [*starts, int(pos.numel())]
    if bounds[0] != 0:
        bounds.insert(0, 0)
    return [b - a for a, b in zip(bounds, bounds[1:]) if b > a]


def _sliding_mask(length: int, window: int, device: torch.device) -> torch.Tensor:
    """Causal attention limited to the last ``window`` keys, for one document (bool, True = attend)."""
    i = torch.arange(length, device=device)
    return ((i[:, None] >= i[None, :]) & (i[:, None] - i[None, :] < window))[None, None]


def per_document_sdpa(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                      attention_mask: torch.Tensor | None, dropout: float = 0.0, scaling: float | None = None,
                      sliding_window: int | None = None, **kwargs: Any) -> tuple[torch.Tensor, None]:
    """transformers' attention-function signature; query/key/value are (batch, heads, seq, head_dim)."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    q_len, kv_len = query.shape[2], key.shape[2]
    causal = kwargs.pop("is_causal", None)
    causal = getattr(module, "is_causal", True) if causal is None else causal
    if attention_mask is not None or q_len != kv_len or not causal:
        # A padded batch, a KV-cache step or an encoder: the stock path with the mask transformers built.
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      is_causal=causal, **kwargs)
    position_ids = kwargs.pop("position_ids", None)
    rows = []
    for b in range(query.shape[0]):
        lengths = document_lengths(position_ids[b if position_ids.shape[0] > 1 else 0]) if position_ids is not None else [q_len]
        parts, start = [], 0
        for n in lengths:
            sl = slice(start, start + n)
            mask = _sliding_mask(n, sliding_window, query.device) if sliding_window and n > sliding_window else None
            out, _ = sdpa_attention_forward(module, query[b : b + 1, :, sl], key[b : b + 1, :, sl], value[b : b + 1, :, sl], mask,
                                            dropout=dropout, scaling=scaling, is_causal=mask is None, **kwargs)
            parts.append(out)  # (1, n, heads, head_dim)
            start += n
        rows.append(torch.cat(parts, dim=1))
    return torch.cat(rows, dim=0), None


def _no_mask_when_unpadded(batch_size: int, q_length: int, kv_length: int, q_offset: int = 0, kv_offset: int = 0,
                           mask_function: Any = None, attention_mask: torch.Tensor | None = None, **kwargs: Any) -> Any:
    """The mask builder for :data:`PER_DOCUMENT_SDPA`: nothing for an unpadded row (the documents are cut
    from its position ids instead), transformers' sdpa mask for anything else."""
    from transformers.masking_utils import sdpa_mask

    if attention_mask is None and q_length == kv_length and not q_offset and not kv_offset and not kwargs.get("use_vmap"):
        return None
    return sdpa_mask(batch_size=batch_size, q_length=q_length, kv_length=kv_length, q_offset=q_offset, kv_offset=kv_offset,
                     mask_function=mask_function, attention_mask=attention_mask, **kwargs)


def register() -> str:
    """Make :data:`PER_DOCUMENT_SDPA` a valid ``attn_implementation`` in this process; returns the name."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register(PER_DOCUMENT_SDPA, per_document_sdpa)
    AttentionMaskInterface.register(PER_DOCUMENT_SDPA, _no_mask_when_unpadded)
    return PER_DOCUMENT_SDPA


def use_per_document_sdpa(model: Any) -> bool:
    """Switch a loaded causal LM to :data:`PER_DOCUMENT_SDPA`; False (and a warning) when it cannot be."""
    before = getattr(model.config, "_attn_implementation", None)
    try:
        model.set_attn_implementation(register())
    except (ValueError, ImportError, AttributeError) as e:
        log.warning("packing: %s cannot use per-document attention (%s); keeping %s, whose packed-row mask is "
                    "(tokens per micro-batch)^2", type(model).__name__, str(e).splitlines()[0][:200], before)
        return False
    return getattr(model.config, "_attn_implementation", None) == PER_DOCUMENT_SDPA


# ------------------------------------------------------------------------------- start-up check


def check_packing(model: Any, rows: list[list[int]], *, tolerance: float | None = None) -> float:
    """Two rows packed into one must give each row's logits alone; returns the largest log-prob difference.

    ``rows``: token ids, of which the first two with 2 tokens or more are used (cut to :data:`CHECK_TOKENS`).

    Raises :class:`~.errors.InvalidConfig` when they differ by more than ``tolerance`` (default: 1e-3 in
    fp32, 5e-2 in 16-bit), or when the model cannot run a packed row at all.
    """
    from .collate import PackedLMCollator

    rows = [list(r[:CHECK_TOKENS]) for r in rows if len(r) >= 2][:2]
    vocab = int(getattr(getattr(model, "config", None), "vocab_size", 0) or 2)
    while len(rows) < 2:  # too little training data to take two rows from: any tokens do
        rows.append([(7 * i + len(rows)) % vocab for i in range(1, CHECK_TOKENS + 1)])
    param = next(model.parameters())
    if tolerance is None:
        tolerance = 1e-3 if param.dtype == torch.float32 else 5e-2
    device = param.device if param.device.type != "meta" else torch.device("cpu")
    packed = PackedLMCollator()([{"input_ids": r} for r in rows])
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            together = model(input_ids=packed["input_ids"].to(device), position_ids=packed["position_ids"].to(device),
                             use_cache=False).logits.float().log_softmax(-1)[0]
            alone = torch.cat([model(input_ids=torch.tensor([r], device=device), use_cache=False).logits.float().log_softmax(-1)[0]
                               for r in rows])
    except Exception as e:  # noqa: BLE001 - any failure here means packing cannot run on this model
        raise InvalidConfig(f"hyperparameters.packing: {type(model).__name__} cannot run a packed row "
                            f"({type(e).__name__}: {str(e).strip()[:200]}); set packing: false") from None
    finally:
        model.train(was_training)
    diff = float((together - alone).abs().max())
    attn = getattr(getattr(model, "config", None), "_attn_implementation", None)
    if not diff <= tolerance:
        raise InvalidConfig(
            f"hyperparameters.packing: {type(model).__name__} (attention {attn}) attends across packed rows: two rows packed "
            f"into one give logits up to {diff:.3g} (log-prob) away from each row alone (tolerance {tolerance:g}); training "
            "on them would let every row see the rows packed before it. Set packing: false")
    log.info("packing check: packed and unpacked logits agree to %.2g (attention %s)", diff, attn)
    return diff


def verify_packing(model: Any, rows: list[list[int]], *, is_main: bool) -> None:
    """:func:`check_packing` on rank 0 (the one rank that holds real weights under FSDP), its verdict on every rank."""
    from . import distributed

    error = None
    if is_main:
        try:
            check_packing(model, rows)
        except InvalidConfig as e:
            error = e.message
    error = distributed.broadcast_object(error)
    if error:
        raise InvalidConfig(error)
