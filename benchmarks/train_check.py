"""A short DiT-S/2 training run per training path, on random latents: does the loss fall, and do the
paths agree?

Paths: float32; bf16 autocast (the CUDA default); bf16 with --compile; bf16 under FSDP on one rank
(a one-process group). Every path trains the same model from the same seed on the same data with the
same draws, so their loss curves differ only by arithmetic: bf16 rounding, compiled kernels' sum
orders, FSDP's flat-parameter copies. What is checked, per path:

- the loss falls: the mean of the last logged interval is below the first's;
- it agrees with the bf16 path over the first logged interval to within AGREE_REL (bf16 rounding and
  different sum orders make the curves part slowly; float32 is compared the same way), and FSDP on
  one rank within FSDP_REL (the same arithmetic on gathered copies of the weights).

Usage: python benchmarks/train_check.py --out DIR [--steps 200] [--tiny] [--paths bf16,...]
  --tiny: a 2-block DiT on 8×8 latents for a few steps (what the CPU tests run).
Writes DIR/train_check.json and prints a table; exits 1 when a check fails.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from imm_kernels.train.trainer import TrainConfig, Trainer

AGREE_REL = 0.05  # bf16 vs float32 or compiled, mean loss over the first logged interval
FSDP_REL = 1e-3  # FSDP on one rank vs the unsharded bf16 path, same interval
PATHS = {
    "fp32": {"mixed_precision": "none"},
    "bf16": {},
    "bf16+compile": {"compile": True},
    "bf16+fsdp(1 rank)": {"dist": "fsdp"},
}


def random_latents(path: Path, num: int, side: int) -> Path:
    """(num, 4, side, side) float32 N(0, 0.5²) latents with labels 0–9, as an .npz the trainer reads."""
    gen = np.random.default_rng(0)
    x = (0.5 * gen.standard_normal((num, 4, side, side))).astype(np.float32)
    np.savez(path, x=x, y=np.arange(num) % 10)
    return path


def run_path(name: str, overrides: dict, base: dict, out: Path) -> dict:
    config = TrainConfig(**{**base, **overrides})
    trainer = Trainer(
        config, out / name.replace("+", "_").replace("(", "").replace(")", "").replace(" ", ""), progress=False
    )
    started = time.perf_counter()
    summary = trainer.train()
    wall = time.perf_counter() - started
    log = [json.loads(line) for line in (trainer.out_dir / "log.jsonl").read_text().splitlines()]
    losses = [record["loss"] for record in log if "loss" in record and "event" not in record]
    peak = torch.cuda.max_memory_allocated() / 2**20 if torch.cuda.is_available() else None
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    return {
        "path": name,
        "losses": losses,
        "first": losses[0],
        "last": losses[-1],
        "falls": losses[-1] < losses[0],
        "samples_per_s": summary["samples_per_s"],
        "wall_s": wall,
        "peak_mib": peak,
    }


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, type=Path)
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--tiny", action="store_true", help="a 2-block DiT on 8×8 latents (CPU tests)")
    parser.add_argument(
        "--paths", default=",".join(PATHS), help=f"comma-separated, of {', '.join(PATHS)} (default: all)"
    )
    args = parser.parse_args(argv)
    chosen = args.paths.split(",")
    if "bf16" not in chosen or not set(chosen) <= set(PATHS):
        parser.error(f"--paths must name bf16 (the reference) and only {', '.join(PATHS)}, got {args.paths!r}")
    args.out.mkdir(parents=True, exist_ok=True)
    on_gpu = torch.cuda.is_available()
    paths = {name: PATHS[name] for name in chosen}
    if not on_gpu:  # bf16 autocast is the CUDA default; on a CPU "bf16" asks for it explicitly
        paths = {name: {"mixed_precision": "bf16", **o} if name != "fp32" else o for name, o in paths.items()}
    if not on_gpu and not args.tiny:
        print("train_check: no GPU; run with --tiny on a CPU", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory() as scratch:
        scratch = Path(scratch)
        side, num = (8, 512) if args.tiny else (32, 8192)
        data = random_latents(scratch / "latents.npz", num, side)
        base = {
            "data": str(data),
            "model": "dit-s2",
            "model_kwargs": {"hidden_size": 32, "depth": 2, "num_heads": 2} if args.tiny else {},
            "conditional": True,
            "batch": 32 if args.tiny else 256,
            "group_size": 4,
            "steps": args.steps,
            "warmup": min(200, args.steps),
            "log_every": max(1, args.steps // 10),
            "sample_every": 0,
            "ckpt_every": 0,
            "seed": 0,
        }
        results = [run_path(name, overrides, base, scratch / "runs") for name, overrides in paths.items()]
    reference = next(result for result in results if result["path"] == "bf16")
    failed = []
    for result in results:
        gap = abs(result["first"] - reference["first"]) / abs(reference["first"])
        limit = FSDP_REL if "fsdp" in result["path"] else AGREE_REL
        result["first_rel_to_bf16"] = gap
        result["agrees"] = gap <= limit and math.isfinite(result["last"])
        if not (result["falls"] and result["agrees"]):
            failed.append(result["path"])
    device = torch.cuda.get_device_name() if on_gpu else "CPU"
    report = {"device": device, "torch": torch.__version__, "steps": args.steps, "tiny": args.tiny, "paths": results}
    (args.out / "train_check.json").write_text(json.dumps(report, indent=2))
    print(f"train_check on {device}, {args.steps} steps, DiT-S/2{' (tiny)' if args.tiny else ''} on random latents")
    print(
        f"{'path':<20} {'first loss':>11} {'last loss':>10} {'falls':>6} {'vs bf16':>9} "
        f"{'samples/s':>10} {'peak MiB':>9}"
    )
    for r in results:
        peak = f"{r['peak_mib']:.0f}" if r["peak_mib"] is not None else "-"
        print(
            f"{r['path']:<20} {r['first']:11.5g} {r['last']:10.5g} {str(r['falls']):>6} "
            f"{r['first_rel_to_bf16']:9.2e} {r['samples_per_s']:10.1f} {peak:>9}"
        )
    if failed:
        print(f"train_check: FAILED for {', '.join(failed)}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
