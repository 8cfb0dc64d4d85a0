"""tf-simclr: SimCLR v1/v2 pretraining, fine-tuning and distillation on TensorFlow 2 / Keras 3."""

__version__ = "0.1.0"
