"""``python -m backend serve`` and ``python -m backend keygen``."""

from __future__ import annotations

import argparse
import functools
import logging
import signal
from pathlib import Path

from protocol.connection import default_connection_file
from protocol.wire import Limits

log = logging.getLogger("backend.server")


def register(subparsers: argparse._SubParsersAction) -> None:
    from backend.server.endpoint import DEFAULT_BIND

    conn = default_connection_file()
    serve = subparsers.add_parser(
        "serve", help="run the persistent backend that the GIMP plug-in talks to",
        description="Load the model once and serve drag edits over ZeroMQ (protocol/PROTOCOL.md). "
        "Prints 'READY <endpoint> <connection-file>' once the model is loaded (followed by a "
        "note in parentheses when it serves the demo model).")
    serve.add_argument("--model", default=None,
                       help="SD1.5 model: Hugging Face id, diffusers folder or single file "
                       "(default: the engine's default, stable-diffusion-v1-5; when that is "
                       "not on this machine, the small demo model backend/demo/model); 'none' "
                       "with --inpaint-model serves only Inpaint4Drag")
    serve.add_argument("--vae", default=None, help="optional replacement VAE")
    serve.add_argument("--inpaint-model", default=None,
                       help="inpainting model for Inpaint4Drag: a model set of `models list` "
                       "(instant, instant-xl: with its LCM-LoRA and tiny VAE), or a 9-channel "
                       "UNet's folder, file or id (e.g. stable-diffusion-v1-5/stable-diffusion-"
                       "inpainting); 'none' for none; default: the first installed of instant "
                       "and instant-xl, else Inpaint4Drag fills with the plain model")
    serve.add_argument("--lcm-lora", default=None,
                       help="LCM-LoRA fused into the inpainting model (e.g. "
                       "latent-consistency/lcm-lora-sdv1-5), as the official setup")
    serve.add_argument("--tiny-vae", default=None,
                       help="tiny autoencoder for the inpainting model (e.g. madebyollin/taesd)")
    serve.add_argument("--device", default="auto", help="cuda, cuda:1, mps, cpu or auto")
    serve.add_argument("--dtype", default=None,
                       help="precision: auto (default), fp16, bf16, fp32, fp16-mixed, bf16-mixed")
    serve.add_argument("--compile", action="store_true",
                       help="run the UNet through torch.compile: the inversion, drag and "
                       "denoising, and the LoRA training's forward and backward (opt-in: the "
                       "first edit of each shape compiles; not yet measured on a GPU)")
    serve.add_argument("--bind", default=DEFAULT_BIND,
                       help="ZeroMQ endpoint (default %(default)s; port 0 = any free port)")
    serve.add_argument("--connection-file", type=Path, default=None,
                       help=f"where to write endpoint and key (default {conn}, or "
                       "$DRAG_DIFFUSION_CONNECTION_FILE)")
    serve.add_argument("--log-file", type=Path, default=None,
                       help="log file (default: backend.log beside the connection file)")
    serve.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING"])
    serve.add_argument("--curve", action="store_true",
                       help="encrypt with CURVE and accept only allow-listed client keys "
                       "(required for a non-loopback --bind)")
    serve.add_argument("--server-key", type=Path, default=None,
                       help="server secret key file (default: curve/server.key_secret beside "
                       "the connection file; create with 'keygen')")
    serve.add_argument("--allow-keys", type=Path, default=None,
                       help="folder of allowed client public keys *.key (default: "
                       "curve/allowed beside the connection file)")
    serve.add_argument("--max-side", type=int, default=Limits.max_side)
    serve.add_argument("--max-pixels", type=int, default=Limits.max_pixels)
    serve.add_argument("--max-frame-mb", type=int, default=Limits.max_frame_bytes // 2**20,
                       help="largest inbound frame in MiB (ZMQ_MAXMSGSIZE)")
    serve.add_argument("--max-queue", type=int, default=Limits.max_queue)
    serve.add_argument("--client-ttl", type=float, default=6.0,
                       help="cancel the jobs of a client silent for this many seconds")
    serve.add_argument("--ray", default=None, metavar="ADDRESS",
                       help="be a gateway to a Ray Serve application: the edits run on the "
                       "Ray cluster at ADDRESS (e.g. 10.0.0.5:6379), one replica per GPU; "
                       "'auto': the cluster `ray start` runs on this machine, else a new local "
                       "one (needs: python install.py --cluster; docs/cluster.md)")
    serve.add_argument("--replicas", type=int, default=None,
                       help="with --ray: how many replicas (default: one per GPU of the cluster)")
    serve.set_defaults(func=run_serve)

    keygen = subparsers.add_parser(
        "keygen", help="write a CURVE key pair for a backend on another machine",
        description="Writes NAME.key (public) and NAME.key_secret (private, 0600) and prints "
        "the public key. Run it for the server (name 'server') and for each client; copy each "
        "client's NAME.key into the server's allow-list folder.")
    keygen.add_argument("--dir", type=Path, default=None,
                        help="output folder (default: curve/ beside the connection file)")
    keygen.add_argument("--name", default="server", help="key name (default %(default)s)")
    keygen.set_defaults(func=run_keygen)


def run_serve(args: argparse.Namespace) -> int:
    from backend.engine.errors import ModelNotFound
    from backend.hub.store import Store
    from backend.model_choice import demo_fallback, expected_table, serve_plan
    from backend.server.endpoint import CurveServer, ServerError
    from backend.server.log import setup_logging
    from backend.server.server import Server

    conn = args.connection_file or default_connection_file()
    setup_logging(args.log_file or conn.with_name("backend.log"), args.log_level)
    curve = None
    if args.curve:
        curve = CurveServer(args.server_key or conn.parent / "curve" / "server.key_secret",
                            args.allow_keys or conn.parent / "curve" / "allowed")
    limits = Limits(max_side=args.max_side, max_pixels=args.max_pixels,
                    max_frame_bytes=args.max_frame_mb * 2**20, max_queue=args.max_queue)
    device = None if args.device == "auto" else args.device
    store = Store()  # the catalogue's sets in the Hugging Face cache (downloads land there)

    def plan():  # what to load, asked again after a download
        return serve_plan(args.model, args.inpaint_model, args.lcm_lora, args.tiny_vae, store)

    try:
        first = plan()
    except ModelNotFound as exc:
        log.error("%s", exc)
        return 2
    if first.plain is None and first.inpaint_model is None:
        log.error("--model none needs an inpainting model (--inpaint-model, or the instant set: "
                  "python -m backend models get instant)")
        return 2

    def load_engine():  # runs in the server's worker thread
        from backend.engine.pipeline import DragEngine
        now = plan()
        return DragEngine.load(now.plain, vae=args.vae, device=device, dtype=args.dtype,
                               compile_unet=args.compile, **now.inpainting)

    def load_demo(path: str):  # when the default model is missing
        from backend.engine.pipeline import DragEngine
        return DragEngine.load(path, device=device, **plan().inpainting)

    def ready(server: Server) -> None:
        note = f" ({server.demo_notice})" if server.demo_notice else ""
        print(f"READY {server.endpoint} {conn}{note}", flush=True)

    fallback = demo_fallback(args.model, load_demo)
    make_worker = None
    if args.ray is not None:
        try:
            make_worker = ray_workers(args, functools.partial(replica_loaders, plan, args))
        except RuntimeError as exc:
            log.error("%s", exc)
            return 2
    server = Server(load_engine, model_name=first.name, device=args.device, bind=args.bind,
                    connection_file=conn, limits=limits, curve=curve,
                    client_ttl=args.client_ttl, fallback=fallback,
                    table=expected_table(args.model), on_ready=ready, store=store, plan=plan,
                    make_worker=make_worker)
    try:
        server.start()
    except ServerError as exc:
        log.error("%s", exc)
        return 1
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: server.stop("signal"))
    server.serve_forever()
    return 0


def load_planned(plan, vae, device, dtype, compile_unet):
    """Load a ``ServePlan``'s engine: what each Ray replica runs (a picklable loader of plain
    values, made again in the gateway at each deploy)."""
    from backend.engine.pipeline import DragEngine

    return DragEngine.load(plan.plain, vae=vae, device=device, dtype=dtype,
                           compile_unet=compile_unet, **plan.inpainting)


def load_demo_planned(plan, device, path: str):
    """Load the demo model at ``path`` with a ``ServePlan``'s inpainting models (the replicas'
    stand-in when the default model is missing)."""
    from backend.engine.pipeline import DragEngine

    return DragEngine.load(path, device=device, **plan.inpainting)


def replica_device(device: str | None) -> str | None:
    """The ``--device`` for a replica: Ray shows each replica only its own GPU (as ``cuda:0``),
    so a gateway's ``cuda:N`` means "CUDA" there; ``cpu`` and ``mps`` stay as they are."""
    if device is not None and device.startswith("cuda:"):
        return "cuda"
    return device


def replica_loaders(plan, args: argparse.Namespace):
    """What the replicas load, as the gateway's plan says now (asked again at each deploy, so
    a reload after a download loads what was added): the engine's loader and the demo model's
    stand-in, both picklable (plain values and module-level functions)."""
    from backend.model_choice import demo_fallback

    now = plan()
    device = replica_device(None if args.device == "auto" else args.device)
    load = functools.partial(load_planned, now, args.vae, device, args.dtype, args.compile)
    return load, demo_fallback(args.model, functools.partial(load_demo_planned, now, device))


def ray_workers(args: argparse.Namespace, loaders):
    """``--ray``: join the cluster and say how to make the gateway's worker (one replica per
    GPU unless ``--replicas``); ``loaders()`` gives the replicas' engine loader and demo
    stand-in now. ``RuntimeError`` with one line when that cannot be."""
    from backend.server.ray_worker import RayWorker, connect

    try:
        gpus = connect(args.ray)
    except RuntimeError:
        raise
    except Exception as exc:
        raise RuntimeError(f"could not join the Ray cluster at {args.ray}: {exc}") from None
    if gpus < 1:
        raise RuntimeError("the Ray cluster has no GPU: each replica needs one; start its "
                           "nodes on machines with GPUs (docs/cluster.md)")
    replicas = args.replicas or gpus
    if replicas < 1:
        raise RuntimeError(f"--replicas {replicas}: give at least 1")
    if replicas > gpus:
        raise RuntimeError(f"--replicas {replicas} needs {replicas} GPUs; the Ray cluster has "
                           f"{gpus}")
    log.info("gateway to the Ray cluster at %s: %d replica(s), one GPU each", args.ray, replicas)
    return lambda wake: RayWorker(loaders, wake, replicas=replicas, fresh=True)


def run_keygen(args: argparse.Namespace) -> int:
    from protocol.curve import generate_keypair, load_keypair

    directory = args.dir or default_connection_file().parent / "curve"
    public, secret = generate_keypair(directory, args.name)
    print(f"public key file: {public}")
    print(f"secret key file: {secret} (keep it private)")
    print(f"public key: {load_keypair(secret)[0].decode('ascii')}")
    return 0
