"""The error log: one line per event on stderr, human-readable or (`[log] format = "json"`) JSON."""

import logging
import sys

import orjson

_TEXT = "%(asctime)s fastlb[%(process)d] %(levelname)s %(message)s"


class JsonFormatter(logging.Formatter):
    def format(self, rec: logging.LogRecord) -> str:
        entry = {"time": self.formatTime(rec, "%Y-%m-%dT%H:%M:%S%z"), "pid": rec.process,
                 "level": rec.levelname.lower(), "message": rec.getMessage()}
        if rec.exc_info:
            entry["exception"] = self.formatException(rec.exc_info)
        return orjson.dumps(entry).decode()


def setup() -> logging.Logger:
    """Text on stderr until the config says otherwise (its errors must be readable either way)."""
    logging.basicConfig(stream=sys.stderr, level=logging.INFO, format=_TEXT)
    return logging.getLogger("fastlb")


def configure(log_spec) -> None:
    root = logging.getLogger()
    root.setLevel(log_spec.level.upper())
    if log_spec.format == "json":
        for handler in root.handlers:
            handler.setFormatter(JsonFormatter())
