"""The server part's side of a local step: decode every device's smashed data, forward and backward of the mean
loss in bounded chunks, one optimizer step, each device's activation gradient encoded with its own stream."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from sflam.platform import codec
from sflam.platform.codec import Encoded
from sflam.platform.messages import DOWNLINK, FEATURES_DOWN, Smashed, codec_generator, real_rows, scatter_rows
from sflam.platform.split import ServerPart
from sflam.platform.strategies import Adapter, trainable_state

SERVER_CHUNK_SAMPLES = 512  # samples per server forward/backward within one local step (`server_chunks`)


def server_chunks(lengths: np.ndarray) -> list[np.ndarray]:
    """The samples (positions in message order) of each forward/backward of a server step, each run padded to
    its longest sample: all of them in order up to SERVER_CHUNK_SAMPLES, more in chunks of that many in order of
    their real length (so almost no work goes to padding). The cost model charges exactly these chunks."""
    n = len(lengths)
    if n <= SERVER_CHUNK_SAMPLES:
        return [np.arange(n)]
    order = np.argsort(lengths, kind="stable")
    return [order[a:a + SERVER_CHUNK_SAMPLES] for a in range(0, n, SERVER_CHUNK_SAMPLES)]


def cut_groups(cuts: Sequence[int] | np.ndarray) -> dict[int, np.ndarray]:
    """The positions of the samples (or messages) at each cut, shallowest cut first: a group at cut c runs the
    server blocks [c, L) (docs/concepts/split-and-codec.md#devices-at-different-cuts)."""
    at = np.asarray(cuts, dtype=np.int64)
    return {int(c): np.flatnonzero(at == c) for c in np.unique(at)}


def cut_chunks(cuts: Sequence[int] | np.ndarray, lengths: np.ndarray) -> list[tuple[int, np.ndarray]]:
    """Each forward/backward of a server step over samples at several cuts: (cut, positions in message order),
    every cut group in its own `server_chunks` (a chunk never mixes cuts), shallowest cut first. All samples at
    one cut: exactly `server_chunks(lengths)`. The cost model charges each chunk the server blocks [cut, L)."""
    return [(cut, group[chunk]) for cut, group in cut_groups(cuts).items() for chunk in server_chunks(lengths[group])]


@dataclass(kw_only=True)
class ServerStepResult:
    """The server part's step over a local step's messages: its figures and each device's encoded gradient."""

    loss: float
    correct: int
    samples: int
    gradients: list[Encoded | None]

    @property
    def downlink_bits(self) -> list[int]:
        return [0 if g is None else g.payload_bits for g in self.gradients]


def _chunk_batch(rows: torch.Tensor, lengths: torch.Tensor, starts: torch.Tensor, chunk: torch.Tensor,
                 dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A chunk's samples as a padded batch: the indices of their rows, the chunk's mask, the hidden states."""
    chunk_lengths = lengths[chunk]
    mask = (torch.arange(int(chunk_lengths.max())) < chunk_lengths[:, None]).to(dtype)
    # the chunk's rows: each sample's run of real tokens, in the chunk's order
    first = torch.repeat_interleave(starts[chunk] - (torch.cumsum(chunk_lengths, 0) - chunk_lengths), chunk_lengths)
    index = first + torch.arange(int(chunk_lengths.sum()))
    return index, mask, scatter_rows(rows[index], mask)


class ServerRunner:
    """Runs the server part's step on all live devices' micro-batches as one batch (mean loss), in this process
    (the reference runtime, a torch-engine server rank)."""

    def __init__(self, part: ServerPart, gradient_bits: int, side_dtype: str, lr: float, seed: int,
                 send_gradients: bool) -> None:
        self.part = part
        self.gradient_bits = gradient_bits
        self.side_dtype = side_dtype
        self.seed = seed
        self.send_gradients = send_gradients
        params = [p for p in part.parameters() if p.requires_grad]
        self.lr = lr
        self.optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0) if params else None

    def set_lr_factor(self, factor: float) -> None:
        if self.optimizer is not None:
            for group in self.optimizer.param_groups:
                group["lr"] = self.lr * factor

    @staticmethod
    def assemble(messages: list[Smashed], length: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Decode every device's activations and pad them into one batch (right padding, to `length` if longer)."""
        length = max([length] + [int(m.attention_mask.shape[1]) for m in messages])
        mask = torch.cat([torch.nn.functional.pad(m.attention_mask, (0, length - int(m.attention_mask.shape[1])))
                          for m in messages])
        # every message's rows are its real tokens in order, so all decode into the stacked mask at once
        hidden = scatter_rows(codec.decode_many([m.activations for m in messages]), mask)
        return hidden, mask, torch.cat([m.labels for m in messages])

    def chunks(self, messages: list[Smashed], lengths: torch.Tensor) -> list[tuple[int, np.ndarray]]:
        """The step's forward/backward runs: (start in the server part's blocks, positions in message order) of
        each of `cut_chunks` over the messages' cuts (a message without one is at the server part's own cut)."""
        cuts = [self.part.cut_layer if m.cut is None else m.cut for m in messages]
        for cut in set(cuts):
            self.part.start_of(cut)  # a cut the server part cannot serve fails loudly, before any work
        per_sample = np.repeat(np.asarray(cuts, dtype=np.int64), [int(m.attention_mask.shape[0]) for m in messages])
        return [(cut - self.part.cut_layer, positions) for cut, positions in cut_chunks(per_sample, lengths.numpy())]

    def step(self, messages: list[Smashed], round_index: int, step: int) -> ServerStepResult:
        """Forward/backward of the mean loss over every message's samples, one optimizer step, encoded gradients.

        The samples run in the chunks of `cut_chunks` (the gradients of the mean accumulate chunk by chunk), so
        the server's activation memory stays bounded at any number of devices, each device's samples from its own
        cut upward. Padding never changes a real token's result (right padding, masked): the chunking changes the
        sums only at float rounding.
        """
        masks = [m.attention_mask for m in messages]
        lengths = torch.cat([mask.sum(1) for mask in masks]).long()  # every sample's real tokens
        labels = torch.cat([m.labels for m in messages])
        total = int(labels.shape[0])
        chunks = self.chunks(messages, lengths)
        rows = codec.decode_many([m.activations for m in messages])  # sample by sample, real tokens in order
        starts = torch.cumsum(lengths, 0) - lengths  # each sample's first row
        grad_rows = torch.empty_like(rows) if self.send_gradients else None
        loss_sum, correct = 0.0, 0
        for start, positions in chunks:
            chunk = torch.from_numpy(positions)
            index, mask, hidden = _chunk_batch(rows, lengths, starts, chunk, masks[0].dtype)
            hidden.requires_grad_(self.send_gradients)
            with torch.enable_grad():
                logits = self.part(hidden, mask, start)
                loss, chunk_correct = self.part.loss_and_correct(logits, labels[chunk])
                if len(chunks) > 1:
                    loss = loss * (len(positions) / total)
                if self.optimizer is not None or self.send_gradients:
                    loss.backward()
            loss_sum += float(loss.detach())
            correct += int(chunk_correct)
            if grad_rows is not None:
                grad_rows[index] = real_rows(hidden.grad, mask)  # type: ignore[arg-type]
        if self.optimizer is not None:
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
        gradients: list[Encoded | None] = [None] * len(messages)
        if grad_rows is not None:  # each device's rows with its own stream, all devices' statistics at once
            counts = [int(mask.sum()) for mask in masks]
            generators = [codec_generator(self.seed, round_index, step, m.device, DOWNLINK) for m in messages]
            gradients = list(codec.encode_many(grad_rows, counts, [self.gradient_bits] * len(messages),
                                               generators, self.side_dtype))
        return ServerStepResult(loss=loss_sum, correct=correct, samples=total, gradients=gradients)

    # ------------------------------------------------------------------ a U-shaped split (the head on the devices)
    def forward_features(self, messages: list[Smashed], round_index: int, step: int, feature_bits: int
                         ) -> list[Encoded]:
        """The server part's features (what the head reads) of every message's samples, each device's samples from
        its own cut upward, each device's encoded with its own stream; the graphs are kept for `backward_features`."""
        masks = [m.attention_mask for m in messages]
        lengths = torch.cat([mask.sum(1) for mask in masks]).long()
        rows = codec.decode_many([m.activations for m in messages])
        starts = torch.cumsum(lengths, 0) - lengths
        self._u_pending: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]] = []
        features: torch.Tensor | None = None
        for start, positions in self.chunks(messages, lengths):
            chunk = torch.from_numpy(positions)
            index, mask, hidden = _chunk_batch(rows, lengths, starts, chunk, masks[0].dtype)
            hidden.requires_grad_(self.send_gradients)
            with torch.enable_grad():
                out = self.part.features(hidden, mask, start)
            self._u_pending.append((chunk, index, mask, hidden, out))
            if features is None:
                features = out.new_empty((int(lengths.shape[0]), out.shape[-1]))
            features[chunk] = out.detach()
        assert features is not None
        self._u_rows, self._u_masks = rows, masks
        generators = [codec_generator(self.seed, round_index, step, m.device, FEATURES_DOWN) for m in messages]
        return list(codec.encode_many(features, [int(m.attention_mask.shape[0]) for m in messages],
                                      [feature_bits] * len(messages),
                                      generators, codec.GRADIENT_SIDE_DTYPE))

    def backward_features(self, messages: list[Smashed], gradients: list[Encoded], round_index: int, step: int
                          ) -> list[Encoded | None]:
        """The devices' gradients of the features through the server part's graphs, one optimizer step; each
        device's smashed-data gradient encoded with its own stream (none when the device part does not train)."""
        grad_features = codec.decode_many(gradients)  # sample by sample, in message order
        grad_rows = torch.empty_like(self._u_rows) if self.send_gradients else None
        for chunk, index, mask, hidden, out in self._u_pending:
            out.backward(grad_features[chunk].to(out.dtype))
            if grad_rows is not None:
                grad_rows[index] = real_rows(hidden.grad, mask)  # type: ignore[arg-type]
        self._u_pending = []
        if self.optimizer is not None:
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
        if grad_rows is None:
            return [None] * len(messages)
        counts = [int(mask.sum()) for mask in self._u_masks]
        generators = [codec_generator(self.seed, round_index, step, m.device, DOWNLINK) for m in messages]
        return list(codec.encode_many(grad_rows, counts, [self.gradient_bits] * len(messages), generators,
                                      self.side_dtype))

    def state(self) -> Adapter:
        return trainable_state(self.part)

    def checkpoint(self) -> dict[str, object]:
        """The trained tensors and the optimizer state: enough to continue exactly."""
        return {"part": self.state(), "optimizer": self.optimizer.state_dict() if self.optimizer else None}

    def restore(self, state: dict[str, object]) -> None:
        tensors = state["part"]
        assert isinstance(tensors, dict)
        with torch.no_grad():
            for name, p in self.part.named_parameters():
                if p.requires_grad:
                    p.copy_(tensors[name])
        if self.optimizer is not None and state.get("optimizer") is not None:
            self.optimizer.load_state_dict(state["optimizer"])  # type: ignore[arg-type]
