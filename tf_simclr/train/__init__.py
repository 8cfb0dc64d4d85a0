"""Training only: assembling a trainer, the training loop and one task per training mode."""
