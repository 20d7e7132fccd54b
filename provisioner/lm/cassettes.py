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
are equivalent answers to the same request), and distinct keys never collide. The temporary file
is ``flock``-ed while written: ``cassettes verify`` removes only temporary files no live writer
holds (left by a writer killed with ``kill -9``). Nothing here ever changes a file's or
directory's mode; a read-only directory makes a recording fail with
:class:`~provisioner.errors.CassetteNotWritableError`, a file that is not a valid entry raises
:class:`~provisioner.errors.CorruptCassetteError` naming it.

An entry::

    {"format": "provisioner-cassette/1", "key": "<sha256>", "recorded_at": "...",
     "identity": "gemini@https://generativelanguage.googleapis.com",
     "summary": {"model": ..., "adapter": "chat", "signature": "question -> answer",
                 "inputs": {"question": "What is..."}},
     "request": {<the canonical request, exactly what the key hashes>},
     "response": {"text": "...", "finish_reason": "stop", "model": "...", "id": "..."},
     "usage": {"input_tokens": 120, "output_tokens": 14, "thoughts_tokens": 0, "cached_tokens": 0},
     "cost_usd": 0.0000176, "test_id": "tests/test_x.py::test_y", "source": "gemini"}

A mock recording also keeps ``"mock_setup": {"rules": [...], "default": ...}``, the rules and
default its identity digests, so a later miss can name the rule that changed.

``source`` says what answered: ``mock``, ``standin`` (the Gemini stand-in the controller wired in)
or ``gemini`` (the real API); ``test_id`` is the recording test's node id (for a call made in a
bridge session: the test that opened it, with ``session_id``; the session id alone when no test
was noted for it).
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import difflib
import errno
import hashlib
import json
import os
import re
import stat
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from provisioner._files import TEMP_SUFFIX, atomic_write, try_lock
from provisioner.errors import CassetteNotWritableError, ConfigError, CorruptCassetteError
from provisioner.lm.signature import parse_prompt
from provisioner.reprs import safe_repr

FORMAT = "provisioner-cassette/1"
_KEY = re.compile(r"^[0-9a-f]{64}$")
_SUMMARY_VALUE_CHARS = 160
# A Google API key: what `cassettes verify` refuses to find in any entry.
GOOGLE_KEY_PATTERN = re.compile(rb"AIza[0-9A-Za-z_\-]{35}")
# What answered a recorded request (an entry's "source"): provisioner's mock, the Gemini stand-in
# (known because the controller wired it in: LMConfig.endpoint_kind), or the real Gemini API.
SOURCES: tuple[str, ...] = ("mock", "standin", "gemini")
SOURCE_LABELS = {"mock": "mock", "standin": "Gemini stand-in", "gemini": "real Gemini"}
_CANNOT_WRITE = (errno.EACCES, errno.EPERM, errno.EROFS, errno.ENOSPC, errno.EDQUOT)
NOT_WRITABLE_HINT = "use --record-mode none or fix its permissions"


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


def _parse_time(text: object) -> _dt.datetime | None:
    try:
        moment = _dt.datetime.fromisoformat(str(text))
    except ValueError:
        return None
    return moment if moment.tzinfo else moment.replace(tzinfo=_dt.UTC)


def source_of(entry: Mapping[str, Any]) -> str:
    """``mock``, ``standin`` or ``gemini`` (entries from before the field: read off the identity)."""
    source = entry.get("source")
    if source in SOURCES:
        return str(source)
    identity = str(entry.get("identity", ""))
    if identity.startswith("mock:"):
        return "mock"
    return "gemini" if identity.startswith("gemini@") else "?"


def entry_problem(entry: object, key: str | None = None) -> str | None:
    """Why ``entry`` (a parsed file) is not a usable recording for ``key``; None when it is."""
    if not isinstance(entry, dict):
        return f"not a JSON object but {type(entry).__name__}"
    if entry.get("format") != FORMAT:
        return f"format {entry.get('format')!r} is not {FORMAT!r}"
    if key is not None and entry.get("key") != key:
        return f"its key {str(entry.get('key'))[:12]!r}… is not the file's name (edited or renamed?)"
    response = entry.get("response")
    if not isinstance(response, dict) or not isinstance(response.get("text"), str):
        return "no response text"
    return None


def _read_entry(path: Path, key: str | None) -> dict[str, Any]:
    """The entry in ``path``; raises FileNotFoundError or :class:`CorruptCassetteError`."""
    with open(path, "rb") as handle:
        data = handle.read()
    try:
        entry = json.loads(data)
    except UnicodeDecodeError as exc:
        raise CorruptCassetteError(path, f"not UTF-8 ({exc.reason} at byte {exc.start})") from None
    except json.JSONDecodeError as exc:
        raise CorruptCassetteError(path, f"not valid JSON ({exc.msg} at line {exc.lineno} column {exc.colno})"
                                   ) from None
    problem = entry_problem(entry, key)
    if problem is not None:
        raise CorruptCassetteError(path, problem)
    return entry


def _no_write_bits(path: Path) -> bool:
    return not stat.S_IMODE(path.stat().st_mode) & (stat.S_IWUSR | stat.S_IWGRP | stat.S_IWOTH)


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
        """The entry for ``key``, or None when there is none.

        Raises:
            CorruptCassetteError: the file exists but is not a valid entry for ``key`` (the
                message names the file, the reason and what to do).
        """
        try:
            return _read_entry(self.path_for(key), key)
        except FileNotFoundError:
            return None

    def not_writable(self, key: str) -> str | None:
        """Why an entry for ``key`` could not be written now (None: it can be).

        A directory without any write permission bit is read-only by intent — also for root, whom
        the kernel would let write anyway; otherwise the kernel's own answer (``access(2)``, which
        also sees read-only mounts) decides. Nothing here ever changes a mode.
        """
        directory = self.path_for(key).parent
        while not directory.exists():
            if directory.parent == directory:
                return f"{directory} does not exist"
            directory = directory.parent
        if not directory.is_dir():
            return f"{directory} is not a directory"
        if _no_write_bits(directory):
            return f"{directory} is read-only (mode {stat.S_IMODE(directory.stat().st_mode):o})"
        if not os.access(directory, os.W_OK):
            return f"{directory} is not writable by uid {os.geteuid()}"
        return None

    def _not_writable_error(self, why: str) -> CassetteNotWritableError:
        return CassetteNotWritableError(f"cassette dir not writable ({why}); {NOT_WRITABLE_HINT}", why)

    def put(self, entry: dict[str, Any]) -> Path:
        """Write an entry atomically (temp file + rename in the same directory).

        The temporary file is ``flock``-ed while it is written, so :func:`verify_cassettes` can tell
        a write in progress from one abandoned by a killed writer.

        Raises:
            CassetteNotWritableError: the directory is read-only or the write failed for lack of
                permission or space (nothing is left behind).
        """
        key = str(entry["key"])
        why = self.not_writable(key)
        if why is not None:
            raise self._not_writable_error(why)
        path = self.path_for(key)
        text = json.dumps(entry, indent=2, sort_keys=True, ensure_ascii=False) + "\n"
        try:
            # The temp file is locked while written (a write in progress, not an abandoned one:
            # see _abandoned); cassettes are shared, readable files (0644); fsync: a recording is
            # worth money.
            atomic_write(path, text, mode=0o644, fsync=True, hold_lock=True)
        except OSError as exc:
            if exc.errno in _CANNOT_WRITE:
                raise self._not_writable_error(f"{path.parent}: {exc.strerror or exc}") from exc
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

    def temp_files(self) -> list[Path]:
        if not self.root.is_dir():
            return []
        return sorted(p for p in self.root.rglob(f"*{TEMP_SUFFIX}") if p.is_file())


# -- the nearest recording of the same program (shown on a replay miss) --------------------------


@dataclass
class Nearest:
    """The recorded request closest to a missed one, and how they differ."""

    path: Path
    key: str
    similarity: float  # difflib ratio of the two prompts, 0..1
    differences: list[str]  # what differs besides the prompt text: identity, generation parameters
    diff: list[str]  # a short unified diff of the prompt (recorded -> this request)
    entry: dict[str, Any] = field(default_factory=dict)  # the recorded entry itself

    def text(self) -> str:
        lines = [f"nearest recording of the same program: {self.path} ({self.similarity:.0%} similar prompt)"]
        lines += [f"  differs in {d}" for d in self.differences]
        lines += ["  " + line for line in self.diff] if self.diff else ["  (same prompt text)"]
        return "\n".join(lines)


def _prompt_lines(request: Mapping[str, Any]) -> list[str]:
    lines: list[str] = []
    if request.get("system"):
        lines += ["[system]", *str(request["system"]).splitlines()]
    for role, text in request.get("messages", []):
        lines += [f"[{role}]", *str(text).splitlines()]
    return lines


def _clip(line: str, width: int = 160) -> str:
    return line if len(line) <= width else line[: width - 1] + "…"


def nearest_recording(root: Path, canonical: dict[str, Any], *, max_diff_lines: int = 16,
                      max_scanned: int = 5000) -> Nearest | None:
    """The recorded request of the same program (same model and DSPy signature) nearest to
    ``canonical``, with a short unified diff of the prompts — after a DSPy upgrade that rewords
    prompts, every key changes, and this shows how. None when nothing of that program is recorded.

    Reads at most ``max_scanned`` entries (only on a miss that fails, never on a hit).
    """
    summary = request_summary(canonical)
    wanted = (summary.get("model"), summary.get("signature"))
    mine = _prompt_lines(canonical)
    candidates: list[tuple[float, Path, dict[str, Any], dict[str, Any]]] = []
    for scanned, path in enumerate(CassetteStore(root).paths()):
        if scanned >= max_scanned:
            break
        try:
            entry = _read_entry(path, path.stem)
        except (OSError, CorruptCassetteError):
            continue
        theirs = entry.get("summary") or {}
        request = entry.get("request")
        if (theirs.get("model"), theirs.get("signature")) != wanted or not isinstance(request, dict):
            continue
        matcher = difflib.SequenceMatcher(None, _prompt_lines(request), mine, autojunk=False)
        candidates.append((matcher.ratio(), path, request, entry))
    if not candidates:
        return None
    ratio, path, request, entry = max(candidates, key=lambda c: (c[0], str(c[1])))
    differences = [f"{name}: {request.get(name)!r} → {canonical.get(name)!r}"
                   for name in ("identity", "generation") if request.get(name) != canonical.get(name)]
    diff = list(difflib.unified_diff(_prompt_lines(request), mine, "recorded", "requested", n=1, lineterm=""))
    if len(diff) > max_diff_lines:
        diff = [*diff[:max_diff_lines], f"… {len(diff) - max_diff_lines} more diff lines"]
    return Nearest(path=path, key=path.stem, similarity=ratio, differences=differences,
                   diff=[_clip(line) for line in diff], entry=entry)


# -- maintenance: list / verify / prune ---------------------------------------------------------


@dataclass
class CassetteInfo:
    """One entry as ``provision cassettes list`` shows it.

    ``source`` is one of :data:`SOURCES` (``?`` when unknown); ``test_id`` the pytest node id of
    the test that recorded it (or a bridge session id no test was noted for);
    ``problem`` the reason the file is corrupt (None when it is a valid entry).
    """

    key: str
    path: Path
    recorded_at: str
    description: str
    size: int
    test_id: str | None
    source: str = "?"
    problem: str | None = None


def list_cassettes(root: Path) -> list[CassetteInfo]:
    infos: list[CassetteInfo] = []
    for path in CassetteStore(root).paths():
        size = path.stat().st_size
        try:
            entry = _read_entry(path, path.stem)
        except CorruptCassetteError as exc:
            infos.append(CassetteInfo(key=path.stem, path=path, recorded_at="?", description="?", size=size,
                                      test_id=None, problem=exc.reason))
            continue
        infos.append(CassetteInfo(
            key=path.stem, path=path, recorded_at=str(entry.get("recorded_at", "?")),
            description=describe(entry.get("summary") or {}), size=size,
            test_id=entry.get("test_id"), source=source_of(entry),
        ))
    return infos


@dataclass
class VerifyReport:
    """``checked`` entries; ``problems`` as (file, why); ``removed_temp`` abandoned temp files removed."""

    checked: int = 0
    problems: list[tuple[Path, str]] = field(default_factory=list)
    removed_temp: list[Path] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems


def _abandoned(path: Path) -> bool:
    """A temporary file no writer holds (its writer finished oddly or was killed, e.g. ``kill -9``)."""
    try:
        fd = try_lock(path, create=False)
    except FileNotFoundError:
        return False
    if fd is None:
        return False  # a write in progress
    os.close(fd)
    return True


def verify_cassettes(root: Path, secrets: Iterable[str] = ()) -> VerifyReport:
    """Check every entry: valid JSON, known format, key = sha256 of its request, a response, no secret.

    ``secrets`` are exact strings (e.g. the API key) that must not occur in any byte of any file;
    anything shaped like a Google API key is refused too. Temporary files of writes in progress
    are ignored; those of writers that died (no one holds their lock) are removed and listed in
    ``removed_temp`` — they are never read as entries, so they are not a problem.
    """
    report = VerifyReport()
    needles = [s.encode("utf-8") for s in secrets if s]
    store = CassetteStore(root)
    for temp in store.temp_files():
        if _abandoned(temp):
            try:
                temp.unlink()
            except FileNotFoundError:
                continue
            except OSError as exc:
                why = f"abandoned temporary file that cannot be removed: {exc.strerror}"
                report.problems.append((temp, why))
                continue
            report.removed_temp.append(temp)
    for path in store.paths():
        report.checked += 1
        data = path.read_bytes()
        if any(needle in data for needle in needles) or GOOGLE_KEY_PATTERN.search(data):
            report.problems.append((path, "contains an API key"))
            continue
        try:
            entry = _read_entry(path, None)
        except CorruptCassetteError as exc:
            report.problems.append((path, exc.reason))
            continue
        request = entry.get("request")
        key_ok = isinstance(request, dict) and cassette_key(request) == path.stem == entry.get("key")
        if not key_ok:
            report.problems.append((path, "key does not match the recorded request (edited or renamed?)"))
    return report


@dataclass
class RunRecord:
    """What the ledgers say about one run: its layer, cassette dir, completeness and cassettes used.

    ``complete`` is None when the run never said it ended (killed, still running); ``partial`` lists
    why a run that ended is not complete (a node id given, ``-k``, ``-x`` stopped it, ...).
    """

    run_id: str
    layer: str | None = None
    cache_dir: str | None = None
    complete: bool | None = None
    partial: list[str] = field(default_factory=list)
    started_at: str | None = None
    ended_at: str | None = None
    used: set[str] = field(default_factory=set)


def read_runs(sources: Iterable[Path]) -> dict[str, RunRecord]:
    """Every run in the ledger ``sources`` (a run ledger that was also archived is read once)."""
    from provisioner.lm.ledger import read_ledger

    runs: dict[str, RunRecord] = {}
    seen: set[str] = set()
    for source in sources:
        for entry in read_ledger(source):
            line_id = str(entry.get("id") or json.dumps(entry, sort_keys=True))
            if line_id in seen or not entry.get("run_id"):
                continue
            seen.add(line_id)
            run = runs.setdefault(str(entry["run_id"]), RunRecord(str(entry["run_id"])))
            run.layer = run.layer or entry.get("layer")
            cassette = entry.get("cassette")
            if isinstance(cassette, str):
                run.used.add(cassette)
            if entry.get("event") == "run_complete":
                run.complete = bool(entry.get("complete"))
                run.partial = [str(r) for r in entry.get("partial") or []]
                run.cache_dir = entry.get("cache_dir")
                run.started_at = entry.get("started_at") or run.started_at
                run.ended_at = entry.get("ts")
                run.layer = entry.get("layer") or run.layer
    return runs


def _same_dir(a: str | Path, b: str | Path) -> bool:
    return Path(a).resolve() == Path(b).resolve()


@dataclass
class PruneResult:
    """``vouching``: the complete run of each layer that vouched (layer -> run id); ``removed``: the
    entries removed (or, without ``apply``, that would be); ``kept``: entries left."""

    vouching: dict[str, str]
    removed: list[Path]
    kept: int
    applied: bool


def prune_unused(root: Path, sources: Iterable[Path], *, layers: Iterable[str] = (),
                 run_id: str | None = None, apply: bool = False, force: bool = False) -> PruneResult:
    """Remove (with ``apply``; else only list) the entries no complete run of any layer used.

    Only a *complete* run vouches for a cassette's disuse: one that ran the whole suite of its
    layer to the end (the pytest plugin marks it; a node id or path, ``-k``/``-m``, ``-x``/
    ``--maxfail``/``max_failures`` stopping it, an interrupt, a timeout, a crashed worker or an
    internal error make it partial). Every layer that uses ``root`` — ``layers`` (from the
    settings) and every layer whose runs the ledgers show against ``root`` — needs its latest
    complete run; the cassettes any of them used are kept, and so is every entry recorded after the
    earliest of them started. ``run_id`` picks the vouching run of its layer; ``force`` prunes
    even when some layer has no complete run (its cassettes may then be lost).

    Raises:
        ConfigError: a layer has no complete run against ``root`` (names the layer, its latest
            partial run and why it was partial), or ``run_id`` is unknown or not complete.
    """
    runs = [r for r in read_runs(sources).values() if r.cache_dir and _same_dir(r.cache_dir, root)]
    using = set(layers) | {r.layer for r in runs if r.layer}
    chosen: dict[str, RunRecord] = {}
    if run_id is not None:
        named = next((r for r in runs if r.run_id == run_id), None)
        if named is None or not named.complete:
            why = "no such run against this directory" if named is None else _why_partial(named)
            raise ConfigError(f"run {run_id!r} cannot vouch for {root}: {why}")
        chosen[str(named.layer)] = named
    missing: list[str] = []
    for layer in sorted(using - set(chosen)):
        mine = sorted((r for r in runs if r.layer == layer), key=lambda r: str(r.ended_at or ""))
        complete = [r for r in mine if r.complete]
        if complete:
            chosen[layer] = complete[-1]
        else:
            last = f"; its latest run {mine[-1].run_id} was partial: {_why_partial(mine[-1])}" if mine else ""
            missing.append(f"layer {layer!r} has no complete run against {root}{last}")
    if (missing and not force) or not chosen:
        how = ("run each such layer's whole suite to the end (e.g. `pytest --layer <layer>`), "
               "then prune again" if missing else "run a layer's whole suite in cached mode first")
        raise ConfigError("cannot prune: " + "; ".join(missing or [f"no run used {root}"]) + f"; {how}")
    used = set().union(*(r.used for r in chosen.values()))
    starts = [t for r in chosen.values() if (t := _parse_time(r.started_at or r.ended_at)) is not None]
    cutoff = min(starts) if starts else None
    removed: list[Path] = []
    total = 0
    for path in CassetteStore(root).paths():
        total += 1
        if path.stem in used:
            continue
        with contextlib.suppress(OSError, CorruptCassetteError):
            recorded = _parse_time(_read_entry(path, path.stem).get("recorded_at"))
            if cutoff is not None and recorded is not None and recorded >= cutoff:
                continue  # recorded since the vouching runs started: they cannot vouch for it
        removed.append(path)
    if apply:
        for path in removed:
            path.unlink(missing_ok=True)
        for shard in Path(root).iterdir() if Path(root).is_dir() else []:
            if shard.is_dir() and len(shard.name) == 2 and not any(shard.iterdir()):
                shard.rmdir()
    vouching = {layer: r.run_id for layer, r in sorted(chosen.items())}
    return PruneResult(vouching, removed, total - len(removed), apply)


def _why_partial(run: RunRecord) -> str:
    # Only runs that said they ended are against a folder (the folder is in the run_complete line).
    return ", ".join(run.partial) or "partial"
