"""Storage kinds of exported tensors. ``registry`` holds the table (kind -> quantize,
dequantize, format label) and ``QuantizedTensor``; ``rows`` is the one per-row intN quantizer;
``groups`` is grouped intN over the full code range (LQER's factors); ``official_int8`` and
``passthrough`` are the other kinds. Importing the registry registers them
all. (Torch-free on purpose: a package __init__ imports nothing heavy.)"""
