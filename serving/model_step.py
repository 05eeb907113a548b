"""The model step of serving: feature rows -> user vectors `[u_t ; 1]` (and attention).

Feature rows come from `pipelines.features.online_features`, the arrays of an offline
example, and go through the very padding code training and evaluation use
(`tlsan.data.right_aligned`, behind `padded_arrays`), with no dataframe in between; the ONNX
path pads the flat lists straight into the graph's inputs (`tlsan.onnx_graph.list_inputs`),
skipping the PyTorch tensors it would not use. User index 0 asks the model for
neutral personal parameters (an unknown user).

Small batches without explanations run on ONNX Runtime when the bundle has the exported
graph (`tlsan.onnx_graph`): a lone request's forward costs a fraction of PyTorch's per-op
dispatch there. The graph is checked against the PyTorch model on load.

Explanations (TLSAN only) read the attention the model actually computed: forward hooks on
its two feature-wise attention modules capture their inputs, and the softmax weights are
recomputed from them with the modules' own layers, then averaged over features (each
feature has its own softmax over positions, so the average is again a distribution).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pipelines.features import OnlineFeatures
from tlsan.bundle import MODEL_DIR, Bundle
from tlsan.data import padded_arrays
from tlsan.errors import BundleError, GraphError
from tlsan.model import NEG_INF, TLSAN, FeatureWiseAttention
from tlsan.onnx_graph import DEFAULT_MAX_BATCH, ONNX_FILE, OnnxUserVectors, list_inputs


def fwa_weights(module: FeatureWiseAttention, x: Tensor, mask: Tensor) -> Tensor:
    """(B, L) attention of a feature-wise attention over positions, mean over features."""
    B, L, D = x.shape
    xh = (x * mask.unsqueeze(-1)).view(B, L, module.heads, D // module.heads)
    a = module.map2(F.relu(module.map1(xh)))  # (B, L, H, Dh); dropout is off in eval mode
    a = a.masked_fill(~mask.view(B, L, 1, 1), NEG_INF)
    return torch.softmax(a, dim=1).mean(dim=(2, 3)) * mask  # (B, L)


class ModelStep:
    """The bundle's model in eval mode, answering batches of feature rows.

    `onnx_max_batch`: batches up to this many rows (without explanations) run on the bundle's
    ONNX graph when it has one; 0 keeps every batch on PyTorch.
    """

    def __init__(
        self, bundle: Bundle, *, threads: int = 1, onnx_max_batch: int = DEFAULT_MAX_BATCH
    ) -> None:
        if onnx_max_batch < 0:
            raise ValueError(f"onnx_max_batch: expected >= 0, got {onnx_max_batch}")
        self.model: nn.Module = bundle.load_model()
        self.model.eval()
        freeze = getattr(self.model, "freeze", None)
        if freeze is not None:  # TLSAN: item and user lookup tables gathered once
            freeze()
        self.explainable = isinstance(getattr(self.model, "fwa_long", None), FeatureWiseAttention)
        self.graph: OnnxUserVectors | None = None
        self.onnx_max_batch = onnx_max_batch
        path = bundle.path / MODEL_DIR / ONNX_FILE
        if onnx_max_batch and isinstance(self.model, TLSAN) and path.is_file():
            try:
                graph = OnnxUserVectors(
                    path, long_window=self.model.config.long_window, threads=threads
                )
                graph.check(self.model)
            except GraphError as exc:
                raise BundleError(f"{bundle.path}: {exc}; re-export the bundle") from exc
            self.graph = graph

    @property
    def runtime(self) -> dict[str, Any]:
        """What `/model` reports about how the model runs."""
        if self.graph is None:
            return {"onnx": False}
        return {"onnx": True, "onnx_max_batch": self.onnx_max_batch}

    def user_vectors(
        self, features: OnlineFeatures, users: np.ndarray, *, explain: np.ndarray | None = None
    ) -> tuple[np.ndarray, list[dict[str, Any] | None]]:
        """(B, D + 1) float32 query vectors; per row, the attention when `explain[b]`."""
        wanted = explain is not None and bool(explain.any()) and self.explainable
        if self.graph is not None and not wanted and len(users) <= self.onnx_max_batch:
            lists = features.lists
            long_off, short_off = lists.long_offsets, lists.short_offsets
            inputs = list_inputs(
                user=users,
                long_items=lists.long_items,
                long_tau=lists.long_tau,
                long_lengths=long_off[1:] - long_off[:-1],
                short_items=lists.short_items,
                short_lengths=short_off[1:] - short_off[:-1],
                user_category=lists.user_category,
                long_window=self.graph.long_window,
            )
            return self.graph.run(inputs), [None] * len(users)
        return self._torch_vectors(features, users, explain if wanted else None)

    @torch.inference_mode()
    def _torch_vectors(
        self, features: OnlineFeatures, users: np.ndarray, explain: np.ndarray | None
    ) -> tuple[np.ndarray, list[dict[str, Any] | None]]:
        """PyTorch's forward, with the attention captured for the rows in `explain`."""
        lists = features.lists
        wanted = explain is not None
        batch = padded_arrays(
            rows=len(features),
            user=users,
            long_items=lists.long_items,
            long_tau=lists.long_tau,
            long_lengths=np.diff(lists.long_offsets),
            short_items=lists.short_items,
            short_lengths=np.diff(lists.short_offsets),
            user_category=lists.user_category,
        ).batch()
        captured: dict[str, tuple[Tensor, Tensor]] = {}
        hooks = []
        if wanted:
            for name in ("fwa_long", "fwa_short"):

                def hook(_m: nn.Module, args: tuple[Tensor, ...], _o: Tensor, name=name) -> None:
                    captured[name] = (args[0], args[1])

                hooks.append(getattr(self.model, name).register_forward_hook(hook))
        try:
            vectors = self.model.user_vectors(batch).numpy().astype(np.float32, copy=False)
        finally:
            for handle in hooks:
                handle.remove()
        attention: list[dict[str, Any] | None] = [None] * len(users)
        if wanted:
            assert explain is not None
            long_w = fwa_weights(self.model.fwa_long, *captured["fwa_long"])  # (B, Ls)
            short_w = fwa_weights(self.model.fwa_short, *captured["fwa_short"])  # (B, 1+S)
            long_mask = captured["fwa_long"][1]
            short_mask = captured["fwa_short"][1][:, 1:]
            for b in np.flatnonzero(explain):
                attention[b] = {
                    "long": long_w[b][long_mask[b]].tolist(),
                    "summary": float(short_w[b, 0]),
                    "short": short_w[b, 1:][short_mask[b]].tolist(),
                }
        return vectors, attention
