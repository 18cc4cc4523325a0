"""`evcli mix`: image-mixing training of classifiers (none / Mixup / CutMix baselines)."""
