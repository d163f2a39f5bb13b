"""Checking the string fields of a parsed binary message.

protobuf's Python runtime returns a ``string`` field whose bytes are not valid UTF-8 as
``bytes`` instead of failing the parse (one flipped bit in a layer name or a path is enough).
Code that then joins, compares or prints it as ``str`` breaks far from the file, or silently
misses a layer whose name no longer matches; so readers of binary files check once, here.
"""
from __future__ import annotations

from typing import Optional

from google.protobuf.descriptor import FieldDescriptor
from google.protobuf.message import Message


def invalid_text_field(message: Message, prefix: str = "") -> Optional[str]:
    """The path (``layer[3].name``) of the first string field of ``message`` that is not valid
    UTF-8 text, or None."""
    for field, value in message.ListFields():
        path = f"{prefix}{field.name}"
        repeated = field.is_repeated
        if field.type == FieldDescriptor.TYPE_STRING:
            items = value if repeated else [value]
            for i, item in enumerate(items):
                if isinstance(item, bytes):
                    return f"{path}[{i}]" if repeated else path
        elif field.type == FieldDescriptor.TYPE_MESSAGE:
            items = value if repeated else [value]
            for i, item in enumerate(items):
                found = invalid_text_field(item, f"{path}[{i}]." if repeated else f"{path}.")
                if found is not None:
                    return found
    return None


__all__ = ["invalid_text_field"]
