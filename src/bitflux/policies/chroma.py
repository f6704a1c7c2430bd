"""Chroma policy: ternarise every Linear inside the double- and single-stream blocks (96.70 % ternary).

Kept: `distilled_guidance_layer`, the small MLP that computes every block's modulation (an error
there reaches all 57 blocks), the x/context embedders and `proj_out`.
"""

from .policy import Policy

CHROMA = Policy(
    name="chroma",
    include=("transformer_blocks.*", "single_transformer_blocks.*"),
    model_class="ChromaTransformer2DModel",
)
