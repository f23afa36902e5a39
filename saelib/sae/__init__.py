"""The SAE itself: ``core`` (the module, config, affine view), ``rules`` (one module per activation
rule, and the registry), ``kernels`` (the training forward's fast paths), ``checkpoint`` (the
saved files), ``topafa`` (the selection kernels), ``train`` (the one training step and the sweep
loop), ``distributed`` (the same training over ranks)."""
