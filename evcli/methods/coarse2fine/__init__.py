"""`evcli coarse2fine`: CF-ViT (arXiv 2203.03821), a coarse-to-fine two-stage ViT with confidence early exit.

Python use, without the CLI::

    from evcli.methods.coarse2fine.model import CFViT
    from evcli.methods.coarse2fine.sweep import sweep_run
    from evcli.ops.flops import counting          # the MAC counter the FLOPs come from
"""
