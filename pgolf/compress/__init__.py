"""Compression: quantizers, packing, the artifact container and size accounting."""
