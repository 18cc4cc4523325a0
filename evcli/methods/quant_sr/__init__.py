"""``evcli quant-sr``: ultra-low-bit super-resolution (DDTB, PAMS baseline) on EDSR / SRResNet."""
