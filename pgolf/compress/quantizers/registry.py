"""The quantizer registry: every storage kind of an exported tensor, registered.

Importing this module imports each kind module (listed here statically, so a bundle carries
them), and each registers its kinds in the table of pgolf.compress.quantizers.base.
"""

from pgolf.compress.quantizers import groups, official_int8, passthrough, rows  # noqa: F401  (they register their kinds)
from pgolf.compress.quantizers.base import (QUANTIZERS, QuantizedTensor, Quantizer, component_label, dtype_from_name,
                                            dtype_name, format_label, get_quantizer, register_quantizer)

__all__ = ["QuantizedTensor", "Quantizer", "QUANTIZERS", "register_quantizer", "get_quantizer",
           "format_label", "component_label", "dtype_name", "dtype_from_name"]
