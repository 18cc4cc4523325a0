"""``evcli qat``: quantization-aware training with LSQ fake-quant layers and the Lottery Ticket Scratcher (LTS)."""
