"""finetune_trainer: the program inside the training pods. What it shares with the operator (failure reasons, FINETUNE_* names, documents) lives in finetune_api."""
