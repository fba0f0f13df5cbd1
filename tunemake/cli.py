"""The command line: parse, call the engine, print. Never imports torch."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

from tunemake import __version__
from tunemake.errors import UserError

STATUS_WORDS = {"up to date": "up to date", "cached": "cached", "stale": "stale", "never built": "never built"}


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except UserError as exc:
        print(f"tunemake: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("tunemake: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        return 0
    except OSError as exc:  # the disk, not the tunefile: still one line naming the file
        where = f"{os.path.relpath(exc.filename)}: " if isinstance(exc.filename, str) else ""
        print(f"tunemake: error: {where}{exc.strerror or exc}", file=sys.stderr)
        return 1
    except Exception as exc:  # noqa: BLE001 - a bug of ours: one line here, the traceback in a file
        if os.environ.get("TUNEMAKE_DEBUG"):
            raise
        import tempfile
        import traceback

        fd, path = tempfile.mkstemp(prefix="tunemake-crash-", suffix=".txt")
        with os.fdopen(fd, "w") as f:
            traceback.print_exc(file=f)
        print(f"tunemake: internal error: {type(exc).__name__}: {exc} (traceback in {path}; please report it)",
              file=sys.stderr)
        return 3


def _parser() -> argparse.ArgumentParser:
    # -C/-f are accepted before and after the command; SUPPRESS keeps a subcommand's
    # defaults from overwriting what was given before it.
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("-C", "--directory", default=argparse.SUPPRESS, help="the project folder (default: .)")
    common.add_argument("-f", "--file", default=argparse.SUPPRESS, help="the tunefile (default: DIR/tunefile.toml)")
    common.add_argument("--set", dest="overrides", action="append", default=[], metavar="NAME.PARAM=VALUE",
                        help="override a param (changes the key), e.g. --set int4.groupsize=128")
    common.add_argument("--remote", default=None, metavar="URL",
                        help="shared cache, e.g. s3://bucket/prefix or file:///ci/cache (env TUNEMAKE_REMOTE)")
    common.add_argument("--no-push", action="store_true", help="use the remote cache but never publish to it")

    parser = argparse.ArgumentParser(prog="tunemake", description="Build LLM artifacts incrementally.")
    parser.add_argument("--version", action="version", version=f"tunemake {__version__}")
    parser.add_argument("-C", "--directory", default=".", help="the project folder (default: .)")
    parser.add_argument("-f", "--file", default=None, help="the tunefile (default: DIR/tunefile.toml)")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("build", parents=[common], help="build targets (default: the tunefile's `default`)")
    p.add_argument("targets", nargs="*")
    p.add_argument("-j", "--jobs", type=int, default=1, help="run up to N steps at once (default 1)")
    p.add_argument("-k", "--keep-going", action="store_true", help="continue with independent targets after a failure")
    p.add_argument("-B", "--force", action="store_true", help="rebuild the named targets even if cached")
    p.add_argument("-n", "--dry-run", action="store_true", help="say what would run and why, run nothing")
    p.add_argument("--no-cache", action="store_true", help="rebuild every selected target (results are still stored)")
    p.add_argument("--plain", action="store_true", help="line-by-line output even on a terminal")
    p.add_argument("--executor", choices=("local", "ray"), default="local",
                   help="where steps run: here, or as Ray tasks (RAY_ADDRESS or a local cluster; needs a remote cache)")
    p.set_defaults(func=cmd_build)

    p = sub.add_parser("status", parents=[common], help="up to date / stale / never built, with the reason")
    p.add_argument("targets", nargs="*")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_status)

    p = sub.add_parser("explain", parents=[common], help="what changed since TARGET was last built")
    p.add_argument("target")
    p.set_defaults(func=cmd_explain)

    p = sub.add_parser("graph", parents=[common], help="the dependency tree (--dot for Graphviz)")
    p.add_argument("targets", nargs="*")
    p.add_argument("--dot", action="store_true")
    p.set_defaults(func=cmd_graph)

    p = sub.add_parser("list", parents=[common], help="the targets of the tunefile")
    p.set_defaults(func=cmd_list)

    p = sub.add_parser("show", parents=[common], help="where a target's outputs are, its key, when built")
    p.add_argument("target")
    p.set_defaults(func=cmd_show)

    p = sub.add_parser("log", parents=[common], help="the log of the step that made TARGET's outputs")
    p.add_argument("target")
    p.add_argument("--last", action="store_true", help="the last step run here instead (it may have failed)")
    p.set_defaults(func=cmd_log)

    p = sub.add_parser("clean", parents=[common], help="remove materialized outputs (targets/), not the cache")
    p.add_argument("targets", nargs="*")
    p.set_defaults(func=cmd_clean)

    p = sub.add_parser("cache", parents=[common], help="the caches: ls | gc | verify | push | pull")
    csub = p.add_subparsers(dest="cache_command", required=True, metavar="ACTION")
    c = csub.add_parser("ls", parents=[common], help="cached actions, oldest use first")
    c.set_defaults(func=cmd_cache_ls)
    c = csub.add_parser("gc", parents=[common], help="drop unreferenced blobs; evict LRU entries beyond --max-size")
    c.add_argument("--max-size", help="e.g. 50GB: evict least-recently-used entries (unneeded ones first)")
    c.set_defaults(func=cmd_cache_gc)
    c = csub.add_parser("verify", parents=[common], help="re-hash every blob; drop corrupt ones")
    c.set_defaults(func=cmd_cache_verify)
    c = csub.add_parser("push", parents=[common], help="publish built targets to the remote cache")
    c.add_argument("targets", nargs="*")
    c.set_defaults(func=cmd_cache_push)
    c = csub.add_parser("pull", parents=[common], help="restore targets from the remote cache, running nothing")
    c.add_argument("targets", nargs="*")
    c.set_defaults(func=cmd_cache_pull)
    return parser


# -- loading -------------------------------------------------------------------
def _project(args):
    from tunemake import graph, tunefile

    path = tunefile.find_tunefile(Path(args.directory), args.file)
    project = tunefile.load(path, args.overrides)
    graph.check_acyclic(project)
    _check_cache_folder(project)
    return project


def _check_cache_folder(project) -> None:
    """The cache folder must be a folder, and one that holds nothing of the user's: `cache gc`
    empties its tmp/, builds write its logs/. A folder of tunemake's carries a CACHEDIR.TAG."""
    from tunemake.store import looks_like_a_cache

    cache = project.cache_dir
    if os.path.lexists(cache) and not cache.is_dir():
        raise UserError(f"{project.file.name}: the cache folder {os.path.relpath(cache)} is not a folder "
                        "(remove it, or set [cache] dir)")
    if cache.name != ".tunecache" and cache.is_dir() and not looks_like_a_cache(cache):
        raise UserError(f"{project.file.name}: [cache] dir {os.path.relpath(cache)} already holds other files; "
                        "point it at a new or empty folder (tunemake's own carry a CACHEDIR.TAG)")


def _engine(args):
    from tunemake.build import Engine

    project = _project(args)
    return project, Engine(project, _remote(args, project))


def _remote(args, project):
    """The remote cache: --remote, else $TUNEMAKE_REMOTE, else [cache] remote in the tunefile."""
    url = getattr(args, "remote", None) or os.environ.get("TUNEMAKE_REMOTE") or project.remote.get("url")
    if not url:
        return None
    from tunemake.remote import Remote

    read_only = bool(getattr(args, "no_push", False) or project.remote.get("read_only"))
    return Remote(url, read_only=read_only, options=project.remote.get("options") or {})


def _roots(project, names: list[str]) -> list[str]:
    return project.expand(names) if names else project.default


# -- commands ------------------------------------------------------------------
def cmd_build(args) -> int:
    from tunemake.build import Options
    from tunemake.progress import PlainReporter, reporter

    project, engine = _engine(args)
    if args.executor == "ray" and not args.dry_run:
        from tunemake.ray_executor import RayExecutor

        engine.executor = RayExecutor(engine.remote, engine.store, engine.upload_sources)
    roots = _roots(project, args.targets)
    if args.jobs < 1:
        raise UserError(f"-j {args.jobs}: must be at least 1")
    options = Options(jobs=args.jobs, keep_going=args.keep_going, no_cache=args.no_cache, dry_run=args.dry_run,
                      force=set(roots) if args.force else set())
    try:
        if args.dry_run:
            outcome = engine.build(roots, options, PlainReporter())
            _print_assessment(outcome, dry_run=True)
            return 0
        rep = PlainReporter() if args.plain else reporter()
        outcome = engine.build(roots, options, rep)
    finally:
        engine.close()
    total = len(outcome.status)
    if outcome.count("up to date") == total:
        print(f"nothing to do: {total} target{'s' * (total != 1)} up to date ({outcome.seconds:.2f}s)")
        return 0
    parts = [f"{outcome.count(s)} {label}" for s, label in
             (("done", "built"), ("cached", "restored from cache"), ("up to date", "up to date"),
              ("failed", "failed"), ("skipped", "skipped")) if outcome.count(s)]
    print(f"{'done' if outcome.ok else 'FAILED'}: {', '.join(parts)} in {outcome.seconds:.1f}s")
    for name, log in outcome.failed_logs.items():
        print(f"  {name}: full log in {os.path.relpath(log)}")
    return 0 if outcome.ok else 1


def _print_assessment(outcome, dry_run: bool) -> None:
    verbs = {"up to date": "up to date", "cached": "would restore from cache" if dry_run else "cached (restorable)",
             "stale": "would run" if dry_run else "stale", "never built": "would run" if dry_run else "never built"}
    width = max((len(n) for n in outcome.status), default=0)
    for name, status in outcome.status.items():
        reasons = outcome.reasons.get(name) or []
        why = f": {'; '.join(reasons)}" if reasons else ""
        print(f"{name:<{width}}  {verbs[status]}{why}")


def cmd_status(args) -> int:
    project, engine = _engine(args)
    try:
        outcome = engine.assess(_roots(project, args.targets))
    finally:
        engine.close()
    if args.json:
        print(json.dumps([{"target": n, "status": s, "reasons": outcome.reasons.get(n, [])}
                          for n, s in outcome.status.items()], indent=1))
    else:
        _print_assessment(outcome, dry_run=False)
    return 0


def cmd_explain(args) -> int:
    from tunemake import keys

    project, engine = _engine(args)
    name = project.expand([args.target])[0] if args.target in project.targets else None
    if name is None:
        raise UserError(f"{project.file.name}: unknown target '{args.target}'"
                        + (" (a matrix family: name one member)" if args.target in project.groups else ""))
    try:
        outcome = engine.assess([name])
        status = outcome.status[name]
        state = engine.store.get_state(name)
        if status == "up to date":
            print(f"{name}: up to date (key {state['key'][:16]})")
            return 0
        print(f"{name}: {status}")
        for line in outcome.reasons.get(name, []) or (["no earlier build to compare with"]
                                                      if state is None else []):
            print(f"  {line}")
        # stale dependencies: follow them down to the changes that started it
        seen: set[str] = set()
        stack = [d for d in project.targets[name].target_deps if outcome.status.get(d) not in ("up to date", "cached")]
        while stack:
            dep = stack.pop(0)
            if dep in seen:
                continue
            seen.add(dep)
            reasons = outcome.reasons.get(dep, [])
            print(f"  dep {dep} is {outcome.status[dep]}" + (": " + "; ".join(reasons) if reasons else ""))
            stack.extend(d for d in project.targets[dep].target_deps
                         if outcome.status.get(d) not in ("up to date", "cached"))
        if state and status == "stale" and not outcome.reasons.get(name):
            print(f"  key {state['key'][:16]} → {keys.key_of(engine.components(name, {}))[:16]}")
    finally:
        engine.close()
    return 0


def cmd_graph(args) -> int:
    from tunemake.graph import closure

    project = _project(args)
    roots = _roots(project, args.targets)
    if args.dot:
        print("digraph tunemake {\n  rankdir=LR;")
        for name in closure(project, roots):
            target = project.targets[name]
            print(f'  "{name}" [label="{name}\\n({target.kind})"];')
            for dep in target.target_deps:
                print(f'  "{dep}" -> "{name}";')
            for src in target.sources:
                print(f'  "{src}" [shape=note]; "{src}" -> "{name}";')
        print("}")
        return 0
    seen: set[str] = set()

    def show(name: str, prefix: str, last: bool, top: bool) -> None:
        target = project.targets[name]
        branch = "" if top else ("└── " if last else "├── ")
        repeat = " …" if name in seen and target.target_deps else ""
        print(f"{prefix}{branch}{name} ({target.kind}){repeat}")
        if repeat:
            return
        seen.add(name)
        children = target.target_deps
        child_prefix = prefix + ("" if top else ("    " if last else "│   "))
        for i, dep in enumerate(children):
            show(dep, child_prefix, i == len(children) - 1, False)

    for root in roots:
        show(root, "", True, True)
    return 0


def cmd_list(args) -> int:
    project = _project(args)
    width = max(len(n) for n in project.targets)
    for name, target in project.targets.items():
        deps = ", ".join(target.target_deps + target.sources)
        star = "*" if name in project.default else " "
        print(f"{star} {name:<{width}}  {target.kind:<9} {('← ' + deps) if deps else ''}")
    print("(* = built by a bare `tunemake build`)")
    return 0


def _single_target(project, name: str) -> str:
    if name not in project.targets:
        project.expand([name])  # raises the unknown-target error
        raise UserError(f"'{name}' is a matrix family: name one of {', '.join(project.groups[name])}")
    return name


def cmd_show(args) -> int:
    from tunemake import kinds
    from tunemake.maintenance import human

    project, engine = _engine(args)
    engine.close()
    name = _single_target(project, args.target)
    state = engine.store.get_state(name)
    if state is None:
        print(f"{name}: never built (run `tunemake build {name}`)")
        return 1
    out = project.output_dir(name)
    built = state.get("built", {})
    print(f"target    {name} ({project.targets[name].kind})")
    print(f"outputs   {os.path.relpath(out)}/")
    print(f"key       {state['key']}")
    if built.get("finished"):
        when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(built["finished"]))
        print(f"built     {when} on {built.get('host')} in {built.get('duration', 0):.2f}s")
    if built.get("log"):
        print(f"log       tunemake log {name}")
    files = state.get("outputs", {})
    print(f"files     {len(files)}, {human(sum(e['size'] for e in files.values()))}")
    for rel, entry in list(files.items())[:20]:
        print(f"  {rel:<40} {human(entry['size']):>10}")
    if len(files) > 20:
        print(f"  ... and {len(files) - 20} more")
    kind = kinds.get(project.targets[name].kind)
    if kind.summary is not None and out.is_dir():
        text = kind.summary(out)
        if text:
            print()
            print(text.rstrip())
    return 0


def cmd_log(args) -> int:
    """The log travels with the outputs (a blob of the action entry, pushed and pulled with
    them), so a target restored from a cache, even a colleague's, still shows how it was made."""
    project, engine = _engine(args)
    engine.close()
    name = _single_target(project, args.target)
    state = engine.store.get_state(name)
    digest = (state or {}).get("built", {}).get("log")
    last = engine.store.log_path(name)
    if args.last or not digest:
        if not last.is_file():
            raise UserError(f"{name}: no step of it has run here (`tunemake build {name}`)")
        if not args.last:
            print(f"{name} has no outputs yet; the last run here:", file=sys.stderr)
        data = last.read_bytes()
    elif engine.store.has_blob(digest):
        data = engine.store.blob_path(digest).read_bytes()
    else:
        raise UserError(f"{name}: the log of the step that made its outputs was removed by `cache gc`; "
                        f"`tunemake log {name} --last` shows the last step run here")
    sys.stdout.buffer.write(data)
    sys.stdout.flush()
    return 0


def cmd_clean(args) -> int:
    from tunemake.fsutil import rmtree

    project = _project(args)
    names = project.expand(args.targets) if args.targets else list(project.targets)
    removed = 0
    for name in names:
        out = project.output_dir(name)
        if out.exists():
            rmtree(out)
            removed += 1
    print(f"removed {removed} materialized target folder{'s' * (removed != 1)} (the cache keeps them)")
    return 0


def cmd_cache_ls(args) -> int:
    from tunemake.maintenance import human, list_actions
    from tunemake.store import Store

    project = _project(args)
    store = Store(project.cache_dir)
    actions = list_actions(store)
    total = 0
    for a in actions:
        size = sum(e["size"] for e in a.entry.get("outputs", {}).values())
        total += size
        used = time.strftime("%Y-%m-%d %H:%M", time.localtime(a.last_used))
        print(f"{a.key[:16]}  {str(a.entry.get('target')):<24} {human(size):>10}  last used {used}")
    print(f"{len(actions)} entries, {human(total)} of outputs")
    from tunemake.request_cache import stats

    answers, size = stats(store.root / "requests")
    if answers or size:
        print(f"request-level eval answers: {answers} units, {human(size)}")
    return 0


def cmd_cache_gc(args) -> int:
    from tunemake.maintenance import gc, human, parse_size
    from tunemake.store import Store

    project = _project(args)
    limit = parse_size(args.max_size) if args.max_size else None
    store = Store(project.cache_dir)
    live = {s["key"] for s in (store.get_state(n) for n in project.targets) if s}
    result = gc(store, live, limit)
    for target, key in result["evicted"]:
        print(f"evicted {key[:16]} ({target})")
    if result["answers_evicted"]:
        print(f"evicted {result['answers_evicted']} request-level eval answers (the least recently used)")
    if result["answers_error"]:
        print(f"warning: {result['answers_error']}")
    print(f"removed {result['blobs_removed']} blobs ({human(result['bytes_removed'])}); "
          f"cache holds {human(result['bytes_kept'])}")
    return 0


def cmd_cache_verify(args) -> int:
    from tunemake.maintenance import verify
    from tunemake.store import Store

    project = _project(args)
    result = verify(Store(project.cache_dir), {name: project.output_dir(name) for name in project.targets})
    for digest in result["corrupt"]:
        print(f"corrupt blob {digest[:16]}: removed")
    for target, key in result["dropped_actions"]:
        print(f"dropped cache entry {key[:16]} ({target}): it needed a removed blob; the next build redoes it")
    for name in result["removed_targets"]:
        print(f"removed targets/{name}: it was made from a corrupt blob; the next build restores or redoes it")
    print(f"checked {result['checked']} blobs: {len(result['corrupt'])} corrupt")
    answers = result["answers"]
    if answers["removed_database"]:
        print("removed the request-level eval answers: their database was unreadable (evals recompute them)")
    elif answers["unwritable"]:
        print(f"could not check the request-level eval answers ({answers['unwritable']}); left as they are")
    elif answers["checked"] or answers["repaired"]:
        print(f"checked {answers['checked']} request-level eval answers: {answers['corrupt']} corrupt"
              + (" (removed)" if answers["corrupt"] else "")
              + (f"; repaired {answers['repaired']} database inconsistencies" if answers["repaired"] else ""))
    bad = result["corrupt"] or answers["corrupt"] or answers["repaired"] or answers["removed_database"]
    return 1 if bad or answers["unwritable"] else 0


def cmd_cache_push(args) -> int:
    from tunemake.remote import CorruptBlob, RemoteError

    project, engine = _engine(args)
    if engine.remote is None:
        raise UserError("cache push: no remote cache (use --remote URL, TUNEMAKE_REMOTE or [cache] remote)")
    if engine.remote.read_only:
        raise UserError(f"cache push: {engine.remote.url} is read-only here ([cache] read_only or --no-push)")
    names = project.expand(args.targets) if args.targets else list(project.targets)
    pushed = blobs = 0
    for name in names:
        state = engine.store.get_state(name)
        entry = state and engine.store.get_action(state["key"])
        if not entry:
            print(f"  {name}: not built (or evicted from the local cache): skipped")
            continue
        try:
            blobs += engine.remote.publish(engine.store, state["key"], entry)
        except CorruptBlob as exc:
            engine.store.drop_action(state["key"])  # its blob is gone too: the next build redoes it
            print(f"  {name}: {exc}: not pushed, the next build redoes it")
            continue
        except RemoteError as exc:
            print(f"tunemake: error: {exc}", file=sys.stderr)
            return 1
        pushed += 1
    print(f"pushed {pushed} target{'s' * (pushed != 1)} ({blobs} new blobs) to {engine.remote.url}")
    return 0


def cmd_cache_pull(args) -> int:
    from tunemake.build import Options
    from tunemake.progress import PlainReporter

    project, engine = _engine(args)
    if engine.remote is None:
        raise UserError("cache pull: no remote cache (use --remote URL, TUNEMAKE_REMOTE or [cache] remote)")
    try:
        outcome = engine.build(_roots(project, args.targets), Options(pull_only=True, keep_going=True),
                               PlainReporter())
    finally:
        engine.close()
    missing = [n for n, s in outcome.status.items() if s == "skipped"]
    print(f"pulled {outcome.count('cached')}, {outcome.count('up to date')} already up to date"
          + (f", {len(missing)} in no cache: {', '.join(missing)}" if missing else ""))
    return 0 if not missing else 1


if __name__ == "__main__":
    sys.exit(main())
