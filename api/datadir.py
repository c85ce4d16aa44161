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


# -- index settings ------------------------------------------------------------------------------
# What a data dir's chunks depend on besides the model: the chunk size and the embedding model.
# Recorded in `index.json` by the first run that indexes or serves it, and reused by later runs,
# so that forgetting `--chunk-tokens` never re-chunks (and recomputes the KV of) a whole corpus.
INDEX_SETTINGS = "index.json"
DEFAULT_CHUNK_TOKENS = 384
# Neighbour-aware chunk KV (index --neighbours, api/neighbour_index.py) for a data dir that records
# none, however it is first filled (CLI or API upload). On, N = 2: across four real-text and
# synthetic sets and two models it is the setting that keeps blend closest to full at r = 0.15
# (README, "Neighbour-aware chunk KV and the default"), at no cost per query; it doubles the store
# and costs ~3× each chunk's prefill when indexing. `--neighbours 0` turns it off for a data dir.
DEFAULT_NEIGHBOURS = 2


class SettingsChanged(ValueError):
    pass


def recorded_index(data_dir: Path) -> dict:
    try:
        rec = json.loads((Path(data_dir) / INDEX_SETTINGS).read_text())
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as e:
        raise SettingsChanged(f"{Path(data_dir) / INDEX_SETTINGS} is unreadable ({e}); it records the chunk size "
                              "and embedding model this data directory was indexed with") from None
    return rec if isinstance(rec, dict) else {}


def settle_chunk_tokens(data_dir: Path, asked: int | None, rechunk: bool = False) -> int:
    """The chunk size to use: the recorded one when none is asked for; the asked one when none is
    recorded or `rechunk` (the explicit change) is given. A different size without it is refused."""
    recorded = recorded_index(data_dir).get("chunk_tokens")
    if asked is None:
        return recorded or DEFAULT_CHUNK_TOKENS
    if recorded is not None and asked != recorded and not rechunk:
        raise SettingsChanged(
            f"{data_dir} is indexed with --chunk-tokens {recorded}, not {asked}: leave --chunk-tokens out to keep "
            f"{recorded}, or pass --rechunk to re-chunk each document indexed from now on at {asked} (its chunk "
            "KVs are recomputed)")
    return asked


def check_embedder(data_dir: Path, name: str) -> None:
    recorded = recorded_index(data_dir).get("embedder")
    if recorded is not None and recorded != name:
        raise SettingsChanged(f"{data_dir} is embedded with {recorded!r}, not {name!r}: its vectors are that "
                              "model's. Use that embedding model with it, or index into a new --data-dir")


def recorded_neighbours(data_dir: Path) -> int:
    """The data dir's --neighbours N: the one `ragblend index` last recorded, else the default. An
    upload through the API (RagService.index_neighbours) follows it as `index` does."""
    return int(recorded_index(data_dir).get("neighbours", DEFAULT_NEIGHBOURS))


def record_index(data_dir: Path, **settings) -> dict:
    """Write the index settings (merged over the recorded ones) when they change; returns them."""
    path = Path(data_dir) / INDEX_SETTINGS
    old = recorded_index(data_dir)
    new = {**old, **settings}
    if new != old:
        tmp = path.with_name(f".{INDEX_SETTINGS}.{os.getpid()}")
        tmp.write_text(json.dumps(new, indent=1) + "\n")
        os.replace(tmp, path)
    return new
