"""FLUX policy: ternarise every Linear inside the double- and single-stream blocks.

That is 99.44 % of FLUX.1-dev's parameters. The embedders (x/context/time/guidance/text),
`norm_out` and `proj_out` stay in the model dtype: they are small and touch every token.
"""

from .policy import Policy

FLUX = Policy(
    name="flux",
    include=("transformer_blocks.*", "single_transformer_blocks.*"),
    model_class="FluxTransformer2DModel",
)
