"""`tlsan` as a torchrun script for tests, with rank 1 made to differ from rank 0 on request.

    torchrun --standalone --nproc-per-node 2 tests/torchrun_entry.py train --data ... --out ...

TLSAN_TEST_RANK1_DATA=DIR   rank 1 trains on DIR instead of --data (another vocabulary, as a
                            node holding another copy of the data would)
TLSAN_TEST_RANK1_NUDGE=1    rank 1's freshly built model gets its first parameter shifted
                            (same shapes, other values, as a rank with another init would)
"""

from __future__ import annotations

import os
import sys

import torch


def _differ_on_rank1() -> None:
    if os.environ.get("RANK") != "1":
        return
    other_data = os.environ.get("TLSAN_TEST_RANK1_DATA")
    if other_data:
        sys.argv[sys.argv.index("--data") + 1] = other_data
    if os.environ.get("TLSAN_TEST_RANK1_NUDGE"):
        import tlsan.train

        build = tlsan.train.new_model

        def nudged(*args, **kwargs):  # type: ignore[no-untyped-def]
            model = build(*args, **kwargs)
            with torch.no_grad():
                next(model.parameters()).add_(1e-3)
            return model

        tlsan.train.new_model = nudged


if __name__ == "__main__":
    _differ_on_rank1()
    from tlsan.cli import main

    sys.exit(main())
