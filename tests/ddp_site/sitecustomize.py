"""Test-only: run by Python at start-up when this folder is on PYTHONPATH (tests/test_ddp.py puts it there);
arranges tests/ddp_hooks.py's changes in torchrun's worker processes (they have RANK), not in the launcher."""
import os

if "RANK" in os.environ and (os.environ.get("MEDCLF_TEST_NORM") or os.environ.get("MEDCLF_TEST_DIE")):
    import ddp_hooks

    ddp_hooks.install()
