"""Stage 2: the base model, its tokenizer, and the trainable part (full weights or an adapter).

Order of work:
1. :func:`resolve_model_dir` turns ``spec.model.uri`` into something ``from_pretrained`` can load:
   an s3:// prefix is downloaded once per node (local rank 0; the other local ranks wait for a marker
   file), an absolute path is used as is, and ``hf://org/name`` is handed to the hub client.
2. :func:`load_tokenizer` (the data stage needs it before the model: labels may come from the data).
3. :func:`load_model` builds the task head, applies dropout/precision/gradient checkpointing and wraps
   the model with a LoRA/DoRA/QLoRA adapter when the method asks for one.
"""

from __future__ import annotations

import hashlib
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from finetune_api import env as pod_env
from finetune_api.spec import FineTuneJobSpec

from .distributed import DistInfo, launch_key, local_main_works
from .errors import CheckpointError, InvalidConfig, ModelNotFound, UnsupportedHardware

if TYPE_CHECKING:
    from transformers import PretrainedConfig, PreTrainedModel, PreTrainedTokenizerBase

    from .storage import Storage

log = logging.getLogger(__name__)

DEFAULT_CACHE_DIR = "/tmp/finetune-cache"
_DOWNLOAD_WAIT_S = 6 * 3600

# Attention and MLP projections per architecture (HF ``config.model_type``). Anything not listed gets
# peft's "all-linear", which adapts every linear layer except the output head.
DEFAULT_TARGET_MODULES: dict[str, list[str]] = {
    **{
        t: ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
        for t in ("llama", "mistral", "mixtral", "qwen2", "qwen2_moe", "qwen3", "qwen3_moe", "gemma", "gemma2", "gemma3_text", "olmo", "olmo2", "granite")
    },
    "phi": ["q_proj", "k_proj", "v_proj", "dense", "fc1", "fc2"],
    "phi3": ["qkv_proj", "o_proj", "gate_up_proj", "down_proj"],
    "gpt2": ["c_attn", "c_proj", "c_fc"],
    "gpt_neox": ["query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h"],
    "falcon": ["query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h"],
    "bert": ["query", "key", "value", "dense"],
    "roberta": ["query", "key", "value"],
    "xlm-roberta": ["query", "key", "value"],
    "distilbert": ["q_lin", "k_lin", "v_lin", "out_lin", "lin1", "lin2"],
    # Encoder-decoders (model.task seq2seq-lm): self- and cross-attention of encoder and decoder, and the MLPs.
    **{t: ["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"] for t in ("bart", "mbart", "marian", "pegasus")},
    **{t: ["q", "k", "v", "o", "wi", "wi_0", "wi_1", "wo"] for t in ("t5", "mt5", "umt5")},  # wi_0/wi_1: gated T5 v1.1/flan-t5
}


def auto_model_class(spec: FineTuneJobSpec) -> Any:
    """The transformers Auto class of the task's head."""
    from transformers import AutoModelForCausalLM, AutoModelForSeq2SeqLM, AutoModelForSequenceClassification

    if spec.is_classification:
        return AutoModelForSequenceClassification
    return AutoModelForSeq2SeqLM if spec.is_seq2seq else AutoModelForCausalLM


# ------------------------------------------------------------------------------------ 1. where it is


def _cache_root() -> Path:
    return Path(os.environ.get(pod_env.CACHE_DIR, DEFAULT_CACHE_DIR))


def resolve_model_dir(uri: str, storage: Storage, dist: DistInfo, *, cache_dir: str | Path | None = None) -> str:
    """A local folder (or, for hf://, a hub id) that ``from_pretrained`` can load."""
    if uri.startswith("hf://"):
        return uri.removeprefix("hf://")
    if not uri.startswith("s3://"):
        if not Path(uri).is_dir() or not (Path(uri) / "config.json").exists():
            raise ModelNotFound(f"{uri} is not a model folder (no config.json there)")
        return uri
    root = Path(cache_dir) if cache_dir else _cache_root()
    local = root / "models" / hashlib.sha256(uri.encode()).hexdigest()[:16]
    marker = local / ".complete"
    if marker.exists():
        return str(local)

    def download() -> str:
        prefix = uri.rstrip("/") + "/"
        try:
            files = storage.list(prefix)
        except FileNotFoundError:
            files = []
        if prefix + "config.json" not in files:
            raise ModelNotFound(f"{uri} holds no config.json; point model.uri at the S3 prefix of a Hugging Face model folder")
        log.info("downloading %s (%d files) to %s", uri, len(files), local)
        local.mkdir(parents=True, exist_ok=True)
        storage.download_prefix(prefix, str(local), workers=8)
        return str(local)

    failed = local.with_name(f"{local.name}.failed-{launch_key()}")
    return local_main_works(dist, download, lambda: str(local), done=marker, failed=failed, what=f"download {uri}",
                            timeout_s=_DOWNLOAD_WAIT_S, timeout_error=ModelNotFound, poll_s=1.0)


# --------------------------------------------------------------------------------------- 2. tokenizer


def load_tokenizer(model_dir: str, spec: FineTuneJobSpec) -> PreTrainedTokenizerBase:
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(model_dir, trust_remote_code=spec.model.trust_remote_code)
    except Exception as e:  # noqa: BLE001 - any failure here means the URI holds no usable tokenizer
        raise ModelNotFound(_load_failure(spec.model.uri, "tokenizer", e)) from None
    if tok.pad_token is None:
        # Decoder-only models often ship without a pad token; EOS is the usual stand-in (labels mask it).
        tok.pad_token = tok.eos_token if tok.eos_token is not None else tok.unk_token
    return tok


def _load_failure(uri: str, what: str, e: Exception) -> str:
    first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    hint = " (hf:// ids are fetched from the Hugging Face hub and need network from the pods; copy the model to S3 and use s3://)" if uri.startswith("hf://") else ""
    if "trust_remote_code" in str(e):  # the folder's own Python code is needed: say which switch, and what it costs
        hint += " (it ships its own Python code; set spec.model.trustRemoteCode: true only if you trust whoever can write it: that code runs in every training pod, see SECURITY.md)"
    return f"cannot load the {what} from {uri}: {first[:300]}{hint}"


# ------------------------------------------------------------------------------------- 3. the model


def resolve_precision(requested: str) -> str:
    """'bf16', 'fp16' or 'fp32' for this machine."""
    cuda = torch.cuda.is_available()
    if requested == "auto":
        if cuda:
            return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
        return "fp32"
    if requested == "fp16" and not cuda:
        raise UnsupportedHardware("precision fp16 needs a CUDA GPU; use precision auto, bf16 or fp32 on CPU")
    return requested


DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def attention_implementation(precision: str) -> str | None:
    """The attention kernel: flash-attention 2 where it can run, else None (transformers' default:
    PyTorch's SDPA where the architecture supports it, eager attention otherwise).

    With packing, a micro-batch is one long row whose ``position_ids`` restart at every original row.
    Flash-attention turns that into variable-length attention over each original row (no wasted
    compute), so the varlen kernel is used whenever the ``flash_attn`` package is installed, the GPU is
    CUDA and the compute precision is 16-bit (which flash-attention requires). Without it, a packed
    causal LM is switched to per-document SDPA after loading (:mod:`.attention`), whose memory is
    linear in tokens, instead of SDPA over a dense ``(tokens)^2`` block-diagonal mask.
    """
    import importlib.util

    if torch.cuda.is_available() and precision in ("bf16", "fp16") and importlib.util.find_spec("flash_attn") is not None:
        return "flash_attention_2"
    return None


@dataclass
class LoadedModel:
    model: PreTrainedModel  # the model to train (a peft wrapper around one with an adapter method)
    precision: str  # bf16 / fp16 / fp32: the compute precision for autocast
    is_adapter: bool
    target_modules: list[str] | str | None
    trainable_params: int
    total_params: int


def _override_dropout(config: PretrainedConfig, p: float) -> list[str]:
    changed = []
    for key, value in list(vars(config).items()):
        if isinstance(value, float) and ("dropout" in key or key.endswith("pdrop")) and "classifier" not in key:
            setattr(config, key, p)
            changed.append(key)
    if hasattr(config, "classifier_dropout"):
        config.classifier_dropout = p
        changed.append("classifier_dropout")
    return changed


def default_target_modules(model_type: str) -> list[str] | str:
    return DEFAULT_TARGET_MODULES.get(model_type, "all-linear")


def check_hardware(spec: FineTuneJobSpec) -> None:
    """Fail in the first second, not after data preparation, when the method cannot run here."""
    if spec.method == "qlora" and not torch.cuda.is_available():
        raise UnsupportedHardware(
            "QLoRA needs a CUDA GPU (4-bit bitsandbytes kernels); use method lora or dora on CPU, or give the job GPUs"
        )
    resolve_precision(spec.hyperparameters.precision)


def load_model(
    model_dir: str,
    spec: FineTuneJobSpec,
    *,
    labels: list[str] | None = None,
    tokenizer: PreTrainedTokenizerBase | None = None,
    dist: DistInfo | None = None,
    empty: bool = False,
) -> LoadedModel:
    """The model to train. ``empty``: the right architecture on the meta device, no weights read
    (FSDP ranks other than 0 do this; rank 0's weights reach them when the model is sharded)."""
    from transformers import AutoConfig

    method = spec.method
    precision = resolve_precision(spec.hyperparameters.precision)
    classification = spec.is_classification
    check_hardware(spec)
    if method == "qlora":
        try:
            import bitsandbytes  # noqa: F401
        except ImportError:
            raise UnsupportedHardware("QLoRA needs the bitsandbytes package, which this trainer image lacks") from None

    trust = spec.model.trust_remote_code
    try:
        config = AutoConfig.from_pretrained(model_dir, trust_remote_code=trust)
    except Exception as e:  # noqa: BLE001
        raise ModelNotFound(_load_failure(spec.model.uri, "model config", e)) from None
    if spec.is_seq2seq and not getattr(config, "is_encoder_decoder", False):
        raise InvalidConfig(
            f"model.task seq2seq-lm needs an encoder-decoder model (BART, T5, ...), but {spec.model.uri} is a "
            f"{config.model_type} decoder-only model: use model.task causal-lm for it"
        )
    if spec.hyperparameters.dropout is not None:
        _override_dropout(config, spec.hyperparameters.dropout)
    if classification:
        num_labels = len(labels) if labels else spec.model.num_labels
        if not num_labels:
            raise InvalidConfig("sequence-classification needs labels: set model.labels or model.numLabels")
        names = labels or [str(i) for i in range(num_labels)]
        config.num_labels = num_labels
        config.id2label = {i: n for i, n in enumerate(names)}
        config.label2id = {n: i for i, n in enumerate(names)}
        config.problem_type = "single_label_classification"
    if tokenizer is not None and getattr(config, "pad_token_id", None) is None:
        config.pad_token_id = tokenizer.pad_token_id

    kwargs: dict[str, Any] = {"config": config, "trust_remote_code": trust}
    if attention_implementation(precision):
        kwargs["attn_implementation"] = attention_implementation(precision)
    is_adapter = spec.is_adapter
    if method == "qlora":
        from transformers import BitsAndBytesConfig

        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=DTYPES[precision],
        )
        kwargs["device_map"] = {"": (dist.local_rank if dist else 0)}
        kwargs["dtype"] = DTYPES[precision]
    elif is_adapter:
        # The frozen base can live in the compute precision; the adapter weights stay fp32 (peft's default).
        kwargs["dtype"] = DTYPES[precision]
    else:
        # Full fine-tune: fp32 master weights, autocast does the rest.
        kwargs["dtype"] = torch.float32

    auto = auto_model_class(spec)
    try:
        if empty:
            with torch.device("meta"):
                model = auto.from_config(config, trust_remote_code=trust, **{k: v for k, v in kwargs.items() if k in ("dtype", "attn_implementation")})
            log.info("model built on the meta device: its weights come from rank 0 when it is sharded")
        else:
            model = auto.from_pretrained(model_dir, **kwargs)
    except Exception as e:  # noqa: BLE001
        raise ModelNotFound(_load_failure(spec.model.uri, "model", e)) from None

    if hasattr(model.config, "use_cache"):
        model.config.use_cache = False
    if not classification and spec.hyperparameters.packing and "attn_implementation" not in kwargs:
        from .attention import use_per_document_sdpa

        use_per_document_sdpa(model)
    if spec.hyperparameters.gradient_checkpointing:
        _enable_activation_checkpointing(model)

    target_modules = None
    if is_adapter:
        model, target_modules = _wrap_adapter(model, spec, classification)

    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    log.info("model %s: %s, %d/%d parameters trainable (%.2f%%), attention %s", spec.model.uri, method, trainable, total,
             100 * trainable / max(total, 1), getattr(model.config, "_attn_implementation", None) or "default")
    return LoadedModel(model, precision, is_adapter, target_modules, trainable, total)


def count_parameters(model_dir: str, spec: FineTuneJobSpec) -> int:
    """Parameters of the base model, from its config alone (instantiated on the meta device: no memory)."""
    from transformers import AutoConfig

    trust = spec.model.trust_remote_code
    try:
        config = AutoConfig.from_pretrained(model_dir, trust_remote_code=trust)
        auto = auto_model_class(spec)
        with torch.device("meta"):
            model = auto.from_config(config, trust_remote_code=trust)
    except Exception as e:  # noqa: BLE001
        raise ModelNotFound(_load_failure(spec.model.uri, "model config", e)) from None
    return sum(p.numel() for p in model.parameters())


def _enable_activation_checkpointing(model: Any) -> None:
    """Non-reentrant checkpointing (works with frozen inputs under LoRA); transformers 5 renamed the method."""
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


def _wrap_adapter(model: Any, spec: FineTuneJobSpec, classification: bool) -> tuple[Any, Any]:
    from peft import LoraConfig, TaskType, get_peft_model, prepare_model_for_kbit_training

    lora = spec.lora_or_default
    targets: list[str] | str = lora.target_modules or default_target_modules(model.config.model_type)
    if isinstance(targets, list) and targets == ["all-linear"]:
        targets = "all-linear"
    if spec.method == "qlora":
        model = prepare_model_for_kbit_training(
            model, use_gradient_checkpointing=spec.hyperparameters.gradient_checkpointing,
            gradient_checkpointing_kwargs={"use_reentrant": False},
        )
    # TaskType.SEQ_CLS makes the new classification head ("classifier"/"score") fully trainable
    # (modules_to_save): it starts random, so a low-rank update of it would be useless.
    config = LoraConfig(
        r=lora.r,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        target_modules=targets,
        use_dora=spec.method == "dora",
        task_type=TaskType.SEQ_CLS if classification else TaskType.SEQ_2_SEQ_LM if spec.is_seq2seq else TaskType.CAUSAL_LM,
        bias="none",
    )
    try:
        model = get_peft_model(model, config)
    except ValueError as e:
        raise InvalidConfig(f"lora.targetModules {targets!r} do not fit model type {model.config.model_type}: {str(e).splitlines()[0][:200]}") from None
    return model, targets


def trainable_state_dict(model: Any) -> dict[str, torch.Tensor]:
    """The parameters training changes (all weights for full, adapter + head for LoRA), by name."""
    return {n: p.detach().to("cpu").contiguous().clone() for n, p in model.named_parameters() if p.requires_grad}


def load_trainable_state_dict(model: Any, state: dict[str, torch.Tensor]) -> None:
    params = dict(model.named_parameters())
    expected = {n for n, p in params.items() if p.requires_grad}
    missing, unexpected = expected - set(state), set(state) - expected
    if missing or unexpected:
        raise CheckpointError(
            f"checkpoint weights do not match the model: {len(missing)} missing (e.g. {sorted(missing)[:2]}), "
            f"{len(unexpected)} unexpected (e.g. {sorted(unexpected)[:2]})"
        )
    with torch.no_grad():
        for n, t in state.items():
            params[n].copy_(t.to(params[n].device, params[n].dtype))
