"""The language model side: models (embedded default, hub names, tiny test models), corpora and
token rows, activations (harvest, store, on-disk cache)."""
