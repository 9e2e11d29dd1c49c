"""Test-only: run the medclf command line with one fault arranged, as a separate process.

`python tests/fault_runner.py ARGS...` runs `medclf ARGS...`. With MEDCLF_TEST_FAULT=POINT:N:SIGNAL the
process sends itself SIGNAL (KILL or INT) at the N-th time POINT is reached:
  decode      right after one image is decoded into the split's store (for folder data: into the reserved,
              memory-mapped images.npy of the temporary cache folder)
  cache       while a decoded store is finished into the cache: images.npy flushed and meta.json written,
              right before the temporary folder is renamed into place
  batch       right after one training batch is prepared
  checkpoint  right after one checkpoint (model.pt or last.pt) is written to its temporary file, cut to half
              its size first (a write cut short), before it replaces the old one
  last        the same, counting only the temporary files of last.pt
When MEDCLF_TEST_FAULT_LOG names a file, "POINT:N" is appended to it just before the signal is sent, so a
test can tell that the fault really fired where it was meant to.
"""
from __future__ import annotations

import importlib
import os
import signal
import sys
import threading
from pathlib import Path

# point -> (module, function patched there, which calls count)
POINTS = {"decode": ("medclf.data.store", "_to_channels", None),
          "cache": ("medclf.data.store", "_finish_cache", None),
          "batch": ("medclf.training", "prepare_batch", None),
          "checkpoint": ("torch", "save", None),
          "last": ("torch", "save", lambda args: Path(args[1]).name.startswith(".last.pt."))}


def _fire(point: str, nth: int, sig: int) -> None:
    log = os.environ.get("MEDCLF_TEST_FAULT_LOG")
    if log:
        with open(log, "a") as f:
            f.write(f"{point}:{nth}\n")
    os.kill(os.getpid(), sig)


def arm(point: str, nth: int, sig: int) -> None:
    module_name, name, counts = POINTS[point]
    module = importlib.import_module(module_name)
    real = getattr(module, name)
    calls = [0]
    lock = threading.Lock()  # decoding runs in worker threads

    def reached(args) -> bool:
        if counts is not None and not counts(args):
            return False
        with lock:
            calls[0] += 1
            return calls[0] == nth

    if point == "cache":
        def finishing(tmp, folder, *args, **kwargs):
            if not reached((tmp, folder)):
                return real(tmp, folder, *args, **kwargs)
            real_replace = os.replace

            def replace(src, dst, *a, **k):  # the rename that makes the store appear
                if Path(src) == Path(tmp):
                    _fire(point, nth, sig)
                return real_replace(src, dst, *a, **k)

            os.replace = replace
            try:
                return real(tmp, folder, *args, **kwargs)
            finally:
                os.replace = real_replace

        setattr(module, name, finishing)
        return

    def faulty(*args, **kwargs):
        result = real(*args, **kwargs)
        if reached(args):
            if point in ("checkpoint", "last"):  # a write cut short
                os.truncate(args[1], Path(args[1]).stat().st_size // 2)
            _fire(point, nth, sig)
        return result

    setattr(module, name, faulty)


if __name__ == "__main__":
    # Ctrl-C as in a terminal: a shell that starts a job in the background without job control hands it SIGINT
    # ignored, and the child would inherit that (the run would finish instead of stopping)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    fault = os.environ.get("MEDCLF_TEST_FAULT")
    if fault:
        point, nth, sig = fault.split(":")
        arm(point, int(nth), getattr(signal, f"SIG{sig}"))
    from medclf.cli import main

    sys.exit(main(sys.argv[1:]))
