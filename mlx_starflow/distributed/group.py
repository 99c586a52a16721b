"""Joining an mx.distributed group and agreeing in it: the launcher's environment, bounded
waits (MLX's own are unbounded), small exchanges (bytes, seeds), and every rank reporting
how its part went so that one rank's error stops them all with its message."""

import json
import os
import subprocess
import sys
import threading
import time
from typing import List, Optional, Sequence

import mlx.core as mx
import numpy as np

from ..options import Cancelled

CONNECT_TIMEOUT_ENV = "MLX_STARFLOW_CONNECT_TIMEOUT"
DEFAULT_CONNECT_TIMEOUT = 120.0  # seconds: ranks start together, but ssh and imports take a while
STEP_TIMEOUT_ENV = "MLX_STARFLOW_STEP_TIMEOUT"
DEFAULT_STEP_TIMEOUT = 600.0  # seconds one sampling step may wait for the others (a 3B token on a CPU: ~6)
# Backends by what their launcher sets (mlx.launch for ring and JACCL, mpirun for MPI).
BACKENDS = (
    ("jaccl", ("MLX_JACCL_COORDINATOR", "MLX_IBV_DEVICES")),
    ("ring", ("MLX_HOSTFILE",)),
    ("mpi", ("OMPI_COMM_WORLD_SIZE", "PMI_SIZE")),
    ("nccl", ("MLX_WORLD_SIZE",)),
)
SIZES = ("OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "MLX_WORLD_SIZE")  # a group's size, where the launcher says it
GO, STOP = 0, 1  # the control word that precedes every hidden state sent down the pipeline


class GroupError(RuntimeError):
    """The group cannot go on: a rank failed or lost its connection, or the ranks disagree."""


class Stopped(Exception):
    """Raised on ranks > 0 of a pipeline when rank 0 stopped sampling (it says why)."""


# -- joining the group --------------------------------------------------------------------


def backend() -> Optional[str]:
    """The backend the launcher prepared this process for, or None (a single process)."""
    for name, keys in BACKENDS:
        if any(k in os.environ for k in keys):
            return name
    return None


def launched() -> bool:
    """True when started by a launcher for a group of more than one process."""
    name = backend()
    if name == "ring":  # mlx.launch gives a single host an empty hostfile
        try:
            return os.path.getsize(os.environ["MLX_HOSTFILE"]) > 2
        except OSError:
            return True  # a missing hostfile: let init name the problem
    sizes = [os.environ[k] for k in SIZES if k in os.environ]
    if sizes and all(v.strip() in ("0", "1") for v in sizes):
        return False  # an MPI or NCCL environment of one process
    return name is not None


# Runs beside a rank while it joins: MLX's connect holds the interpreter until every peer
# answers, so no thread of ours could time it out. Exits quietly once told (or orphaned).
_WATCHDOG = """
import os, select, signal, sys
pid, timeout, message = int(sys.argv[1]), float(sys.argv[2]), sys.argv[3]
if not select.select([sys.stdin], [], [], timeout)[0]:
    sys.stderr.write(message + "\\n")
    sys.stderr.flush()
    os.kill(pid, signal.SIGTERM)
"""


def _seconds(env, default, value=None) -> float:
    value = os.environ.get(env) if value is None else value
    if value is None:
        return default
    try:
        seconds = float(value)
    except ValueError:
        seconds = -1.0
    if not seconds > 0:
        raise ValueError(f"{env} must be a number of seconds > 0, not {value!r}")
    return seconds


class _Stall:
    """Ends this process with a message when an exchange of the sampling loop makes
    no progress for the step timeout: MLX's ring backend can wait forever on a peer
    that died in the middle of an exchange. beat() when an exchange starts, stop()
    when the loop reports progress. (mx.eval releases the interpreter, so a thread
    can watch it.)"""

    def __init__(self):
        self.deadline, self.thread, self.message = None, None, ""

    def beat(self, group):
        timeout = _seconds(STEP_TIMEOUT_ENV, DEFAULT_STEP_TIMEOUT)
        self.message = (
            f"error: rank {group.rank()} of {group.size()}: sampling made no progress for {timeout:g} s: "
            f"another rank stopped or is unreachable ({STEP_TIMEOUT_ENV} sets the wait)"
        )
        self.deadline = time.monotonic() + timeout
        if self.thread is None:
            self.thread = threading.Thread(target=self._watch, daemon=True, name="mlx-starflow-stall")
            self.thread.start()

    def stop(self):
        self.deadline = None

    def _watch(self):
        while True:
            time.sleep(0.25)
            if self.deadline is not None and time.monotonic() > self.deadline:
                sys.stderr.write(self.message + "\n")
                sys.stderr.flush()
                os._exit(1)


_stall = _Stall()


def init(timeout: Optional[float] = None) -> Optional[mx.distributed.Group]:
    """The group this process was launched into, or None for a single process (no
    launcher, or a launcher with one host). Joining waits at most `timeout` seconds
    (default $MLX_STARFLOW_CONNECT_TIMEOUT, else 120): a rank that cannot reach its
    peers by then prints why and is terminated."""
    if not launched():
        return None
    timeout = _seconds(CONNECT_TIMEOUT_ENV, DEFAULT_CONNECT_TIMEOUT, timeout)
    rank = os.environ.get("MLX_RANK") or os.environ.get("OMPI_COMM_WORLD_RANK") or "?"
    message = (
        f"error: rank {rank} could not join the group within {timeout:g} s. Check that every host runs "
        f"this same command, that the addresses in the hostfile are the hosts' own and reachable "
        f"from each other, and that no firewall blocks the ports ({CONNECT_TIMEOUT_ENV} sets the wait)"
    )
    watchdog = subprocess.Popen(
        [sys.executable, "-c", _WATCHDOG, str(os.getpid()), str(timeout), message], stdin=subprocess.PIPE
    )
    try:
        group = mx.distributed.init(strict=True, backend=backend())
    except RuntimeError as e:
        raise GroupError(f"cannot start the distributed group ({backend()} backend): {e}") from None
    finally:
        watchdog.stdin.close()
        watchdog.wait()
    return group if group.size() > 1 else None


# -- exchanging small things ------------------------------------------------------------------


def _comm_error(e: BaseException) -> bool:
    return isinstance(e, RuntimeError) and str(e).startswith(("[ring]", "[jaccl]", "[mpi]", "[nccl]"))


def _lost(group, e) -> GroupError:
    return GroupError(
        f"rank {group.rank()} of {group.size()} lost its connection to the group ({e}): "
        "another rank stopped (see its error) or its machine is unreachable"
    )


def _exchange(group, arrays):
    """Evaluate collectives, turning a lost connection into a GroupError."""
    try:
        mx.eval(arrays)
    except RuntimeError as e:
        if _comm_error(e):
            raise _lost(group, e) from None
        raise
    return arrays


def gather_bytes(group, data: bytes) -> List[bytes]:
    """Every rank's bytes, on every rank."""
    n = mx.distributed.all_gather(mx.array([len(data)], dtype=mx.int32), group=group)
    lengths = _exchange(group, n).tolist()
    buf = np.zeros(max(lengths), dtype=np.uint8)
    buf[: len(data)] = np.frombuffer(data, dtype=np.uint8)
    rows = np.array(_exchange(group, mx.distributed.all_gather(mx.array(buf)[None], group=group)))
    return [rows[r, :k].tobytes() for r, k in enumerate(lengths)]


def broadcast_seeds(group, seeds: Sequence[int]) -> List[int]:
    """Rank 0's seeds on every rank (each rank may have drawn its own random ones)."""
    if group is None:
        return list(seeds)
    gathered = mx.distributed.all_gather(mx.array(list(seeds), dtype=mx.int64)[None], group=group)
    return _exchange(group, gathered)[0].tolist()


def on_rank0(group, fn):
    """fn() on rank 0 only (everything for a single process), its failure raised on
    every rank: checks of what only rank 0 touches, such as the output files."""
    if group is None:
        return fn()
    return _run_agreed(group, fn if group.rank() == 0 else (lambda: None))


def barrier(group):
    _exchange(group, mx.distributed.all_sum(mx.array([1], dtype=mx.int32), group=group))


def shares(n: int, size: int) -> List[range]:
    """n items split into `size` contiguous ranges, the first n % size one longer."""
    out, start = [], 0
    for r in range(size):
        k = n // size + (r < n % size)
        out.append(range(start, start + k))
        start += k
    return out


def _describe(error: BaseException) -> str:
    if isinstance(error, (Cancelled, Stopped)):
        return "cancelled"
    return f"{type(error).__name__}: {error}"


def agree(group, error: Optional[BaseException] = None, fingerprint: str = "", own: bool = True):
    """Every rank says how its part went (and what it was asked, as a fingerprint).
    If one failed, every rank raises: the failing rank its own error (unless own is
    False), the others a GroupError naming it (Cancelled if it was cancelled); ranks
    asked different things raise a ValueError."""
    try:
        rows = [
            json.loads(b)
            for b in gather_bytes(
                group, json.dumps(["ok" if error is None else _describe(error), fingerprint]).encode()
            )
        ]
    except ValueError:  # another rank was at another exchange
        raise GroupError("the ranks are out of step: every rank must run the same program and options") from None
    if error is not None and not isinstance(error, Stopped):
        if own:
            raise error
        return
    for r, (status, _) in enumerate(rows):
        if status == "cancelled":
            raise Cancelled(f"rank {r} cancelled")
        if status != "ok":
            raise GroupError(f"rank {r} of {group.size()} failed: {status}")
    if error is not None:  # stopped by rank 0 without a reason: should not happen
        raise GroupError(f"rank 0 stopped the group's sampling ({error})")
    differ = [r for r, (_, fp) in enumerate(rows) if fp != rows[0][1]]
    if differ:
        raise ValueError(
            f"the ranks were not asked the same thing (rank {differ[0]} differs from rank 0): "
            "every rank must run the same command with the same options"
        )


def _run_agreed(group, fn):
    """fn() on every rank, then agreement: a failure anywhere raises everywhere."""
    result, error = None, None
    try:
        result = fn()
    except KeyboardInterrupt:
        raise
    except Exception as e:  # shared with the other ranks, then raised here by agree
        error = e
    agree(group, error)
    return result
