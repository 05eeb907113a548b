"""`tlsan` as a torchrun script for tests, with rank 1 made to differ from rank 0 on request.

    torchrun --standalone --nproc-per-node 2 tests/torchrun_entry.py train --data ... --out ...

TLSAN_TEST_RANK1_DATA=DIR   rank 1 trains on DIR instead of --data (another vocabulary, as a
                            node holding another copy of the data would)
TLSAN_TEST_RANK1_NUDGE=1    rank 1's freshly built model gets its first parameter shifted
                            (same shapes, other values, as a rank with another init would)
TLSAN_TEST_WEIGHTS_DIR=DIR  every rank writes DIR/rank<R>.json: a hash of each tensor of the
                            model `fit` returned (the chosen checkpoint as that rank holds it)
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
from pathlib import Path

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


def _record_weights() -> None:
    folder = os.environ.get("TLSAN_TEST_WEIGHTS_DIR")
    if not folder:
        return
    import tlsan.train

    fit = tlsan.train.fit

    def recording(*args, **kwargs):  # type: ignore[no-untyped-def]
        result = fit(*args, **kwargs)
        digests = {
            name: hashlib.sha256(value.contiguous().numpy().tobytes()).hexdigest()
            for name, value in result.model.state_dict().items()
        }
        out = Path(folder) / f"rank{os.environ['RANK']}.json"
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(digests, sort_keys=True))
        return result

    tlsan.train.fit = recording


if __name__ == "__main__":
    _differ_on_rank1()
    _record_weights()
    from tlsan.cli import main

    sys.exit(main())
