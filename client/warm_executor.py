"""A warm ClientApp executor for a device: one long-lived process that imports the client's libraries once and
runs each Flower task in a child forked from it.

Flower 1.42 runs every message a SuperNode receives in a fresh ``flwr-clientapp`` process (Flower's SuperExec
starts one per task), so every message pays Python's start and the imports: ``flwr`` alone takes about 2 s on
this machine, with torch and peft about 5 s, and a SecAgg+ round is a dozen messages. Started beside a SuperNode
in Flower's ``--isolation process`` mode (the SuperNode then launches nothing and waits for an executor to claim
its tasks through its Runtime API), this process claims ClientApp tasks as Flower's SuperExec does and runs each
with Flower's own ``run_clientapp`` in a forked child. The child starts with everything already imported
(copy-on-write pages of the parent), runs its one task and exits, so a task still cannot leave state behind for
the next (the isolation Flower's process model gives) and a crashing task takes down only its child.

Forking is safe because the parent runs torch single-threaded (it only loads the foundation; no OpenMP worker
pool exists to be inherited in a broken state: a child sets its thread count back and starts its own), starts no
thread and holds no connection a child uses: each child opens its own to the Runtime API.

    python -m fedpa.client.warm_executor --runtime-api-address 127.0.0.1:9094 --insecure
"""

from __future__ import annotations

import argparse
import gc
import importlib
import os
import resource
import signal
import sys
import time

PRELOAD = ("flwr.supernode.runtime.run_clientapp", "torch", "fedpa.client.app", "fedpa.client.runtime",
           "fedpa.client.training", "fedpa.common.models", "fedpa.recmodels.compiled")
"""What the ClientApp's handlers import: the training path (torch, the models) and the SecAgg+ phases."""
FULL_MODEL = ("peft", "fedpa.foundation.model")
"""What a device without a compiled model of the run (`recmodels.compiled`) trains with besides: the modelling stack."""
_TASK_THREADS = 0
"""torch's thread count for a task (the parent's own before `preload` pinned it to one)."""


def preload(modules: tuple[str, ...] = PRELOAD, foundation: str | None = None) -> float:
    """Import what every task needs, once, and load the device's model; returns the seconds it took. A device
    whose directory holds a compiled model (``foundation``'s sibling ``compiled/``, made at provisioning) needs no
    more than torch: that model is loaded (`recmodels.compiled.pin_compiled`). Otherwise (or with no
    ``foundation`` named) the modelling stack too, and the foundation (`foundation.model.pin_foundation`). A task
    then copies what is loaded instead of reading and checking the files."""
    from pathlib import Path

    from fedpa.client.device_data import COMPILED_DIR

    global _TASK_THREADS
    t = time.perf_counter()
    full = foundation is None or not (Path(foundation).parent / COMPILED_DIR).is_dir()
    for name in modules + (FULL_MODEL if full else ()):
        importlib.import_module(name)
    from flwr.supernode.runtime import run_clientapp as task_process

    from fedpa.common.flower_pace import retry_objects_locally

    # a SuperNode announces a task before it holds the message's objects, and its Runtime API is on this device:
    # the tasks forked from here ask again for a missing one at a local pace
    retry_objects_locally(task_process, "pull_and_inflate_object_from_tree")
    if "torch" in sys.modules:
        import torch

        _TASK_THREADS = _TASK_THREADS or torch.get_num_threads()
        torch.set_num_threads(1)
    if foundation and not full:
        from fedpa.recmodels.compiled import pin_compiled

        pin_compiled(Path(foundation).parent / COMPILED_DIR)
    if foundation and full:
        from fedpa.foundation.model import pin_foundation

        pin_foundation(foundation)
    return time.perf_counter() - t


def memory_mib() -> tuple[float, float]:
    """This process's peak resident memory and what of its current memory is its own (not shared with the
    executor it was forked from: private pages), in MiB, from /proc (Linux). getrusage's peak is not used: a
    process that forks reports more than it ever held."""
    def kib(text: str, field: str) -> float:
        return sum(float(line.split()[1]) for line in text.splitlines() if line.startswith(field))
    try:
        status = open("/proc/self/status").read()
        rollup = open("/proc/self/smaps_rollup").read()
    except OSError:
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, float("nan")
    return kib(status, "VmHWM:") / 1024, (kib(rollup, "Private_Clean:") + kib(rollup, "Private_Dirty:")) / 1024


def _run_task(address: str, token: str, insecure: bool, certificates: bytes | None, parent: int) -> None:
    """In the forked child: Flower's own ClientApp process body for one task, then exit without returning to the
    parent's loop (whatever happens)."""
    code, t = 1, time.perf_counter()
    try:
        from flwr.supernode.runtime.run_clientapp import run_clientapp

        if _TASK_THREADS:
            sys.modules["torch"].set_num_threads(_TASK_THREADS)

        run_clientapp(runtime_api_address=address, token=token, insecure=insecure, certificates=certificates,
                      parent_pid=parent)
        code = 0
    except SystemExit as e:   # run_clientapp ends with flwr_exit, which raises SystemExit with the task's code
        code = e.code if isinstance(e.code, int) else 1
    finally:
        try:
            peak, own = memory_mib()
            print(f"fedpa warm executor: task done in {time.perf_counter() - t:.2f} s (exit {code}; peak RSS "
                  f"{peak:.0f} MiB, {own:.0f} MiB its own)", flush=True)
            sys.stderr.flush()
        finally:
            os._exit(code)   # never back into the parent's loop, whatever the last lines raised


class _Stopped(Exception):
    pass


CHILD_GRACE_S = 3.0


def end_children(children: set[int], grace_s: float = CHILD_GRACE_S) -> set[int]:
    """SIGTERM each task process, SIGKILL those still running after ``grace_s``, reap all; returns the killed.

    A task's SIGTERM runs Flower's exit handlers, which can wait on the Runtime API for far longer than whoever
    stops the executor waits for it (a deployment's teardown: 10 s, then SIGKILL for the whole group, and the
    executor's own last line is lost)."""
    for pid in children:
        try:
            os.kill(pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
    left, deadline = set(children), time.monotonic() + grace_s
    while left and time.monotonic() < deadline:
        left = {pid for pid in left if os.waitpid(pid, os.WNOHANG)[0] == 0}
        if left:
            time.sleep(0.02)
    for pid in left:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        os.waitpid(pid, 0)
    children.clear()
    return left


class WarmExecutor:
    """Claims the ClientApp tasks of one SuperNode (its Runtime API at ``address``) and forks a child per task."""

    def __init__(self, address: str, *, insecure: bool = False, root_certificates: str | None = None,
                 poll_s: float = 0.05):
        from flwr.supercore.interceptors import RuntimeVersionHttpInterceptor
        from flwr.supercore.retry import make_simple_http_retry_invoker
        from flwr.supercore.runtime import RuntimeHttpClient

        from fedpa.foundation.errors import FedpaError

        if insecure == bool(root_certificates):
            raise FedpaError("give either --insecure or --root-certificates for the Runtime API (not both, not none)")
        self.address, self.insecure, self.poll_s = address, insecure, poll_s
        self.certificates = open(root_certificates, "rb").read() if root_certificates else None
        self.client = RuntimeHttpClient.from_server_address(
            server_address=address, insecure=insecure, root_certificates=self.certificates,
            interceptors=[RuntimeVersionHttpInterceptor(component_name="SuperExec")],
            retry_invoker=make_simple_http_retry_invoker())
        self.children: set[int] = set()
        self.tasks = 0

    def _reap(self) -> None:
        for pid in list(self.children):
            done, _ = os.waitpid(pid, os.WNOHANG)
            if done:
                self.children.discard(pid)

    def acquire(self) -> str | None:
        """Claim the next ClientApp task; its token, or None when there is none."""
        from flwr.proto.runtime_pb2 import AcquireTaskRequest  # pylint: disable=E0611
        from flwr.supercore.constant import TaskType

        res = self.client.AcquireTask(AcquireTaskRequest(supported_task_types=[TaskType.CLIENT_APP.value],
                                                         agentapp_fab_hashes=[]))
        return res.token if res.HasField("task") and res.token else None

    def serve(self, max_tasks: int | None = None) -> int:
        """Claim and run tasks until stopped (SIGTERM / SIGINT) or ``max_tasks`` have run; returns how many ran."""
        signal.signal(signal.SIGTERM, self._stop)
        signal.signal(signal.SIGINT, self._stop)
        parent = os.getpid()
        try:
            while max_tasks is None or self.tasks < max_tasks:
                self._reap()
                token = self.acquire()
                if token is None:
                    time.sleep(self.poll_s)
                    continue
                # what the parent holds goes to the collector's permanent generation: a child's collections then
                # never write to the parent's objects, so their pages stay shared (copy-on-write, not copied)
                gc.freeze()
                pid = os.fork()
                if pid == 0:
                    signal.signal(signal.SIGTERM, signal.SIG_DFL)
                    signal.signal(signal.SIGINT, signal.SIG_DFL)
                    _run_task(self.address, token, self.insecure, self.certificates, parent)
                self.children.add(pid)
                self.tasks += 1
        except _Stopped:
            pass
        finally:
            if os.getpid() != parent:   # stopped in a child before it became a task: nothing of the parent's is its
                os._exit(1)
            end_children(self.children)   # a task in flight is ended with the executor, as with Flower's SuperExec
            self.client.close()
            print(f"fedpa warm executor: stopped after {self.tasks} task(s); peak RSS {memory_mib()[0]:.0f} MiB",
                  flush=True)
        return self.tasks

    @staticmethod
    def _stop(*_):
        # raised, not flagged: Flower's client retries an unreachable Runtime API for minutes, and a stop must not
        # wait for that (a task in flight is ended below)
        raise _Stopped


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runtime-api-address", required=True, help="the SuperNode's Runtime API (its --host:--port)")
    ap.add_argument("--insecure", action="store_true", help="the Runtime API has no TLS (loopback only)")
    ap.add_argument("--root-certificates", help="CA certificate of the Runtime API's TLS")
    ap.add_argument("--poll", type=float, default=0.05, help="seconds between claims when idle")
    ap.add_argument("--foundation", help="the device's foundation directory (its device-data/foundation), kept loaded")
    a = ap.parse_args(argv)
    executor = WarmExecutor(a.runtime_api_address, insecure=a.insecure, root_certificates=a.root_certificates,
                            poll_s=a.poll)
    seconds = preload(foundation=a.foundation)
    print(f"fedpa warm executor: imports ready in {seconds:.1f} s, claiming tasks of {a.runtime_api_address}",
          flush=True)
    executor.serve()


if __name__ == "__main__":
    main()
