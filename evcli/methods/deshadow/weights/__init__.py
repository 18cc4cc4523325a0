"""Default weights shipped with evcli deshadow (safetensors), trained by the recipes
recipes/deshadow/labnet_builtin_default.yaml and recipes/deshadow/sadc_builtin_default.yaml."""
