"""Packed rows with per-document attention give exactly the padded layout's loss on the same documents."""
from __future__ import annotations

import dataclasses

import torch

from mdlm_golf.config import BOS_ID, Tokens, build_config
from mdlm_golf.diffusion import Noise
from mdlm_golf.objective import diffusion_loss
from mdlm_golf.model import Transformer, document_ids

SEQ = 32
DOC_LENGTHS = [[10, 12, 10], [16, 9, 7], [32]]  # three packed rows, each exactly full


def make_docs(generator: torch.Generator) -> list[torch.Tensor]:
    docs = []
    for row in DOC_LENGTHS:
        for n in row:
            doc = torch.randint(4, 1024, (n,), generator=generator)
            doc[0] = BOS_ID
            docs.append(doc)
    return docs


def trained_like_model() -> tuple[Transformer, Tokens]:
    cfg = build_config("tiny", environ={}, overrides={"seq_len": SEQ})
    torch.manual_seed(0)
    model = Transformer(cfg)
    for p in model.parameters():  # adaLN-zero and the zero head would hide any difference
        torch.nn.init.normal_(p, std=0.2)
    return model.eval(), Tokens(cfg.vocab_size)


def test_document_ids_separate_documents_and_pad():
    x0 = torch.tensor([[BOS_ID, 5, 6, BOS_ID, 7, 1025, 1025], [8, 9, BOS_ID, 4, 4, 4, 4]])
    ids = document_ids(x0, "packed", pad_id=1025)
    assert ids.tolist() == [[1, 1, 1, 2, 2, -1, -1], [0, 0, 1, 1, 1, 1, 1]]
    assert document_ids(x0, "stream", pad_id=1025) is None


def test_packed_layout_loss_equals_padded_layout_loss():
    generator = torch.Generator().manual_seed(1)
    model, tokens = trained_like_model()
    docs = make_docs(generator)
    row_t = torch.tensor([0.3, 0.7, 0.5])  # packed rows share one noise level per row

    packed = torch.stack([torch.cat(docs[i:i + len(r)]) for i, r in
                          zip([0, 3, 6], DOC_LENGTHS)])
    packed_u = torch.rand(packed.shape, generator=generator)
    packed_noise = Noise(row_t, packed_u, torch.ones_like(packed_u))

    # the padded layout: one document per row, PAD after it, each with its packed row's t and draws
    padded = torch.full((len(docs), SEQ), tokens.pad)
    padded_u = torch.ones(len(docs), SEQ)
    padded_t = torch.empty(len(docs))
    doc = 0
    for row, lengths in enumerate(DOC_LENGTHS):
        offset = 0
        for n in lengths:
            padded[doc, :n] = packed[row, offset:offset + n]
            padded_u[doc, :n] = packed_u[row, offset:offset + n]
            padded_t[doc] = row_t[row]
            offset, doc = offset + n, doc + 1
    padded_noise = Noise(padded_t, padded_u, torch.ones_like(padded_u))

    with torch.no_grad():
        out_packed = diffusion_loss(model, packed, tokens, 1e-3, "packed", packed_noise)
        out_padded = diffusion_loss(model, padded, tokens, 1e-3, "docs", padded_noise)
    assert out_packed.masked > 20 and out_packed.scored == sum(map(sum, DOC_LENGTHS)) - len(docs)
    assert out_packed.scored == out_padded.scored and out_packed.masked == out_padded.masked
    torch.testing.assert_close(out_packed.weighted_sum, out_padded.weighted_sum, rtol=1e-5, atol=1e-4)

    # and the masking matters: full attention across the packed documents changes the loss
    streaming = Transformer(dataclasses.replace(model.cfg, layout="stream")).eval()
    streaming.load_state_dict(model.state_dict())
    with torch.no_grad():
        leaky = diffusion_loss(streaming, packed, tokens, 1e-3, "stream",
                               Noise(row_t, torch.where(packed == BOS_ID, 2.0, packed_u),
                                     torch.ones_like(packed_u)))
    assert leaky.scored > out_packed.scored  # stream scores BOS positions too (none masked here)
    assert not torch.allclose(leaky.weighted_sum, out_packed.weighted_sum, rtol=1e-3)
