"""Generate the config reference (docs/config.md) from the pydantic models, so the docs cannot drift.

    python -m utils.config_doc        # prints the Markdown table

Paste its output between the config-reference markers of docs/config.md; testing/test_docs.py
checks that the table there is the one this prints.
"""
from __future__ import annotations

from pydantic import BaseModel

from core.config import Config


def _type_name(annotation) -> str:
    return str(annotation).replace("typing.", "").replace("<class '", "").replace("'>", "")


def _rows(instance: BaseModel, prefix: str) -> list[str]:
    rows = []
    for name, field in type(instance).model_fields.items():
        key = f"{prefix}{field.alias or name}"
        value = getattr(instance, name)
        if isinstance(value, BaseModel):
            rows.extend(_rows(value, key + "."))
            continue
        rows.append(f"| `{key}` | `{_type_name(field.annotation)}` | `{value!r}` | {field.description or ''} |")
    return rows


def config_reference() -> str:
    """Markdown table: every config key, its type, its default and what it does."""
    return "\n".join(["| key | type | default | meaning |", "|---|---|---|---|"] + _rows(Config(), ""))


if __name__ == "__main__":
    print(config_reference())
