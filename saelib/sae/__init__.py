"""The SAE itself: ``core`` (the module, config, save/load), ``rules`` (one module per activation
rule, and the registry), ``topafa`` (the selection kernels), ``train`` (the one training step and
the sweep loop), ``distributed`` (the same training over ranks)."""
