"""Default weights shipped with evcli deshadow (safetensors), trained by the recipes
recipes/deshadow/labnet_builtin_default.yaml, recipes/deshadow/sadc_builtin_default.yaml and
recipes/deshadow/detector_builtin.yaml (the shadow detector behind ``--mask auto``)."""
