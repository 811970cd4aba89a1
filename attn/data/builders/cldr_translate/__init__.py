"""The `cldr_translate` TFDS builder (see cldr_translate_dataset_builder.py)."""
