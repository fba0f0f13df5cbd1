"""The one decision about a target: up to date, restorable from a cache, or to be run, and why.

`build`, `build -n`, `status` and `explain` all ask `decide`; only what they do with the answer
differs (a dry run and `status` pass `repair=False`, so looking changes nothing on disk). Like
redo's `isdirty`, the side effects are parameters, not a second copy of the logic.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from enum import Enum

from tunemake import keys


class State(str, Enum):
    """A target's state in one build. A str, so it prints and serializes as its value."""

    PENDING = "pending"  # not decided yet: a dependency is unfinished
    UP_TO_DATE = "up to date"  # targets/NAME holds this key's outputs, untouched
    CACHED = "cached"  # a cache (local, or remote with `remote`) has the key: restore it
    STALE = "stale"  # built before with other inputs: the step must run
    NEVER_BUILT = "never built"  # no earlier build: the step must run
    QUEUED = "queued"  # will run when a slot (and its key lock) is free
    WAITING = "waiting"  # another tunemake holds the key's lock
    RUNNING = "running"
    DONE = "done"  # ran and succeeded
    FAILED = "failed"
    SKIPPED = "skipped"  # not run: a dependency failed, or the build stopped

    def __str__(self) -> str:
        return self.value


MUST_RUN = (State.STALE, State.NEVER_BUILT)


@dataclass
class Decision:
    state: State
    reasons: list[str] = field(default_factory=list)
    entry: dict | None = None  # the action entry to restore, when CACHED
    remote: bool = False  # that entry is in the remote cache only
    last: dict | None = None  # the target's state record (what targets/NAME holds), if any


def decide(engine, name: str, key: str, parts: dict, forced: bool, repair: bool = True) -> Decision:
    """What to do with target `name` whose inputs give `key` (its components `parts`)."""
    store = engine.store
    last = store.get_state(name)
    last_parts = last.get("components") if last else None
    if forced:
        return Decision(State.STALE if last else State.NEVER_BUILT, ["forced"], last=last)
    if engine.check_current(name, key, repair=repair, state=last):
        return Decision(State.UP_TO_DATE, last=last)
    entry = store.get_action(key)
    if entry is not None and key not in engine.damaged and store.action_complete(entry):
        if last and last.get("key") == key:
            reasons = ["outputs in targets/ were deleted or edited"]
        else:
            reasons = keys.explain(last_parts, parts)
        return Decision(State.CACHED, reasons, entry)
    remote_entry = engine.remote_entry(key)
    if remote_entry is not None:
        return Decision(State.CACHED, ["in the remote cache"], remote_entry, remote=True)
    if key in engine.damaged:
        decision = Decision(State.STALE, ["its outputs were edited in place, which damaged their cache entry"])
    elif last is None:
        decision = Decision(State.NEVER_BUILT, [])
    else:
        decision = Decision(State.STALE, keys.explain(last_parts, parts) or ["cache entry missing"])
    failure = store.get_failure(name)
    if failure and failure.get("key") == key:
        decision.reasons.insert(0, f"failed {ago(failure.get('finished'))} with these inputs: "
                                   f"{failure.get('detail')} (tunemake log {name} --last)")
    return decision


def ago(ts: float | None) -> str:
    if not isinstance(ts, (int, float)) or isinstance(ts, bool):
        return "earlier"
    secs = max(0, time.time() - ts)
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if secs >= size:
            return f"{int(secs // size)}{unit} ago"
    return f"{int(secs)}s ago"
