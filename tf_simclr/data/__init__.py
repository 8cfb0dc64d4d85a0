"""Input data: dataset resolution, SimCLR augmentations and tf.data pipelines."""
