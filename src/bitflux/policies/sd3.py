"""SD3 / SD3.5 policy: ternarise every Linear inside the joint (MM-DiT) blocks.

Ternary: 98.38 % of SD3.5-large's stored parameters (its 90M-element pos_embed buffer counts).

SD3Transformer2DModel declares no `_repeated_blocks`, so the generic policy cannot serve it.
Each block's adaLN Linears (`norm1.linear`, `norm1_context.linear`) are ternarised, as in FLUX.1:
they are a third of SD3.5-large, and keeping them would cap the ratio at 2.3x. Kept: `pos_embed`, the time/text embedders,
`context_embedder`, `norm_out` and `proj_out` (small, and every token passes through them).
"""

from .policy import Policy

SD3 = Policy(
    name="sd3",
    include=("transformer_blocks.*",),
    model_class="SD3Transformer2DModel",
)
