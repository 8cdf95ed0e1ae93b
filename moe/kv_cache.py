"""Key/value cache for incremental decoding, with rolling buffers for sliding-window layers (Mistral, Jiang et
al. 2023, section 2 "Rolling Buffer Cache").

Each attention layer gets preallocated key and value buffers of S slots. A layer whose window binds (window <
max_len) keeps only `window` slots and writes token number n into slot n % window, so its memory stays bounded
however long the generation; other layers keep max_len slots. Every slot remembers the absolute position of the
token it holds, and attention masks (causal, window, empty slot) are computed from those positions, so the
slot order never matters. MoE feed-forward layers act on each token alone and need no cache.

Build one with `KVCache.for_model(model, batch_size, max_len)` and pass it as `model(ids, cache=cache)`; each
call appends its T tokens. All rows of a batch share positions (no per-row padding). Windows are measured in
positions here and in token indices without a cache; the two agree for the default consecutive positions.
Shapes: B batch, T new tokens, K key/value heads, S slots, C head dim.
"""

from __future__ import annotations

import copy

import torch

# Position recorded in an empty slot. It is larger than any query position, so the causal test (key position
# <= query position) masks empty slots without a separate validity mask.
EMPTY = torch.iinfo(torch.long).max


class LayerKVCache:
    """One attention layer's buffers: keys/values (B, K, S, C) and the position held by each slot (S,)."""

    def __init__(self, batch_size: int, n_kv_heads: int, head_dim: int, max_len: int, window: int | None,
                 device=None, dtype=None):
        self.window = window
        self.rolling = window is not None and window < max_len
        n_slots = window if self.rolling else max_len
        self.keys = torch.zeros(batch_size, n_kv_heads, n_slots, head_dim, device=device, dtype=dtype)
        self.values = torch.zeros_like(self.keys)
        self.positions = torch.full((n_slots,), EMPTY, dtype=torch.long, device=device)
        self.length = 0  # tokens written so far; a Python int so that slot arithmetic never syncs a device

    @property
    def n_slots(self) -> int:
        return self.keys.shape[2]

    def update(self, k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor):
        """Append k, v (B, K, T, C) at `positions` (T,); return (keys, values, key_positions) for the T queries
        to attend over: (B, K, S', C), (B, K, S', C), (S',), with masking left to the caller. The keys and values
        come back in the buffers' dtype, whatever k and v's."""
        k, v = k.to(self.keys.dtype), v.to(self.values.dtype)  # no-ops when the dtypes agree
        T = k.shape[2]
        if self.rolling and T > 1:
            # Writing first would overwrite keys that this chunk's earlier queries still see (a query at the
            # chunk's start reaches window - 1 tokens back), so attend over the old slots plus the new keys.
            keys, values = torch.cat((self.keys, k), dim=2), torch.cat((self.values, v), dim=2)
            key_positions = torch.cat((self.positions, positions))
            keep = min(T, self.n_slots)  # only the last `window` tokens can be seen by any later query
            self._write(k[:, :, T - keep:], v[:, :, T - keep:], positions[T - keep:], self.length + T - keep)
            self.length += T
            return keys, values, key_positions
        # One token into a rolling buffer overwrites the token `window` back, which its query no longer sees.
        self._write(k, v, positions, self.length)
        self.length += T
        used = min(self.length, self.n_slots)  # slots past `used` are empty; skip them
        return self.keys[:, :, :used], self.values[:, :, :used], self.positions[:used]

    def select_rows(self, rows: torch.Tensor) -> LayerKVCache:
        """A new layer cache whose row i is a copy of this one's row rows[i] (rows: (B',) indices, repeats
        allowed); slot positions and length are shared by all rows, so they carry over unchanged."""
        selected = copy.copy(self)
        selected.keys = self.keys.index_select(0, rows)
        selected.values = self.values.index_select(0, rows)
        selected.positions = self.positions.clone()
        return selected

    def _write(self, k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor, first: int) -> None:
        """Write k, v (B, K, T, C) as tokens number first .. first + T - 1, T <= S."""
        T = k.shape[2]
        start = first % self.n_slots
        head = min(T, self.n_slots - start)  # tokens before the buffer wraps round
        for src, dst in ((slice(0, head), slice(start, start + head)), (slice(head, T), slice(0, T - head))):
            self.keys[:, :, dst] = k[:, :, src]
            self.values[:, :, dst] = v[:, :, src]
            self.positions[dst] = positions[src]


class KVCache:
    """Per-layer key/value caches of one model for a batch of sequences generated together."""

    def __init__(self, layers: list[LayerKVCache], max_len: int):
        self.layers = layers
        self.max_len = max_len

    @classmethod
    def for_model(cls, model, batch_size: int, max_len: int | None = None, device=None,
                  dtype: torch.dtype | None = None) -> KVCache:
        """Empty cache for up to max_len tokens per row (default: the config's max_seq_len), on the model's
        device and, unless given, in the dtype its keys will have: the autocast dtype inside an autocast region
        (bf16-mixed precision keeps float32 weights but computes keys in bf16), else the parameter dtype."""
        config = model.config
        max_len = config.max_seq_len if max_len is None else max_len
        if batch_size < 1:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        if max_len < 1:
            raise ValueError(f"max_len must be positive, got {max_len}")
        weight = model.embed_tokens.weight
        device = weight.device if device is None else device
        if dtype is None:
            device_type = torch.device(device).type
            autocast = torch.is_autocast_enabled(device_type)
            dtype = torch.get_autocast_dtype(device_type) if autocast else weight.dtype
        layers = [
            LayerKVCache(batch_size, config.n_kv_heads, config.head_dim, max_len, config.window_for_layer(i),
                         device, dtype)
            for i in range(config.n_layers)
        ]
        return cls(layers, max_len)

    def select_rows(self, rows: torch.Tensor) -> KVCache:
        """A new cache whose row i continues this cache's row rows[i] (rows: (B',) indices into the batch,
        repeats allowed): e.g. one prefilled context repeated once per candidate continuation."""
        return KVCache([layer.select_rows(rows) for layer in self.layers], self.max_len)

    @property
    def length(self) -> int:
        """Tokens appended so far (per row)."""
        return self.layers[0].length

    def next_positions(self, n_tokens: int, device=None) -> torch.Tensor:
        """Positions of the next n_tokens tokens, continuing from the cache's length."""
        return torch.arange(self.length, self.length + n_tokens, device=device)

    def check_room(self, n_tokens: int) -> None:
        """Raise before any layer is written if n_tokens more would not fit in max_len."""
        if self.length + n_tokens > self.max_len:
            raise ValueError(
                f"cache holds {self.length} tokens of max_len={self.max_len}; {n_tokens} more do not fit"
            )
