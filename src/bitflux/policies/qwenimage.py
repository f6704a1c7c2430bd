"""Qwen-Image policy: ternarise every Linear inside the 60 dual-stream blocks (99.77 % ternary).

The per-block modulation Linears (`img_mod.1`, `txt_mod.1`, a third of the model) are
ternarised as FLUX.1's adaLN is; keeping them would cap the ratio at 2.4x. Kept: `img_in`,
`txt_in`, the timestep embedder, `norm_out` and `proj_out` (small, every token passes through).
"""

from .policy import Policy

QWENIMAGE = Policy(
    name="qwenimage",
    include=("transformer_blocks.*",),
    model_class="QwenImageTransformer2DModel",
)
