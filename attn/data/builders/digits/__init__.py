"""The `digits` TFDS builder (see digits_dataset_builder.py)."""
