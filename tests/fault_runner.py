"""Test-only: run the medclf command line with one fault arranged, as a separate process.

`python tests/fault_runner.py ARGS...` runs `medclf ARGS...`. With MEDCLF_TEST_FAULT=POINT:N:SIGNAL the
process sends itself SIGNAL (KILL or INT) right after the N-th call of POINT:
  decode      one image decoded into the cache
  cache       one array of the decoded-image cache saved (np.save), before the cache is moved in place
  batch       one training batch prepared
  checkpoint  one checkpoint written to its temporary file (cut to half its size first), before it replaces the old one
"""
from __future__ import annotations

import importlib
import os
import signal
import sys
from pathlib import Path

POINTS = {"decode": ("medclf.data.store", "decode_image"), "cache": ("numpy", "save"),
          "batch": ("medclf.training", "prepare_batch"), "checkpoint": ("torch", "save")}


def arm(point: str, nth: int, sig: int) -> None:
    module = importlib.import_module(POINTS[point][0])
    real = getattr(module, POINTS[point][1])
    calls = [0]

    def faulty(*args, **kwargs):
        result = real(*args, **kwargs)
        calls[0] += 1
        if calls[0] == nth:
            if point == "checkpoint":  # a write cut short
                os.truncate(args[1], Path(args[1]).stat().st_size // 2)
            os.kill(os.getpid(), sig)
        return result

    setattr(module, POINTS[point][1], faulty)


if __name__ == "__main__":
    fault = os.environ.get("MEDCLF_TEST_FAULT")
    if fault:
        point, nth, sig = fault.split(":")
        arm(point, int(nth), getattr(signal, f"SIG{sig}"))
    from medclf.cli import main

    sys.exit(main(sys.argv[1:]))
