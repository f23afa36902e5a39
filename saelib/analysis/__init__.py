"""Science on trained SAEs: ``afa`` (quasi-orthogonality, bounds, ZF), ``evaluate`` (metrics,
spliced CE/KL, statistics), ``stitching``, ``meta`` (meta-SAEs), ``synthetic`` (known ground
truth), ``ablations`` (design grids)."""
