"""TFDS builders for the embedded datasets: one package folder each, as TFDS requires."""
