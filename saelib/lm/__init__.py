"""The language-model side: ``models`` (embedded default, hub names, tiny test models, hook names),
``data`` (corpora and token rows), ``activations`` (harvest, the shuffled store), ``cache`` (the
on-disk activation cache)."""
