"""The exact split of a Hugging Face transformer at a cut layer into a device part and a server part.

Cut layer c in 0..L: the device part is the embeddings plus blocks [0, c); the server part is blocks
[c, L), the final norm and the head (docs/concepts/split-and-codec.md). Both parts hold the model's own modules (no
copies),
so loss and gradients equal the unsplit model's. What travels between them is the hidden state and
the attention mask; the server recomputes positions, rotary embeddings and masks from the mask.
Sequences are right-padded, so positions are 0..T-1 as in the unsplit model. Vision transformers (ViT,
DeiT, Dinov2): the device part takes pixels, the patch embedding adds the CLS (and register) tokens and
the position embeddings; the smashed data is the token sequence, every position a real token.
"""

from __future__ import annotations

import copy
import re
from typing import Any, TypeVar

import torch
from torch import nn
from transformers import PreTrainedModel
from transformers.masking_utils import (
    create_bidirectional_mask,
    create_causal_mask,
    create_sliding_window_causal_mask,
)


def last_token_index(attention_mask: torch.Tensor) -> torch.Tensor:
    """Index of each row's last real token (right padding), as HF's sequence-classification pooling."""
    positions = torch.arange(attention_mask.shape[-1], device=attention_mask.device)
    return (positions * attention_mask.to(positions.dtype)).argmax(-1)


# --------------------------------------------------------------------------- family block runners


def _positions(hidden: torch.Tensor) -> torch.Tensor:
    return torch.arange(hidden.shape[1], device=hidden.device).unsqueeze(0)


def _run_llama(config, layers: nn.ModuleList, rotary: nn.Module, hidden: torch.Tensor,
               attention_mask: torch.Tensor) -> torch.Tensor:
    if len(layers) == 0:
        return hidden
    position_ids = _positions(hidden)
    kwargs = dict(config=config, inputs_embeds=hidden, attention_mask=attention_mask, cache=None,
                  position_ids=position_ids)
    layer_types = getattr(config, "layer_types", None) or ["full_attention"] * config.num_hidden_layers
    masks = {"full_attention": create_causal_mask(**kwargs)}
    if "sliding_attention" in layer_types:
        masks["sliding_attention"] = create_sliding_window_causal_mask(**kwargs)
    position_embeddings = rotary(hidden, position_ids=position_ids)
    for layer in layers:
        hidden = layer(hidden, attention_mask=masks[layer_types[layer.self_attn.layer_idx]],
                       position_embeddings=position_embeddings, position_ids=position_ids)
    return hidden


def _run_gpt2(config, blocks: nn.ModuleList, hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    if len(blocks) == 0:
        return hidden
    position_ids = _positions(hidden)
    mask = create_causal_mask(config=config, inputs_embeds=hidden, attention_mask=attention_mask, cache=None,
                              position_ids=position_ids)
    for block in blocks:
        hidden = block(hidden, None, mask, None, encoder_attention_mask=None, use_cache=False,
                       position_ids=position_ids)
    return hidden


def _run_bert(config, layers: nn.ModuleList, hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    if len(layers) == 0:
        return hidden
    mask = create_bidirectional_mask(config=config, inputs_embeds=hidden, attention_mask=attention_mask)
    for layer in layers:
        hidden = layer(hidden, mask)
    return hidden


def _vit_blocks(base: nn.Module) -> nn.ModuleList:
    """The encoder blocks of a ViT-style backbone (ViT and DeiT hold them as `layers`, Dinov2 in `encoder`)."""
    blocks = base.layers if hasattr(base, "layers") else base.encoder.layer
    assert isinstance(blocks, nn.ModuleList)
    return blocks


def _vit_pool(config, final: torch.Tensor) -> torch.Tensor:
    """What the image-classification head reads, as in transformers' *ForImageClassification."""
    if config.model_type in ("dinov2", "dinov2_with_registers"):
        # Dinov2: the CLS token beside the mean of the patch tokens (registers excluded)
        first_patch = 1 + int(getattr(config, "num_register_tokens", 0) or 0)
        return torch.cat([final[:, 0], final[:, first_patch:].mean(dim=1)], dim=1)
    return final[:, 0]


# --------------------------------------------------------------------------- the two parts

Part = TypeVar("Part", bound=nn.Module)


def _view(part: Part, layers: nn.ModuleList, cut: int) -> Part:
    """The same part over some of its blocks: a new module object sharing every module and tensor with `part`."""
    view = copy.copy(part)
    view._modules = {**part._modules, "layers": layers}  # the blocks' own modules, shared
    view.cut_layer = cut  # type: ignore[assignment]
    return view



class DevicePart(nn.Module):
    """Embeddings + blocks [0, c): token ids and mask in, smashed data (hidden states) out."""

    def __init__(self, model: PreTrainedModel, family: str, cut_layer: int) -> None:
        super().__init__()
        self.family = family
        self.cut_layer = cut_layer
        self.config = model.config
        self.autocast_dtype: torch.dtype | None = None  # set for bf16 weights
        if family == "llama":
            base = model.model
            self.embed_tokens = base.embed_tokens
            self.rotary_emb = base.rotary_emb
            self.layers = nn.ModuleList(base.layers[:cut_layer])
        elif family == "gpt2":
            base = model.transformer
            self.wte, self.wpe, self.drop = base.wte, base.wpe, base.drop
            self.layers = nn.ModuleList(base.h[:cut_layer])
        elif family == "bert":
            base = model.bert
            self.embeddings = base.embeddings
            self.layers = nn.ModuleList(base.encoder.layer[:cut_layer])
        elif family == "vit":
            base = model.base_model
            self.embeddings = base.embeddings
            self.layers = nn.ModuleList(_vit_blocks(base)[:cut_layer])
        else:
            raise ValueError(f"unknown family {family}")

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Smashed data (B, T, H); for the vision family `input_ids` are pixels (B, 3, H, W) and the mask
        is all ones over the T tokens."""
        if self.autocast_dtype is not None:
            with torch.autocast(input_ids.device.type, dtype=self.autocast_dtype):
                return self._forward(input_ids, attention_mask).float()
        return self._forward(input_ids, attention_mask)

    def _forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        if self.family == "llama":
            hidden = self.embed_tokens(input_ids)
            return _run_llama(self.config, self.layers, self.rotary_emb, hidden, attention_mask)
        if self.family == "gpt2":
            hidden = self.wte(input_ids) + self.wpe(_positions(input_ids))
            return _run_gpt2(self.config, self.layers, self.drop(hidden), attention_mask)
        if self.family == "vit":
            return _run_bert(self.config, self.layers, self._embed_image(input_ids), attention_mask)
        return _run_bert(self.config, self.layers, self.embeddings(input_ids=input_ids), attention_mask)


    def at(self, cut: int) -> DevicePart:
        """The part of a device at a shallower cut: embeddings + blocks [0, cut) of these (shared, not copied; a
        LoRA tensor keeps its name), so devices at several cuts run one device part held at the deepest
        (docs/concepts/split-and-codec.md#devices-at-different-cuts)."""
        if cut == self.cut_layer:
            return self
        if not 0 <= cut <= self.cut_layer:
            raise ValueError(f"a device at cut {cut} outside the device part's 0..{self.cut_layer}")
        return _view(self, nn.ModuleList(self.layers[:cut]), cut)

    def input_vectors(self, input_ids: torch.Tensor) -> torch.Tensor:
        """The inputs as vectors of a metric space (for NoPeek's distance correlation): the token embeddings
        (B, T, H) of text, the flattened pixels (B, C*H*W) of images."""
        if self.family == "vit":
            return input_ids.flatten(1)
        table = {"bert": lambda: self.embeddings.word_embeddings, "llama": lambda: self.embed_tokens,
                 "gpt2": lambda: self.wte}[self.family]()
        return table(input_ids).float()

    def _embed_image(self, pixels: torch.Tensor) -> torch.Tensor:
        size = self.config.image_size if isinstance(self.config.image_size, int) else self.config.image_size[0]
        if self.config.model_type in ("vit", "deit") and pixels.shape[-1] != size:
            # another input size (model.image_size): bicubic position embeddings, as Dinov2 does by itself
            return self.embeddings(pixels, interpolate_pos_encoding=True)
        return self.embeddings(pixels)


class ServerPart(nn.Module):
    """Blocks [c, L), final norm and head: smashed data and mask in, task logits out.

    Devices may sit at deeper cuts than the part's own `c`: `start` (`start_of(cut)`, the device's cut less `c`)
    runs a device's samples from its own cut upward, so one server part built at the shallowest cut serves every
    device (docs/concepts/split-and-codec.md#devices-at-different-cuts).
    """

    def __init__(self, model: PreTrainedModel, family: str, cut_layer: int, task: str,
                 label_token_ids: list[int] | None = None) -> None:
        super().__init__()
        self.family = family
        self.task = task
        self.config = model.config
        self.cut_layer = cut_layer
        if task == "causal-lm":
            if not label_token_ids:
                raise ValueError("causal-lm needs the label words' token ids")
            self.register_buffer("label_token_ids", torch.tensor(label_token_ids), persistent=False)
        if family == "llama":
            base = model.model
            self.layers = nn.ModuleList(base.layers[cut_layer:])
            self.norm, self.rotary_emb = base.norm, base.rotary_emb
        elif family == "gpt2":
            base = model.transformer
            self.layers = nn.ModuleList(base.h[cut_layer:])
            self.norm = base.ln_f
        elif family == "vit":
            base = model.base_model
            self.layers = nn.ModuleList(_vit_blocks(base)[cut_layer:])
            self.norm = base.layernorm
        else:
            base = model.bert
            self.layers = nn.ModuleList(base.encoder.layer[cut_layer:])
            self.norm = nn.Identity()  # post-LN encoder: no final norm
            self.pooler, self.dropout = base.pooler, model.dropout
        if task == "causal-lm":
            self.head = model.lm_head
        else:
            self.head = model.classifier if family in ("bert", "vit") else model.score

    def head_modules(self) -> list[nn.Module]:
        """The modules trained in full on the server (a new classification head; none for causal LM)."""
        if self.task == "causal-lm":
            return []
        return [self.pooler, self.head] if self.family == "bert" else [self.head]

    @property
    def num_layers(self) -> int:
        """L, the model's blocks: the deepest cut a device may sit at."""
        return self.cut_layer + len(self.layers)

    def start_of(self, cut: int | None) -> int:
        """Where a device at `cut` enters the part's blocks: `cut - c` (None: the part's own cut, 0)."""
        if cut is None:
            return 0
        if not self.cut_layer <= cut <= self.num_layers:
            raise ValueError(f"a device at cut {cut} outside the server part's {self.cut_layer}..{self.num_layers}")
        return cut - self.cut_layer

    def at(self, cut: int) -> ServerPart:
        """The server part as a device at `cut` sees it: blocks [cut, L) of these (shared, not copied), the norm
        and the head; what the cost model counts for that device's samples."""
        start = self.start_of(cut)
        return self if start == 0 else _view(self, nn.ModuleList(self.layers[start:]), cut)

    def body(self, hidden: torch.Tensor, attention_mask: torch.Tensor, start: int = 0) -> torch.Tensor:
        """Blocks [c + start, L) and the final norm: the final hidden states of every position (`start`: see
        `start_of`)."""
        layers = self.layers if start == 0 else self.layers[start:]
        if self.family == "llama":
            hidden = _run_llama(self.config, layers, self.rotary_emb, hidden, attention_mask)
        elif self.family == "gpt2":
            hidden = _run_gpt2(self.config, layers, hidden, attention_mask)
        else:  # bert and vit: bidirectional attention
            hidden = _run_bert(self.config, layers, hidden, attention_mask)
        return self.norm(hidden)

    def features(self, hidden: torch.Tensor, attention_mask: torch.Tensor, start: int = 0) -> torch.Tensor:
        """What the head reads of the final hidden states, (B, F): what a U-shaped split's server sends down."""
        final = self.body(hidden, attention_mask, start)
        if self.family == "bert":
            return final[:, 0]  # the pooler reads the CLS row
        if self.family == "vit":
            return _vit_pool(self.config, final)
        return final[torch.arange(final.shape[0], device=final.device), last_token_index(attention_mask)]

    def forward(self, hidden: torch.Tensor, attention_mask: torch.Tensor, start: int = 0) -> torch.Tensor:
        """Task logits: (B, classes) for classification, (B, vocab) at the last token for causal LM."""
        final = self.body(hidden, attention_mask, start)
        if self.family == "bert":
            return self.head(self.dropout(self.pooler(final)))
        if self.family == "vit":
            return self.head(_vit_pool(self.config, final))
        pooled = final[torch.arange(final.shape[0], device=final.device), last_token_index(attention_mask)]
        return self.head(pooled)

    def loss_and_correct(self, logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean cross-entropy and the number of correct predictions.

        Causal LM: the loss is the next-token loss of the label word after the prompt; the prediction
        is the label word scored higher.
        """
        return task_loss(self.task, getattr(self, "label_token_ids", None), logits, labels)


def task_loss(task: str, label_token_ids: torch.Tensor | None, logits: torch.Tensor, labels: torch.Tensor
              ) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean cross-entropy and correct predictions of a task's logits (one definition, wherever the head runs)."""
    if task == "causal-lm":
        assert label_token_ids is not None
        loss = nn.functional.cross_entropy(logits, label_token_ids[labels])
        predictions = logits[:, label_token_ids].argmax(-1)
    else:
        loss = nn.functional.cross_entropy(logits, labels)
        predictions = logits.argmax(-1)
    return loss, (predictions == labels).sum()


class HeadPart(nn.Module):
    """The head of a U-shaped split, on the device: the server part's features in, task logits out, the loss
    beside it; the labels never leave the device. It holds the server part's own head modules (no copies)."""

    def __init__(self, server_part: ServerPart) -> None:
        super().__init__()
        self.family, self.task = server_part.family, server_part.task
        self.head = server_part.head
        if self.family == "bert":
            self.pooler, self.dropout = server_part.pooler, server_part.dropout
        if self.task == "causal-lm":
            self.register_buffer("label_token_ids", server_part.label_token_ids.clone(), persistent=False)

    @property
    def width(self) -> int:
        """The features per sample the head reads (what the server sends down)."""
        first: Any = self.pooler.dense if self.family == "bert" else self.head
        return int(first.in_features)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        if self.family == "bert":  # BertPooler on the CLS row: dense, then tanh
            return self.head(self.dropout(self.pooler.activation(self.pooler.dense(features))))
        return self.head(features)

    def loss_and_correct(self, logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return task_loss(self.task, getattr(self, "label_token_ids", None), logits, labels)


def split_model(model: PreTrainedModel, family: str, cut_layer: int, task: str,
                label_token_ids: list[int] | None = None) -> tuple[DevicePart, ServerPart]:
    """Cut a loaded model at `cut_layer`; the parts share the model's modules."""
    num_layers = model.config.num_hidden_layers if family != "gpt2" else model.config.n_layer
    if not 0 <= cut_layer <= num_layers:
        raise ValueError(f"cut layer {cut_layer} outside 0..{num_layers}")
    return (DevicePart(model, family, cut_layer),
            ServerPart(model, family, cut_layer, task, label_token_ids))


_BLOCK = re.compile(r"^layers\.(\d+)\.(.*)$")


def block_of(name: str) -> int | None:
    """The block a device part's tensor belongs to ("layers.3.attention..." -> 3; None outside the blocks)."""
    found = _BLOCK.match(name)
    return int(found.group(1)) if found else None


def overlap_names(device_part: DevicePart, server_part: ServerPart) -> list[tuple[str, str]]:
    """The LoRA tensors of the blocks in both parts (devices at several cuts): (device part's name, server part's
    name) of each, in the device part's order; empty when the parts meet at one cut."""
    offset = server_part.cut_layer
    server = {name for name, p in server_part.named_parameters() if p.requires_grad}
    pairs = []
    for name, param in device_part.named_parameters():
        block = block_of(name)
        if param.requires_grad and block is not None and block >= offset:
            found = _BLOCK.match(name)
            assert found is not None
            twin = f"layers.{block - offset}.{found.group(2)}"
            if twin in server:
                pairs.append((name, twin))
    return pairs
