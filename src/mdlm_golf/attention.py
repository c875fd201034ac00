"""Who attends to whom: document masks (attention stays inside the documents the visible BOS tokens
delimit), the causal mask of the AR yardstick, block diffusion's [x_t ; x_0] mask, and the key/value
cache block sampling reuses. SDPA boolean masks on CPU, FlexAttention block masks on CUDA."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .config import BOS_ID

try:  # FlexAttention: torch >= 2.5; without it document masking falls back to an SDPA mask
    from torch.nn.attention.flex_attention import BlockMask, create_block_mask, flex_attention
except ImportError:  # pragma: no cover - old torch
    BlockMask = create_block_mask = flex_attention = None


AttentionMask = torch.Tensor | BlockMask | None  # bool [B, 1, L, L] for SDPA, or a FlexAttention BlockMask


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: AttentionMask) -> torch.Tensor:
    """Bidirectional attention, restricted by the mask: FlexAttention for a BlockMask, else SDPA."""
    if BlockMask is not None and isinstance(mask, BlockMask):
        return flex_attention(q, k, v, block_mask=mask)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)


def document_ids(x: torch.Tensor, layout: str, pad_id: int) -> torch.Tensor | None:
    """Per-position document number from the BOS tokens *visible in x* (PAD -1), or None (stream).

    Computed from the model's input, never from the clean tokens: a masked BOS merges its two
    documents, so attention cannot reveal where a hidden boundary was, and training, evaluation and
    sampling all see the same rule.
    """
    if layout == "stream":
        return None
    ids = torch.cumsum(x == BOS_ID, dim=1)
    return torch.where(x == pad_id, -1, ids)


def document_mask(doc_ids: torch.Tensor | None, use_flex: bool, causal: bool = False,
                  length: int = 0) -> AttentionMask:
    """Attention only between positions of the same document (and, if causal, to earlier ones).

    With FlexAttention (CUDA) fully masked blocks are skipped, so packed rows cost what their
    documents cost; the SDPA fallback (CPU) materializes the [B, 1, L, L] boolean mask and lets
    PAD attend to PAD (an all-masked row would give NaN there; PAD outputs are never scored).
    """
    if doc_ids is None and not causal:
        return None
    if use_flex and BlockMask is not None and doc_ids is not None:
        def same_document(b, h, q_idx, kv_idx):  # PAD (-1) attends nowhere: its blocks are skipped
            keep = (doc_ids[b, q_idx] == doc_ids[b, kv_idx]) & (doc_ids[b, kv_idx] >= 0)
            return keep & (kv_idx <= q_idx) if causal else keep

        batch, length = doc_ids.shape
        return create_block_mask(same_document, batch, None, length, length, device=doc_ids.device)
    mask = None if doc_ids is None else (doc_ids[:, :, None] == doc_ids[:, None, :]).unsqueeze(1)
    if causal:
        length = doc_ids.size(1) if doc_ids is not None else length
        device = doc_ids.device if doc_ids is not None else None
        lower = torch.ones(length, length, dtype=torch.bool, device=device).tril()
        mask = lower if mask is None else mask & lower
    return mask


def block_rule(q_idx: torch.Tensor, kv_idx: torch.Tensor, length: int, block: int) -> torch.Tensor:
    """Block diffusion's pairs over [x_t ; x_0] (positions < length are noisy, the rest clean):
    a noisy position sees its own noisy block and the clean blocks before it; a clean position sees
    the clean blocks up to its own; nothing sees a noisy position of another block."""
    q_clean, kv_clean = q_idx >= length, kv_idx >= length
    q_block, kv_block = (q_idx % length) // block, (kv_idx % length) // block
    noisy_q = ~q_clean & ((~kv_clean & (kv_block == q_block)) | (kv_clean & (kv_block < q_block)))
    return noisy_q | (q_clean & kv_clean & (kv_block <= q_block))


def block_document_ids(x_t: torch.Tensor, clean: torch.Tensor, layout: str, pad_id: int,
                       block: int) -> torch.Tensor | None:
    """Document numbers [B, 2L] over [x_t ; x_0] (PAD -1), or None (stream).

    The clean half counts every BOS; a noisy position counts the BOS of the clean blocks before its
    block plus those visible in x_t inside its block, so a masked BOS merges its documents there, as
    document_ids does for the plain MDLM."""
    if layout == "stream":
        return None
    batch, length = x_t.shape
    clean_count = torch.cumsum(clean == BOS_ID, dim=1)
    before_block = (clean_count - (clean == BOS_ID).long()).view(batch, -1, block)[:, :, :1]
    noisy_count = before_block + torch.cumsum((x_t == BOS_ID).view(batch, -1, block), dim=2)
    ids = torch.cat([noisy_count.view(batch, length), clean_count], 1)
    return torch.where(torch.cat([x_t, clean], 1) == pad_id, -1, ids)


def block_rule_mask(q_docs: torch.Tensor | None, kv_docs: torch.Tensor | None, queries: range, keys: range,
                    length: int, block: int, use_flex: bool) -> AttentionMask:
    """block_rule within documents, for the queries and keys at those positions of [x_t ; x_0], with
    document numbers q_docs [B, Q] and kv_docs [B, K] (PAD -1; None: the stream layout). On CUDA with
    flex a BlockMask that skips the empty tiles; else an SDPA bool mask [B, 1, Q, K] that lets PAD
    attend to PAD (an all-masked row gives NaN; PAD outputs are never scored)."""
    if use_flex and BlockMask is not None:
        def allowed(b, h, q_idx, kv_idx):
            keep = block_rule(q_idx + queries.start, kv_idx + keys.start, length, block)
            if q_docs is None:
                return keep
            return keep & (q_docs[b, q_idx] == kv_docs[b, kv_idx]) & (kv_docs[b, kv_idx] >= 0)

        batch = q_docs.size(0) if q_docs is not None else None
        device = q_docs.device if q_docs is not None else "cuda"
        return create_block_mask(allowed, batch, None, len(queries), len(keys), device=device)
    device = q_docs.device if q_docs is not None else None
    q_index = torch.arange(queries.start, queries.stop, device=device)
    kv_index = torch.arange(keys.start, keys.stop, device=device)
    mask = block_rule(q_index[:, None], kv_index[None, :], length, block)[None, None]
    if q_docs is not None:
        mask = mask & (q_docs[:, :, None] == kv_docs[:, None, :]).unsqueeze(1)
    return mask


def block_attention_mask(doc_ids: torch.Tensor | None, length: int, block: int, use_flex: bool) -> AttentionMask:
    """The [x_t ; x_0] forward's mask: block_rule over all 2L positions, within documents."""
    both = range(2 * length)
    return block_rule_mask(doc_ids, doc_ids, both, both, length, block, use_flex)


def encoder_decoder_masks(doc_ids: torch.Tensor | None, length: int, block: int,
                          use_flex: bool) -> tuple[AttentionMask, AttentionMask]:
    """The encoder-decoder's two masks, the rows of block_attention_mask each of its forwards runs: the
    encoder's (clean queries, clean keys: the clean blocks up to its own) and the decoder's (noisy
    queries, keys [x_t ; x_0]: its own noisy block and the clean blocks before it), within documents."""
    noisy, clean = (None, None) if doc_ids is None else (doc_ids[:, :length], doc_ids[:, length:])
    clean_half = range(length, 2 * length)
    return (block_rule_mask(clean, clean, clean_half, clean_half, length, block, use_flex),
            block_rule_mask(noisy, doc_ids, range(length), range(2 * length), length, block, use_flex))


def cached_attention_mask(cache: "KVCache", x_block: torch.Tensor, layout: str, pad_id: int,
                          causal: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(bool mask [B, 1, n, T + n], document numbers [B, T + n]) of a block [B, n] placed after the
    cache's T positions: a position sees the cached and block positions of its own document (visible
    BOS tokens start one; the stream layout has one document), never a PAD of the block, and with
    `causal` nothing after itself."""
    batch, n = x_block.shape
    past = cache.docs if cache.docs is not None else x_block.new_zeros(batch, 0)
    last = past[:, -1:] if past.size(1) else x_block.new_zeros(batch, 1)
    opened = (x_block == BOS_ID).long() if layout != "stream" else torch.zeros_like(x_block)
    docs = torch.cat([past, last + torch.cumsum(opened, 1)], 1)
    keys_valid = torch.cat([torch.ones_like(past, dtype=torch.bool), x_block != pad_id], 1)
    mask = (docs[:, None, :] == docs[:, -n:, None]) & keys_valid[:, None, :]
    if causal:
        mask &= torch.ones(n, docs.size(1), dtype=torch.bool, device=x_block.device).tril(docs.size(1) - n)
    return mask[:, None], docs


class LayerCache:
    """One layer's keys and values [B, H, T, head_dim] of the positions already cached."""

    def __init__(self, keys: torch.Tensor | None = None, values: torch.Tensor | None = None):
        self.keys, self.values = keys, values

    def extend(self, k: torch.Tensor, v: torch.Tensor, store: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """The cached keys and values followed by these; kept in the cache when `store`."""
        if self.keys is not None:
            k, v = torch.cat([self.keys, k], 2), torch.cat([self.values, v], 2)
        if store:
            self.keys, self.values = k, v
        return k, v


class KVCache:
    """The clean past, per layer, and the document number of each cached position: each clean block
    (block sampling) or token (AR coding) is run once to append its keys and values, never recomputed."""

    def __init__(self, num_layers: int, layers: list[LayerCache] | None = None, docs: torch.Tensor | None = None):
        self.layers = layers if layers is not None else [LayerCache() for _ in range(num_layers)]
        self.docs = docs  # [B, T] document numbers of the cached positions; None while empty

    @property
    def length(self) -> int:
        """Positions cached."""
        return 0 if self.docs is None else self.docs.size(1)

    def append(self, docs: torch.Tensor) -> None:
        """Record the documents [B, T + n] of the positions the layers now hold (after a storing forward)."""
        self.docs = docs

    def rows(self, index: torch.Tensor) -> "KVCache":
        """A cache of some rows (the rows a sampling step runs), to read from."""
        if self.docs is None:
            return KVCache(len(self.layers))
        return KVCache(len(self.layers), [LayerCache(layer.keys[index], layer.values[index]) for layer in self.layers],
                       self.docs[index])
