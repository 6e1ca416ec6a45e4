"""``python -m backend models list|get|verify|remove``: the catalogue's model sets on this machine.

``get`` shows one progress bar per set (bytes, rate, time left); Ctrl+C keeps what arrived and
the same command resumes. Every failure is one ``error:`` line saying what to do (exit 1);
an interrupted download exits 130.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from backend.hub.catalogue import ROLES, CatalogueError, ModelSet, load_catalogue, size_text
from backend.hub.store import GetResult, HubError, Outlook, Progress, SetStatus, Store

DOCS = "docs/models.md"


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "models", help="list, download, verify or remove the model sets (SD1.5, instant, …)",
        description="The model sets the backend runs on: what is installed where, download "
        "with progress (resumable, checked against the hub's SHA-256), verify, remove. "
        f"Files go into the Hugging Face cache (HF_HOME), or --to a folder. See {DOCS}.")
    verbs = p.add_subparsers(dest="verb", metavar="VERB")

    ls = verbs.add_parser("list", help="the sets, where they are, what each method runs on")
    ls.add_argument("--folder", type=Path, help="look in this folder (one that get --to "
                    "filled) instead of the Hugging Face cache")
    ls.add_argument("--json", action="store_true", help="print it as JSON")
    ls.set_defaults(func=run_list)

    get = verbs.add_parser("get", help="download sets (resumable; checked by SHA-256)")
    get.add_argument("names", nargs="+", metavar="NAME", help="set names (see list)")
    get.add_argument("--to", "--folder", dest="folder", type=Path,
                     help="download into this folder (one sub-folder per repository) instead "
                     "of the Hugging Face cache")
    get.set_defaults(func=run_get)

    verify = verbs.add_parser("verify", help="check the installed files against their "
                              "checksums (offline)")
    verify.add_argument("names", nargs="*", metavar="NAME", help="sets (default: all installed)")
    verify.add_argument("--folder", type=Path, help="the folder get --to filled")
    verify.add_argument("--repair", action="store_true",
                        help="delete damaged files and download them again")
    verify.set_defaults(func=run_verify)

    remove = verbs.add_parser("remove", help="delete a set's files")
    remove.add_argument("names", nargs="+", metavar="NAME")
    remove.add_argument("--folder", type=Path, help="the folder get --to filled")
    remove.set_defaults(func=run_remove)
    p.set_defaults(func=lambda args: p.print_help() or 2)


def _store(args: argparse.Namespace) -> Store:
    from backend.cli import UsageError

    try:
        store = Store(load_catalogue(), folder=getattr(args, "folder", None))
        for name in getattr(args, "names", []):
            store.catalogue.get(name)
    except CatalogueError as exc:
        raise UsageError(str(exc)) from None
    return store


# --- list -------------------------------------------------------------------------------------

def run_list(args: argparse.Namespace) -> int:
    store = _store(args)
    statuses = {name: store.status(name) for name in store.catalogue.names()}
    if args.json:
        print(json.dumps(list_json(store, statuses), indent=1))
        return 0
    print(f"Model sets in the {store.describe_location()}:")
    for status in statuses.values():
        print(_set_line(status))
        for piece in status.pieces:
            where = f"{piece.path}" if piece.path else "not here"
            print(f"      {piece.piece.repo} ({piece.piece.licence}): {where}")
    print("What each method runs on now:")
    installed = {n for n, s in statuses.items() if s.installed}
    for method, text in method_lines(store, installed).items():
        print(f"  {method:<14}{text}")
    return 0


def _set_line(status: SetStatus) -> str:
    model_set = status.set
    if status.state == "installed":
        state, size = "installed", size_text(status.bytes)
    elif status.state == "partial":
        state = "partial"
        size = (f"{size_text(status.bytes + status.partial_bytes)} of about "
                f"{size_text(model_set.approx_bytes)}; `models get {model_set.name}` resumes")
    else:
        state, size = "not installed", f"about {size_text(model_set.approx_bytes)}"
    return f"  {model_set.name:<11} {state:<14} {size:<10}  {model_set.title}"


def method_lines(store: Store, installed: set[str]) -> dict[str, str]:
    """One line per method: the set it runs on now, and a better one to get."""
    lines = {}
    for method, names in store.catalogue.methods.items():
        uses = next((n for n in names if n in installed), None)
        best = store.catalogue.get(names[0])
        get_best = (f"python -m backend models get {best.name} (about "
                    f"{size_text(best.approx_bytes)})")
        if uses == names[0]:
            lines[method] = f"{uses} ({store.catalogue.get(uses).title})"
        elif uses is not None:
            lines[method] = f"{uses}, as a stand-in; for the real setup: {get_best}"
        else:
            lines[method] = f"nothing installed (the backend serves its demo model): {get_best}"
    return lines


def list_json(store: Store, statuses: dict[str, SetStatus]) -> dict[str, Any]:
    return {
        "location": str(store.location),
        "sets": {name: {"title": s.set.title, "state": s.state, "bytes": s.bytes,
                        "partial_bytes": s.partial_bytes, "approx_bytes": s.set.approx_bytes,
                        "licence": s.set.licence, "methods": list(s.set.methods),
                        "pieces": [{"role": p.piece.role, "repo": p.piece.repo,
                                    "path": str(p.path) if p.path else None,
                                    "commit": p.commit, "missing": p.missing}
                                   for p in s.pieces]}
                 for name, s in statuses.items()},
        "methods": {m: list(n) for m, n in store.catalogue.methods.items()},
    }


# --- get --------------------------------------------------------------------------------------

class Bar:
    """One tqdm bar per set, fed by the store's ``Progress`` reports."""

    def __init__(self, model_set: ModelSet) -> None:
        self.model_set = model_set
        self.bar = None
        self.last: Progress | None = None

    def start(self, outlook: Outlook) -> None:
        resumed = f", resuming {size_text(outlook.resumed)} already here" if outlook.resumed \
            else ""
        print(f"{self.model_set.name}: {outlook.files} files, {size_text(outlook.total)}"
              f" ({size_text(outlook.to_fetch)} to download{resumed}; "
              f"{size_text(outlook.free)} free)", file=sys.stderr, flush=True)

    def __call__(self, progress: Progress) -> None:
        from tqdm import tqdm

        self.last = progress
        if self.bar is None:
            self.bar = tqdm(total=progress.total, initial=progress.done, unit="B",
                            unit_scale=True, unit_divisor=1000, desc=self.model_set.name,
                            dynamic_ncols=True, file=sys.stderr)
        self.bar.update(progress.done - self.bar.n)
        verb = "checking" if progress.phase == "verify" else ""
        self.bar.set_postfix_str(f"{verb} {progress.file}".strip()[-48:], refresh=False)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


def run_get(args: argparse.Namespace) -> int:
    store = _store(args)
    for name in args.names:
        model_set = store.catalogue.get(name)
        print(f"{name}: {model_set.title}; licence {model_set.licence} "
              f"({', '.join(p.page for p in model_set.pieces)})", file=sys.stderr)
        bar = Bar(model_set)
        try:
            result = store.get(name, progress=bar, on_start=bar.start)
        except KeyboardInterrupt:
            bar.close()
            done = f"{size_text(bar.last.done)} of {size_text(bar.last.total)}" if bar.last \
                else "what arrived"
            print(f"interrupted: {done} kept; run `python -m backend models get {name}` "
                  "again to resume", file=sys.stderr)
            return 130
        except HubError as exc:
            bar.close()
            print(f"error: {exc}", file=sys.stderr)
            return 1
        bar.close()
        print(_got_line(store, result))
    print(_next_step(store, args.names))
    return 0


def _got_line(store: Store, result: GetResult) -> str:
    if result.already:
        return (f"{result.set}: already installed ({size_text(result.total)} in the "
                f"{store.describe_location()}); `models verify {result.set}` checks it")
    rate = result.fetched / result.seconds if result.seconds > 0 else 0.0
    return (f"{result.set}: installed, {result.files} files ({size_text(result.total)}) "
            f"checked against the hub's checksums; {size_text(result.fetched)} downloaded in "
            f"{result.seconds:.1f} s ({size_text(rate)}/s) into the "
            f"{store.describe_location()}")


def _next_step(store: Store, names: list[str]) -> str:
    if store.folder is None:
        return ("The backend serves them from its next start (the plug-in's Download button "
                "loads them into a running backend without a restart).")
    options = []
    for name in names:
        for piece in store.catalogue.get(name).pieces:
            options.append(f"{ROLES[piece.role]} {store.folder / piece.folder_name}")
    return "Serve them with: python -m backend serve " + " ".join(options)


# --- verify and remove ------------------------------------------------------------------------

def run_verify(args: argparse.Namespace) -> int:
    store = _store(args)
    names = args.names or [n for n in store.catalogue.names() if store.status(n).state !=
                           "missing"]
    if not names:
        print(f"nothing installed in the {store.describe_location()}")
        return 0
    bad = 0
    for name in names:
        status = store.status(name)
        if status.state == "missing":
            print(f"{name}: not installed")
            bad += 1
            continue
        problems = store.verify(name)
        if not problems:
            print(f"{name}: {sum(len(p.present) for p in status.pieces)} files intact "
                  f"({size_text(status.bytes)}, checksums match)")
            continue
        bad += 1
        for problem in problems:
            print(f"{name}: {problem.repo} {problem.path}: {problem.what}")
        if args.repair:
            store.repair(problems)
            print(f"{name}: damaged files deleted; downloading them again", file=sys.stderr)
            code = run_get(argparse.Namespace(names=[name], folder=args.folder))
            if code:
                return code
            bad -= 1
        else:
            print(f"{name}: run `python -m backend models verify {name} --repair` to fetch "
                  "the damaged or missing files again")
    return 1 if bad else 0


def run_remove(args: argparse.Namespace) -> int:
    store = _store(args)
    for name in args.names:
        freed = store.remove(name)
        if freed:
            print(f"{name}: removed from the {store.describe_location()} "
                  f"({size_text(freed)} freed)")
        else:
            print(f"{name}: nothing to remove in the {store.describe_location()}")
    return 0
