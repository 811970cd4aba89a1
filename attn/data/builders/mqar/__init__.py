"""The `mqar` TFDS builder (see mqar_dataset_builder.py)."""
