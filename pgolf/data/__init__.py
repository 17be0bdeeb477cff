"""Data: shards, streams and loaders, tokenizers and byte counting, corpus building."""
