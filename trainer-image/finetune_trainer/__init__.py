"""finetune_trainer: the program inside the training pods. Keep this module import-light (the operator imports finetune_trainer.errors)."""
