"""A flat dataclass that round-trips through JSON / YAML mappings (the run config, the preprocessing record)."""

from __future__ import annotations

import dataclasses
from typing import Any


class DictRecord:
    """``to_dict`` (tuples as lists, JSON-serialisable) and its inverse ``from_dict``, which rejects unknown fields
    by name. Mix into a ``@dataclass``."""

    def to_dict(self) -> dict[str, Any]:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()}

    @classmethod
    def from_dict(cls, values: dict[str, Any]):
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"unknown {cls.__name__} field(s) {unknown}; known fields: {sorted(known)}")
        return cls(**values)
