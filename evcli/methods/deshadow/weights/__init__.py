"""Default weights shipped with evcli deshadow (safetensors; see recipes/deshadow/labnet_builtin_default.yaml)."""
