"""Reading and writing: safetensors checkpoints and user images."""
