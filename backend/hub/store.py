"""Getting the catalogue's model sets from the Hugging Face hub, and knowing what is installed.

``Store`` answers four questions for a set: what is here (``status``, offline), fetch it
(``get``: the hub's file list and checksums, a disk-space check, every file downloaded with
progress and resumable, verified, then placed), are the files intact (``verify``, offline) and
``remove``. Files go into the Hugging Face cache (shared with every other tool, in its own
layout) or, with ``folder``, into ``FOLDER/<repository name>/`` as plain diffusers folders.

huggingface_hub does the HTTP: its ``http_get`` (tokens, ``HF_ENDPOINT``, proxies, up to five
retries with a ``Range`` request when a connection drops) and, for the cache, ``hf_hub_download``
links each finished blob into ``snapshots/<commit>`` and writes ``refs/<revision>``. What this
module adds: the choice of files, one progress for the whole set, a check of every file against
the hub's metadata (SHA-256 for LFS files, the git blob id for small ones; a file that arrives
damaged is fetched again once, then refused), resume across runs, and one-line errors.

Resume across runs: huggingface_hub 2.x downloads into a process-unique ``<etag>.<random>
.incomplete`` and deletes it when the download fails or is interrupted (its PR #4228), so a
Ctrl+C starts that file over. Here a file is downloaded into ``blobs/<etag>.incomplete`` (the
name huggingface_hub 0.x resumed from; ``FOLDER/<name>/.incomplete/<path>`` for a folder) by
``http_get(resume_size=…)``, checked, and only then moved to its place.
"""

from __future__ import annotations

import fnmatch
import hashlib
import json
import os
import shutil
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from backend.hub.catalogue import Catalogue, ModelSet, Piece, load_catalogue, size_text

MANIFEST = ".drag-diffusion.json"  # a folder download's record of its files and checksums
PARTIAL_DIR = ".incomplete"  # where a folder download keeps unfinished files
DISK_MARGIN = 64 * 10**6  # bytes left free besides what a download needs
CHUNK = 8 * 2**20  # bytes read at a time to hash a file
WRITE_CHUNK = 2**17  # bytes a download writes (and reports) at a time: 128 KiB


# --- errors -----------------------------------------------------------------------------------

class HubError(Exception):
    """A download or check failed; the message is one line saying what to do. ``kind``:
    ``offline``, ``network``, ``gated``, ``not_found``, ``http``, ``disk``, ``corrupt``,
    ``changed``, ``catalogue``, ``cancelled``."""

    def __init__(self, message: str, kind: str) -> None:
        super().__init__(message)
        self.kind = kind


class Cancelled(HubError):
    """The download was cancelled (Ctrl+C or the plug-in's Cancel); what arrived is kept."""

    def __init__(self, message: str = "the download was cancelled") -> None:
        super().__init__(message, "cancelled")


# --- where the hub and the cache are ------------------------------------------------------------

@dataclass(frozen=True)
class Hub:
    """The hub to download from and the cache to download into; None: huggingface_hub's own
    settings (``HF_ENDPOINT``, ``HF_HUB_CACHE``/``HF_HOME``, the token of ``hf auth login`` or
    ``HF_TOKEN``)."""

    endpoint: str | None = None
    cache_dir: Path | None = None
    token: str | bool | None = None

    @property
    def url(self) -> str:
        from huggingface_hub import constants

        return (self.endpoint or constants.ENDPOINT).rstrip("/")

    @property
    def cache(self) -> Path:
        from huggingface_hub import constants

        return Path(self.cache_dir or constants.HF_HUB_CACHE).expanduser().resolve()

    def offline(self) -> bool:
        from huggingface_hub import constants

        return bool(constants.HF_HUB_OFFLINE) or os.environ.get(
            "HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")

    def repo_dir(self, repo: str) -> Path:
        return self.cache / ("models--" + repo.replace("/", "--"))


# --- what a download moves ----------------------------------------------------------------------

@dataclass(frozen=True)
class RemoteFile:
    """One file of a piece as the hub describes it at the commit being downloaded."""

    piece: Piece
    commit: str
    path: str
    size: int
    sha256: str | None  # LFS files: the content's SHA-256 (also its name in the cache)
    blob_id: str  # the git blob id; a small file's name in the cache

    @property
    def etag(self) -> str:
        """The file's name under ``blobs/`` in the cache (as the hub's ETag names it)."""
        return self.sha256 or self.blob_id


@dataclass
class Progress:
    """Where a download stands: ``done`` of ``total`` bytes (what was already here counts as
    done), the file being moved, the recent rate and the time left (None: unknown)."""

    set: str
    done: int
    total: int
    file: str = ""
    phase: str = "download"  # or "verify" (hashing a finished file)
    rate: float = 0.0
    seconds_left: float | None = None


ProgressFn = Callable[[Progress], None]
CancelFn = Callable[[], bool]


@dataclass(frozen=True)
class Outlook:
    """What a download will move, known once the hub has listed the files."""

    set: str
    files: int
    total: int  # bytes of the whole set
    to_fetch: int  # bytes still to come over the network
    resumed: int  # bytes of unfinished files that a resume keeps
    free: int  # free bytes where they go


@dataclass
class GetResult:
    set: str
    fetched: int  # bytes moved over the network this time
    total: int  # bytes of the set
    files: int
    seconds: float
    already: bool = False  # everything was here; nothing was asked of the hub


@dataclass
class PieceStatus:
    piece: Piece
    path: Path | None  # the snapshot (cache) or folder holding its files
    commit: str | None
    present: list[str] = field(default_factory=list)  # files the engine needs that are here
    missing: list[str] = field(default_factory=list)  # catalogue entries not satisfied
    bytes: int = 0

    @property
    def complete(self) -> bool:
        return self.path is not None and not self.missing


@dataclass
class SetStatus:
    set: ModelSet
    pieces: list[PieceStatus]
    partial_bytes: int = 0  # unfinished downloads waiting to be resumed

    @property
    def installed(self) -> bool:
        return all(p.complete for p in self.pieces)

    @property
    def state(self) -> str:
        if self.installed:
            return "installed"
        if any(p.present for p in self.pieces) or self.partial_bytes:
            return "partial"
        return "missing"

    @property
    def bytes(self) -> int:
        return sum(p.bytes for p in self.pieces)


@dataclass
class Problem:
    """A file ``verify`` found damaged or missing."""

    repo: str
    path: str
    what: str  # one line
    local: Path | None = None


# --- the store ------------------------------------------------------------------------------------

class Store:
    """The catalogue's sets in one place: the Hugging Face cache (default) or ``folder``."""

    def __init__(self, catalogue: Catalogue | None = None, hub: Hub | None = None,
                 folder: Path | None = None) -> None:
        self.catalogue = catalogue or load_catalogue()
        self.hub = hub or Hub()
        self.folder = Path(folder).expanduser().resolve() if folder else None
        self._lock = threading.Lock()  # one download at a time per store

    @property
    def location(self) -> Path:
        return self.folder or self.hub.cache

    def describe_location(self) -> str:
        return f"folder {self.folder}" if self.folder else f"Hugging Face cache {self.hub.cache}"

    # --- what is here (no network) ------------------------------------------------------------
    def status(self, name: str) -> SetStatus:
        model_set = self.catalogue.get(name)
        pieces = [self._piece_status(p) for p in model_set.pieces]
        partial = sum(self._partial_bytes(p) for p in model_set.pieces)
        return SetStatus(model_set, pieces, partial)

    def installed(self, name: str) -> bool:
        return self.status(name).installed

    def local_path(self, piece: Piece) -> Path | None:
        """The folder holding the piece's files (a cache snapshot or ``FOLDER/<name>``)."""
        return self._piece_folder(piece)[0]

    def _piece_folder(self, piece: Piece) -> tuple[Path | None, str | None]:
        if self.folder is not None:
            path = self.folder / piece.folder_name
            manifest = _read_manifest(path)
            return (path if path.is_dir() else None), manifest.get("commit")
        commit = _commit_of(self.hub.repo_dir(piece.repo), piece.revision)
        if commit is None:
            return None, None
        snapshot = self.hub.repo_dir(piece.repo) / "snapshots" / commit
        return (snapshot if snapshot.is_dir() else None), commit

    def _piece_status(self, piece: Piece) -> PieceStatus:
        path, commit = self._piece_folder(piece)
        status = PieceStatus(piece, path, commit)
        here = _files_in(path) if path is not None else []
        for spec in piece.files:
            chosen = _choose(spec, here)
            if chosen:
                status.present += chosen
            else:
                status.missing.append(spec if isinstance(spec, str) else spec[0])
        status.bytes = sum(_size(path / f) for f in status.present) if path else 0
        return status

    def _partial_bytes(self, piece: Piece) -> int:
        if self.folder is not None:
            root = self.folder / piece.folder_name / PARTIAL_DIR
            return sum(_size(p) for p in root.rglob("*") if p.is_file()) if root.is_dir() else 0
        blobs = self.hub.repo_dir(piece.repo) / "blobs"
        return sum(_size(p) for p in blobs.glob("*.incomplete")) if blobs.is_dir() else 0

    # --- get ------------------------------------------------------------------------------------
    def plan(self, name: str) -> list[RemoteFile]:
        """Every file of the set as the hub lists it now: sizes, checksums, the commit."""
        model_set = self.catalogue.get(name)
        return [f for piece in model_set.pieces for f in self._plan_piece(piece)]

    def _plan_piece(self, piece: Piece) -> list[RemoteFile]:
        from huggingface_hub import HfApi

        if self.hub.offline():
            raise HubError(f"cannot download {piece.repo}: HF_HUB_OFFLINE is set; unset it to "
                           "download (or download on a machine with a network and copy its "
                           "Hugging Face cache here)", "offline")
        api = HfApi(endpoint=self.hub.url, token=self.hub.token)
        try:
            info = api.model_info(piece.repo, revision=piece.revision, files_metadata=True)
        except Exception as exc:
            raise self._hub_error(exc, piece) from None
        siblings = {s.rfilename: s for s in info.siblings or []}
        files = []
        for spec in piece.files:
            chosen = _choose(spec, list(siblings))
            if not chosen:
                wanted = spec if isinstance(spec, str) else " or ".join(spec)
                raise HubError(f"{piece.repo} at {piece.revision} has no {wanted}, which the "
                               "catalogue (backend/hub/catalogue.json) lists: the repository "
                               "changed; update the catalogue", "catalogue")
            for path in chosen:
                files.append(_remote_file(piece, str(info.sha), siblings[path]))
        return files

    def get(self, name: str, progress: ProgressFn | None = None,
            cancel: CancelFn | None = None,
            on_start: Callable[[Outlook], None] | None = None) -> GetResult:
        """Download the set (what is missing of it), verified, into the store's place.
        ``on_start`` hears what will move once the hub has answered and the disk has room.
        Raises ``HubError`` (one line) or ``Cancelled``; what arrived stays for a resume."""
        started = time.monotonic()
        with self._lock:
            if self.installed(name):
                total = self.status(name).bytes
                return GetResult(name, 0, total, 0, 0.0, already=True)
            files = self.plan(name)
            todo = [f for f in files if not self._is_placed(f)]
            total = sum(f.size for f in files)
            outlook = Outlook(name, len(files), total,
                              sum(f.size - self._partial_size(f) for f in todo),
                              sum(self._partial_size(f) for f in todo), self._free_bytes())
            self._check_disk(outlook)
            if on_start is not None:
                on_start(outlook)
            meter = Meter(name, total, total - outlook.to_fetch, progress, cancel)
            fetched = 0
            for remote in todo:
                fetched += self._fetch(remote, meter)
            meter.finish()
            if not self.installed(name):  # the hub and the catalogue disagree: never silently
                raise HubError(f"{name} is still incomplete after the download: "
                               f"{self._missing_text(name)}", "changed")
        return GetResult(name, fetched, total, len(files), time.monotonic() - started)

    def _missing_text(self, name: str) -> str:
        status = self.status(name)
        return "; ".join(f"{p.piece.repo} lacks {', '.join(p.missing)}" for p in status.pieces
                         if p.missing) or "nothing missing"

    def _free_bytes(self) -> int:
        return shutil.disk_usage(_existing_parent(self.location)).free

    def _check_disk(self, outlook: Outlook) -> None:
        """Refuse before anything moves when the disk cannot take what the hub's metadata says
        is still to come."""
        if outlook.to_fetch + DISK_MARGIN > outlook.free:
            raise HubError(f"not enough disk space for {outlook.set} in {self.location}: it "
                           f"needs {size_text(outlook.to_fetch)} more and "
                           f"{size_text(outlook.free)} are free; free some space, or download "
                           "to another disk with --to FOLDER (or set HF_HOME there)", "disk")

    # --- one file ---------------------------------------------------------------------------
    def _final_path(self, remote: RemoteFile) -> Path:
        if self.folder is not None:
            return self.folder / remote.piece.folder_name / remote.path
        return self.hub.repo_dir(remote.piece.repo) / "snapshots" / remote.commit / remote.path

    def _blob_path(self, remote: RemoteFile) -> Path:
        return self.hub.repo_dir(remote.piece.repo) / "blobs" / remote.etag

    def _partial_path(self, remote: RemoteFile) -> Path:
        if self.folder is not None:
            return self.folder / remote.piece.folder_name / PARTIAL_DIR / remote.path
        return self._blob_path(remote).with_name(remote.etag + ".incomplete")

    def _partial_size(self, remote: RemoteFile) -> int:
        size = _size(self._partial_path(remote))
        return size if size <= remote.size else 0

    def _is_placed(self, remote: RemoteFile) -> bool:
        final = self._final_path(remote)
        if not final.is_file() or _size(final) != remote.size:
            return False
        if self.folder is not None:
            recorded = _read_manifest(self.folder / remote.piece.folder_name)
            return recorded.get("files", {}).get(remote.path, {}).get("etag") == remote.etag
        return final.resolve().name == remote.etag or not final.is_symlink()

    def _fetch(self, remote: RemoteFile, meter: Meter) -> int:
        """Bring one file into place, verified; returns the bytes moved over the network."""
        if self.folder is None and self._blob_path(remote).is_file():
            self._link(remote)  # the same content is already in the cache (another commit)
            return 0
        fetched = 0
        for attempt in (1, 2):
            fetched += self._download(remote, meter)
            meter.show(remote.path, "verify")
            if self._digest_matches(self._partial_path(remote), remote):
                break
            self._partial_path(remote).unlink(missing_ok=True)
            meter.rewind(remote.size)
            if attempt == 2:
                raise HubError(f"{remote.path} of {remote.piece.repo} arrived damaged twice (its "
                               "checksum differs from the hub's); try again later, and report it "
                               "if it persists", "corrupt")
        self._place(remote)
        return fetched

    def _download(self, remote: RemoteFile, meter: Meter) -> int:
        from huggingface_hub import constants, hf_hub_url
        from huggingface_hub.file_download import http_get
        from huggingface_hub.utils import build_hf_headers

        # http_get writes and reports in pieces of DOWNLOAD_CHUNK_SIZE (10 MiB): an
        # interruption would lose up to that much, and on a slow line the bar would stand
        # still for a minute. 128 KiB: a report every half second at 250 kB/s; at 1 GB/s the
        # 8,000 chunks a second cost the meter about 1 % of a core (Meter.INTERVAL throttles
        # what is sent).
        constants.DOWNLOAD_CHUNK_SIZE = min(constants.DOWNLOAD_CHUNK_SIZE, WRITE_CHUNK)

        partial = self._partial_path(remote)
        partial.parent.mkdir(parents=True, exist_ok=True)
        resume = self._partial_size(remote)
        if resume == 0:
            partial.unlink(missing_ok=True)
        url = hf_hub_url(remote.piece.repo, remote.path, revision=remote.commit,
                         endpoint=self.hub.url)
        headers = build_hf_headers(token=self.hub.token)
        meter.show(remote.path, "download")
        before = meter.done
        try:
            with open(partial, "ab") as out:
                http_get(url, out, resume_size=resume, headers=headers,
                         expected_size=remote.size, tqdm_class=meter.bar_class())
        except (HubError, KeyboardInterrupt):
            raise
        except Exception as exc:
            raise self._hub_error(exc, remote.piece) from None
        # A server that ignored the Range sent the whole file again: count it once.
        meter.state.done = min(meter.state.done, before + remote.size - resume)
        return meter.done - before

    def _digest_matches(self, path: Path, remote: RemoteFile) -> bool:
        if _size(path) != remote.size:
            return False
        return file_digest(path, git=remote.sha256 is None) == remote.etag

    def _place(self, remote: RemoteFile) -> None:
        partial, final = self._partial_path(remote), self._final_path(remote)
        if self.folder is not None:
            final.parent.mkdir(parents=True, exist_ok=True)
            os.replace(partial, final)
            _record(self.folder / remote.piece.folder_name, remote)
            return
        blob = self._blob_path(remote)
        os.replace(partial, blob)
        self._link(remote)

    def _link(self, remote: RemoteFile) -> None:
        """huggingface_hub puts a blob that is already in the cache into ``snapshots`` and
        writes ``refs`` (it asks the hub which commit the revision is, without a transfer)."""
        from huggingface_hub import hf_hub_download

        try:
            path = hf_hub_download(remote.piece.repo, remote.path,
                                   revision=remote.piece.revision, cache_dir=self.hub.cache,
                                   endpoint=self.hub.url, token=self.hub.token)
        except Exception as exc:
            raise self._hub_error(exc, remote.piece) from None
        if not Path(path).as_posix().endswith(f"/snapshots/{remote.commit}/{remote.path}"):
            raise HubError(f"{remote.piece.repo} changed on the hub during the download (now at "
                           f"{Path(path).parent.name}); run the command again", "changed")

    # --- verify and remove ------------------------------------------------------------------
    def verify(self, name: str, progress: ProgressFn | None = None) -> list[Problem]:
        """Hash every file of the set against what it should be (no network: a cache blob is
        named by its checksum; a folder keeps them in its manifest)."""
        problems = []
        status = self.status(name)
        paths = [(p, f) for p in status.pieces for f in p.present]
        total = sum(_size(p.path / f) for p, f in paths if p.path)
        meter = Meter(name, total, 0, progress, None)
        for piece_status, rel in paths:
            assert piece_status.path is not None
            local = piece_status.path / rel
            meter.show(rel, "verify")
            expected = self._expected_etag(piece_status, rel, local)
            if expected is None:
                problems.append(Problem(piece_status.piece.repo, rel, "no checksum to compare "
                                        "with (not downloaded by this tool)", local))
            elif file_digest(local, git=len(expected) == 40) != expected:
                problems.append(Problem(piece_status.piece.repo, rel, "damaged: its checksum "
                                        "differs from the hub's", local))
            meter.advance(_size(local))
        for piece_status in status.pieces:
            problems += [Problem(piece_status.piece.repo, m, "missing") for m in
                         piece_status.missing]
        return problems

    def _expected_etag(self, status: PieceStatus, rel: str, local: Path) -> str | None:
        if self.folder is not None:
            assert status.path is not None
            return _read_manifest(status.path).get("files", {}).get(rel, {}).get("etag")
        name = local.resolve().name
        return name if len(name) in (40, 64) and all(c in "0123456789abcdef" for c in name) \
            else None

    def repair(self, problems: list[Problem]) -> None:
        """Delete the damaged files ``verify`` found, so that ``get`` fetches them again."""
        for problem in problems:
            if problem.local is None:
                continue
            target = problem.local.resolve()
            problem.local.unlink(missing_ok=True)
            if self.folder is None and target.parent.name == "blobs":
                target.unlink(missing_ok=True)

    def remove(self, name: str) -> int:
        """Delete the set's files (in the cache: every cached revision of its repositories,
        and unfinished downloads); returns the bytes freed."""
        model_set = self.catalogue.get(name)
        freed = 0
        for piece in model_set.pieces:
            if self._shared_with_another_set(name, piece):
                continue
            root = (self.folder / piece.folder_name if self.folder is not None
                    else self.hub.repo_dir(piece.repo))
            if root.is_dir():
                freed += sum(_size(p) for p in root.rglob("*") if p.is_file() and
                             not p.is_symlink())
                shutil.rmtree(root)
        return freed

    def _shared_with_another_set(self, name: str, piece: Piece) -> bool:
        return any(other.name != name and self.installed(other.name)
                   and any(p.repo == piece.repo for p in other.pieces)
                   for other in self.catalogue.sets.values())

    # --- errors ---------------------------------------------------------------------------
    def _hub_error(self, exc: Exception, piece: Piece) -> HubError:
        from huggingface_hub import errors

        page = f"{self.hub.url}/{piece.repo}"
        status = getattr(getattr(exc, "response", None), "status_code", None)
        if isinstance(exc, (errors.OfflineModeIsEnabled,)):
            return HubError(f"cannot download {piece.repo}: HF_HUB_OFFLINE is set; unset it "
                            "to download", "offline")
        if isinstance(exc, errors.GatedRepoError) or (status == 403):
            return HubError(f"{piece.repo} is gated: open {page}, log in and accept its licence "
                            f"({piece.licence}), then log in here with `hf auth login` (or set "
                            "HF_TOKEN) and run the download again", "gated")
        if isinstance(exc, errors.RepositoryNotFoundError) or status == 401:
            return HubError(f"the hub at {self.hub.url} refused {piece.repo} (HTTP {status}: not "
                            "found, or private): check the name, or log in with `hf auth login` "
                            "(or set HF_TOKEN) if you have access", "not_found")
        if isinstance(exc, errors.HfHubHTTPError) and status is not None:
            return HubError(f"the hub at {self.hub.url} answered HTTP {status} for "
                            f"{piece.repo}; try again later (the download resumes where it "
                            "stopped)", "http")
        if _is_network_error(exc):
            return HubError(f"cannot reach the Hugging Face hub at {self.hub.url} "
                            f"({_first_line(exc)}): check the network connection (or HF_ENDPOINT "
                            "and the proxy settings), then run the download again: it resumes "
                            "where it stopped", "network")
        return HubError(f"downloading {piece.repo} failed: {type(exc).__name__}: "
                        f"{_first_line(exc)}", "http")


# --- progress -----------------------------------------------------------------------------------

class Meter:
    """One progress for a whole set, fed by huggingface_hub's per-file progress bars (it calls
    ``bar_class()`` like a tqdm class) and checking ``cancel`` at every chunk. The rate and
    time left come from the last ``WINDOW`` seconds."""

    WINDOW = 5.0
    INTERVAL = 0.1  # seconds between reports (the first, phase changes and the last always)

    def __init__(self, name: str, total: int, done: int, report: ProgressFn | None,
                 cancel: CancelFn | None) -> None:
        self.state = Progress(name, done, total)
        self.report = report
        self.cancel = cancel
        self._samples: deque[tuple[float, int]] = deque([(time.monotonic(), done)])
        self._last = 0.0
        self._send(force=True)

    @property
    def done(self) -> int:
        return self.state.done

    def show(self, file: str, phase: str) -> None:
        self.state.file, self.state.phase = file, phase
        self._send(force=True)

    def advance(self, n: int) -> None:
        if self.cancel is not None and self.cancel():
            raise Cancelled()
        self.state.done = max(0, self.state.done + n)
        now = time.monotonic()
        self._samples.append((now, self.state.done))
        while len(self._samples) > 2 and now - self._samples[0][0] > self.WINDOW:
            self._samples.popleft()
        self._send()

    def rewind(self, n: int) -> None:
        """A damaged file is fetched again: its bytes count again."""
        self.state.done = max(0, self.state.done - n)
        self._samples = deque([(time.monotonic(), self.state.done)])

    def finish(self) -> None:
        self.state.done = self.state.total
        self.state.seconds_left = 0.0
        self._send(force=True)

    def _send(self, force: bool = False) -> None:
        now = time.monotonic()
        (t0, d0), (t1, d1) = self._samples[0], self._samples[-1]
        self.state.rate = (d1 - d0) / (t1 - t0) if t1 - t0 > 0.2 else self.state.rate
        left = self.state.total - self.state.done
        self.state.seconds_left = left / self.state.rate if self.state.rate > 0 else None
        if self.report is not None and (force or now - self._last >= self.INTERVAL):
            self._last = now
            self.report(Progress(**vars(self.state)))

    def bar_class(self) -> type:
        meter = self

        class Bar:
            """What huggingface_hub's ``http_get`` needs of a tqdm class."""

            def __init__(self, *args: Any, **kwargs: Any) -> None:
                pass

            def update(self, n: int = 1) -> None:
                meter.advance(int(n))

            def close(self) -> None:
                pass

            def __enter__(self) -> Bar:
                return self

            def __exit__(self, *exc: object) -> None:
                pass

        return Bar


# --- small helpers --------------------------------------------------------------------------------

def file_digest(path: Path, git: bool = False) -> str:
    """SHA-256 of the file (an LFS file's id), or with ``git`` its git blob id (SHA-1 of
    ``blob <size>\\0`` and the content): what the hub names a small file by."""
    digest = hashlib.sha1(usedforsecurity=False) if git else hashlib.sha256()
    if git:
        digest.update(f"blob {_size(path)}\0".encode())
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _remote_file(piece: Piece, commit: str, sibling: Any) -> RemoteFile:
    lfs = sibling.lfs
    size = int(lfs.size if lfs else sibling.size if sibling.size is not None else -1)
    blob_id = sibling.blob_id
    if size < 0 or not (lfs or blob_id):
        raise HubError(f"the hub gave no size or checksum for {sibling.rfilename} of "
                       f"{piece.repo}; cannot verify it", "http")
    return RemoteFile(piece, commit, sibling.rfilename, size, lfs.sha256 if lfs else None,
                      str(blob_id or ""))


def _choose(spec: str | tuple[str, ...], names: list[str]) -> list[str]:
    """The names a catalogue entry takes from ``names``: a path itself, every match of a glob,
    the first alternative there is."""
    if isinstance(spec, tuple):
        return next(([alt] for alt in spec if alt in names), [])
    if any(c in spec for c in "*?["):
        return sorted(n for n in names if fnmatch.fnmatchcase(n, spec))
    return [spec] if spec in names else []


def _files_in(folder: Path) -> list[str]:
    """The files under ``folder`` (relative, ``/``-separated), leaving out dot-folders such as
    a folder download's ``.incomplete`` and huggingface_hub's ``.cache``."""
    found = []
    for path in folder.rglob("*"):
        rel = path.relative_to(folder)
        if rel.parts[0].startswith(".") or not path.is_file():
            continue
        found.append(rel.as_posix())
    return found


def _commit_of(repo_dir: Path, revision: str) -> str | None:
    if len(revision) == 40 and (repo_dir / "snapshots" / revision).is_dir():
        return revision
    ref = repo_dir / "refs" / revision
    try:
        return ref.read_text().strip() or None
    except OSError:
        return None


def _read_manifest(folder: Path) -> dict[str, Any]:
    try:
        data = json.loads((folder / MANIFEST).read_text("utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _record(folder: Path, remote: RemoteFile) -> None:
    """Add a finished file to a folder download's manifest (written under a new name, then
    renamed)."""
    data = _read_manifest(folder)
    if data.get("commit") != remote.commit:
        data = {"repo": remote.piece.repo, "commit": remote.commit, "files": {}}
    data["files"][remote.path] = {"size": remote.size, "etag": remote.etag}
    tmp = folder / (MANIFEST + ".tmp")
    tmp.write_text(json.dumps(data, indent=1), "utf-8")
    os.replace(tmp, folder / MANIFEST)


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except OSError:
        return 0


def _existing_parent(path: Path) -> Path:
    path = path.resolve()
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def _is_network_error(exc: BaseException) -> bool:
    """A connection that failed or dropped (httpx's transport errors, OSError, or
    huggingface_hub's "couldn't reach the hub")."""
    names = {cls.__name__ for cls in type(exc).__mro__}
    return bool(names & {"TransportError", "TimeoutException", "LocalEntryNotFoundError"}) or \
        isinstance(exc, (OSError, ConnectionError))


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return (text.splitlines()[0][:200] if text else type(exc).__name__)
