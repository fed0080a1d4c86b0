"""Independent runs of a sweep in parallel worker processes that never outlive their parent.

A killed parent (SIGKILL, an out-of-memory kill, a closed terminal) cannot clean up, so each worker
watches its parent's pid and exits as soon as it is gone, and every run-file write first checks
that the parent lives (:func:`stablespike.runfiles.write_only_while_parent_lives`).
"""
from __future__ import annotations

import logging
import os
import signal
import threading
import time
import traceback
from dataclasses import replace
from typing import Callable

import torch

from ..runfiles import write_only_while_parent_lives


def run_parallel(cfg, out_dir: str, keys: list, resume: bool, jobs: int, run: Callable,
                 load: Callable, on_done: Callable[[], None]) -> None:
    """``jobs`` worker processes (spawned: no forked torch thread pools), each with its share of
    the cores, fed one run at a time through a pipe: ``run(cfg, out_dir, key, resume, data)`` with
    ``data = load(cfg)`` loaded once per worker (both module-level functions: they are sent to
    spawned processes by name). ``on_done()`` runs in the parent after each finished run. On any
    error or Ctrl-C the workers are stopped (their runs resume from their last checkpoint)."""
    import multiprocessing
    from multiprocessing.connection import wait
    ctx = multiprocessing.get_context("spawn")
    threads = max(1, (os.cpu_count() or 1) // jobs)
    quiet = replace(cfg, train=replace(cfg.train, progress=False))  # no interleaved bars
    todo, workers, running = list(keys), [], {}
    try:
        for _ in range(min(jobs, len(todo))):
            here, there = ctx.Pipe()
            proc = ctx.Process(target=_worker, args=(there, run, load, quiet, out_dir, resume, threads, os.getpid()),
                               daemon=True)
            proc.start()
            there.close()
            workers.append((proc, here))
            running[here] = None
        for conn in list(running):
            running[conn] = _next(conn, todo)
        while any(k is not None for k in running.values()):
            busy = [c for c, k in running.items() if k is not None]
            ready = wait(busy + [p.sentinel for p, c in workers if c in busy])
            for proc, conn in workers:
                key = running.get(conn)
                if key is None or not (conn in ready or proc.sentinel in ready):
                    continue
                try:
                    status, error = conn.recv()
                except EOFError:
                    proc.join(1)
                    raise ChildProcessError(
                        f"the worker process running {key.name} died (exit code {proc.exitcode}, e.g. "
                        f"killed for memory); resume the sweep to continue") from None
                if status == "error":
                    raise error
                on_done()
                running[conn] = _next(conn, todo)
    finally:
        for proc, conn in workers:
            conn.close()  # an idle worker reads the end of its pipe and exits
        for proc, _ in workers:
            proc.join(0.5)
            if proc.is_alive():
                proc.terminate()  # a busy one is stopped; its run resumes from its checkpoint
                proc.join()


def _next(conn, todo: list):
    key = todo.pop(0) if todo else None
    if key is not None:
        conn.send(key)
    return key


def _watch_parent(parent: int, every: float = 0.05) -> None:
    """Exit this worker as soon as its parent is gone (SIGKILL, out-of-memory kill, closed
    terminal: the parent cannot clean up, so each worker watches it)."""
    while os.getppid() == parent:
        time.sleep(every)
    os._exit(1)


def _worker(conn, run: Callable, load: Callable, cfg, out_dir: str, resume: bool, threads: int,
            parent: int) -> None:
    """A worker of :func:`run_parallel`: runs the keys it receives until its pipe closes."""
    write_only_while_parent_lives(parent)
    threading.Thread(target=_watch_parent, args=(parent,), daemon=True).start()
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle: it stops us
    torch.set_num_threads(threads)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    data = None
    while True:
        try:
            key = conn.recv()
        except (EOFError, OSError):
            return
        try:
            data = data if data is not None else load(cfg)
            run(cfg, out_dir, key, resume, data)
            conn.send(("done", None))
        except Exception as err:  # handed to the parent, which raises it
            if not isinstance(err, (ValueError, OSError, ImportError)):
                err = RuntimeError(f"run {key.name} failed in a worker process:\n{traceback.format_exc()}")
            try:
                conn.send(("error", err))
            except Exception:  # an exception that does not pickle
                conn.send(("error", RuntimeError(f"run {key.name}: {traceback.format_exc()}")))
