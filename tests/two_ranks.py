"""Start rank 1 of a 2-process CPU DDP worker script before its heavy imports, so both ranks import at once.

Lightning's launcher starts rank 1 at the first ``fit``, after rank 0 has imported torch, Lightning and
transformers (about 13 s on 2 cores), and rank 0 then waits while rank 1 imports the same again. Started here,
with ``LOCAL_RANK``, ``NODE_RANK``, ``WORLD_SIZE``, ``MASTER_ADDR`` and ``MASTER_PORT`` set, both ranks run
the same script from the top, as with Lightning's launcher, and Lightning's environment joins them as
processes created outside it (as it does for its own relaunched ranks). Standard library only: it runs before
anything else is imported.
"""

from __future__ import annotations

import atexit
import os
import socket
import subprocess
import sys

RANK_VARIABLES = ("RANK", "LOCAL_RANK", "NODE_RANK", "GROUP_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "PL_GLOBAL_SEED")


def worker_env(**extra: str) -> dict[str, str]:
    """This process's environment for a 2-rank worker script: no rank variables (a worker started from a
    test must be rank 0 of its own group, whatever launched pytest), ``MASTER_ADDR``/``MASTER_PORT`` on a
    free local port, and ``extra`` on top."""
    env = {k: v for k, v in os.environ.items() if k not in RANK_VARIABLES}
    env.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()), **extra)
    return env


def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free now, for a process group's ``MASTER_PORT``."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_second_rank() -> None:
    """In rank 0 (no ``LOCAL_RANK`` yet): start this script again as rank 1, and at exit fail if rank 1 failed."""
    if "LOCAL_RANK" in os.environ:
        return
    if "MASTER_PORT" not in os.environ:
        os.environ["MASTER_PORT"] = str(free_port())
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.update(NODE_RANK="0", LOCAL_RANK="0", WORLD_SIZE="2")
    rank1 = subprocess.Popen([sys.executable, *sys.argv], env={**os.environ, "LOCAL_RANK": "1"})
    failed_here = []
    previous_hook = sys.excepthook

    def stop_rank1_on_error(*exc_info) -> None:  # rank 1 would otherwise wait in a collective until gloo's timeout
        failed_here.append(True)
        rank1.kill()
        previous_hook(*exc_info)

    def wait_for_rank1() -> None:
        code = rank1.wait()
        if code and not failed_here:
            sys.stdout.flush()
            sys.stderr.write(f"rank 1 exited with code {code}\n")
            sys.stderr.flush()
            os._exit(code)

    sys.excepthook = stop_rank1_on_error
    atexit.register(wait_for_rank1)
