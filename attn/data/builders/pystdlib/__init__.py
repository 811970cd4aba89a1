"""The `pystdlib` TFDS builder (see pystdlib_dataset_builder.py)."""
