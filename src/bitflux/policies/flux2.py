"""FLUX.2 policy (dev 32B, klein 4B/9B): ternarise every Linear inside the double- and single-stream blocks.

Ternary: 97.47 % of FLUX.2-dev's stored parameters, 94.97 % of klein-4B's (`bitflux inspect --arch all`).

Kept in the model dtype: the three shared modulation Linears (`double_stream_modulation_img/txt`,
`single_stream_modulation`), because each one sets the shift/scale/gate of every block, so an
error there repeats in all of them; the x/context/time/guidance embedders; `norm_out`, `proj_out`.
"""

from .policy import Policy

FLUX2 = Policy(
    name="flux2",
    include=("transformer_blocks.*", "single_transformer_blocks.*"),
    model_class="Flux2Transformer2DModel",
)
