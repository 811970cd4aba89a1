"""One file per attention mechanism that is not a plain core in attn/layers/variants.py.

Every module here is imported by `attn.layers.registry` on first use, so a new mechanism is one
file here (its module class with the `@registry.register(...)` entry), its op in attn/ops and
its test file; the model, the config validation, the matrix test, the README table and the
ablation sweep pick it up from the registry. Layer-level mechanisms (their own projections and
cache, `level='layer'`) belong here; see attn/layers/registry.py for the contract.
"""
