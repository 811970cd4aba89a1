"""The `algorithmic` TFDS builder (see algorithmic_dataset_builder.py)."""
