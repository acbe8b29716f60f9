"""Loader of the raw request corpus in tests/data/requests/ (format: tests/data/requests/README.md)."""

import json
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).parent / "data" / "requests"


@dataclass(frozen=True)
class Case:
    kind: str          # "valid" | "invalid"
    name: str
    data: bytes        # the exact bytes a client sends
    expect: dict       # the parsed NAME.expect

    @property
    def responses(self) -> list[int]:
        return self.expect["responses"]

    @property
    def close(self) -> bool:
        return self.expect["close"]

    @property
    def forwarded(self) -> list[dict]:
        return self.expect["forwarded"]

    @property
    def no_body(self) -> list[int]:
        return self.expect.get("no_body", [])

    def __str__(self) -> str:
        return f"{self.kind}/{self.name}"


def load(kind: str) -> list[Case]:
    cases = []
    for path in sorted((ROOT / kind).glob("*.http")):
        expect = json.loads(path.with_suffix(".expect").read_text())
        cases.append(Case(kind, path.stem, path.read_bytes(), expect))
    return cases


def split(data: bytes, mode: str) -> list[bytes]:
    """The pieces a client writes: all at once, one line at a time (split after each LF), or byte by byte."""
    if mode == "whole":
        return [data]
    if mode == "lines":
        pieces = data.split(b"\n")
        return [p + b"\n" for p in pieces[:-1]] + ([pieces[-1]] if pieces[-1] else [])
    if mode == "bytes":
        return [data[i:i + 1] for i in range(len(data))]
    raise ValueError(mode)
