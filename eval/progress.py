"""`progress.jsonl`: the run's config (with its hash) on the first line, then one finished example a
line, appended and flushed as each finishes — a killed run loses at most the example in flight."""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path


def config_hash(config: dict) -> str:
    return hashlib.blake2b(json.dumps(config, sort_keys=True).encode(), digest_size=12).hexdigest()


class ConfigMismatch(ValueError):
    pass


class Progress:
    def __init__(self, path: Path, config: dict, *, fresh: bool = False):
        self.path = path
        self.hash = config_hash(config)
        self.done: dict[str, dict] = {}
        if path.exists() and not fresh:
            self._load()
        else:
            path.parent.mkdir(parents=True, exist_ok=True)
            self._write([{"config_hash": self.hash, "config": config}])

    def _load(self) -> None:
        lines = self.path.read_text(encoding="utf-8").splitlines()
        try:
            head = json.loads(lines[0]) if lines else {}
        except json.JSONDecodeError:
            head = {}
        if head.get("config_hash") != self.hash:
            raise ConfigMismatch(
                f"{self.path} belongs to a run with another config (hash {head.get('config_hash')}, "
                f"this one is {self.hash}); pass --fresh to start over, or use another --out")
        records = []
        for line in lines[1:]:
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                break  # the line being written when the run died; that example runs again
        if len(records) < len(lines) - 1:  # drop the torn tail so the next append starts clean
            self._write([head] + records)
        self.done = {r["id"]: r for r in records}

    def _write(self, rows: list[dict]) -> None:
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
        os.replace(tmp, self.path)

    def add(self, record: dict) -> None:
        with self.path.open("a", encoding="utf-8") as f:
            f.write(json.dumps(record, ensure_ascii=False) + "\n")
            f.flush()
            os.fsync(f.fileno())
        self.done[record["id"]] = record
