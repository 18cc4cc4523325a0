"""`evcli sparsify`: LBC N:M and OptG unstructured sparse training, magnitude and SR-STE baselines.

Python use, without the CLI::

    from evcli.methods.sparsify.layers import select_layers, LBCSite, attach
    from evcli.methods.sparsify.report import verify_file, pack_file, bench_file
    from evcli.ops.nm import nm_mask, pack_nm, unpack_nm
"""
