"""Samplers: determinism, prompts, document boundaries, the lazy ("cached") and confidence variants."""
from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from mdlm_golf.config import BOS_ID, EOS_ID, Tokens, build_config
from mdlm_golf.model import Transformer
from mdlm_golf.sampling import SAMPLERS, decode_rows, generate, live_widths, run_network

CFG = build_config("tiny", environ={})
V = CFG.vocab_size
MASK, PAD = CFG.tokens.mask, CFG.tokens.pad


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """These forwards are tiny: with several intra-op threads on a busy machine, OpenMP's spin-waits
    made them ~30x slower (measured on the 2-core CI box under load)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def model() -> Transformer:
    """The tiny MDLM with non-zero head and adaLN weights: contextual, time-dependent, far from uniform
    (about 5 nats of entropy, top token ~0.1) yet diverse enough that samples differ."""
    torch.manual_seed(0)
    model = Transformer(CFG)
    with torch.no_grad():
        nn.init.normal_(model.head.weight, std=0.3)
        nn.init.normal_(model.embed.weight, std=1.0)
        for block in model.blocks:
            nn.init.normal_(block.adaln.weight, std=0.2)
        nn.init.normal_(model.final_adaln.weight, std=0.2)
    return model.eval()


class Boost(nn.Module):
    """Wraps a denoiser: adds `amount` to token `token`'s logit at `position`; records its inputs."""

    def __init__(self, inner: nn.Module, token: int, position: int, amount: float = 1e4):
        super().__init__()
        self.inner, self.token, self.position, self.amount = inner, token, position, amount
        self.inputs: list[torch.Tensor] = []

    def forward(self, x_t, sigma, clean=None, doc_ids=None):
        self.inputs.append(x_t.clone())
        logits = self.inner(x_t, sigma, doc_ids).clone()
        if x_t.size(1) > self.position:
            logits[:, self.position, self.token] += self.amount
        return logits


class NoBoundary(nn.Module):
    """Wraps a denoiser so it never predicts BOS/EOS (full-length rows); records its inputs."""

    def __init__(self, inner: nn.Module):
        super().__init__()
        self.inner = inner
        self.inputs: list[torch.Tensor] = []

    @property
    def masked(self) -> list[list[int]]:
        return [(x == MASK).sum(1).tolist() for x in self.inputs]

    def forward(self, x_t, sigma, clean=None, doc_ids=None):
        self.inputs.append(x_t.clone())
        logits = self.inner(x_t, sigma, doc_ids).clone()
        logits[..., [BOS_ID, EOS_ID]] = -1e4
        return logits


class PositionTable(nn.Module):
    """Context-free, time-independent denoiser: fixed logits per position, BOS/EOS ruled out."""

    def __init__(self, length: int, seed: int = 0):
        super().__init__()
        table = torch.randn(length, V + 2, generator=torch.Generator().manual_seed(seed)) * 3
        table[:, [BOS_ID, EOS_ID]] = -1e4
        table[:, [MASK, PAD]] = 1e4  # SUBS must suppress them
        self.register_buffer("table", table)

    def forward(self, x_t, sigma, clean=None, doc_ids=None):
        return self.table[: x_t.size(1)].expand(x_t.size(0), -1, -1)


def sample(model, **kw):
    kw = dict(num=2, length=24, steps=12, seed=0) | kw
    return generate(model, CFG, **kw)


@pytest.mark.parametrize("sampler", SAMPLERS)
def test_same_seed_same_samples_and_different_seeds_differ(model, sampler):
    a, b = sample(model, sampler=sampler, seed=3), sample(model, sampler=sampler, seed=3)
    assert a.rows == b.rows and torch.equal(a.canvas, b.canvas)
    assert a.nfe == b.nfe and a.row_nfe == b.row_nfe
    assert sample(model, sampler=sampler, seed=4).rows != a.rows
    assert a.rows[0] != a.rows[1]  # rows of one batch are different samples


@pytest.mark.parametrize("sampler", SAMPLERS)
def test_rows_are_bounded_and_free_of_special_ids(model, sampler):
    for seed in range(3):
        r = sample(model, sampler=sampler, num=3, length=20, steps=8, seed=seed)
        assert len(r.rows) == 3 and r.canvas.shape == (3, 20)
        for row, full in zip(r.rows, r.canvas.tolist()):
            assert 2 <= len(row) <= 20 and row[0] == BOS_ID
            assert all(0 <= t < V for t in row)  # never MASK (1024) or PAD (1025)
            assert BOS_ID not in row[1:] and EOS_ID not in row  # boundaries are cut, not emitted
            assert full[: len(row)] == row and set(full[len(row):]) <= {PAD}
        assert MASK not in r.canvas
        assert r.nfe <= 8 and max(r.row_nfe) <= r.nfe
        assert r.generated_tokens == sum(len(x) - 1 for x in r.rows)
        assert r.elapsed > 0 and r.tokens_per_s > 0


@pytest.mark.parametrize("sampler", SAMPLERS)
def test_prompt_is_kept_verbatim(model, sampler):
    prompt = [5, 6, 7, 300, 0, 1000]
    for seed in range(2):
        r = sample(model, sampler=sampler, prompt_ids=prompt, length=16, seed=seed)
        for row, full in zip(r.rows, r.canvas.tolist()):
            assert row[: 1 + len(prompt)] == [BOS_ID, *prompt]
            assert full[: 1 + len(prompt)] == [BOS_ID, *prompt]
        assert r.generated_tokens == sum(len(x) - 1 - len(prompt) for x in r.rows)


@pytest.mark.parametrize("sampler", SAMPLERS)
@pytest.mark.parametrize("token", [BOS_ID, EOS_ID])
def test_nothing_is_generated_past_a_boundary(model, sampler, token):
    widths = []
    for seed in range(3):
        boosted = Boost(model, token, position=8)
        r = sample(boosted, sampler=sampler, num=2, length=24, steps=12, seed=seed)
        for row, full in zip(r.rows, r.canvas.tolist()):
            assert len(row) <= 8  # the document ends before position 8 (or earlier by chance)
            assert full[8:] == [PAD] * 16
        # trimming: every forward is exactly as wide as its longest live document
        assert all(x.size(1) == int((x != PAD).sum(1).max()) for x in boosted.inputs)
        assert r.widths == [x.size(1) for x in boosted.inputs] and r.widths[0] == 24
        assert r.positions == sum(x.numel() for x in boosted.inputs)
        widths += r.widths
    assert min(widths) <= 8  # and the network ran on fewer positions


def test_rows_of_different_widths_do_not_see_each_others_padding(model):
    """A row's logits do not depend on its batch: masked attention equals running it alone."""
    x = torch.full((2, 16), MASK)
    x[:, 0] = BOS_ID
    x[0, 4:] = PAD  # row 0 has ended: width 4; row 1 is full width
    widths = live_widths(x, Tokens(V))
    assert widths.tolist() == [4, 16]
    with torch.no_grad():
        both = run_network(model, x, torch.tensor([True, True]), widths, 2.0)
        alone = run_network(model, x, torch.tensor([True, False]), widths, 2.0)
    assert both.shape[1] == 16 and alone.shape[1] == 4
    torch.testing.assert_close(both[0, :4], alone[0], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("num", [1, 3])
def test_cached_matches_ancestral_with_fewer_forwards(model, num):
    """Lazy evaluation is exact even for this time-dependent model: identical tokens, fewer forwards."""
    kw = dict(num=num, length=16, steps=48, seed=7)  # more steps than positions: many empty steps
    anc, cached = sample(model, sampler="ancestral", **kw), sample(model, sampler="cached", **kw)
    assert cached.rows == anc.rows and torch.equal(cached.canvas, anc.canvas)
    assert cached.nfe < anc.nfe and cached.nfe_saved > anc.nfe_saved
    assert all(c <= a for c, a in zip(cached.row_nfe, anc.row_nfe))
    assert cached.positions < anc.positions


def test_cached_matches_ancestral_for_a_time_independent_model():
    table = PositionTable(32)
    kw = dict(num=2, length=32, steps=20, seed=1)
    assert sample(table, sampler="cached", **kw).rows == sample(table, sampler="ancestral", **kw).rows


def test_confidence_reveals_all_within_steps_on_schedule(model):
    wrapped = NoBoundary(model)
    r = sample(wrapped, sampler="confidence", num=2, length=33, steps=4, seed=0)
    assert r.nfe == 4 and all(len(row) == 33 for row in r.rows) and MASK not in r.canvas
    # 32 masked, w_k = 1/k on the log-linear grid (eps aside): reveal 8 per step
    assert wrapped.masked == [[32, 32], [24, 24], [16, 16], [8, 8]]
    one = sample(model, sampler="confidence", length=33, steps=1)
    assert one.nfe == 1 and MASK not in one.canvas
    many = sample(NoBoundary(model), sampler="confidence", length=9, steps=50)
    assert many.nfe == 8  # at least one reveal per forward: never more forwards than masked positions


def test_confidence_reveals_the_most_probable_positions_first():
    table = PositionTable(9)
    wrapped = NoBoundary(table)
    r = sample(wrapped, sampler="confidence", num=1, length=9, steps=8, top_p=1e-9)
    assert wrapped.masked == [[8], [7], [6], [5], [4], [3], [2], [1]]  # w_k = 1/k: one per step
    revealed = [int(((a == MASK) & (b != MASK)).nonzero()[0, 1])
                for a, b in zip(wrapped.inputs, wrapped.inputs[1:] + [r.canvas])]
    top = torch.softmax(table.table[1:9, :V], -1).max(-1).values  # greedy candidates' probability
    assert revealed == (1 + top.argsort(descending=True)).tolist()


@pytest.mark.parametrize("sampler", SAMPLERS)
def test_tiny_top_p_is_greedy(sampler):
    table = PositionTable(24, seed=5)
    greedy = [BOS_ID] + table.table[1:24, :V].argmax(-1).tolist()
    for seed in range(2):
        r = sample(table, sampler=sampler, num=2, length=24, top_p=1e-9, temperature=1.7, seed=seed)
        assert r.rows == [greedy, greedy]


class TwoTokens(nn.Module):
    """Everywhere p(10) = 0.8, p(11) = 0.2, everything else impossible."""

    def forward(self, x_t, sigma, clean=None, doc_ids=None):
        logits = torch.full((*x_t.shape, V + 2), -1e4)
        logits[..., 10], logits[..., 11] = math.log(0.8), math.log(0.2)
        return logits


@pytest.mark.parametrize("temperature, top_p, p10", [(1.0, 1.0, 0.8), (0.5, 1.0, 0.64 / 0.68),
                                                     (2.0, 1.0, 0.8**0.5 / (0.8**0.5 + 0.2**0.5)),
                                                     (1.0, 0.7, 1.0), (1.0, 0.9, 0.8)])
def test_temperature_and_top_p_shape_the_distribution(temperature, top_p, p10):
    r = sample(TwoTokens(), num=64, length=33, steps=4, temperature=temperature, top_p=top_p)
    ids = torch.tensor([row[1:] for row in r.rows])
    assert set(ids.unique().tolist()) <= {10, 11}
    assert abs((ids == 10).double().mean().item() - p10) < 0.03  # 2048 draws: >= 3.4 standard errors


@pytest.mark.parametrize("bad, message", [
    (dict(temperature=0.0), "temperature must be a positive finite number, got 0.0"),
    (dict(temperature=-1.0), "temperature"),
    (dict(temperature=float("nan")), "temperature"),
    (dict(temperature=float("inf")), "temperature"),
    (dict(top_p=0.0), "top_p must lie in (0, 1], got 0.0"),
    (dict(top_p=1.5), "top_p"),
    (dict(sampler="beam"), "sampler must be one of ancestral, cached, confidence"),
    (dict(steps=0), "steps must be >= 1"),
    (dict(num=0), "num must be >= 1"),
    (dict(num=10**9), "num must be <= 1024 (one batch), got 1000000000"),
    (dict(length=CFG.seq_len + 1), "exceeds the model's training length"),
    (dict(length=5, prompt_ids=[5, 6, 7, 8]), "leaves nothing to generate"),
    (dict(prompt_ids=[5, BOS_ID]), "prompt ids must be real tokens"),
    (dict(prompt_ids=[MASK]), "prompt ids must be real tokens"),
])
def test_bad_options_raise_clear_errors(model, bad, message):
    with pytest.raises(ValueError) as e:
        sample(model, **bad)
    assert message in str(e.value)


def test_decode_rows(shared_sp, model):
    text = "The quick brown fox"
    ids = shared_sp.encode(text)
    assert decode_rows(shared_sp, [[BOS_ID, *ids], [BOS_ID]]) == [text, ""]
    r = sample(model, prompt_ids=ids, length=20)
    assert all(t.startswith(text) for t in decode_rows(shared_sp, r.rows))
