"""Dataclasses built from TOML/JSON dicts, with unknown or missing keys reported, never dropped."""

from __future__ import annotations

from dataclasses import fields


def build(cls, raw: dict, where: str, error: type[Exception] = ValueError):
    """`cls(**raw)`, raising `error` that names the file and the offending keys."""
    unknown = sorted(set(raw) - {f.name for f in fields(cls)})
    if unknown:
        raise error(f"{where}: unknown key(s) {', '.join(unknown)}")
    try:
        return cls(**raw)
    except TypeError as exc:
        raise error(f"{where}: incomplete entry ({exc})") from None
