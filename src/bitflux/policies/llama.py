"""Llama (transformers `LlamaForCausalLM`) policy: ternarise the decoder layers' Linears.

As in BitNet b1.58, `model.embed_tokens` and `lm_head` stay in the model dtype: they are
vocabulary-sized lookups/projections that every token passes through.
"""

from .policy import Policy

LLAMA = Policy(
    name="llama",
    include=("model.layers.*",),
    model_class="LlamaForCausalLM",
)
