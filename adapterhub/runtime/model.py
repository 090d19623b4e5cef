"""The batched forward: a decoder whose every row may name a different adapter.

The Hugging Face model only lends its weights (its Linear/Linear4bit modules, norms, embedding and
rotary embedding); this module runs them in its own loop so it controls the KV cache, masks and
positions. What differs between decoder families (fused projections, sandwich norms, softcaps, q/k
norms, sliding windows) is a ``Family`` description from ``runtime/families/``; the loop below reads it.

Every adapter that is resident on the device lives in a numbered *slot* (slot 0 is the base and
stays identity). The modules adapters change carry every slot's tables (``runtime/targets.py``):

- LoRA: each token multiplies by its own row's slot's A and B only (``runtime/lora.py``), on the
  projections, the output head and the input embedding.
- IA3, DoRA and bias vectors: one ``(slots × Σ widths)`` table per kind; each projection gathers its
  columns for the forward's tokens and multiplies (or adds) them.
- Trainable tokens: per-slot replacement rows of the embedding (and of a tied output head).

Prompt families live in model-wide tables. ``prefix_kv`` (layers × 2 × slots × kv heads × n × head
dim) is copied into a row's KV cache ahead of its prompt. Prefix tuning saves those K/V itself; for
prompt tuning and P-tuning, ``virtual_tokens`` (slots × n × hidden) are run through the base once when
the adapter loads, and their K/V fill the same table (``_virtual_states``).

A forward runs over packed tokens, decoding rows and new prompts together (``runtime/batch.py``):
the projections see only real tokens; attention lays each group of rows into a small grid.

The KV cache is preallocated at full length: one region of ``max_context`` positions per batch row.
A row's tokens sit at cache positions 0.. of its region; queries see keys at positions <= their own
(and, in a sliding-window layer, within the window), so batches of ragged prompts need no padding.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from adapterhub.runtime.adapters import BaseShape, NativeAdapter
from adapterhub.runtime.batch import (
    AdapterRows,
    AttentionGroup,
    Batch,
    RowInput,
    SlotFeatures,
    adapter_rows,
    pack,
)
from adapterhub.runtime.families import Family, head_dim
from adapterhub.runtime.lora import LoraGroup, LoraRows
from adapterhub.runtime.slot_loads import SlotLoads
from adapterhub.runtime.targets import RowVectors, SlotEmbedding, SlotLinear, VectorTable, is_quantized

ATTENTION_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "qkv_proj", "o_proj")


class SlottedDecoder:
    """Runs a decoder over a batch of rows with per-row adapters, writing a static KV cache."""

    def __init__(
        self,
        model: nn.Module,
        family: Family,
        *,
        num_slots: int,
        max_rank: int,
        max_virtual_tokens: int,
        max_trainable_tokens: int,
        max_batch: int,
        max_context: int,
        dtype: torch.dtype,
        device: str,
    ) -> None:
        config = model.config
        self.model, self.family, self.config = model, family, config
        self.decoder = model.model
        self.dtype, self.device = dtype, device
        self.num_slots, self.max_rank, self.max_context = num_slots, max_rank, max_context
        self.max_trainable_tokens = max_trainable_tokens
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.head_dim = head_dim(config)
        self.scaling = family.query_scale(config)
        self.attention_softcap = family.softcap(config, family.attention_softcap)
        self.final_softcap = family.softcap(config, family.final_softcap)
        self.group = self.num_heads // self.num_kv_heads
        self.windows = family.windows(config)
        layers = self.decoder.layers
        self.vectors = {"ia3": VectorTable(1.0), "dora": VectorTable(1.0), "bias": VectorTable(0.0)}
        # Adapters name modules as PEFT does: by their qualified name in the Hugging Face model.
        module_names = {module: name for name, module in model.named_modules()}
        self.layers: list[dict[str, SlotLinear]] = []
        for layer in layers:
            projections: dict[str, SlotLinear] = {}
            for names in family.lora_groups:
                modules = [getattr(self._parent(layer, name), name) for name in names]
                tables = LoraGroup(
                    [module_names[m] for m in modules],
                    modules[0].in_features,
                    [m.out_features for m in modules],
                    num_slots,
                    max_rank,
                    dtype,
                    device,
                )
                for member, (name, module) in enumerate(zip(names, modules, strict=True)):
                    projections[name] = SlotLinear(module, tables, member, self.vectors)
            self.layers.append(projections)
        head = model.lm_head
        head_tables = LoraGroup(
            [module_names[head]],
            head.in_features,
            [head.out_features],
            num_slots,
            max_rank,
            dtype,
            device,
            allocate=False,
        )
        self.lm_head = SlotLinear(head, head_tables, 0, self.vectors)
        self.embedding = SlotEmbedding(self.decoder.embed_tokens, num_slots, max_rank, dtype, device)
        self.vectors["ia3"].allocate(num_slots, dtype, device)
        self.targets = {
            module_names[target.base]: target for layer in self.layers for target in layer.values()
        }
        self.targets[module_names[head]] = self.lm_head
        self.embedding_name = module_names[self.decoder.embed_tokens]
        self.shape = BaseShape(
            num_layers=len(layers),
            hidden_size=config.hidden_size,
            num_kv_heads=self.num_kv_heads,
            head_dim=self.head_dim,
            targets=frozenset(self.targets),
            embedding=self.embedding_name,
            tied_output=module_names[head] if getattr(config, "tie_word_embeddings", False) else None,
        )
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
        self.slots = [SlotFeatures() for _ in range(num_slots)]
        self.loads = SlotLoads(device)
        self.layout_version = 0  # bumped when a module starts using a vector a captured graph skips

    def _parent(self, layer: nn.Module, projection: str) -> nn.Module:
        return layer.self_attn if projection in ATTENTION_PROJECTIONS else layer.mlp

    # -- what the adapter conversion reads of the base ------------------------------------------

    def dense_weight(self, module: str) -> torch.Tensor:
        return self.targets[module].dense_weight(self.dtype)

    def bias(self, module: str) -> torch.Tensor | None:
        return self.targets[module].base_bias

    def parameter(self, name: str) -> torch.Tensor:
        return self.model.get_parameter(name)

    # -- slots -----------------------------------------------------------------------------------

    def load_slot(self, slot: int, adapter: NativeAdapter) -> None:
        """Copy an adapter into slot ``slot``'s preallocated rows; every other slot is untouched.

        What the previous occupant wrote and this adapter does not overwrite is reset to identity
        first; a LoRA replacing a LoRA of the same shape needs no reset at all. On CUDA the copies
        overlap decoding (``slot_loads.py``): ``loads.ready(slot)`` says when they have landed.
        """
        layout = self._layout()
        with self.loads.loading(slot):
            self._copy_into(slot, adapter)
        if adapter.virtual_tokens is not None or self._layout() != layout:
            self.loads.settle(slot)
        self.slots[slot] = SlotFeatures(
            lora={module: a.shape[0] for module, (a, _) in adapter.lora.items()},
            embedding_lora=0 if adapter.embedding_lora is None else adapter.embedding_lora[0].shape[1],
            ia3={module: on_input for module, (_, on_input) in adapter.ia3.items()},
            dora=tuple(adapter.dora),
            bias=tuple(adapter.bias),
            token_ids=() if adapter.tokens is None else adapter.tokens.ids,
            tied_tokens=adapter.tokens is not None and adapter.tokens.tied,
        )
        if adapter.virtual_tokens is not None:
            self._virtual_states(slot, adapter.virtual_tokens.shape[0])

    def _layout(self) -> tuple:
        """What a load can change that every slot's rows read: which shared tables exist, and which
        vectors the projections apply."""
        tables = [self.lm_head.group.a, self.embedding.lora_a, self.embedding.token_index]
        tables += [table.tensor for table in self.vectors.values()]
        return self.layout_version, tuple(table is None for table in tables)

    def _copy_into(self, slot: int, adapter: NativeAdapter) -> None:
        self._reset(slot, adapter)
        adapter = adapter.to(self.device)
        destinations, sources = [], []
        for module, (a, b) in adapter.lora.items():
            slot_a, slot_b = self.targets[module].slot_views(slot)
            destinations += [slot_a[: a.shape[0]], slot_b[: b.shape[0]]]
            sources += [a, b]
        if adapter.embedding_lora is not None:
            a, b = adapter.embedding_lora
            self.embedding.allocate_lora()
            destinations += [
                self.embedding.lora_a[slot, :, : a.shape[1]],
                self.embedding.lora_b[slot, : b.shape[0]],
            ]
            sources += [a, b]
        for module, (vector, on_input) in adapter.ia3.items():
            destinations.append(self._vector_view("ia3_in" if on_input else "ia3_out", module, slot))
            sources.append(vector)
        for kind, vectors in (("dora", adapter.dora), ("bias", adapter.bias)):
            for module, vector in vectors.items():
                destinations.append(self._vector_view(kind, module, slot))
                sources.append(vector)
        if adapter.tokens is not None:
            self._load_tokens(slot, adapter)
        if adapter.virtual_tokens is not None:
            destinations.append(self.virtual_tokens[slot, : adapter.virtual_tokens.shape[0]])
            sources.append(adapter.virtual_tokens)
        if adapter.prefix_kv is not None:
            destinations.append(self.prefix_kv[:, :, slot, :, : adapter.prefix_kv.shape[3]])
            sources.append(adapter.prefix_kv)
        if destinations:
            torch._foreach_copy_(destinations, sources, non_blocking=True)

    def _virtual_states(self, slot: int, count: int) -> None:
        """Run slot ``slot``'s virtual tokens through the base once, their K/V into its prefix rows.

        A prompt- or P-tuning row's virtual tokens come first (positions 0..n-1) and attend only to
        one another, so their keys and values are the same in every request. Computed here, a row
        prefills only its prompt after them, as a prefix row does: with 16 virtual tokens and 32-token
        prompts that is a third less prefill for the row.
        """
        row = RowInput(slot, slot, [0] * count, 0, 0, (count - 1,), virtual=count)
        self._forward(self.pack([row]), self.prefix_kv)

    def _vector_view(self, use: str, module: str, slot: int) -> torch.Tensor:
        """Slot ``slot``'s columns of one module's vector, allocating the table on first use."""
        target = self.targets[module]
        kind = use.removesuffix("_in").removesuffix("_out")
        table = self.vectors[kind]
        table.allocate(self.num_slots, self.dtype, self.device)
        if use not in target.uses:
            target.uses.add(use)
            self.layout_version += 1  # a captured decode graph does not apply this vector
        return table.tensor[slot, getattr(target, use)]

    def _load_tokens(self, slot: int, adapter: NativeAdapter) -> None:
        tokens = adapter.tokens
        embedding = self.embedding
        embedding.allocate_tokens(self.max_trainable_tokens)
        ids = torch.tensor(tokens.ids, device=self.device)
        embedding.token_rows[slot, : len(tokens.ids)] = tokens.rows
        embedding.token_ids[slot, : len(tokens.ids)] = ids
        embedding.token_index[slot, ids] = torch.arange(len(tokens.ids), device=self.device)

    def _reset(self, slot: int, adapter: NativeAdapter) -> None:
        previous = self.slots[slot]
        for module, rank in previous.lora.items():
            new_rank = adapter.lora[module][0].shape[0] if module in adapter.lora else 0
            if rank > new_rank:
                for rows in self.targets[module].slot_views(slot):
                    rows[new_rank:rank].zero_()
        if previous.embedding_lora:
            self.embedding.lora_a[slot, :, : previous.embedding_lora].zero_()
            self.embedding.lora_b[slot, : previous.embedding_lora].zero_()
        for module, on_input in previous.ia3.items():
            if adapter.ia3.get(module, (None, not on_input))[1] != on_input:
                self._vector_view("ia3_in" if on_input else "ia3_out", module, slot).fill_(1.0)
        for module in previous.dora:
            if module not in adapter.dora:
                self._vector_view("dora", module, slot).fill_(1.0)
        for module in previous.bias:
            if module not in adapter.bias:
                self._vector_view("bias", module, slot).zero_()
        if previous.token_ids:
            ids = torch.tensor(previous.token_ids, device=self.device)
            self.embedding.token_index[slot, ids] = -1
            self.embedding.token_ids[slot] = -1

    def pack(self, inputs: list[RowInput]) -> Batch:
        """One forward's batch over ``inputs`` (see ``runtime/batch.py``)."""
        return pack(inputs, self.slots, self.device)

    def adapter_rows(self, slots: list[int], static_slots: torch.Tensor | None = None) -> AdapterRows:
        """The adapter features of one token per row serving ``slots`` (a decode step)."""
        return adapter_rows(slots, self.slots, self.device, static_slots)

    # -- merge -----------------------------------------------------------------------------------

    def merge(self, adapter: NativeAdapter) -> dict[SlotLinear, tuple[torch.Tensor, torch.Tensor | None]]:
        """Fold a LoRA or IA3 adapter into the base; return copies of what was touched, for ``unmerge``.

        Dense bases are changed in place (the copies restore them bit-exactly). 4-bit bases are never
        touched: the touched projections get a dequantized, merged dense weight that stands in for them,
        as do projections that gain a bias they do not have.
        """
        saved: dict[SlotLinear, tuple[torch.Tensor, torch.Tensor | None]] = {}
        for module in {*adapter.lora, *adapter.ia3, *adapter.dora, *adapter.bias}:
            target = self.targets[module]
            weight = target.dense_weight(self.dtype).float()
            bias = target.base_bias
            merged_bias = None if bias is None else bias.float()
            if module in adapter.lora:
                a, b = adapter.lora[module]
                weight = weight + b.to(self.device).float().t() @ a.to(self.device).float()
            if module in adapter.ia3:
                vector, on_input = adapter.ia3[module]
                vector = vector.to(self.device).float()
                weight = weight * (vector.unsqueeze(0) if on_input else vector.unsqueeze(1))
                if merged_bias is not None and not on_input:
                    merged_bias = merged_bias * vector
            if module in adapter.dora:
                weight = weight * adapter.dora[module].to(self.device).float().unsqueeze(1)
            if module in adapter.bias:
                delta = adapter.bias[module].to(self.device).float()
                merged_bias = delta if merged_bias is None else merged_bias + delta
            cast_bias = None if merged_bias is None else merged_bias.to(self.dtype)
            if is_quantized(target.base) or (bias is None and cast_bias is not None):
                target.merged = (weight.to(self.dtype), cast_bias)
                saved[target] = (torch.empty(0), None)
                continue
            saved[target] = (target.base.weight.data.clone(), None if bias is None else bias.data.clone())
            target.base.weight.data.copy_(weight.to(target.base.weight.dtype))
            if bias is not None:
                target.base.bias.data.copy_(cast_bias)
            target.pack()
        return saved

    def unmerge(self, saved: dict[SlotLinear, tuple[torch.Tensor, torch.Tensor | None]]) -> None:
        for target, (weight, bias) in saved.items():
            if target.merged is not None:
                target.merged = None
                continue
            target.base.weight.data.copy_(weight)
            if bias is not None:
                target.base.bias.data.copy_(bias)
            target.pack()

    # -- forward ---------------------------------------------------------------------------------

    def forward(self, batch: Batch) -> torch.Tensor:
        """Run the decoder over ``batch``'s packed tokens; float logits (picked, vocab) of its picks."""
        return self._forward(batch, self.kv)

    @torch.inference_mode()
    def _forward(self, batch: Batch, cache: torch.Tensor) -> torch.Tensor:
        """``forward``, writing and reading K/V in ``cache`` (layers × 2 × rows × kv heads × positions ×
        head dim): the KV cache, or the prefix table whose rows are slots."""
        for row, slot, count in batch.prefix_write:
            cache[:, :, row, :, :count] = self.prefix_kv[:, :, slot, :, :count]
        adapters, family = batch.adapters, self.family
        lora = adapters.lora
        hidden = self.embedding(batch.token_ids, adapters.slots, adapters.embedding_lora, adapters.tokens)
        if batch.virtual is not None:
            tokens, slots, indices = batch.virtual
            hidden[tokens] = self.virtual_tokens[slots, indices].to(hidden.dtype)
        vectors = self._vectors(adapters)
        masks = [self._masks(group) for group in batch.groups]
        rotary = self._rotary(hidden, batch.rope_pos)
        count = hidden.shape[0]
        for index, (layer, proj) in enumerate(zip(self.decoder.layers, self.layers, strict=True)):
            attn = layer.self_attn
            x = layer.input_layernorm(hidden)
            q, k, v = self._qkv(proj, x, vectors, lora)
            q = q.view(count, -1, self.head_dim)
            k = k.view(count, -1, self.head_dim)
            v = v.view(count, -1, self.head_dim)
            if family.qk_norm:
                q, k = attn.q_norm(q), attn.k_norm(k)
            cos, sin = rotary[index]
            q, k = _rotate(q, cos, sin), _rotate(k, cos, sin)
            key_cache, value_cache = cache[index, 0], cache[index, 1]
            key_cache[batch.token_rows, :, batch.cache_pos] = k.to(self.dtype)
            value_cache[batch.token_rows, :, batch.cache_pos] = v.to(self.dtype)
            out = self._attend(batch.groups, masks, self.windows[index], q, key_cache, value_cache)
            o_proj = proj["o_proj"]
            out = o_proj(out, vectors, o_proj.group.shrink(out, lora), lora, owned_input=True)
            if family.sandwich_norms:
                hidden = hidden + layer.post_attention_layernorm(out)
                x = layer.pre_feedforward_layernorm(hidden)
            else:
                hidden = hidden + out
                x = layer.post_attention_layernorm(hidden)
            gate, up = self._gate_up(proj, x, vectors, lora)
            gated = getattr(layer.mlp, family.activation)(gate) * up
            down = proj["down_proj"]
            out = down(gated, vectors, down.group.shrink(gated, lora), lora, owned_input=True)
            hidden = hidden + (layer.post_feedforward_layernorm(out) if family.sandwich_norms else out)
        picked = hidden if batch.picks is None else hidden.index_select(0, batch.picks)
        return self._logits(self.decoder.norm(picked), batch.pick_adapters)

    def _vectors(self, adapters: AdapterRows) -> RowVectors:
        return RowVectors(
            slots=adapters.slots,
            ia3=self.vectors["ia3"].tensor if adapters.ia3 else None,
            ia3_stretches=adapters.ia3_stretches,
            dora=self.vectors["dora"].tensor if adapters.dora else None,
            bias=self.vectors["bias"].tensor if adapters.bias else None,
        )

    def _attend(
        self,
        groups: tuple[AttentionGroup, ...],
        masks: list[dict[int | None, torch.Tensor]],
        window: int | None,
        q: torch.Tensor,
        key_cache: torch.Tensor,
        value_cache: torch.Tensor,
    ) -> torch.Tensor:
        """Attention of every token's queries (tokens, heads, head dim), group by group; returns
        (tokens, heads · head dim) in token order."""
        outputs = []
        for group, mask in zip(groups, masks, strict=True):
            keys = key_cache[group.rows, :, : group.kv_len]
            values = value_cache[group.rows, :, : group.kv_len]
            out = self._attention(group.queries(q), keys, values, mask[window])
            outputs.append(group.outputs(out.view(group.size, self.num_heads, group.length, self.head_dim)))
        if len(groups) == 1 and groups[0].tokens is None:
            return outputs[0]
        merged = q.new_empty(q.shape[0], self.num_heads * self.head_dim)
        for group, out in zip(groups, outputs, strict=True):
            merged.index_copy_(0, group.tokens, out)
        return merged

    def _logits(self, normed: torch.Tensor, adapters: AdapterRows) -> torch.Tensor:
        """Float logits of ``normed`` (tokens, hidden), every token through its own row's adapter."""
        lora = adapters.lora
        vectors = self._vectors(adapters)
        logits = self.lm_head(normed, vectors, self.lm_head.group.shrink(normed, lora), lora)
        if adapters.tied_tokens:
            logits = self.embedding.tied_logits(normed, adapters.slots, logits)
        if self.final_softcap is not None:
            logits = torch.tanh(logits / self.final_softcap) * self.final_softcap
        return logits.float()

    def _qkv(
        self, proj: dict[str, SlotLinear], x: torch.Tensor, vectors: RowVectors, lora: LoraRows | None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        names = self.family.qkv
        shrunk = proj[names[0]].group.shrink(x, lora)
        if len(names) == 3:
            q, k, v = (proj[name](x, vectors, shrunk, lora) for name in names)
            return q, k, v
        fused = proj[names[0]](x, vectors, shrunk, lora)
        kv_width = self.num_kv_heads * self.head_dim
        return fused.split([self.num_heads * self.head_dim, kv_width, kv_width], dim=-1)

    def _gate_up(
        self, proj: dict[str, SlotLinear], x: torch.Tensor, vectors: RowVectors, lora: LoraRows | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        names = self.family.gate_up
        shrunk = proj[names[0]].group.shrink(x, lora)
        if len(names) == 2:
            return proj[names[0]](x, vectors, shrunk, lora), proj[names[1]](x, vectors, shrunk, lora)
        gate, up = proj[names[0]](x, vectors, shrunk, lora).chunk(2, dim=-1)
        return gate, up

    def _masks(self, group: AttentionGroup) -> dict[int | None, torch.Tensor]:
        """One (rows, 1, group·length, keys) mask per distinct window among the layers.

        Grouped-query attention runs as plain attention: each KV head's query heads become extra query
        rows, so no backend needs GQA support and the KV cache is never repeated.
        """
        keys = torch.arange(group.kv_len, device=self.device).view(1, 1, -1)
        queries = group.query_pos.unsqueeze(-1)
        causal = keys <= queries
        size, length = causal.shape[:2]
        masks = {}
        for window in set(self.windows):
            # transformers' sliding window: a query sees the keys of the last ``window`` positions.
            visible = causal if window is None else causal & (keys > queries - window)
            masks[window] = (
                visible.unsqueeze(1).expand(size, self.group, length, -1).reshape(size, 1, -1, group.kv_len)
            )
        return masks

    def _attention(
        self, q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, mask: torch.Tensor
    ) -> torch.Tensor:
        size, _, length, _ = q.shape
        grouped = q.reshape(size, self.num_kv_heads, self.group * length, self.head_dim)
        if self.attention_softcap is None:
            return F.scaled_dot_product_attention(grouped, keys, values, attn_mask=mask, scale=self.scaling)
        # Softcapped logits (Gemma 2), as transformers' eager attention computes them.
        scores = grouped @ keys.transpose(-1, -2) * self.scaling
        scores = torch.tanh(scores / self.attention_softcap) * self.attention_softcap
        scores = scores.masked_fill(~mask, float("-inf"))
        return scores.softmax(dim=-1, dtype=torch.float32).to(q.dtype) @ values

    def _rotary(
        self, embeds: torch.Tensor, positions: torch.Tensor
    ) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Each layer's (cos, sin) of every token, (tokens, 1, rotary dim) to broadcast over heads."""
        rotary = self.decoder.rotary_emb
        if not self.family.rotary_per_layer_type:
            cos, sin = rotary(embeds, positions)
            return [(cos[0].unsqueeze(1), sin[0].unsqueeze(1))] * len(self.layers)
        types = self.config.layer_types
        by_type = {}
        for kind in set(types):
            cos, sin = rotary(embeds, positions, kind)
            by_type[kind] = (cos[0].unsqueeze(1), sin[0].unsqueeze(1))
        return [by_type[kind] for kind in types]


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotary embedding on the first ``cos.shape[-1]`` dimensions (all of them, unless partial)."""
    width = cos.shape[-1]
    if width < x.shape[-1]:
        return torch.cat((_rotate(x[..., :width], cos, sin), x[..., width:]), dim=-1)
    half = width // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin
