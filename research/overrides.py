"""Row specs of the probe scripts: 'base' or 'field=value,field=value' overrides of a dataclass."""

from __future__ import annotations

import dataclasses


def parse_row(row: str, base) -> dict:
    """Overrides of dataclass instance `base` named by `row`, each value cast to the field's type."""
    if row == "base":
        return {}
    fields = [f.name for f in dataclasses.fields(base)]
    out = {}
    for part in row.split(","):
        key, _, val = part.partition("=")
        if key not in fields:
            raise SystemExit(f"unknown {type(base).__name__} field {key!r}; fields: {', '.join(fields)}")
        cur = getattr(base, key)
        if isinstance(cur, bool):
            if val.lower() not in ("true", "false", "1", "0"):
                raise SystemExit(f"{key} takes true or false, got {val!r}")
            out[key] = val.lower() in ("true", "1")
            continue
        out[key] = type(cur)(val) if isinstance(cur, (int, float)) and not isinstance(cur, bool) else val
    return out
