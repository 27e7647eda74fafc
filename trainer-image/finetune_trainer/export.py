"""Stage 6: publish the model under ``<output>/model`` (rank 0 only).

The folder holds what ``from_pretrained`` loads (full weights, or the adapter), the tokenizer, the
merged copy when ``output.mergeAdapter`` asks for it, and the model card (``model_card.json`` and
``README.md``, built from the :class:`~.report.RunSummary`). It is written locally first and uploaded
over whatever an earlier attempt left there, so the published folder never mixes two runs.
"""

from __future__ import annotations

import copy
import json
import logging
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any

from finetune_api.spec import FineTuneJobSpec

from .model import LoadedModel
from .report import RunSummary, public
from .storage import Storage

if TYPE_CHECKING:
    from peft import PeftModel
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

log = logging.getLogger(__name__)


def export_model(summary: RunSummary, model_uri: str, *, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, loaded: LoadedModel, model_dir: str,
                 work_dir: Path, storage: Storage, full_weights: dict[str, Any] | None = None) -> None:
    """Write the model, its tokenizer and card to ``work_dir/model`` and upload that folder to ``model_uri``.

    ``model`` is the unwrapped model; ``full_weights`` its gathered state dict under FSDP (None otherwise).
    """
    local = work_dir / "model"
    shutil.rmtree(local, ignore_errors=True)
    local.mkdir(parents=True)
    if full_weights is not None:  # FSDP: the shards were gathered to this rank
        model.save_pretrained(str(local), state_dict=full_weights, safe_serialization=True)
    else:
        model.save_pretrained(str(local), safe_serialization=True)
    tokenizer.save_pretrained(str(local))
    if loaded.is_adapter and summary.spec.output.merge_adapter:
        export_merged(model, tokenizer, summary.spec, precision=loaded.precision, model_dir=model_dir,
                      dest=local / "merged", adapter_dir=local)
    card, markdown = _card(summary)
    (local / "model_card.json").write_text(json.dumps(card, indent=1, default=str))
    (local / "README.md").write_text(markdown)
    storage.delete_prefix(model_uri.rstrip("/") + "/")
    storage.upload_dir(local, model_uri)
    shutil.rmtree(local, ignore_errors=True)


def _card(summary: RunSummary) -> tuple[dict[str, Any], str]:
    """The model card, or a minimal one: a broken card must not throw away a finished training run."""
    try:
        from .model_card import build_model_card

        return build_model_card(summary)
    except Exception:  # noqa: BLE001
        log.exception("could not build the model card; writing a minimal one")
        spec = summary.spec
        card = {"jobName": summary.job, "baseModel": spec.model.uri, "method": spec.method,
                **{k: public(v) if isinstance(v, dict) else v for k, v in summary.to_dict().items() if k != "history"}}
        return card, f"# {summary.job}\n\nFine-tuned from {spec.model.uri} with {spec.method}.\n"


def export_merged(model: PeftModel, tokenizer: PreTrainedTokenizerBase, spec: FineTuneJobSpec, *, precision: str, model_dir: str, dest: Path,
                  adapter_dir: Path) -> None:
    """Base weights + adapter folded in, as a plain transformers model.

    The base is loaded afresh from the model folder in the compute precision (bf16 on GPU, fp32 on CPU)
    and the saved adapter applied to it, so QLoRA merges into full-precision weights, not the 4-bit
    ones it trained against (merging into a quantised base would be lossy).
    """
    from peft import PeftModel
    from .model import DTYPES, auto_model_class

    config = copy.deepcopy(model.get_base_model().config)  # with the task head's labels
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    auto = auto_model_class(spec)
    dtype = DTYPES["fp32" if precision == "fp32" else precision]
    base = auto.from_pretrained(model_dir, config=config, dtype=dtype, trust_remote_code=spec.model.trust_remote_code)
    merged = PeftModel.from_pretrained(base, str(adapter_dir)).merge_and_unload()
    merged.save_pretrained(str(dest), safe_serialization=True)
    tokenizer.save_pretrained(str(dest))
