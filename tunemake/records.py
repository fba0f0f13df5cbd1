"""The shapes of the cache's JSON records: action entries, per-target state, failure records.

Any of them may come back damaged (a torn or hand-edited file) or hostile (a remote cache that
others write to). A record that fails these checks is a cache miss, so the target is rebuilt or
restored: never a crash, and never a file written outside targets/NAME. Plain functions, not
pydantic: a no-op build checks one state file per target and must stay in milliseconds.
"""

from __future__ import annotations

import re

from tunemake.hashing import tree_digest

MAX_TEXT = 1024  # target, kind and host names
MAX_NAME_BYTES = 255  # one component of an output path (NAME_MAX)
MAX_PATH_BYTES = 1024  # a whole output path
MAX_SIZE = 1 << 62  # larger "sizes" overflow the float arithmetic of `show` and `cache ls`
MAX_SECONDS = 1e11  # timestamps and durations; beyond (year 5138) time.localtime overflows
CONTROL = re.compile("[\x00-\x1f\x7f-\x9f]")  # Unicode category Cc: C0, DEL and C1 (NEL \x85 too)
DIGEST = re.compile("[0-9a-f]{64}")
PLACED = ("reflink", "link", "copy")
EXPLAINED = ("code", "deps", "sources", "env")  # the components explain() reads as tables


def check_action(entry) -> None:
    """An action cache entry as Engine.record writes it; ValueError says what is wrong."""
    _table(entry, "entry")
    for field in ("target", "kind"):
        _text(entry.get(field), field)
    _digest(entry.get("key"), "key")
    _provenance(entry)
    _table(entry.get("components"), "components")
    check_outputs(entry.get("outputs"))
    if entry.get("tree") != tree_digest(entry["outputs"]):
        raise ValueError("tree digest does not match the outputs")


def check_state(state) -> None:
    """A target's state file as Engine.restore writes it."""
    _table(state, "state")
    _digest(state.get("key"), "key")
    # only the tree's shape: re-deriving it from the outputs would cost every no-op build 5 µs a target
    _digest(state.get("tree"), "tree")
    outputs = state.get("outputs")
    check_outputs(outputs)
    components = state.get("components")
    _table(components, "components")
    for part in EXPLAINED:
        _table(components.get(part, {}), f"components.{part}")
    materialized = state.get("materialized")
    _table(materialized, "materialized")
    if materialized.keys() != outputs.keys():
        raise ValueError("materialized files differ from the outputs")
    for placed in materialized.values():  # [inode, size, mtime_ns, how, ctime_ns] (no ctime before 2026-12)
        if not (isinstance(placed, list) and len(placed) in (4, 5) and _is_int(placed[0]) and _is_int(placed[1])
                and _is_int(placed[2]) and placed[3] in PLACED and (len(placed) == 4 or _is_int(placed[4]))):
            raise ValueError("bad materialized record")
    built = state.get("built")
    _table(built, "built")
    _provenance(built)


def check_failure(record) -> None:
    """A failure record (failed/NAME.json): the key that failed, why, and when."""
    _table(record, "failure")
    _digest(record.get("key"), "key")
    detail = record.get("detail")
    if not isinstance(detail, str) or not _utf8(detail):
        raise ValueError("bad detail")
    _seconds(record.get("finished"), "finished")


def check_outputs(outputs) -> None:
    """An output manifest {path: {digest, size, x}} whose paths all stay inside targets/NAME."""
    _table(outputs, "outputs")
    for rel, e in outputs.items():
        check_output_path(rel)
        if not isinstance(e, dict) or not is_digest(e.get("digest")):
            raise ValueError(f"bad digest for {rel!r}")
        if not _is_int(e.get("size")) or not 0 <= e["size"] <= MAX_SIZE:
            raise ValueError(f"bad size for {rel!r}")
        if not isinstance(e.get("x"), bool):
            raise ValueError(f"bad executable bit for {rel!r}")
    for rel in outputs:  # a file cannot also be a folder of other outputs
        parts = rel.split("/")
        if any("/".join(parts[:i]) in outputs for i in range(1, len(parts))):
            raise ValueError(f"output {rel!r} lies inside another output file")


def check_output_path(rel) -> None:
    """A relative path that names a file inside the target's folder on any Linux filesystem."""
    if not isinstance(rel, str) or not _utf8(rel):  # a lone surrogate would become a non-UTF-8 name
        raise ValueError(f"unsafe output path {rel!r:.80}")
    raw = rel.encode()
    if (len(raw) > MAX_PATH_BYTES or rel.startswith("/") or "\\" in rel or CONTROL.search(rel)
            or any(p in (b"", b".", b"..") or len(p) > MAX_NAME_BYTES for p in raw.split(b"/"))):
        raise ValueError(f"unsafe output path {rel!r:.80}")


def is_digest(value) -> bool:
    return isinstance(value, str) and DIGEST.fullmatch(value) is not None


def _provenance(record: dict) -> None:
    """Where and when a result was made: an action entry's fields, a state's `built`."""
    _text(record.get("host"), "host")
    for field in ("started", "finished", "duration"):
        _seconds(record.get(field), field)
    if record.get("log") is not None:
        _digest(record["log"], "log")


def _table(value, field: str) -> None:
    if not isinstance(value, dict):
        raise ValueError(f"{field} is not a table")


def _digest(value, field: str) -> None:
    if not is_digest(value):
        raise ValueError(f"bad {field} digest")


def _text(value, field: str) -> None:
    # printed by `show`, `cache ls`: no terminal escapes, nothing stdout cannot encode
    if not isinstance(value, str) or len(value) > MAX_TEXT or not _utf8(value) or CONTROL.search(value):
        raise ValueError(f"bad {field}")


def _seconds(value, field: str) -> None:
    # the range test also refuses NaN and infinities
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not -MAX_SECONDS <= value <= MAX_SECONDS:
        raise ValueError(f"bad {field}")


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _utf8(text: str) -> bool:
    try:
        text.encode()
    except UnicodeEncodeError:
        return False
    return True
