"""Training: recover accuracy after pruning inside transformers.Trainer (trainer, callback, optimizer, distillation)."""
