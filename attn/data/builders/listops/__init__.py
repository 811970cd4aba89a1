"""The `listops` TFDS builder (see listops_dataset_builder.py)."""
