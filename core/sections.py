"""The base of every config section: read values as written, forbid unknown keys, bound counts.

Shared by :mod:`core.config` (the whole experiment) and the algorithm modules, each of which
declares its own options as a :class:`Section` (see :func:`merged_section`).
"""
from __future__ import annotations

from typing import Optional, Union, get_args, get_origin

from pydantic import BaseModel, ConfigDict, ValidationInfo, create_model, field_validator, model_validator


def _is_section(field) -> bool:
    """Whether a pydantic field holds a nested section (a model) rather than a value."""
    return isinstance(field.annotation, type) and issubclass(field.annotation, BaseModel)


MAX_ROUNDS = 10_000_000  # server_config.max_iteration, val_freq, ckpt_freq: ten million rounds
MAX_EPOCHS = 1_000_000  # local_epochs and the personalization epoch counts
MAX_COUNT = 2**31 - 1  # any other count (clients, samples, batch sizes, classes): far beyond any real run
MAX_SEED = 2**63 - 1  # seed: a signed 64-bit integer, what numpy's and torch's seeding and the checkpoints hold
MAX_TIMEOUT_S = 365 * 86400.0  # server_config.timeout_s: one year (torch's timedelta overflows far beyond)


def _scalar_type(annotation) -> Optional[type]:
    """``int``, ``float`` or ``bool`` for a field annotated so (or ``Optional`` of it); None otherwise."""
    if get_origin(annotation) is Union:
        inner = [a for a in get_args(annotation) if a is not type(None)]
        annotation = inner[0] if len(inner) == 1 else None
    return annotation if annotation in (int, float, bool) else None


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True, allow_inf_nan=False)

    @field_validator("*", mode="before")
    @classmethod
    def _as_written(cls, value, info: ValidationInfo):
        """Refuse what pydantic would coerce: true/false or 2.0 or '2' for a count, true/false for a
        float, 1/0 or text for a flag (YAML reads ``true``, ``false``, ``yes``, ``no`` as booleans)."""
        kind = _scalar_type(cls.model_fields[str(info.field_name)].annotation)
        if value is None or kind is None:
            return value
        if kind is int and (isinstance(value, bool) or not isinstance(value, int)):
            raise ValueError("expected a whole number, e.g. 5 (not true/false, a decimal or quoted text)")
        if kind is float and isinstance(value, bool):
            raise ValueError("expected a number, e.g. 0.5 (not true/false)")
        if kind is bool and not isinstance(value, bool):
            raise ValueError("expected true or false")
        return value

    @model_validator(mode="before")
    @classmethod
    def _empty_sections(cls, data):
        """A section written with nothing under it (``server_config:`` in YAML, read as None) counts
        as left out, at any depth: it takes the defaults listed in the config reference."""
        if not isinstance(data, dict):
            return data
        sections = {name for n, f in cls.model_fields.items() if _is_section(f) for name in (n, f.alias) if name}
        return {key: value for key, value in data.items() if not (value is None and key in sections)}


def merged_section(name: str, doc: str, sections) -> type[Section]:
    """One :class:`Section` named ``name`` holding the fields of every class of ``sections`` (the
    options each algorithm declares), in order; a field declared by several (a subclass inherits its
    parent's) appears once.

    Raises:
        TypeError: two sections declare one field name differently (type or default).
    """
    fields: dict = {}
    for section in sections:
        for key, field in section.model_fields.items():
            if key in fields and (fields[key].annotation, fields[key].default) != (field.annotation, field.default):
                raise TypeError(f"{name}: option {key!r} is declared differently by {section.__qualname__}")
            fields.setdefault(key, field)
    model = create_model(name, __base__=Section, **{k: (f.annotation, f) for k, f in fields.items()})  # type: ignore[call-overload]
    model.__doc__ = doc
    return model
