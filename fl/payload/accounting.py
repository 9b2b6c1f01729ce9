"""Byte accounting: what a message costs, counted from what Flower serializes."""

from __future__ import annotations


from flwr.app import RecordDict
from flwr.supercore.inflatable.inflatable_object import get_all_nested_objects


def payload_bytes(content: RecordDict) -> int:
    """Bytes of a message's content as Flower serializes its records (plus the record keys)."""
    return sum(len(key) + record.count_bytes() for key, record in content.items())


def wire_bytes(content: RecordDict) -> int:
    """Exact size of the content's deflated object tree as Flower's object store sends it."""
    return sum(len(obj.deflate()) for obj in get_all_nested_objects(content).values())
