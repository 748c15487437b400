"""One line of a JSONL input file, read as a JSON object or refused with the reason."""

from __future__ import annotations

import json


def json_object_line(raw: bytes, keys: tuple[str, ...] = ()) -> tuple[dict | None, str]:
    """One JSONL line as a dict holding `keys`, or (None, why not): not UTF-8, blank, invalid
    JSON, not an object, a key missing."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as error:
        return None, f"not UTF-8 ({error.reason} at byte {error.start})"
    if not text.strip():
        return None, "blank line"
    try:
        record = json.loads(text)
    except json.JSONDecodeError as error:
        return None, f"invalid JSON ({error.msg} at column {error.colno})"
    if not isinstance(record, dict):
        return None, f"a JSON {type(record).__name__}, not an object"
    for key in keys:
        if key not in record:
            return None, f'"{key}" is missing'
    return record, ""
