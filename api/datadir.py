"""A data directory belongs to the model that created it. Its chunk KVs are that model's, and
its registry's content hashes name that model's fingerprint, so another model would recompute
and overwrite every entry it reads (and the first model would do it again on the way back).
The fingerprint is written to `model.json` when the directory is first opened by a service,
and a different model is refused: one data dir per model."""
from __future__ import annotations

import json
import os
import time
from pathlib import Path

MARKER = "model.json"


class ModelMismatch(ValueError):
    pass


def recorded_model(data_dir: Path) -> dict | None:
    try:
        return json.loads((Path(data_dir) / MARKER).read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as e:
        raise ModelMismatch(f"{Path(data_dir) / MARKER} is unreadable ({e}); it names the model this data "
                            "directory belongs to") from None


def check_model(data_dir: Path, name: str, fingerprint: str) -> None:
    """Raise ModelMismatch when `data_dir` was created for another model."""
    rec = recorded_model(data_dir)
    if rec is not None and rec.get("fingerprint") != fingerprint:
        raise ModelMismatch(
            f"{data_dir} belongs to model {rec.get('model')!r} (fingerprint {str(rec.get('fingerprint'))[:12]}), "
            f"not to {name!r} ({fingerprint[:12]}): its chunk KVs are that model's. Use --model "
            f"{rec.get('model')} (with its --dtype) with it, or give this model a --data-dir of its own")


def bind_model(data_dir: Path, name: str, fingerprint: str) -> None:
    """Record the model of `data_dir` unless one is recorded (check_model first)."""
    marker = Path(data_dir) / MARKER
    if marker.exists():
        check_model(data_dir, name, fingerprint)
        return
    tmp = marker.with_name(f".{MARKER}.{os.getpid()}")
    tmp.write_text(json.dumps({"model": name, "fingerprint": fingerprint, "created_at": time.time()}) + "\n")
    try:
        os.link(tmp, marker)  # atomic, and never replaces another process's record
    except FileExistsError:
        check_model(data_dir, name, fingerprint)
    finally:
        tmp.unlink(missing_ok=True)
