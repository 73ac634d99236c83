"""The warm executor's stop (client/warm_executor.py): its task processes end within a bound, so the executor
itself ends (and says so) before whoever stops it gives up and kills the whole group."""

from __future__ import annotations

import subprocess
import sys
import time

from fedpa.client.warm_executor import end_children

STUBBORN = "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); print('ready', flush=True); " \
           "time.sleep(60)"
POLITE = "import time; print('ready', flush=True); time.sleep(60)"


def test_a_task_that_ignores_sigterm_is_killed_after_the_grace_and_every_task_is_reaped():
    procs = [subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
             for code in (STUBBORN, POLITE)]
    for p in procs:
        assert p.stdout.readline().strip() == "ready"   # its handler is in place
    children = {p.pid for p in procs}
    t = time.monotonic()
    killed = end_children(children, grace_s=1.0)
    took = time.monotonic() - t
    assert killed == {procs[0].pid} and children == set()
    assert 1.0 <= took < 5.0, took
    for p in procs:   # reaped by end_children: nothing left for Popen to wait for
        p.returncode = 0
        p.stdout.close()


def test_tasks_that_end_on_sigterm_are_not_waited_for():
    procs = [subprocess.Popen([sys.executable, "-c", POLITE], stdout=subprocess.PIPE, text=True) for _ in range(2)]
    for p in procs:
        assert p.stdout.readline().strip() == "ready"
    t = time.monotonic()
    assert end_children({p.pid for p in procs}, grace_s=30.0) == set()
    assert time.monotonic() - t < 5.0
    for p in procs:
        p.returncode = 0
        p.stdout.close()
