"""saelib: sparse autoencoders on language-model activations.

Top-AFA, TopK, BatchTopK and ReLU SAEs, the AFA theory of quasi-orthogonality, SAE stitching
and meta-SAEs, with the research book in ``notebooks/``.
"""

__version__ = "0.1.0"
