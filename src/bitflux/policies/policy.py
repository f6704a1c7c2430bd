"""`Policy`: include/exclude name globs saying which `nn.Linear`s of a model become ternary."""

from __future__ import annotations

from dataclasses import dataclass, replace
from fnmatch import fnmatchcase

from torch import nn


@dataclass(frozen=True)
class Policy:
    """Include/exclude glob patterns over module names (as in `model.named_modules()`).

    `*` matches across dots, so `transformer_blocks.*` covers everything inside those blocks.
    """

    name: str  # recorded in checkpoints; looked up by `get_policy`
    include: tuple[str, ...]  # a Linear is converted if its name matches one of these ...
    exclude: tuple[str, ...] = ()  # ... and none of these
    model_class: str = ""  # class name the policy is written for ("" = any class)

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

    def with_overrides(self, include: tuple[str, ...] = (), exclude: tuple[str, ...] = ()) -> Policy:
        """This policy plus extra globs: `include` converts more Linears, `exclude` keeps more."""
        if not include and not exclude:
            return self
        return replace(self, include=self.include + tuple(include), exclude=self.exclude + tuple(exclude))
