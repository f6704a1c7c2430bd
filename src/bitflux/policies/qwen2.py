"""Qwen2 (transformers `Qwen2ForCausalLM`) policy: ternarise the decoder layers' Linears.

`model.embed_tokens` and `lm_head` stay in the model dtype, as in BitNet b1.58.
"""

from .policy import Policy

QWEN2 = Policy(
    name="qwen2",
    include=("model.layers.*",),
    model_class="Qwen2ForCausalLM",
)
