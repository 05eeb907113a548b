"""TLSAN's user-vector computation as an ONNX graph, run by ONNX Runtime for small batches.

Why: a lone request's model step is about 45 small tensor operations, and PyTorch's
per-operation dispatch costs more than their arithmetic. ONNX Runtime runs the same graph,
exported from the model's inference form (`tlsan.frozen.FrozenTLSAN`), with a fraction of
that overhead; larger batches stay on PyTorch, whose kernels are the faster ones there (see
`DEFAULT_MAX_BATCH`). The feature-wise attention's softmax is exported as max, exp and sum
(`PositionSoftmax`, swapped in for the export only): ONNX Runtime's Softmax over a non-last
axis transposes twice and cost a quarter of a lone request's forward; the plain ops compute
the same weights in ~40% less time (measured: 138 -> 100 us).

The graph takes the padded arrays of a `tlsan.data.Batch` with the long-term window cut or
left-padded to exactly `long_window` positions (the model looks at no more) and at least one
short-term position (padding is masked either way); `graph_inputs` makes them. Outputs
match PyTorch's to float32 rounding; `OnnxUserVectors.check` verifies that on load.
"""

from __future__ import annotations

import logging
import os
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from tlsan.data import Batch, right_aligned
from tlsan.errors import GraphError
from tlsan.frozen import FrozenTLSAN
from tlsan.model import TLSAN, FeatureWiseAttention

ONNX_FILE = "model.onnx"
INPUT_NAMES = ("user", "long_items", "long_tau", "short_items", "user_category")
DEFAULT_MAX_BATCH = 8  # measured: ONNX Runtime ahead up to ~8 rows, PyTorch ahead from there
MAX_EXPORT_BYTES = 1 << 30  # one protobuf holds at most 2 GiB; larger models serve on PyTorch


def graph_inputs(batch: Batch, long_window: int) -> dict[str, np.ndarray]:
    """The graph's inputs as contiguous NumPy arrays (int64 indices, float32 `long_tau`)."""
    long_items, long_tau = batch.long_items.numpy(), batch.long_tau.numpy()
    width = long_items.shape[1]
    if width >= long_window:
        long_items, long_tau = (
            long_items[:, width - long_window :],
            long_tau[:, width - long_window :],
        )
    else:  # pad on the left (the older side), as the model itself does
        rows = long_items.shape[0]
        padded_items = np.zeros((rows, long_window), np.int64)
        padded_tau = np.zeros((rows, long_window), np.float32)
        padded_items[:, long_window - width :] = long_items
        padded_tau[:, long_window - width :] = long_tau
        long_items, long_tau = padded_items, padded_tau
    short = batch.short_items.numpy()
    if short.shape[1] == 0:
        short = np.zeros((short.shape[0], 1), np.int64)
    return {
        "user": batch.user.numpy(),
        "long_items": np.ascontiguousarray(long_items, np.int64),
        "long_tau": np.ascontiguousarray(long_tau, np.float32),
        "short_items": np.ascontiguousarray(short, np.int64),
        "user_category": batch.user_category.numpy(),
    }


def list_inputs(
    *,
    user: np.ndarray,
    long_items: np.ndarray,
    long_tau: np.ndarray,
    long_lengths: np.ndarray,
    short_items: np.ndarray,
    short_lengths: np.ndarray,
    user_category: np.ndarray,
    long_window: int,
) -> dict[str, np.ndarray]:
    """The graph's inputs straight from flat feature lists (what serving computes), without
    the padded tensors of a `Batch`: the same right-aligned padding (`right_aligned`), with
    the long-term lists cut to the window. Equal to `graph_inputs` of the padded batch."""
    width_short = max(int(short_lengths.max(initial=0)), 1)
    return {
        "user": np.ascontiguousarray(user, np.int64),
        "long_items": right_aligned(long_items, long_lengths, long_window, np.int64),
        "long_tau": right_aligned(long_tau, long_lengths, long_window, np.float32),
        "short_items": right_aligned(short_items, short_lengths, width_short, np.int64),
        "user_category": np.ascontiguousarray(user_category, np.int64),
    }


class PositionSoftmax(nn.Module):
    """`nn.Softmax(dim)` in plain ops (max, exp, sum): what the export puts in the graph."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.dim = dim

    def forward(self, a: Tensor) -> Tensor:
        e = torch.exp(a - a.amax(dim=self.dim, keepdim=True))
        return e / e.sum(dim=self.dim, keepdim=True)


class _UserVectors(nn.Module):
    """`model.user_vectors` over plain tensors (what the exporter traces)."""

    def __init__(self, model: TLSAN) -> None:
        super().__init__()
        self.model = model

    def forward(
        self,
        user: Tensor,
        long_items: Tensor,
        long_tau: Tensor,
        short_items: Tensor,
        user_category: Tensor,
    ) -> Tensor:
        batch = Batch(user, long_items, long_tau, short_items, user_category, target=user)
        return self.model.user_vectors(batch)


def exportable(model: nn.Module) -> str | None:
    """Why `model` gets no ONNX graph, or None when it can have one."""
    if not isinstance(model, TLSAN):
        return f"{type(model).__name__} serves on PyTorch (the graph covers TLSAN)"
    size = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    if size * 2 > MAX_EXPORT_BYTES:  # the frozen tables roughly double the initializers
        return f"{size >> 20} MiB of weights: too large for one ONNX file; serves on PyTorch"
    return None


def probe_batch(model: TLSAN, rows: int = 4, seed: int = 0) -> Batch:
    """Deterministic inputs covering unknown and known users, padding, and tau values."""
    g = torch.Generator().manual_seed(seed)
    Ls = model.config.long_window
    n_items, n_users = model.b.shape[0], model.P.shape[0]
    n_cats = model.E_c.weight.shape[0]
    long_items = torch.randint(1, n_items, (rows, Ls), generator=g)
    long_items[0, : Ls // 2] = 0  # a short history
    short = torch.randint(1, n_items, (rows, 3), generator=g)
    short[1] = 0  # no current session
    user = torch.randint(1, n_users, (rows,), generator=g) if n_users > 1 else torch.zeros(rows)
    user = user.to(torch.int64)
    user[0] = 0  # an unknown user: neutral personal parameters
    return Batch(
        user=user,
        long_items=long_items,
        long_tau=torch.rand(rows, Ls, generator=g) * (long_items > 0),
        short_items=short,
        user_category=torch.randint(0, n_cats, (rows,), generator=g),
        target=torch.zeros(rows, dtype=torch.int64),
    )


def export_user_vectors(model: TLSAN, path: Path) -> None:
    """Write `model`'s user vectors (computed by its `FrozenTLSAN` form) as an ONNX graph with
    dynamic batch and session length to `path`; `model` is left as it was. Raises
    `GraphError` on failure."""
    was_training = model.training
    model.eval()
    frozen = model if isinstance(model, FrozenTLSAN) else FrozenTLSAN(model)
    model.train(was_training)
    attentions = [m for m in frozen.modules() if isinstance(m, FeatureWiseAttention)]
    softmaxes = [m.softmax for m in attentions]
    example = probe_batch(frozen, rows=2)
    inputs = graph_inputs(example, model.config.long_window)
    args = tuple(torch.from_numpy(inputs[name]) for name in INPUT_NAMES)
    batch, session = torch.export.Dim("batch"), torch.export.Dim("session")
    dynamic = ({0: batch}, {0: batch}, {0: batch}, {0: batch, 1: session}, {0: batch})
    quiet = [logging.getLogger(name) for name in ("torch.onnx", "torch._dynamo", "onnxscript")]
    levels = [logger.level for logger in quiet]
    try:
        for module in attentions:
            module.softmax = PositionSoftmax(dim=1)
        for logger in quiet:
            logger.setLevel(logging.ERROR)
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")
            program = torch.onnx.export(
                _UserVectors(frozen),
                args,
                input_names=list(INPUT_NAMES),
                output_names=["user_vectors"],
                dynamic_shapes=dynamic,
                dynamo=True,
                optimize=True,
                verbose=False,
            )
        if program is None:
            raise GraphError("torch.onnx.export returned no program")
        program.save(str(path))
    except GraphError:
        raise
    except Exception as exc:  # the exporter raises many types
        raise GraphError(f"exporting the ONNX graph failed: {exc}") from exc
    finally:
        for module, softmax in zip(attentions, softmaxes, strict=True):
            module.softmax = softmax
        for logger, level in zip(quiet, levels, strict=True):
            logger.setLevel(level)


class OnnxUserVectors:
    """An ONNX Runtime session over an exported graph, single-threaded by default (a worker
    per core is the scaling unit, as for PyTorch and FAISS)."""

    def __init__(self, path: Path, *, long_window: int, threads: int = 1) -> None:
        try:
            import onnxruntime as ort
        except ImportError as exc:  # a core dependency; only a broken install lacks it
            raise GraphError(f"onnxruntime is not installed ({exc})") from exc
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        options.log_severity_level = 3
        try:
            self.session = ort.InferenceSession(
                os.fspath(path), options, providers=["CPUExecutionProvider"]
            )
        except Exception as exc:  # onnxruntime raises its own Fail/InvalidGraph types
            raise GraphError(f"{path}: not a loadable ONNX graph ({exc})") from exc
        names = tuple(i.name for i in self.session.get_inputs())
        if sorted(names) != sorted(INPUT_NAMES):
            raise GraphError(f"{path}: graph inputs {names}, expected {INPUT_NAMES}")
        self.long_window = long_window

    def __call__(self, batch: Batch) -> np.ndarray:
        """(B, D + 1) float32 user vectors `[u_t ; 1]`."""
        return self.run(graph_inputs(batch, self.long_window))

    def run(self, inputs: dict[str, np.ndarray]) -> np.ndarray:
        """User vectors from ready graph inputs (`graph_inputs` or `list_inputs`)."""
        return self.session.run(None, inputs)[0]

    def check(self, model: TLSAN, *, atol: float = 1e-5) -> None:
        """Compare with PyTorch on a probe batch: a graph from other weights is refused."""
        batch = probe_batch(model)
        with torch.inference_mode():
            expected = model.user_vectors(batch).numpy()
        got = self(batch)
        if got.shape != expected.shape or not np.allclose(got, expected, rtol=1e-4, atol=atol):
            worst: Any = (
                float(np.abs(got - expected).max()) if got.shape == expected.shape else got.shape
            )
            raise GraphError(
                f"the ONNX graph does not match the model's weights (largest difference {worst})"
            )
