"""Sub-commands: ``demo train``, ``demo export``, ``demo eval`` and ``bench-quality`` (``toy``
is the old name of ``demo``, still accepted)."""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path


def _threads(n: int) -> None:
    import torch

    if n > 0:
        torch.set_num_threads(n)


def _cmd_train(args: argparse.Namespace) -> int:
    from backend.demo.train import TrainConfig, train

    _threads(args.threads)
    overrides = {f.name: getattr(args, f.name) for f in dataclasses.fields(TrainConfig)
                 if getattr(args, f.name, None) is not None}
    cfg = TrainConfig(**overrides)
    trainer = train(cfg, Path(args.work_dir), args.device, args.resume, args.max_minutes,
                    Path(args.out) if args.out else None)
    return 0 if trainer.unet_step >= cfg.unet_steps else 3


def _cmd_export(args: argparse.Namespace) -> int:
    from backend.demo.train import TrainConfig, Trainer

    trainer = Trainer(TrainConfig(), Path(args.work_dir), "cpu")
    if not trainer.load():
        print(f"no checkpoint in {args.work_dir}")
        return 1
    print(f"vae step {trainer.vae_step}, unet step {trainer.unet_step}")
    print(f"exported to {trainer.export(Path(args.out))}")
    return 0


def _cmd_eval(args: argparse.Namespace) -> int:
    from backend.demo import evaluate
    from backend.engine.pipeline import DragEngine

    _threads(args.threads)
    engine = DragEngine.load(args.model, device=args.device)
    per_image = evaluate.quality(engine, evaluate.evaluation_sets(args.n), args.strength)
    for name, row in per_image.items():
        print(f"{name}: VAE round trip {row['vae_psnr']:.2f} dB, "
              f"inversion + denoise {row['inversion_psnr']:.2f} dB")
    print(json.dumps(evaluate.summary(per_image), indent=2))
    return 0


def _cmd_bench(args: argparse.Namespace) -> int:
    from backend.demo.bench_quality import main

    _threads(args.threads)
    return main(args)


def register(subparsers: argparse._SubParsersAction) -> None:
    from backend.demo.bench_quality import CASE_SETS
    from backend.demo.train import DEFAULT_MODEL_DIR, DEFAULT_WORK_DIR, TrainConfig

    demo = subparsers.add_parser("demo", aliases=["toy"],
                                 help="the trained demo model (backend/demo/model): train, "
                                 "export, eval")
    demo_sub = demo.add_subparsers(dest="demo_command", metavar="DEMO_COMMAND")

    tr = demo_sub.add_parser("train", help="train (or --resume) the demo model")
    tr.add_argument("--work-dir", default=str(DEFAULT_WORK_DIR),
                    help="checkpoints and latent cache (default: %(default)s)")
    tr.add_argument("--out", default=str(DEFAULT_MODEL_DIR),
                    help="export the pipeline here when training finishes (default: %(default)s)")
    tr.add_argument("--resume", action="store_true", help="continue from the checkpoint")
    tr.add_argument("--device", default="cpu")
    tr.add_argument("--threads", type=int, default=1, help="torch CPU threads (0: torch default)")
    tr.add_argument("--max-minutes", type=float, default=600.0,
                    help="stop (with a checkpoint) after this wall time")
    for f in dataclasses.fields(TrainConfig):
        tr.add_argument("--" + f.name.replace("_", "-"), type=type(f.default), default=None,
                        help=f"default {f.default}")
    tr.set_defaults(func=_cmd_train)

    ex = demo_sub.add_parser("export", help="export the latest checkpoint as a diffusers folder")
    ex.add_argument("--work-dir", default=str(DEFAULT_WORK_DIR))
    ex.add_argument("--out", default=str(DEFAULT_MODEL_DIR))
    ex.set_defaults(func=_cmd_export)

    ev = demo_sub.add_parser("eval", help="reconstruction PSNR on held-out photographs and "
                            "unseen colours: VAE round trip, DDIM inversion + denoise")
    ev.add_argument("--model", default=str(DEFAULT_MODEL_DIR))
    ev.add_argument("--device", default="cpu")
    ev.add_argument("--n", type=int, default=4, help="unseen-colour shape scenes")
    ev.add_argument("--strength", type=float, default=0.7)
    ev.add_argument("--threads", type=int, default=0)
    ev.set_defaults(func=_cmd_eval)

    bq = subparsers.add_parser("bench-quality",
                               help="drag methods vs baselines on cases with known answers "
                               "(shapes, a stereo pair, an object moved over a photograph)")
    bq.add_argument("--method", default="all",
                    help="comma-separated methods or presets, all (default: dragdiffusion, "
                    "gooddrag and the fast preset) or none (baselines only)")
    bq.add_argument("--sets", default=",".join(CASE_SETS),
                    help="comma-separated case sets (default: %(default)s)")
    bq.add_argument("--cases", type=int, default=6, help="shape cases (default: %(default)s)")
    bq.add_argument("--photo-cases", type=int, default=4,
                    help="cases per photo set (default: %(default)s)")
    bq.add_argument("--seed", type=int, default=0, help="case generator seed")
    bq.add_argument("--model", default=str(DEFAULT_MODEL_DIR))
    bq.add_argument("--out", default="bench-quality-out")
    bq.add_argument("--param", action="append", default=[], metavar="KEY=VALUE",
                    help="engine parameter override for every method (repeatable)")
    bq.add_argument("--lora-steps", type=int, default=None,
                    help="override every method's LoRA steps (default: each method's own)")
    bq.add_argument("--no-baselines", action="store_true",
                    help="leave out the no-op and cut-and-paste rows and grid columns")
    bq.add_argument("--figure", default="", metavar="CASE",
                    help="also write figure.png: this case's row alone (e.g. paste-00-disc)")
    bq.add_argument("--threads", type=int, default=0)
    bq.set_defaults(func=_cmd_bench)
