"""Random protobuf messages that parse: every field of the message's descriptor drawn from edge
values (zero, -1, the type's limits, huge lengths, NaN, lone control characters), nested messages
drawn the same way, and mutations of a valid message (one field replaced by such a value). What a
buggy or hostile peer can send once parsing has succeeded."""

from __future__ import annotations

import random
from typing import Any

from google.protobuf import message_factory
from google.protobuf.descriptor import Descriptor, FieldDescriptor
from google.protobuf.message import Message

F = FieldDescriptor
_INT_EDGES = (0, 1, -1, 2, 3, 7, 16, 64, 255, 4096, 2**31 - 1, -(2**31))
_INT64_EDGES = (2**63 - 1, -(2**63), 2**40)
_FLOATS = (0.0, -0.0, 1.0, -1.0, 0.5, 2.0, 1e-30, 1e30, 3.4e38, float("nan"), float("inf"),
           float("-inf"))
_STRINGS = ("", "a", "req-0", "real", " ", "\x00", "\u2028", "é" * 3, "{", '{"type": "object"}',
            "x" * 5000, "root ::= \"a\"")
_SIGNED = {F.TYPE_INT32, F.TYPE_SINT32, F.TYPE_SFIXED32}
_SIGNED64 = {F.TYPE_INT64, F.TYPE_SINT64, F.TYPE_SFIXED64}
_UNSIGNED = {F.TYPE_UINT32: 2**32 - 1, F.TYPE_FIXED32: 2**32 - 1, F.TYPE_UINT64: 2**64 - 1,
             F.TYPE_FIXED64: 2**64 - 1}


def _scalar(field: FieldDescriptor, rng: random.Random) -> Any:
    t = field.type
    if t in _SIGNED:
        return rng.choice(_INT_EDGES) if rng.random() < 0.7 else rng.randint(-50, 3000)
    if t in _SIGNED64:
        return rng.choice(_INT_EDGES + _INT64_EDGES)
    if t in _UNSIGNED:
        return rng.choice((0, 1, 2, 16, 4096, _UNSIGNED[t], rng.randint(0, 3000)))
    if t in (F.TYPE_FLOAT, F.TYPE_DOUBLE):
        value = rng.choice(_FLOATS) if rng.random() < 0.7 else rng.uniform(-5, 5)
        return max(min(value, 3.4e38), -3.4e38) if t == F.TYPE_FLOAT and value == value \
            else value
    if t == F.TYPE_BOOL:
        return rng.random() < 0.5
    if t == F.TYPE_STRING:
        return rng.choice(_STRINGS)
    if t == F.TYPE_BYTES:
        return rng.randbytes(rng.choice((0, 1, 8, 300)))
    if t == F.TYPE_ENUM:
        return rng.choice([v.number for v in field.enum_type.values] + [99])
    raise AssertionError(f"unhandled field type {t} of {field.full_name}")


def _count(rng: random.Random) -> int:
    return rng.choice((0, 1, 1, 2, 3, 5, 40))


def _fill(msg: Message, field: FieldDescriptor, rng: random.Random, depth: int) -> None:
    name = field.name
    if field.message_type is not None and field.message_type.GetOptions().map_entry:
        key_f, value_f = field.message_type.fields_by_name["key"], \
            field.message_type.fields_by_name["value"]
        target = getattr(msg, name)
        for _ in range(_count(rng)):
            key = _scalar(key_f, rng)
            if value_f.message_type is not None:
                target[key].CopyFrom(random_message(value_f.message_type, rng, depth + 1))
            else:
                target[key] = _scalar(value_f, rng)
        return
    repeated = field.is_repeated
    if field.message_type is not None:
        if depth >= 3:
            return
        if repeated:
            for _ in range(min(_count(rng), 5)):
                getattr(msg, name).add().CopyFrom(random_message(field.message_type, rng,
                                                                 depth + 1))
        else:
            getattr(msg, name).CopyFrom(random_message(field.message_type, rng, depth + 1))
    elif repeated:
        getattr(msg, name).extend(_scalar(field, rng) for _ in range(_count(rng)))
    else:
        setattr(msg, name, _scalar(field, rng))


def random_message(descriptor: Descriptor, rng: random.Random, depth: int = 0) -> Message:
    """A message of this type with about half of its fields drawn (oneof: the last drawn)."""
    msg = message_factory.GetMessageClass(descriptor)()
    for field in descriptor.fields:
        if rng.random() < 0.5:
            _fill(msg, field, rng, depth)
    return msg


def mutate(seed: Message, rng: random.Random) -> Message:
    """A copy of a valid message with one or two fields cleared or redrawn."""
    msg = type(seed)()
    msg.CopyFrom(seed)
    for _ in range(rng.choice((1, 2))):
        field = rng.choice(seed.DESCRIPTOR.fields)
        msg.ClearField(field.name)
        if rng.random() < 0.8:
            _fill(msg, field, rng, 1)
    return msg
