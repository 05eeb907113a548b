"""The model step of serving: feature rows -> user vectors `[u_t ; 1]` (and attention).

Every model kind of the harness serves: `tlsan`, `sasrec`, `tisasrec` and `pop`; all score an
item as `<user_vector, item_vector>`, so retrieval is the same FAISS search for each.

Feature rows come from `pipelines.features.online_features`, the arrays of an offline
example, and go through the very padding code training and evaluation use
(`tlsan.data.right_aligned`, behind `padded_arrays`), with no dataframe in between: the
long-term history and the current session's items, and for TiSASRec their timestamps
(`long_time`/`short_time`), so a sequence model reads exactly the [long ; session] sequence
the offline evaluator builds from an example. The ONNX path pads the flat lists straight into
the graph's inputs (`tlsan.onnx_graph.list_inputs`), skipping the PyTorch tensors it would not
use. User index 0 asks the model for neutral personal parameters (an unknown user).

TLSAN runs in its inference form (`tlsan.frozen.FrozenTLSAN`: lookup tables gathered once,
bit-identical outputs). Small TLSAN batches without explanations run on ONNX Runtime when the
bundle has the exported graph (`tlsan.onnx_graph`): a lone request's forward costs a fraction
of PyTorch's per-op dispatch there. The graph is checked against the PyTorch model on load.
The other kinds serve on PyTorch (`runtime` says which, and `GET /model` shows it).

Explanations read the attention the model actually computed, captured by forward hooks:
- TLSAN: the inputs of its two feature-wise attention modules; the softmax weights are
  recomputed from them with the modules' own layers, then averaged over features (each
  feature has its own softmax over positions, so the average is again a distribution);
- SASRec / TiSASRec: the inputs of every self-attention block; the weights of the last
  position (the user state) over the sequence are recomputed with the block's own
  `attention`, then averaged over heads and over blocks (again a distribution);
- pop has no attention: the recommender explains its answer as popularity.
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
from tlsan.frozen import FrozenTLSAN
from tlsan.model import NEG_INF, TLSAN, FeatureWiseAttention
from tlsan.onnx_graph import DEFAULT_MAX_BATCH, ONNX_FILE, OnnxUserVectors, list_inputs
from tlsan.sasrec import SequenceModel, TiSASRec

# what the explanation's weights are, per model family (the `method` of an explanation)
FEATURE_WISE = "feature_wise_attention"
SELF_ATTENTION = "self_attention"
POPULARITY = "popularity"


def fwa_weights(module: FeatureWiseAttention, x: Tensor, mask: Tensor) -> Tensor:
    """(B, L) attention of a feature-wise attention over positions, mean over features."""
    B, L, D = x.shape
    xh = (x * mask.unsqueeze(-1)).view(B, L, module.heads, D // module.heads)
    a = module.map2(F.relu(module.map1(xh)))  # (B, L, H, Dh); dropout is off in eval mode
    a = a.masked_fill(~mask.view(B, L, 1, 1), NEG_INF)
    return module.softmax(a).mean(dim=(2, 3)) * mask  # (B, L)


def last_position_weights(model: SequenceModel, inputs: list[tuple[Tensor, ...]]) -> Tensor:
    """(B, T) attention of the last position over the sequence, averaged over heads and
    blocks, from each block's captured forward inputs."""
    maps = [
        block.attention(*args)[:, :, -1, :].mean(1)  # (B, T)
        for block, args in zip(model.blocks, inputs, strict=True)
    ]
    return torch.stack(maps).mean(0)


class ModelStep:
    """The bundle's model in eval mode, answering batches of feature rows.

    `onnx_max_batch`: batches up to this many rows (without explanations) run on the bundle's
    ONNX graph when it has one (TLSAN); 0 keeps every batch on PyTorch.
    """

    def __init__(
        self, bundle: Bundle, *, threads: int = 1, onnx_max_batch: int = DEFAULT_MAX_BATCH
    ) -> None:
        if onnx_max_batch < 0:
            raise ValueError(f"onnx_max_batch: expected >= 0, got {onnx_max_batch}")
        model: nn.Module = bundle.load_model().eval()
        if isinstance(model, TLSAN):  # item and user lookup tables gathered once
            model = FrozenTLSAN(model)
        self.model = model
        self.kind = str(bundle.manifest["model"])
        self.uses_time = isinstance(model, TiSASRec)  # the events' timestamps are inputs
        if isinstance(model, TLSAN):
            self.method: str = FEATURE_WISE
        elif isinstance(model, SequenceModel):
            self.method = SELF_ATTENTION
        else:
            self.method = POPULARITY
        self.explainable = self.method != POPULARITY
        self.graph: OnnxUserVectors | None = None
        self.onnx_max_batch = onnx_max_batch
        path = bundle.path / MODEL_DIR / ONNX_FILE
        if onnx_max_batch and isinstance(model, TLSAN) and path.is_file():
            try:
                graph = OnnxUserVectors(path, long_window=model.config.long_window, threads=threads)
                graph.check(model)
            except GraphError as exc:
                raise BundleError(f"{bundle.path}: {exc}; re-export the bundle") from exc
            self.graph = graph

    @property
    def runtime(self) -> dict[str, Any]:
        """What `/model` reports about how the model runs."""
        info: dict[str, Any] = {"model_kind": self.kind, "explanation": self.method}
        if self.graph is None:
            return {**info, "engine": "pytorch", "onnx": False}
        return {
            **info,
            "engine": "onnxruntime (batches up to onnx_max_batch rows), pytorch (larger "
            "batches and explanations)",
            "onnx": True,
            "onnx_max_batch": self.onnx_max_batch,
        }

    def user_vectors(
        self, features: OnlineFeatures, users: np.ndarray, *, explain: np.ndarray | None = None
    ) -> tuple[np.ndarray, list[dict[str, Any] | None]]:
        """(B, D + 1) float32 query vectors; per row, the attention when `explain[b]` (None
        for a model without attention)."""
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
        long_lengths, short_lengths = np.diff(lists.long_offsets), np.diff(lists.short_offsets)
        times = {}
        if self.uses_time:
            times = {"long_time": lists.long_time, "short_time": lists.short_time}
        batch = padded_arrays(
            rows=len(features),
            user=users,
            long_items=lists.long_items,
            long_tau=lists.long_tau,
            long_lengths=long_lengths,
            short_items=lists.short_items,
            short_lengths=short_lengths,
            user_category=lists.user_category,
            **times,
        ).batch()
        if explain is None:
            vectors = self.model.user_vectors(batch).numpy()
            return vectors.astype(np.float32, copy=False), [None] * len(users)
        modules = self._attention_modules()
        captured: list[tuple[Tensor, ...]] = [()] * len(modules)
        hooks = []
        for n, module in enumerate(modules):

            def hook(_m: nn.Module, args: tuple[Tensor, ...], _o: Tensor, n: int = n) -> None:
                captured[n] = args

            hooks.append(module.register_forward_hook(hook))
        try:
            vectors = self.model.user_vectors(batch).numpy().astype(np.float32, copy=False)
        finally:
            for handle in hooks:
                handle.remove()
        if self.method == FEATURE_WISE:
            attention = self._fwa_attention(captured, explain)
        else:
            attention = self._sequence_attention(captured, explain, long_lengths, short_lengths)
        return vectors, attention

    def _attention_modules(self) -> list[nn.Module]:
        """The modules whose forward inputs an explanation needs."""
        if self.method == FEATURE_WISE:
            return [self.model.fwa_long, self.model.fwa_short]
        return list(self.model.blocks)

    def _fwa_attention(
        self, captured: list[tuple[Tensor, ...]], explain: np.ndarray
    ) -> list[dict[str, Any] | None]:
        """TLSAN: long-term weights, the summary's and the session items' weights."""
        (x_long, long_mask), (x_short, short_mask) = captured[0][:2], captured[1][:2]
        long_w = fwa_weights(self.model.fwa_long, x_long, long_mask)  # (B, Ls)
        short_w = fwa_weights(self.model.fwa_short, x_short, short_mask)  # (B, 1+S)
        attention: list[dict[str, Any] | None] = [None] * len(explain)
        for b in np.flatnonzero(explain):
            attention[b] = {
                "method": FEATURE_WISE,
                "long": long_w[b][long_mask[b]].tolist(),
                "summary": float(short_w[b, 0]),
                "short": short_w[b, 1:][short_mask[b, 1:]].tolist(),
            }
        return attention

    def _sequence_attention(
        self,
        captured: list[tuple[Tensor, ...]],
        explain: np.ndarray,
        long_lengths: np.ndarray,
        short_lengths: np.ndarray,
    ) -> list[dict[str, Any] | None]:
        """(Ti)SASRec: the last position's weights over the events it read, split into the
        long-term events and the session's (the sequence is the last `max_len` of both)."""
        weights = last_position_weights(self.model, captured)  # (B, T), right-aligned
        max_len = self.model.config.max_len
        attention: list[dict[str, Any] | None] = [None] * len(explain)
        for b in np.flatnonzero(explain):
            kept = min(int(long_lengths[b] + short_lengths[b]), max_len)
            short = min(int(short_lengths[b]), kept)
            row = weights[b, weights.shape[1] - kept :].tolist() if kept else []
            attention[b] = {
                "method": SELF_ATTENTION,
                "long": row[: kept - short],
                "summary": 0.0,
                "short": row[kept - short :],
            }
        return attention
