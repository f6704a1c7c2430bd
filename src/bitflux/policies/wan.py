"""Wan 2.1/2.2 (video) policy: ternarise every Linear inside the transformer blocks (98.34 % of 14B).

Kept: `condition_embedder` (its `time_proj` is the one modulation shared by all 40 blocks, and
the text/image embedders see every conditioning token), `patch_embedding`, `proj_out`.
"""

from .policy import Policy

WAN = Policy(
    name="wan",
    include=("blocks.*",),
    model_class="WanTransformer3DModel",
)
