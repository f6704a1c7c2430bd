"""Model policies: which `nn.Linear`s of an architecture become ternary. A policy is data."""

from __future__ import annotations

from dataclasses import dataclass
from fnmatch import fnmatchcase

from torch import nn

from ..errors import BitfluxError


@dataclass(frozen=True)
class Policy:
    """Include/exclude glob patterns over module names (as in `model.named_modules()`)."""

    name: str  # recorded in checkpoints; looked up by `get_policy`
    include: tuple[str, ...]  # a Linear is converted if its name matches one of these ...
    exclude: tuple[str, ...] = ()  # ... and none of these
    model_class: str = ""  # class name the policy is written for (checked on quantize/load)

    def matches(self, name: str) -> bool:
        """Whether the module called `name` is ternarised."""
        return any(fnmatchcase(name, p) for p in self.include) and not any(
            fnmatchcase(name, p) for p in self.exclude
        )

    def select(self, model: nn.Module) -> tuple[list[str], list[str]]:
        """(names of Linears to convert, names of Linears kept in the model dtype)."""
        convert, keep = [], []
        for name, mod in model.named_modules():
            if isinstance(mod, nn.Linear):
                (convert if self.matches(name) else keep).append(name)
        return convert, keep


def get_policy(name: str) -> Policy:
    """Look up a policy by name."""
    from .flux import FLUX

    policies = {FLUX.name: FLUX}
    if name not in policies:
        raise BitfluxError(f"unknown policy {name!r}; known: {', '.join(sorted(policies))}")
    return policies[name]
