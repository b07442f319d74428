"""Data-parallel training through ``torch.distributed``: several processes, one model each.

``full`` and ``adv`` train data-parallel when their section says ``distributed: {processes: N}``
with N > 1: the stage re-launches itself under ``torchrun`` (``python -m torch.distributed.run``)
on this machine, N ranks that each run the same stage body (:func:`main`), and rank 0 writes the
outputs. Several machines: run ``torchrun`` yourself on each, with this module as the program
(docs/distributed.md).

What makes the result independent of the number of processes (the shared loop,
``classifiers/loop.py``, does it with the helpers here):

- every rank draws the same global batch order and the same per-image augmentation seeds, and
  trains on its contiguous shard of each global batch (:func:`shard`);
- each rank scales its mean loss by its share of the global batch, and :func:`all_reduce_grads`
  sums the gradients, so every rank steps with the global batch's mean gradient, as one process
  would;
- validation runs on rank 0 and its verdict is broadcast (:func:`from_main`), so early stopping
  and the kept epoch are the same everywhere;
- rank 0 alone writes checkpoints, models and metrics, then every rank waits at a barrier; a
  checkpoint holds nothing specific to the world size, so a run killed at N processes resumes at
  M.

BatchNorm statistics stay frozen by default (``bn_train: false``), so no statistics need syncing
across ranks; with ``bn_train: true`` each rank updates its own from its shard and rank 0's are
kept (SyncBatchNorm is not used).

Backends: ``gloo`` on CPUs, ``nccl`` on CUDA GPUs (one GPU per rank, ``LOCAL_RANK``); ``auto``
picks between them.
"""

from __future__ import annotations

import argparse
import builtins
import json
import logging
import os
import shutil
import socket
import sys
import tempfile
from collections.abc import Callable, Iterable
from datetime import timedelta
from pathlib import Path
from typing import Any, TypeVar

import torch
import torch.distributed as dist
from torch import Tensor

log = logging.getLogger(__name__)

T = TypeVar("T")

BACKENDS = ("auto", "gloo", "nccl")
# a rank waits this long for the others at a collective (a slow validation on rank 0 included)
TIMEOUT = timedelta(hours=2)
# the folder (under the workspace) for the files the ranks share with their launcher
WORK_DIR = ".transferlab/distributed"


# ---------------------------------------------------------------- where this process stands


def active() -> bool:
    """Whether this process is one rank of an initialised process group."""
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    return dist.get_rank() if active() else 0


def world_size() -> int:
    return dist.get_world_size() if active() else 1


def is_main() -> bool:
    """Rank 0: the one process that writes files and logs at INFO."""
    return rank() == 0


def local_rank() -> int:
    """This process's index on its machine (torchrun's ``LOCAL_RANK``; 0 outside torchrun)."""
    return int(os.environ.get("LOCAL_RANK", "0")) if active() else 0


def resolve_backend(name: str) -> str:
    """``auto`` -> ``nccl`` where CUDA is, else ``gloo``; an explicit name is checked."""
    if name not in BACKENDS:
        raise ValueError(f"distributed.backend: unknown {name!r}; allowed values are {BACKENDS}")
    if name == "auto":
        return "nccl" if torch.cuda.is_available() and dist.is_nccl_available() else "gloo"
    if name == "nccl" and not (torch.cuda.is_available() and dist.is_nccl_available()):
        raise ValueError(
            "distributed.backend: nccl needs CUDA GPUs and a torch built with NCCL; this machine "
            "has none: use gloo (or auto)"
        )
    return name


def init_from_env(backend: str = "auto") -> bool:
    """Join the process group that torchrun's environment describes (``RANK``, ``WORLD_SIZE``,
    ``MASTER_ADDR``, ``MASTER_PORT``, ``LOCAL_RANK``). With NCCL, this rank's GPU becomes the
    current CUDA device, so code that asks for ``"cuda"`` gets its own.

    Returns:
        Whether a process group is active now (False outside torchrun).
    """
    if active():
        return True
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        return False
    backend = resolve_backend(backend)
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group(backend=backend, timeout=TIMEOUT)
    log.debug("rank %d of %d joined (%s)", rank(), world_size(), backend)
    return True


# ---------------------------------------------------------------- what the loop calls


def shard(idx: Tensor) -> Tensor:
    """This rank's contiguous part of a global batch's indices (sizes differ by at most one;
    a rank's part is empty when the batch has fewer items than there are ranks)."""
    if not active():
        return idx
    return torch.tensor_split(idx, world_size())[rank()]


def all_reduce_grads(params: Iterable[torch.nn.Parameter], *, some_empty: bool = False) -> None:
    """Sum the parameters' gradients over the ranks, in place.

    Each rank's loss was scaled by its share of the global batch (``len(shard) / len(batch)``),
    so the sum is the global batch's mean gradient: what one process computes. The gradients go
    as one flat buffer per dtype and device (one collective, not one per tensor).

    Args:
        params: the optimiser's parameters, in the same order on every rank.
        some_empty: some rank had an empty shard (it built no graph); the ranks then agree first
            on which parameters have a gradient anywhere, and fill the missing ones with zeros.
    """
    if not active() or world_size() == 1:
        return
    params = list(params)
    if some_empty:
        device = params[0].device if params else torch.device("cpu")
        has = torch.tensor([p.grad is not None for p in params], dtype=torch.int32, device=device)
        dist.all_reduce(has)
        for p, h in zip(params, has.tolist(), strict=True):
            if h and p.grad is None:
                p.grad = torch.zeros_like(p)
    groups: dict[tuple, list[Tensor]] = {}
    for p in params:
        if p.grad is not None:
            groups.setdefault((p.grad.dtype, p.grad.device), []).append(p.grad)
    for grads in groups.values():
        flat = torch.cat([g.reshape(-1) for g in grads])
        dist.all_reduce(flat)
        offset = 0
        for g in grads:
            g.copy_(flat[offset : offset + g.numel()].view(g.shape))
            offset += g.numel()


def broadcast_modules(modules: Iterable[torch.nn.Module]) -> None:
    """Every rank takes rank 0's parameters and buffers, so all start from the same weights
    (as DDP does), whatever randomness went into building them."""
    if not active() or world_size() == 1:
        return
    groups: dict[tuple, list[Tensor]] = {}
    for module in modules:
        for t in module.state_dict(keep_vars=True).values():
            if t.is_floating_point() or t.dtype in (torch.int64, torch.int32):
                groups.setdefault((t.dtype, t.device), []).append(t.data)
    for tensors in groups.values():
        flat = torch.cat([t.reshape(-1) for t in tensors])
        dist.broadcast(flat, src=0)
        offset = 0
        for t in tensors:
            t.copy_(flat[offset : offset + t.numel()].view(t.shape))
            offset += t.numel()


def sum_over_ranks(t: Tensor) -> Tensor:
    """``t`` summed over the ranks (in place; ``t`` itself outside a process group)."""
    if active() and world_size() > 1:
        dist.all_reduce(t)
    return t


def from_main(compute: Callable[[], T]) -> T:
    """``compute()`` on rank 0, its value on every rank (the others do not call it): one
    verdict, so decisions that follow it (early stopping, the kept epoch) are the same
    everywhere."""
    if not active() or world_size() == 1:
        return compute()
    box = [compute() if is_main() else None]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def barrier() -> None:
    if active() and world_size() > 1:
        dist.barrier()


def computed_once(path: Path, compute: Callable[[], dict[str, Tensor]]) -> dict[str, Tensor]:
    """``compute()`` once per machine, shared with the other ranks there through ``path``.

    The first rank of each machine computes and saves it; every rank of the machine then maps
    the file (``mmap``: one copy in memory, however many ranks); it is deleted once all have it.
    Outside a process group this is ``compute()``.
    """
    if not active() or world_size() == 1:
        return compute()
    from transferlab import tensor_files

    if local_rank() == 0:
        path.parent.mkdir(parents=True, exist_ok=True)
        tensor_files.save(compute(), path)
    barrier()
    value = tensor_files.load(path, mmap=True)
    barrier()
    if local_rank() == 0:
        path.unlink(missing_ok=True)  # the maps keep their pages
    return value


# ---------------------------------------------------------------- launching the ranks


def should_launch(processes: int) -> bool:
    """A stage asked for ``processes`` > 1 and is not one of their ranks yet."""
    return processes > 1 and not active()


def free_port() -> int:
    """A TCP port free on 127.0.0.1 now (the rendezvous binds it a moment later)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def loopback_interface() -> str | None:
    """The loopback network interface's name (``lo`` on Linux, ``lo0`` on macOS), if any."""
    names = [name for _, name in socket.if_nameindex()]
    return next((n for n in names if n.startswith("lo")), None)


def torchrun_command(processes: int, program: list[str]) -> list[str]:
    """``python -m torch.distributed.run`` starting ``processes`` ranks of ``program`` (a script
    path or ``-m module``, then its arguments) on this machine, the rendezvous on 127.0.0.1 at
    a free port, no restarts (a failed rank fails the run)."""
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nnodes=1",
        "--node-rank=0",
        f"--nproc-per-node={processes}",
        "--master-addr=127.0.0.1",
        f"--master-port={free_port()}",
        "--local-addr=127.0.0.1",
        "--max-restarts=0",
        *program,
    ]


def local_env(processes: int) -> dict[str, str]:
    """Environment for ``processes`` ranks on this machine: an equal share of the CPU threads
    each (``OMP_NUM_THREADS``) and gloo on the loopback interface, unless already set."""
    env = {}
    if "OMP_NUM_THREADS" not in os.environ:
        env["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // processes))
    lo = loopback_interface()
    if lo and "GLOO_SOCKET_IFNAME" not in os.environ:
        env["GLOO_SOCKET_IFNAME"] = lo
    return env


def launch(method: str, params: Any, root: Path, *, processes: int, backend: str) -> dict:
    """Run ``method``'s stage in ``processes`` ranks on this machine under torchrun.

    The rendezvous and gloo's connections stay on 127.0.0.1. Each rank gets an equal share of
    the CPU threads (``OMP_NUM_THREADS``, unless set). The caller keeps the workspace lock; the
    ranks write under it.

    Returns:
        Rank 0's stage summary. Raises the first failing rank's error (its type for Python's
        own exceptions, RuntimeError otherwise) when a rank fails.
    """
    from transferlab.procgroup import run_group

    # a bad setting fails here, in one line, before any rank starts
    if resolve_backend(backend) == "nccl" and processes > torch.cuda.device_count():
        raise ValueError(
            f"distributed.processes: {processes} NCCL ranks need a GPU each and this machine has "
            f"{torch.cuda.device_count()}; lower processes, or set backend: gloo"
        )
    (root / WORK_DIR).mkdir(parents=True, exist_ok=True)
    # the caller holds the workspace lock: what an earlier, killed launch left is stale
    for stale in (root / WORK_DIR).glob(f"{method}-*"):
        if stale.is_dir():
            shutil.rmtree(stale, ignore_errors=True)
        else:
            stale.unlink(missing_ok=True)
    with tempfile.TemporaryDirectory(dir=root / WORK_DIR, prefix=f"{method}-") as tmp:
        out = Path(tmp)
        (out / "params.json").write_text(params.model_dump_json())
        program = ["-m", __name__, method, "--params", str(out / "params.json")]
        program += ["--root", str(root), "--backend", backend, "--out", str(out)]
        # rank 0 logs as this process does (--quiet, --verbose)
        program += ["--log-level", logging.getLevelName(logging.getLogger().getEffectiveLevel())]
        log.info("%s: training in %d processes (torchrun, %s)", method, processes, backend)
        code = run_group(torchrun_command(processes, program), env=local_env(processes))
        summary = out / "summary.json"
        if code == 0 and summary.exists():
            return json.loads(summary.read_text())
        errors = sorted(out.glob("error.*.json"))
        if errors:
            err = json.loads(errors[0].read_text())
            kind = getattr(builtins, err["type"], None)
            if not (isinstance(kind, type) and issubclass(kind, Exception)):
                kind = RuntimeError
            raise kind(err["message"])
        raise RuntimeError(
            f"{method}: the {processes} training processes failed (torchrun exit {code}); "
            "the log above names the rank and its error"
        )


def main(argv: list[str] | None = None) -> int:
    """One rank: ``python -m transferlab.classifiers.distributed METHOD --params FILE --root
    DIR``, under torchrun. Runs the method's stage body with the process group joined; rank 0
    writes its outputs (and ``--out``/summary.json)."""
    parser = argparse.ArgumentParser(
        prog="python -m transferlab.classifiers.distributed",
        description="One rank of a data-parallel full/adv training; start it with torchrun.",
    )
    parser.add_argument("method", help="the method's stage: full or adv")
    parser.add_argument("--params", type=Path, required=True, help="params.yaml, or a JSON dump")
    parser.add_argument("--root", type=Path, default=Path.cwd(), help="the workspace")
    parser.add_argument("--backend", default="auto", choices=BACKENDS)
    parser.add_argument("--out", type=Path, default=None, help="summary.json / error files here")
    parser.add_argument("--log-level", default="INFO", help="rank 0's; the others log errors")
    args = parser.parse_args(argv)
    rank_ = os.environ.get("RANK", "0")
    if rank_ != "0":
        os.environ["TQDM_DISABLE"] = "1"  # one set of bars: rank 0's
    logging.basicConfig(
        level=args.log_level if rank_ == "0" else logging.ERROR,
        format=f"%(asctime)s [rank {rank_}] %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    from transferlab.atomic import write_json
    from transferlab.config import Params, load_params
    from transferlab.methods import METHODS

    try:
        names = [m for m, v in METHODS.items() if "distributed" in v.params.model_fields]
        if args.method not in names:
            raise ValueError(f"{args.method!r} does not train data-parallel; choose one of {names}")
        if args.params.suffix == ".json":
            params = Params.model_validate_json(args.params.read_text())
        else:
            params = load_params(args.params)
        if not init_from_env(args.backend):
            raise ValueError("no process group to join: start this module with torchrun")
        summary = METHODS[args.method].stage()(params, args.root.resolve())
        if is_main() and args.out is not None:
            write_json(args.out / "summary.json", summary)
    except Exception as exc:
        if args.out is not None:
            write_json(
                args.out / f"error.{os.environ.get('RANK', '0')}.json",
                {"type": type(exc).__name__, "message": str(exc)},
            )
        raise
    finally:
        if active():
            dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
