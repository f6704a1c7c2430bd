"""Model policies: which `nn.Linear`s of an architecture become ternary. A policy is data.

Each named policy is a small file here (`flux.py`, `sd3.py`, ...) pinned to one model class;
`policy_for(model)` picks the one registered for the model's class, else the generic policy
(the Linears inside the class's `_repeated_blocks`).
"""

from __future__ import annotations

from torch import nn

from ..errors import BitfluxError, ModelError
from .generic import GENERIC, generic
from .policy import Policy

AUTO = "auto"  # policy name meaning: the named policy for the model's class, else generic


def named_policies() -> dict[str, Policy]:
    """Every named policy, by name."""
    from .chroma import CHROMA
    from .flux import FLUX
    from .flux2 import FLUX2
    from .llama import LLAMA
    from .qwen2 import QWEN2
    from .qwenimage import QWENIMAGE
    from .sd3 import SD3
    from .wan import WAN

    return {p.name: p for p in (FLUX, FLUX2, SD3, QWENIMAGE, WAN, CHROMA, LLAMA, QWEN2)}


def get_policy(name: str) -> Policy:
    """Look up a named policy (the generic one depends on a model: use `policy_for`)."""
    policies = named_policies()
    if name not in policies:
        raise BitfluxError(f"unknown policy {name!r}; known: {', '.join(sorted(policies) + [GENERIC, AUTO])}")
    return policies[name]


def policy_for(
    model: nn.Module,
    name: str | None = None,
    *,
    include: tuple[str, ...] = (),
    exclude: tuple[str, ...] = (),
) -> Policy:
    """The policy to quantise `model` with, plus optional extra include/exclude globs.

    `name` given: that named policy (an error if it is written for another class), or "generic".
    `name` None or "auto": the named policy registered for the model's class, else generic.
    """
    cls = type(model).__name__
    if name == GENERIC:
        return generic(model, include, exclude)
    if name in (None, AUTO):
        by_class = {p.model_class: p for p in named_policies().values()}
        if cls not in by_class:
            return generic(model, include, exclude)
        policy = by_class[cls]
    else:
        policy = get_policy(name)
        if policy.model_class and policy.model_class != cls:
            raise ModelError(f"policy {policy.name!r} is for {policy.model_class}, got {cls}")
    return policy.with_overrides(include, exclude)


__all__ = ["AUTO", "GENERIC", "Policy", "generic", "get_policy", "named_policies", "policy_for"]
