"""CRD (content relationship distillation) for CycleGAN / Pix2Pix generators: `evcli distill-gan`."""
