"""A Hugging Face hub on loopback for the download tests: tiny random models over real HTTP.

``LocalHub`` is a stdlib ``http.server`` in a thread that answers what huggingface_hub 2.4
asks when ``HF_ENDPOINT`` points at it (read in its ``hf_api.model_info`` and
``file_download``):

- ``GET /api/models/<repo>[/revision/<rev>]?blobs=True``: the commit (``sha``) and every file
  (``siblings``) with its size, git blob id and, for weights, LFS metadata (its SHA-256); any
  other API path (such as ``snapshot_download``'s ``/tree/<rev>`` listing) answers 404, not
  the model info: given the info's JSON object, huggingface_hub read it as the tree's list and
  failed with "string indices must be integers";
- ``HEAD``/``GET /<repo>/resolve/<rev>/<path>``: the file, with ``X-Repo-Commit``, ``ETag``
  (the git blob id; for LFS files ``X-Linked-Etag`` = the SHA-256 and ``X-Linked-Size``),
  ``Content-Length``, and ``Range: bytes=N-`` answered ``206`` with ``Content-Range``;
- a gated repository answers ``401`` (no token) or ``403`` (another token) with
  ``X-Error-Code: GatedRepo``; an unknown one ``401`` with ``X-Error-Code: RepoNotFound``.

Faults for the tests, per file path: ``cut`` (send that many bytes, then drop the connection),
``corrupt`` (flip a byte in the next N deliveries), ``rate`` (bytes per second), ``advertise``
(a size to claim in the model info, for the disk-space check). ``requests`` logs every request
as ``(method, repo, path, range header)``.

``tiny_repos`` builds the repositories from configs (backend/engine/random_tiny.py) in the
layouts of the real ones: fp16 and fp32 weights side by side (the catalogue takes the fp16
ones), files the engine does not load (a .bin, a safety checker, a whole-model checkpoint), and
SD1.5-inpainting's ``model_index.json`` naming the feature extractor and safety checker it does
not ship with the download.
"""

from __future__ import annotations

import hashlib
import http.server
import json
import threading
import time
import urllib.parse
from dataclasses import dataclass, field
from pathlib import Path

GOOD_TOKEN = "hf_test_token_that_may_read_gated_repos"
LFS_SUFFIXES = (".safetensors", ".bin", ".ckpt", ".pt")


@dataclass
class Repo:
    files: dict[str, bytes]
    gated: bool = False
    commit: str = ""

    def __post_init__(self) -> None:
        if not self.commit:
            digest = hashlib.sha1(usedforsecurity=False)
            for path in sorted(self.files):
                digest.update(path.encode() + hashlib.sha256(self.files[path]).digest())
            self.commit = digest.hexdigest()


@dataclass
class Faults:
    cut: dict[str, int] = field(default_factory=dict)  # path → bytes sent before dropping (once)
    corrupt: dict[str, int] = field(default_factory=dict)  # path → deliveries left to damage
    rate: dict[str, float] = field(default_factory=dict)  # path → bytes per second
    advertise: dict[str, int] = field(default_factory=dict)  # path → size claimed in model info


def is_lfs(path: str) -> bool:
    return path.endswith(LFS_SUFFIXES)


def git_blob_id(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data, usedforsecurity=False).hexdigest()


class LocalHub:
    """``with LocalHub(repos) as hub:`` serves them at ``hub.url`` until the block ends."""

    def __init__(self, repos: dict[str, Repo]) -> None:
        self.repos = repos
        self.faults = Faults()
        self.requests: list[tuple[str, str, str, str | None]] = []
        self.lock = threading.Lock()
        hub = self

        class Handler(_Handler):
            owner = hub

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True,
                                       name="local-hub")

    @property
    def url(self) -> str:
        host, port = self.server.server_address[:2]
        return f"http://{host}:{port}"

    def __enter__(self) -> LocalHub:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()

    def gets(self, path: str) -> list[str | None]:
        """The Range headers of the GETs of ``path`` (None: the whole file)."""
        return [r for m, _, p, r in self.requests if m == "GET" and p == path]

    def log(self, method: str, repo: str, path: str, byte_range: str | None) -> None:
        with self.lock:
            self.requests.append((method, repo, path, byte_range))


class _Handler(http.server.BaseHTTPRequestHandler):
    owner: LocalHub

    def log_message(self, *args: object) -> None:  # quiet
        pass

    # --- routing --------------------------------------------------------------------------------
    def do_GET(self) -> None:
        self._route(body=True)

    def do_HEAD(self) -> None:
        self._route(body=False)

    def _route(self, body: bool) -> None:
        url = urllib.parse.urlsplit(self.path)
        parts = [urllib.parse.unquote(p) for p in url.path.strip("/").split("/")]
        if parts[:2] == ["api", "models"] and (len(parts) == 4 or (len(parts) == 6 and
                                                                   parts[4] == "revision")):
            self._model_info("/".join(parts[2:4]), body)
        elif len(parts) >= 5 and parts[2] == "resolve":
            self._resolve("/".join(parts[:2]), parts[3], "/".join(parts[4:]), body)
        else:
            self._error(404, "RepoNotFound", "no such endpoint on the test hub", body)

    def _repo(self, repo_id: str, body: bool) -> Repo | None:
        repo = self.owner.repos.get(repo_id)
        if repo is None:
            self._error(401, "RepoNotFound", "Repository not found", body)
            return None
        if repo.gated:
            token = self.headers.get("Authorization", "")
            if not token:
                self._error(401, "GatedRepo", f"Access to model {repo_id} is restricted. You "
                            "must have access to it and be authenticated to access it.", body)
                return None
            if token != f"Bearer {GOOD_TOKEN}":
                self._error(403, "GatedRepo", f"Access to model {repo_id} is restricted and you "
                            "are not in the authorized list.", body)
                return None
        return repo

    # --- the API ----------------------------------------------------------------------------------
    def _model_info(self, repo_id: str, body: bool) -> None:
        self.owner.log("INFO", repo_id, "", None)
        repo = self._repo(repo_id, body)
        if repo is None:
            return
        siblings = []
        for path, data in sorted(repo.files.items()):
            size = self.owner.faults.advertise.get(path, len(data))
            entry = {"rfilename": path, "size": size, "blobId": git_blob_id(data)}
            if is_lfs(path):
                entry["lfs"] = {"size": size, "sha256": hashlib.sha256(data).hexdigest(),
                                "pointerSize": 134}
            siblings.append(entry)
        payload = json.dumps({"id": repo_id, "modelId": repo_id, "sha": repo.commit,
                              "private": False, "gated": "manual" if repo.gated else False,
                              "siblings": siblings}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        if body:
            self.wfile.write(payload)

    def _resolve(self, repo_id: str, revision: str, path: str, body: bool) -> None:
        byte_range = self.headers.get("Range")
        self.owner.log("GET" if body else "HEAD", repo_id, path, byte_range)
        repo = self._repo(repo_id, body)
        if repo is None:
            return
        if revision not in ("main", repo.commit):
            self._error(404, "RevisionNotFound", f"no revision {revision}", body)
            return
        data = repo.files.get(path)
        if data is None:
            self._error(404, "EntryNotFound", f"{path} not in {repo_id}", body)
            return
        start = _range_start(byte_range)
        size = len(data)
        status = 206 if start else 200
        self.send_response(status)
        self.send_header("X-Repo-Commit", repo.commit)
        self.send_header("ETag", f'"{git_blob_id(data)}"')
        if is_lfs(path):
            self.send_header("X-Linked-Etag", f'"{hashlib.sha256(data).hexdigest()}"')
            self.send_header("X-Linked-Size", str(size))
        self.send_header("Accept-Ranges", "bytes")
        self.send_header("Content-Length", str(size - start))
        if start:
            self.send_header("Content-Range", f"bytes {start}-{size - 1}/{size}")
        self.end_headers()
        if body:
            self._send_body(path, data, start)

    def _send_body(self, path: str, data: bytes, start: int) -> None:
        faults, lock = self.owner.faults, self.owner.lock
        with lock:
            cut = faults.cut.pop(path, None)
            damage = faults.corrupt.get(path, 0) > 0
            if damage:
                faults.corrupt[path] -= 1
        payload = bytearray(data[start:])
        if damage and payload:
            payload[len(payload) // 2] ^= 0xFF
        end = len(payload) if cut is None else max(0, min(len(payload), cut - start))
        step = 16384
        for offset in range(0, end, step):
            chunk = payload[offset:min(end, offset + step)]
            try:
                self.wfile.write(chunk)
                self.wfile.flush()
            except OSError:  # the client went away (a cancelled or interrupted download)
                return
            rate = faults.rate.get(path)
            if rate:
                time.sleep(len(chunk) / rate)
        if cut is not None:
            self.close_connection = True
            self.connection.shutdown(2)  # drop it: the client sees a truncated body

    def _error(self, status: int, code: str, message: str, body: bool) -> None:
        payload = json.dumps({"error": message}).encode()
        self.send_response(status)
        self.send_header("X-Error-Code", code)
        self.send_header("X-Error-Message", message)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        if body:
            self.wfile.write(payload)


def _range_start(header: str | None) -> int:
    if not header or not header.startswith("bytes="):
        return 0
    first = header[len("bytes="):].split(",")[0].split("-")[0]
    return int(first) if first.isdigit() else 0


# --- the tiny repositories --------------------------------------------------------------------------

TINY = {  # catalogue repo → the test hub's repo that stands in for it
    "stable-diffusion-v1-5/stable-diffusion-v1-5": "tiny/sd15",
    "stable-diffusion-v1-5/stable-diffusion-inpainting": "tiny/sd15-inpainting",
    "latent-consistency/lcm-lora-sdv1-5": "tiny/lcm-lora-sdv1-5",
    "madebyollin/taesd": "tiny/taesd",
}


def _read_folder(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def _with_fp16_variants(pipe, folder: Path) -> None:
    """Save ``pipe`` as the real repositories hold it: fp32 weights and fp16 variants."""
    import torch

    pipe.save_pretrained(folder, safe_serialization=True)
    pipe.to(torch.float16).save_pretrained(folder, safe_serialization=True, variant="fp16")


def tiny_repos(workdir: Path) -> dict[str, Repo]:
    """The tiny stand-ins of the catalogue's sd15 and instant repositories (and a gated one)."""
    from backend.engine.random_tiny import (
        build_tiny_inpaint_pipeline,
        build_tiny_pipeline,
        make_tiny_lcm_lora,
        make_tiny_taesd,
    )

    workdir.mkdir(parents=True, exist_ok=True)
    sd15 = workdir / "sd15"
    _with_fp16_variants(build_tiny_pipeline(seed=1), sd15)
    sd15_files = _read_folder(sd15)
    sd15_files.update({  # what the download must leave on the hub
        "README.md": b"# tiny stand-in for stable-diffusion-v1-5\n",
        "v1-5-pruned-emaonly.safetensors": bytes(range(256)) * 400,
        "unet/diffusion_pytorch_model.bin": b"pickle, never downloaded" * 10,
        "safety_checker/config.json": b"{}",
        "safety_checker/model.fp16.safetensors": b"\0" * 4096,
    })

    inpainting = workdir / "sd15-inpainting"
    _with_fp16_variants(build_tiny_inpaint_pipeline("sd15", seed=2), inpainting)
    inpaint_files = _read_folder(inpainting)
    index = json.loads(inpaint_files["model_index.json"])
    index.update(feature_extractor=["transformers", "CLIPImageProcessor"],
                 safety_checker=["stable_diffusion", "StableDiffusionSafetyChecker"])
    inpaint_files["model_index.json"] = json.dumps(index, indent=2).encode()
    inpaint_files["feature_extractor/preprocessor_config.json"] = b'{"crop_size": 224}'

    lora = _read_folder(make_tiny_lcm_lora(workdir / "lcm-lora", "sd15", seed=3))
    taesd = _read_folder(make_tiny_taesd(workdir / "taesd", seed=4))
    taesd["diffusion_pytorch_model.bin"] = b"pickle, never downloaded"
    return {
        "tiny/sd15": Repo(sd15_files),
        "tiny/sd15-inpainting": Repo(inpaint_files),
        "tiny/lcm-lora-sdv1-5": Repo(lora),
        "tiny/taesd": Repo(taesd),
        "tiny/gated-taesd": Repo(dict(taesd), gated=True),
    }


def tiny_catalogue(path: Path, repos: dict[str, Repo]) -> Path:
    """A catalogue override (``DRAG_DIFFUSION_CATALOGUE``): the shipped sd15 and instant sets
    with their repositories replaced by the tiny ones (the file lists stay the catalogue's),
    and a ``gated`` set on the gated repository. Each piece's ``approx_bytes`` is the true size
    of the tiny files the catalogue takes from ``repos`` (``tiny_repos``), so what the dialog,
    ``models list`` and the installer announce is what the download then moves."""
    from backend.hub.catalogue import CATALOGUE_FILE

    shipped = json.loads(CATALOGUE_FILE.read_text("utf-8"))
    sets = {}
    for name in ("sd15", "instant"):
        entry = json.loads(json.dumps(shipped["sets"][name]))
        for piece in entry["pieces"]:
            piece["repo"] = TINY[piece["repo"]]
        sets[name] = entry
    taesd = json.loads(json.dumps(shipped["sets"]["instant"]["pieces"][2]))
    sets["gated"] = {"title": "A gated test set", "pieces": [{**taesd, "repo": "tiny/gated-taesd",
                                                             "licence": "test licence"}]}
    for entry in sets.values():
        for piece in entry["pieces"]:
            piece["approx_bytes"] = _chosen_bytes(repos[piece["repo"]], piece["files"])
    path.write_text(json.dumps({"sets": sets}, indent=1), "utf-8")
    return path


def _chosen_bytes(repo: Repo, specs: list) -> int:
    """The bytes of the files a catalogue piece takes from ``repo`` (the store's own choice:
    a path, every match of a glob, the first alternative there is)."""
    from backend.hub.store import _choose

    names = list(repo.files)
    chosen = {n for spec in specs for n in _choose(tuple(spec) if isinstance(spec, list)
                                                   else spec, names)}
    return sum(len(repo.files[n]) for n in chosen)
