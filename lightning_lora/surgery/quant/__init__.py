"""4-bit quantized bases (bitsandbytes NF4 / FP4) for QLoRA: config, quantization, k-bit preparation, merge bases.

Importing this package registers the bitsandbytes ``Linear4bit`` codec with the LoRA core
(:func:`~lightning_lora.surgery.lora.codecs.register_codec`) and the quantized-base merge path with
:func:`~lightning_lora.merge_lora`: the core never imports this package, quantization plugs into it.
"""

from lightning_lora.surgery.lora.codecs import register_codec
from lightning_lora.surgery.lora.merge import register_merge_path
from lightning_lora.surgery.quant import bnb4bit, merge_bases

register_codec(bnb4bit.LINEAR4BIT, first=True)
register_merge_path(merge_bases.needs_merge_base, merge_bases.merge_onto_base_)
