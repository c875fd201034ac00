"""FlexAttention block masks (CUDA) let through exactly the pairs the SDPA boolean masks (CPU) do: for
documents (bidirectional and causal), for block diffusion's [x_t ; x_0] rule, and for blocks smaller than
FlexAttention's 128-position tiles, and for the encoder-decoder's two masks. Run on a GPU by bench/gpu_check.sh; skipped without CUDA."""
from __future__ import annotations

import pytest
import torch

from mdlm_golf.attention import (attend, block_attention_mask, block_document_ids, document_ids,
                                 document_mask, encoder_decoder_masks)
from mdlm_golf.config import BOS_ID

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="FlexAttention block masks need CUDA")]
PAD, MASK = 1025, 1024


def rows_with_documents(batch: int, length: int, seed: int) -> torch.Tensor:
    """Token rows with BOS at random places (documents of every size, some under one tile) and a PAD tail."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randint(4, 1000, (batch, length), generator=gen)
    x[torch.rand(batch, length, generator=gen) < 0.02] = BOS_ID
    x[:, 0] = BOS_ID
    x[0, -37:] = PAD
    return x.cuda()


def both_ways(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, flex_mask, sdpa_mask) -> tuple:
    return attend(q, k, v, flex_mask), attend(q, k, v, sdpa_mask)


def random_qkv(batch: int, length: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    gen = torch.Generator(device="cuda").manual_seed(0)
    return tuple(torch.randn(batch, 2, length, 16, device="cuda", generator=gen) for _ in range(3))


@pytest.mark.parametrize("causal", [False, True])
def test_document_masks_agree(causal):
    x = rows_with_documents(3, 512, seed=1)
    docs = document_ids(x, "packed", PAD)
    flex, sdpa = document_mask(docs, True, causal, 512), document_mask(docs, False, causal, 512)
    got, want = both_ways(*random_qkv(3, 512), flex, sdpa)
    live = (x != PAD)[:, None, :, None].expand_as(got)  # PAD queries: no key under flex, each other under SDPA
    torch.testing.assert_close(got[live], want[live], rtol=2e-3, atol=2e-3)


@pytest.mark.parametrize("block", [2, 4, 16, 128])
def test_block_diffusion_masks_agree(block):
    clean = rows_with_documents(2, 256, seed=2)
    x_t = torch.where(torch.rand(clean.shape, device="cuda") < 0.5, torch.full_like(clean, MASK), clean)
    x_t = torch.where(clean == PAD, clean, x_t)
    docs = block_document_ids(x_t, clean, "packed", PAD, block)
    flex, sdpa = block_attention_mask(docs, 256, block, True), block_attention_mask(docs, 256, block, False)
    got, want = both_ways(*random_qkv(2, 512), flex, sdpa)
    live = (torch.cat([x_t, clean], 1) != PAD)[:, None, :, None].expand_as(got)
    torch.testing.assert_close(got[live], want[live], rtol=2e-3, atol=2e-3)


@pytest.mark.parametrize("block", [2, 16])
def test_encoder_decoder_masks_agree(block):
    clean = rows_with_documents(2, 256, seed=3)
    x_t = torch.where(torch.rand(clean.shape, device="cuda") < 0.5, torch.full_like(clean, MASK), clean)
    x_t = torch.where(clean == PAD, clean, x_t)
    docs = block_document_ids(x_t, clean, "packed", PAD, block)
    (enc_flex, dec_flex), (enc_sdpa, dec_sdpa) = (encoder_decoder_masks(docs, 256, block, flex) for flex in (True, False))
    q, k, v = random_qkv(2, 512)
    got, want = both_ways(q[:, :, :256], k[:, :, 256:], v[:, :, 256:], enc_flex, enc_sdpa)
    live = (clean != PAD)[:, None, :, None].expand_as(got)
    torch.testing.assert_close(got[live], want[live], rtol=2e-3, atol=2e-3)
    got, want = both_ways(q[:, :, :256], k, v, dec_flex, dec_sdpa)
    live = (x_t != PAD)[:, None, :, None].expand_as(got)
    torch.testing.assert_close(got[live], want[live], rtol=2e-3, atol=2e-3)
