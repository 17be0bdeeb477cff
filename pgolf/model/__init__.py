"""Model: the GPT, its layers and the technique registries."""
