"""The generic policy: ternarise every Linear inside a model's repeated transformer blocks.

diffusers models name their block classes in `_repeated_blocks` (the list that
`compile_repeated_blocks` compiles); the Linears outside them (embedders, shared modulation,
final layers) are small and touch every token, so they stay in the model dtype.
"""

from __future__ import annotations

from torch import nn

from ..errors import ModelError
from .policy import Policy

GENERIC = "generic"


def block_globs(model: nn.Module, classes: set[str]) -> tuple[str, ...]:
    """Name globs covering every module whose class is in `classes` (outermost ones only).

    Blocks that fill a whole container (`transformer_blocks.0..N`) collapse to `transformer_blocks.*`.
    """
    blocks = [n for n, m in model.named_modules() if n and type(m).__name__ in classes]
    outer = [n for n in blocks if not any(n.startswith(b + ".") for b in blocks)]
    globs: list[str] = []
    for name in outer:
        parent, _, _ = name.rpartition(".")
        siblings = [f"{parent}.{c}" if parent else c for c, _ in (model.get_submodule(parent) if parent else model).named_children()]
        glob = f"{parent}.*" if parent and all(s in outer for s in siblings) else f"{name}.*"
        if glob not in globs:
            globs.append(glob)
    return tuple(globs)


def generic(model: nn.Module, include: tuple[str, ...] = (), exclude: tuple[str, ...] = ()) -> Policy:
    """The generic policy for `model`: its `_repeated_blocks`' Linears, plus/minus name globs."""
    cls = type(model).__name__
    classes = set(getattr(model, "_repeated_blocks", None) or ())
    globs = block_globs(model, classes) if classes else ()
    if not globs and not include:
        raise ModelError(
            f"{cls} declares no _repeated_blocks and bitflux has no policy for it; "
            "name the Linears to ternarise with include globs (e.g. 'layers.*')"
        )
    return Policy(name=GENERIC, include=globs + tuple(include), exclude=tuple(exclude), model_class=cls)
