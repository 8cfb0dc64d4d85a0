"""Training only: assembling a run, the training loop and one task per training mode."""
