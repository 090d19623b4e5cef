"""The batched forward: a Llama-family decoder whose every row may name a different adapter.

The Hugging Face model only lends its weights (its Linear/Linear4bit modules, norms and rotary
embedding); this module runs them in its own loop so it controls the KV cache, masks and positions.

Every adapter that is resident on the device lives in a numbered *slot* (slot 0 is the base and
stays identity). Per projection, the slot tables hold:

- LoRA: projections reading the same input (q/k/v, gate/up) share one A table
  (rank·slots·members × in, rank-major so the first ``r·slots·members`` rows cover every slot up to
  rank ``r``); each projection has a B table with a row per A row. A row's delta is
  ``((x Aᵀ) ⊙ onehot(slot)) B``: one shrink GEMM per group and one expand GEMM (fused with the add)
  per projection for the whole batch, no Python loop over adapters; the one-hot mask zeroes the
  columns of every other slot.
- IA3: one ``(slots × Σ widths)`` table holding every projection's input- and output-side scale
  vectors (ones for identity); a forward gathers each row's slice once, and each projection
  multiplies by its columns.

Prompt families live in model-wide tables: ``virtual_tokens`` (slots × n × hidden) replace the
embeddings at a row's first positions, and ``prefix_kv`` (layers × 2 × slots × kv heads × n × head dim)
is copied into the row's KV cache ahead of its prompt.

The KV cache is preallocated: one region of ``max_context`` positions per batch row. A row's tokens
sit at cache positions 0.. of its region; queries see keys at positions <= their own, so batches of
ragged prompts need no padding tokens among the keys.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PretrainedConfig

from adapterhub.errors import UserError
from adapterhub.runtime.adapters import BaseShape, NativeAdapter

SUPPORTED_ARCHITECTURES = ("llama", "mistral", "qwen2", "qwen3")
# Projections that read the same input share one LoRA A table (one shrink GEMM per group).
LORA_GROUPS = (("q_proj", "k_proj", "v_proj"), ("o_proj",), ("gate_proj", "up_proj"), ("down_proj",))


def check_architecture(config: PretrainedConfig, base_name: str) -> None:
    model_type = config.model_type
    if model_type not in SUPPORTED_ARCHITECTURES or config.is_encoder_decoder:
        raise UserError(
            f"base '{base_name}' is a {model_type} model; the runtime serves Llama-family decoders "
            f"({', '.join(SUPPORTED_ARCHITECTURES)}, SmolLM): choose one of those"
        )


def is_quantized(module: nn.Module) -> bool:
    return type(module).__name__ in ("Linear4bit", "Linear8bitLt")


def dense_weight(module: nn.Module, dtype: torch.dtype) -> torch.Tensor:
    """The weight a projection multiplies by, as a dense matrix; 4-bit weights are dequantized."""
    if type(module).__name__ == "Linear4bit":
        import bitsandbytes.functional as bnb_functional

        return bnb_functional.dequantize_4bit(module.weight.data, module.weight.quant_state).to(dtype)
    if is_quantized(module):
        raise UserError("merge on an int8 base is not supported: use quantization none or nf4 to merge")
    return module.weight.data


@dataclass
class Batch:
    """Everything one forward needs besides the input embeddings; built by the engine per step.

    ``rows`` picks the batch rows of the KV cache (a slice for decode, an index tensor for prefill);
    ``cache_pos``/``rope_pos`` are (batch, tokens); ``slots`` (batch,) names each row's adapter slot.
    """

    rows: slice | torch.Tensor
    row_index: torch.Tensor  # (batch, 1) cache row of each input row, for writes
    cache_pos: torch.Tensor
    rope_pos: torch.Tensor
    kv_len: int
    slots: torch.Tensor
    lora_rank: int  # widest LoRA rank among this batch's slots; 0 skips the LoRA GEMMs
    any_ia3: bool
    prefix_write: tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor] | None = None


@dataclass
class SlotContents:
    """What a slot's occupant wrote: LoRA rank and IA3 side per projection, to reset on the next load."""

    lora: dict[tuple[int, str], int] = field(default_factory=dict)
    ia3: dict[tuple[int, str], bool] = field(default_factory=dict)


class LoraShrink:
    """The LoRA A table shared by the projections that read one input (q/k/v, gate/up, o, down).

    Rows are ordered (rank, slot, member) so the first ``r·slots·members`` rows cover every slot and
    member up to rank ``r``: one GEMM and one one-hot mask serve the whole group.
    """

    def __init__(
        self, in_features: int, members: int, num_slots: int, max_rank: int, dtype: torch.dtype, device: str
    ) -> None:
        self.members, self.num_slots, self.max_rank = members, num_slots, max_rank
        self.lora_a = torch.zeros(max_rank * num_slots * members, in_features, dtype=dtype, device=device)
        self.row_views: dict[int, torch.Tensor] = {}

    def __call__(self, x: torch.Tensor, masks: dict[int, torch.Tensor] | None) -> torch.Tensor | None:
        if masks is None:
            return None
        mask = masks[self.members]
        rows = _leading_rows(self.lora_a, mask.shape[-1], self.row_views)
        if x.dtype != rows.dtype:
            x = x.to(rows.dtype)
        return F.linear(x, rows) * mask

    def slot_view(self, slot: int, member: int) -> torch.Tensor:
        return self.lora_a.view(self.max_rank, self.num_slots, self.members, -1)[:, slot, member]


class SlotLinear:
    """A base projection plus every slot's LoRA B rows and IA3 vectors for it.

    Its B table has a row for every row of its group's A table; rows of the other members stay zero,
    so the shrunk activations of the whole group multiply straight into this projection's output.
    """

    def __init__(
        self, base: nn.Module, shrink: LoraShrink, member: int, dtype: torch.dtype, device: str
    ) -> None:
        self.base = base
        self.shrink, self.member = shrink, member
        self.in_features, self.out_features = base.in_features, base.out_features
        self.lora_b = torch.zeros(shrink.lora_a.shape[0], self.out_features, dtype=dtype, device=device)
        self.row_views: dict[int, torch.Tensor] = {}
        self.ia3_in_columns = self.ia3_out_columns = slice(0)
        self.ia3_in = self.ia3_out = torch.empty(0)
        self.uses_ia3_in = self.uses_ia3_out = False
        # A dense merged (weight, bias) standing in for a 4-bit base while an adapter is merged.
        self.merged: tuple[torch.Tensor, torch.Tensor | None] | None = None

    def bind_ia3(self, table: torch.Tensor, offset: int) -> int:
        """Take this projection's columns of the shared IA3 table; returns the next free column."""
        middle = offset + self.in_features
        self.ia3_in_columns, self.ia3_out_columns = (
            slice(offset, middle),
            slice(middle, middle + self.out_features),
        )
        self.ia3_in, self.ia3_out = table[:, self.ia3_in_columns], table[:, self.ia3_out_columns]
        return middle + self.out_features

    def __call__(
        self, x: torch.Tensor, ia3_rows: torch.Tensor | None, shrunk: torch.Tensor | None
    ) -> torch.Tensor:
        """``ia3_rows``: each row's gathered IA3 table row (batch, 1, columns), None without IA3 rows."""
        if ia3_rows is not None and self.uses_ia3_in:
            x = x * ia3_rows[..., self.ia3_in_columns]
        if self.merged is not None:
            weight, bias = self.merged
            out = F.linear(x.to(weight.dtype), weight, bias)
        else:
            out = self.base(x)
        if ia3_rows is not None and self.uses_ia3_out:
            out = out * ia3_rows[..., self.ia3_out_columns]
        if shrunk is None:
            return out
        width = shrunk.shape[-1]
        rows = _leading_rows(self.lora_b, width, self.row_views)
        flat = out.reshape(-1, self.out_features)
        if flat.dtype != rows.dtype:
            return (flat.to(rows.dtype) + shrunk.reshape(-1, width) @ rows).to(out.dtype).view(out.shape)
        return torch.addmm(flat, shrunk.reshape(-1, width), rows).view(out.shape)

    def slot_views(self, slot: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Slot ``slot``'s LoRA rows: (max rank × in) and (max rank × out) strided views."""
        shrink = self.shrink
        b_rows = self.lora_b.view(shrink.max_rank, shrink.num_slots, shrink.members, -1)[:, slot, self.member]
        return shrink.slot_view(slot, self.member), b_rows


def _leading_rows(table: torch.Tensor, count: int, cache: dict[int, torch.Tensor]) -> torch.Tensor:
    """``table[:count]``, kept so a forward does not re-slice (the tables are never reallocated)."""
    rows = cache.get(count)
    if rows is None:
        rows = cache[count] = table[:count]
    return rows


class SlottedDecoder:
    """Runs a Llama-family model over a batch of rows with per-row adapters, writing a static KV cache."""

    def __init__(
        self,
        model: nn.Module,
        *,
        num_slots: int,
        max_rank: int,
        max_virtual_tokens: int,
        max_batch: int,
        max_context: int,
        dtype: torch.dtype,
        device: str,
    ) -> None:
        config = model.config
        self.model = model
        self.decoder = model.model
        self.dtype, self.device = dtype, device
        self.num_slots, self.max_rank, self.max_context = num_slots, max_rank, max_context
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        self.scaling = self.head_dim**-0.5
        self.group = self.num_heads // self.num_kv_heads
        layers = self.decoder.layers
        self.projections: list[dict[str, SlotLinear]] = []
        for layer in layers:
            projections: dict[str, SlotLinear] = {}
            for group in LORA_GROUPS:
                modules = [getattr(self._parent(layer, name), name) for name in group]
                shrink = LoraShrink(modules[0].in_features, len(group), num_slots, max_rank, dtype, device)
                for member, (name, module) in enumerate(zip(group, modules, strict=True)):
                    projections[name] = SlotLinear(module, shrink, member, dtype, device)
            self.projections.append(projections)
        targets = [target for projections in self.projections for target in projections.values()]
        width = sum(target.in_features + target.out_features for target in targets)
        self.ia3_table = torch.ones(num_slots, width, dtype=dtype, device=device)
        offset = 0
        for target in targets:
            offset = target.bind_ia3(self.ia3_table, offset)
        first = self.projections[0]
        self.shape = BaseShape(
            num_layers=len(layers),
            hidden_size=config.hidden_size,
            num_kv_heads=self.num_kv_heads,
            head_dim=self.head_dim,
            features={name: (p.in_features, p.out_features) for name, p in first.items()},
        )
        # The one-hot LoRA column selectors compare each A-table row's slot with the batch row's slot.
        self.column_slot = {
            len(group): torch.arange(max_rank * num_slots * len(group), device=device)
            // len(group)
            % num_slots
            for group in LORA_GROUPS
        }
        self.virtual_tokens = torch.zeros(
            num_slots, max_virtual_tokens, config.hidden_size, dtype=dtype, device=device
        )
        self.prefix_kv = torch.zeros(
            len(layers),
            2,
            num_slots,
            self.num_kv_heads,
            max_virtual_tokens,
            self.head_dim,
            dtype=dtype,
            device=device,
        )
        self.kv = torch.zeros(
            len(layers),
            2,
            max_batch,
            self.num_kv_heads,
            max_context,
            self.head_dim,
            dtype=dtype,
            device=device,
        )
        self.slot_rank = [0] * num_slots
        self.slot_contents = [SlotContents() for _ in range(num_slots)]
        self.layout_version = 0  # bumped when a projection starts using IA3

    @staticmethod
    def _parent(layer: nn.Module, projection: str) -> nn.Module:
        return layer.mlp if projection in ("gate_proj", "up_proj", "down_proj") else layer.self_attn

    # -- slots -----------------------------------------------------------------------------------

    def load_slot(self, slot: int, adapter: NativeAdapter) -> None:
        """Copy an adapter into slot ``slot``'s preallocated rows; every other slot is untouched.

        Rows the previous occupant wrote and this adapter does not overwrite are reset to identity
        first; a LoRA replacing a LoRA of the same shape needs no reset at all.
        """
        previous = self.slot_contents[slot]
        for key, rank in previous.lora.items():
            new_rank = adapter.lora[key][0].shape[0] if key in adapter.lora else 0
            if rank > new_rank:
                for rows in self.projections[key[0]][key[1]].slot_views(slot):
                    rows[new_rank:rank].zero_()
        for key, on_input in previous.ia3.items():
            if adapter.ia3.get(key, (None, not on_input))[1] != on_input:
                target = self.projections[key[0]][key[1]]
                (target.ia3_in if on_input else target.ia3_out)[slot].fill_(1.0)
        adapter = adapter.to(self.device)
        destinations, sources = [], []
        for (layer, proj), (a, b) in adapter.lora.items():
            slot_a, slot_b = self.projections[layer][proj].slot_views(slot)
            destinations += [slot_a[: a.shape[0]], slot_b[: b.shape[0]]]
            sources += [a, b]
        for (layer, proj), (vector, on_input) in adapter.ia3.items():
            target = self.projections[layer][proj]
            destinations.append((target.ia3_in if on_input else target.ia3_out)[slot])
            sources.append(vector)
            if not (target.uses_ia3_in if on_input else target.uses_ia3_out):
                self.layout_version += 1  # a captured decode graph no longer covers this projection
            target.uses_ia3_in |= on_input
            target.uses_ia3_out |= not on_input
        if adapter.virtual_tokens is not None:
            destinations.append(self.virtual_tokens[slot, : adapter.virtual_tokens.shape[0]])
            sources.append(adapter.virtual_tokens)
        if adapter.prefix_kv is not None:
            destinations.append(self.prefix_kv[:, :, slot, :, : adapter.prefix_kv.shape[3]])
            sources.append(adapter.prefix_kv)
        if destinations:
            torch._foreach_copy_(destinations, sources)
        self.slot_contents[slot] = SlotContents(
            lora={key: a.shape[0] for key, (a, _) in adapter.lora.items()},
            ia3={key: on_input for key, (_, on_input) in adapter.ia3.items()},
        )
        self.slot_rank[slot] = adapter.rank or 0

    # -- merge -----------------------------------------------------------------------------------

    def merge(self, adapter: NativeAdapter) -> dict[SlotLinear, tuple[torch.Tensor, torch.Tensor | None]]:
        """Fold a LoRA or IA3 adapter into the base; return copies of what was touched, for ``unmerge``.

        Dense bases are changed in place (the copies restore them bit-exactly). 4-bit bases are never
        touched: the touched projections get a dequantized, merged dense weight that stands in for them.
        """
        saved: dict[SlotLinear, tuple[torch.Tensor, torch.Tensor | None]] = {}
        for key in {*adapter.lora, *adapter.ia3}:
            layer, proj = key
            target = self.projections[layer][proj]
            weight = dense_weight(target.base, self.dtype).float()
            bias = None if target.base.bias is None else target.base.bias.data
            merged_bias = bias
            if key in adapter.lora:
                a, b = adapter.lora[key]
                weight = weight + b.to(self.device).float().t() @ a.to(self.device).float()
            if key in adapter.ia3:
                vector, on_input = adapter.ia3[key]
                vector = vector.to(self.device).float()
                weight = weight * (vector.unsqueeze(0) if on_input else vector.unsqueeze(1))
                if bias is not None and not on_input:
                    merged_bias = (bias.float() * vector).to(bias.dtype)
            if is_quantized(target.base):
                target.merged = (weight.to(self.dtype), merged_bias)
                saved[target] = (torch.empty(0), None)
                continue
            saved[target] = (target.base.weight.data.clone(), None if bias is None else bias.clone())
            target.base.weight.data.copy_(weight.to(target.base.weight.dtype))
            if bias is not None:
                target.base.bias.data.copy_(merged_bias)
        return saved

    def unmerge(self, saved: dict[SlotLinear, tuple[torch.Tensor, torch.Tensor | None]]) -> None:
        for target, (weight, bias) in saved.items():
            if target.merged is not None:
                target.merged = None
                continue
            target.base.weight.data.copy_(weight)
            if bias is not None:
                target.base.bias.data.copy_(bias)

    # -- forward ---------------------------------------------------------------------------------

    @torch.inference_mode()
    def embed(self, token_ids: torch.Tensor, virtual: tuple[torch.Tensor, ...] | None) -> torch.Tensor:
        """Token embeddings, with a prompt row's first positions replaced by its virtual tokens.

        ``virtual`` is flat (batch row, position, slot, virtual index) for every virtual position.
        """
        embeds = self.decoder.embed_tokens(token_ids)
        if virtual is not None:
            rows, positions, slots, indices = virtual
            embeds[rows, positions] = self.virtual_tokens[slots, indices].to(embeds.dtype)
        return embeds

    @torch.inference_mode()
    def forward(
        self, embeds: torch.Tensor, batch: Batch, last: torch.Tensor | tuple[torch.Tensor, torch.Tensor]
    ) -> torch.Tensor:
        """Run the decoder over ``embeds`` (batch, tokens, hidden); float logits at position ``last``
        of each row, or at each (input row, position) pair when ``last`` is a pair of flat tensors
        (prompt logprobs need every position of some rows)."""
        if batch.prefix_write is not None:
            rows, positions, slots, indices = batch.prefix_write
            self.kv[:, :, rows, :, positions] = self.prefix_kv[:, :, slots, :, indices]
        masks = None
        if batch.lora_rank:
            masks = {}
            for members, column_slot in self.column_slot.items():
                width = batch.lora_rank * self.num_slots * members
                selected = column_slot[:width].unsqueeze(0) == batch.slots.unsqueeze(1)
                masks[members] = selected.to(self.dtype).unsqueeze(1)
        ia3_rows = self.ia3_table[batch.slots].unsqueeze(1) if batch.any_ia3 else None
        keys_visible = torch.arange(batch.kv_len, device=self.device).view(
            1, 1, -1
        ) <= batch.cache_pos.unsqueeze(-1)
        size, length = keys_visible.shape[:2]
        attention_mask = (
            keys_visible.unsqueeze(1).expand(size, self.group, length, -1).reshape(size, 1, -1, batch.kv_len)
        )
        cos, sin = self.decoder.rotary_emb(embeds, batch.rope_pos)
        cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
        hidden = embeds
        for index, (layer, proj) in enumerate(zip(self.decoder.layers, self.projections, strict=True)):
            attn = layer.self_attn
            x = layer.input_layernorm(hidden)
            size, length, _ = x.shape
            shrunk = proj["q_proj"].shrink(x, masks)
            q = proj["q_proj"](x, ia3_rows, shrunk).view(size, length, -1, self.head_dim)
            k = proj["k_proj"](x, ia3_rows, shrunk).view(size, length, -1, self.head_dim)
            v = proj["v_proj"](x, ia3_rows, shrunk).view(size, length, -1, self.head_dim)
            if hasattr(attn, "q_norm"):
                q, k = attn.q_norm(q), attn.k_norm(k)
            q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
            q, k = _rotate(q, cos, sin), _rotate(k, cos, sin)
            key_cache, value_cache = self.kv[index, 0], self.kv[index, 1]
            key_cache[batch.row_index, :, batch.cache_pos] = k.transpose(1, 2).to(self.dtype)
            value_cache[batch.row_index, :, batch.cache_pos] = v.transpose(1, 2).to(self.dtype)
            keys = key_cache[batch.rows, :, : batch.kv_len]
            values = value_cache[batch.rows, :, : batch.kv_len]
            # Grouped-query attention as plain attention: each KV head's query heads become extra query
            # rows, so no backend needs GQA support and the KV cache is never repeated.
            grouped = q.reshape(size, self.num_kv_heads, self.group * length, self.head_dim)
            out = F.scaled_dot_product_attention(
                grouped, keys, values, attn_mask=attention_mask, scale=self.scaling
            )
            out = (
                out.view(size, self.num_heads, length, self.head_dim)
                .transpose(1, 2)
                .reshape(size, length, -1)
            )
            hidden = hidden + proj["o_proj"](out, ia3_rows, proj["o_proj"].shrink(out, masks))
            x = layer.post_attention_layernorm(hidden)
            shrunk = proj["gate_proj"].shrink(x, masks)
            gate = layer.mlp.act_fn(proj["gate_proj"](x, ia3_rows, shrunk)) * proj["up_proj"](
                x, ia3_rows, shrunk
            )
            hidden = hidden + proj["down_proj"](gate, ia3_rows, proj["down_proj"].shrink(gate, masks))
        if isinstance(last, tuple):
            picked = hidden[last]
        else:
            picked = hidden[torch.arange(hidden.shape[0], device=self.device), last]
        return self.model.lm_head(self.decoder.norm(picked)).float()


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin
