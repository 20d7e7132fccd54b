"""The cassette store: one readable JSON file per recorded LM request.

Layout: ``<cache_dir>/<key[:2]>/<key>.json`` where ``key`` is the sha256 of the canonical request
(:func:`canonical_request`): the endpoint identity (``gemini@<url>`` or ``mock:<rules digest>``),
the model, the system prompt, every message, and the generation parameters that change an answer
(temperature, max_tokens, top_p, top_k, stop, seed, response_format). Secrets and volatile fields
(API key, request ids, timestamps, the dspy.LM's own name) are not part of it. A lookup is one
``open()`` of a path computed from the key, so replay cost does not grow with the number of
entries; the two-character fan-out keeps directories small for git and file systems.

Writes are atomic: the entry is written to a unique temporary file in the same directory and
``os.replace``-d into place, so concurrent writers (xdist processes, containers sharing the mounted
directory) never produce torn files; two writers of the same key produce one file (both contents
are equivalent answers to the same request), and distinct keys never collide.

An entry::

    {"format": "provisioner-cassette/1", "key": "<sha256>", "recorded_at": "...",
     "identity": "gemini@https://generativelanguage.googleapis.com",
     "summary": {"model": ..., "adapter": "chat", "signature": "question -> answer",
                 "inputs": {"question": "What is..."}},
     "request": {<the canonical request, exactly what the key hashes>},
     "response": {"text": "...", "finish_reason": "stop", "model": "...", "id": "..."},
     "usage": {"input_tokens": 120, "output_tokens": 14, "thoughts_tokens": 0, "cached_tokens": 0},
     "cost_usd": 0.0000176, "test_id": "tests/test_x.py::test_y"}
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import hashlib
import json
import os
import re
import tempfile
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from provisioner.lm.signature import parse_prompt
from provisioner.reprs import safe_repr

FORMAT = "provisioner-cassette/1"
_KEY = re.compile(r"^[0-9a-f]{64}$")
_SUMMARY_VALUE_CHARS = 160
# A Google API key: what `cassettes verify` refuses to find in any entry.
GOOGLE_KEY_PATTERN = re.compile(rb"AIza[0-9A-Za-z_\-]{35}")


def _jsonable(value: Any) -> Any:
    if value is None or isinstance(value, (str, int, float, bool)):
        return value
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in sorted(value.items(), key=lambda kv: str(kv[0]))}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    dump = getattr(value, "model_json_schema", None)  # a pydantic model class as response_format
    if callable(dump):
        return {"json_schema": _jsonable(dump())}
    return repr(value)


def canonical_request(*, identity: str, model: str, system: str, messages: list[tuple[str, str]],
                      generation: dict[str, Any]) -> dict[str, Any]:
    """The request as the key sees it (no secrets, nothing volatile)."""
    return {
        "v": 1,
        "identity": identity,
        "model": model,
        "system": system,
        "messages": [[role, text] for role, text in messages],
        "generation": _jsonable(generation),
    }


def cassette_key(canonical: dict[str, Any]) -> str:
    blob = json.dumps(canonical, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()


def _short(text: str) -> str:
    text = text.strip()
    return text if len(text) <= _SUMMARY_VALUE_CHARS else text[: _SUMMARY_VALUE_CHARS - 1] + "…"


def request_summary(canonical: dict[str, Any]) -> dict[str, Any]:
    """A short, human-readable description of a request: model, signature and input values."""
    messages = [(str(r), str(t)) for r, t in canonical.get("messages", [])]
    view = parse_prompt(str(canonical.get("system", "")), messages)
    summary: dict[str, Any] = {"model": canonical.get("model"), "adapter": view.format}
    if view.outputs:
        summary["signature"] = f"{', '.join(view.input_names)} -> {', '.join(o.name for o in view.outputs)}"
        summary["inputs"] = {name: _short(value) for name, value in view.inputs.items()}
    else:
        summary["prompt"] = _short(view.last_user_text)
    return summary


def describe(summary: dict[str, Any]) -> str:
    """One line for error messages and listings."""
    if "signature" in summary:
        inputs = ", ".join(f"{k}={v!r}" for k, v in summary.get("inputs", {}).items())
        return f"{summary.get('model')} `{summary['signature']}` ({inputs})"
    return f"{summary.get('model')} prompt {summary.get('prompt', '')!r}"


def now_iso() -> str:
    return _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds")


class CassetteStore:
    """Entries under one cache directory."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)

    @safe_repr
    def __repr__(self) -> str:
        return f"CassetteStore({str(self.root)!r})"

    def path_for(self, key: str) -> Path:
        if not _KEY.match(key):
            raise ValueError(f"not a cassette key: {key!r}")
        return self.root / key[:2] / f"{key}.json"

    def get(self, key: str) -> dict[str, Any] | None:
        try:
            with open(self.path_for(key), "rb") as handle:
                entry = json.loads(handle.read())
        except FileNotFoundError:
            return None
        return entry if isinstance(entry, dict) else None

    def put(self, entry: dict[str, Any]) -> Path:
        """Write an entry atomically (temp file + rename in the same directory)."""
        path = self.path_for(str(entry["key"]))
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.stem[:12]}.", suffix=".tmp", dir=path.parent)
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as handle:
                json.dump(entry, handle, indent=2, sort_keys=True, ensure_ascii=False)
                handle.write("\n")
                handle.flush()
                os.fsync(handle.fileno())
            os.chmod(tmp, 0o644)  # mkstemp makes 0600; cassettes are shared, readable files
            os.replace(tmp, path)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
            raise
        return path

    def has_entries(self) -> bool:
        return next(self.paths(), None) is not None

    def paths(self) -> Iterator[Path]:
        if not self.root.is_dir():
            return
        for shard in sorted(self.root.iterdir()):
            if shard.is_dir() and len(shard.name) == 2:
                yield from sorted(shard.glob("*.json"))

    def keys(self) -> list[str]:
        return [p.stem for p in self.paths()]


# -- maintenance: list / verify / prune ---------------------------------------------------------


@dataclass
class CassetteInfo:
    key: str
    path: Path
    recorded_at: str
    description: str
    size: int
    test_id: str | None


def list_cassettes(root: Path) -> list[CassetteInfo]:
    store = CassetteStore(root)
    infos: list[CassetteInfo] = []
    for path in store.paths():
        try:
            entry = json.loads(path.read_text(encoding="utf-8"))
        except ValueError:
            entry = {}
        infos.append(CassetteInfo(
            key=path.stem, path=path, recorded_at=str(entry.get("recorded_at", "?")),
            description=describe(entry.get("summary", {})) if isinstance(entry, dict) else "?",
            size=path.stat().st_size, test_id=entry.get("test_id") if isinstance(entry, dict) else None,
        ))
    return infos


@dataclass
class VerifyReport:
    checked: int = 0
    problems: list[tuple[Path, str]] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems


def verify_cassettes(root: Path, secrets: Iterable[str] = ()) -> VerifyReport:
    """Check every entry: valid JSON, known format, key = sha256 of its request, a response, no secret.

    ``secrets`` are exact strings (e.g. the API key) that must not occur in any byte of any file;
    anything shaped like a Google API key is refused too. Stray temporary files are reported.
    """
    report = VerifyReport()
    needles = [s.encode("utf-8") for s in secrets if s]
    root = Path(root)
    if root.is_dir():
        for path in sorted(root.rglob("*")):
            if path.is_file() and path.name.endswith(".tmp"):
                report.problems.append((path, "stray temporary file (an interrupted write)"))
    for path in CassetteStore(root).paths():
        report.checked += 1
        data = path.read_bytes()
        if any(needle in data for needle in needles) or GOOGLE_KEY_PATTERN.search(data):
            report.problems.append((path, "contains an API key"))
            continue
        try:
            entry = json.loads(data)
        except ValueError as exc:
            report.problems.append((path, f"not valid JSON: {exc}"))
            continue
        if not isinstance(entry, dict) or entry.get("format") != FORMAT:
            report.problems.append((path, f"not a {FORMAT} entry"))
            continue
        request = entry.get("request")
        key_ok = isinstance(request, dict) and cassette_key(request) == path.stem == entry.get("key")
        if not key_ok:
            report.problems.append((path, "key does not match the recorded request (edited or renamed?)"))
            continue
        response = entry.get("response")
        if not isinstance(response, dict) or not isinstance(response.get("text"), str):
            report.problems.append((path, "no response text"))
    return report


def prune_cassettes(root: Path, used: set[str], *, dry_run: bool = False) -> list[Path]:
    """Remove entries whose key is not in ``used``; returns what was (or would be) removed."""
    removed: list[Path] = []
    for path in CassetteStore(root).paths():
        if path.stem not in used:
            removed.append(path)
            if not dry_run:
                path.unlink(missing_ok=True)
    if not dry_run:
        for shard in Path(root).iterdir() if Path(root).is_dir() else []:
            if shard.is_dir() and len(shard.name) == 2 and not any(shard.iterdir()):
                shard.rmdir()
    return removed


@dataclass
class PruneResult:
    run_id: str
    removed: list[Path]
    kept: int
    dry_run: bool


def prune_unused(root: Path, sources: Iterable[Path], *, run_id: str | None = None, dry_run: bool = False,
                 force: bool = False) -> PruneResult:
    """Remove the entries that no test used in the last full run (or in ``run_id``).

    The run's usage comes from its ledger (every replayed or recorded call names its cassette).
    Unless ``force``, the run must be marked complete and full — pruning after a partial run
    (``-k``, a failed session) would delete recordings the skipped tests still need.
    """
    from provisioner.errors import ConfigError
    from provisioner.lm.ledger import last_full_run, run_cassette_usage

    sources = list(sources)
    chosen = run_id or last_full_run(sources)
    if chosen is None:
        raise ConfigError("no full run found in the ledgers to prune against; run the whole suite in "
                          "cached mode first, or name one with --run (and --force if it was partial)")
    used, full = run_cassette_usage(sources, chosen)
    if not full and not force:
        raise ConfigError(f"run {chosen!r} is not marked as a complete full run; pruning against it could "
                          "delete recordings of tests it did not run (use --force to prune anyway)")
    if not used and not force:
        raise ConfigError(f"run {chosen!r} used no cassettes at all; refusing to delete every entry "
                          "(use --force to prune anyway)")
    total = sum(1 for _ in CassetteStore(root).paths())
    removed = prune_cassettes(root, used, dry_run=dry_run)
    return PruneResult(chosen, removed, total - len(removed), dry_run)
