"""Entry point for trainer subprocesses in tests (plain, kill -9, SIGTERM, torchrun).

Same as ``python -m finetune_trainer``, plus test-only knobs that slow one phase down so a test can
act (kill -9, SIGTERM, scrape metrics) while it runs:

* FT_TEST_STEP_SLEEP=<seconds>: after every optimizer step;
* FT_TEST_PREP_SLEEP=<seconds>: in data preparation, before each batch of rows is tokenised (after the
  staged Arrow file is opened), logging ``test: data preparation paused`` first;
* FT_TEST_TOKENIZER_SLEEP=<seconds>: inside ``AutoTokenizer.from_pretrained`` (stage preparing-data,
  before the data is read), logging ``test: tokenizer loading paused`` first;
* FT_TEST_UPLOAD_SLEEP=<seconds>: before every checkpoint file upload (the background upload thread);
* FT_TEST_LEAKY_ATTENTION=1: the per-document attention kernel for packed rows is replaced by one that
  attends causally over the whole packed row, across documents (what the start-up check must catch).
"""

import logging
import os
import sys
import time

_sleep = float(os.environ.get("FT_TEST_STEP_SLEEP", "0") or 0)
if _sleep > 0:
    from finetune_trainer.metrics import TrainerMetrics

    _on_step = TrainerMetrics.on_step

    def _slow_on_step(self, **kw):
        _on_step(self, **kw)
        time.sleep(_sleep)

    TrainerMetrics.on_step = _slow_on_step

_prep_sleep = float(os.environ.get("FT_TEST_PREP_SLEEP", "0") or 0)
if _prep_sleep > 0:
    from finetune_trainer.data import staging as _staging  # where the staged rows are tokenised

    _tokenize_batch = _staging.tokenize_batch

    def _slow_tokenize_batch(*args, **kw):
        if args and args[0]:  # a real batch, not the final empty flush
            logging.getLogger("finetune_trainer.test").info("test: data preparation paused for %.1fs", _prep_sleep)
            time.sleep(_prep_sleep)
        return _tokenize_batch(*args, **kw)

    _staging.tokenize_batch = _slow_tokenize_batch

_tokenizer_sleep = float(os.environ.get("FT_TEST_TOKENIZER_SLEEP", "0") or 0)
if _tokenizer_sleep > 0:
    from transformers import AutoTokenizer

    _from_pretrained = AutoTokenizer.from_pretrained.__func__

    def _slow_from_pretrained(cls, *args, **kw):
        logging.getLogger("finetune_trainer.test").info("test: tokenizer loading paused for %.1fs", _tokenizer_sleep)
        time.sleep(_tokenizer_sleep)
        return _from_pretrained(cls, *args, **kw)

    AutoTokenizer.from_pretrained = classmethod(_slow_from_pretrained)

_upload_sleep = float(os.environ.get("FT_TEST_UPLOAD_SLEEP", "0") or 0)
if _upload_sleep > 0:
    from finetune_trainer import checkpoint as _checkpoint

    _upload = _checkpoint.CheckpointManager._upload

    def _slow_upload(self, step, *args, **kw):
        logging.getLogger("finetune_trainer.test").info("test: upload of step %d paused for %.1fs", step, _upload_sleep)
        time.sleep(_upload_sleep)
        return _upload(self, step, *args, **kw)

    _checkpoint.CheckpointManager._upload = _slow_upload

if os.environ.get("FT_TEST_LEAKY_ATTENTION") == "1":
    from finetune_trainer import attention as _attention

    def _leaky_sdpa(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kw):
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        kw.pop("position_ids", None)  # forget where the documents start
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kw)

    _attention.per_document_sdpa = _leaky_sdpa

from finetune_trainer.__main__ import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
