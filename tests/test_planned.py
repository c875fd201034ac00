"""Planned-order code length: exact for a unigram model, causal order, schedule, sigma, modes, ranks."""
from __future__ import annotations

import math

import numpy as np
import pytest
from conftest import UnigramDenoiser, synthetic_byte_table, synthetic_val, zipf_unigram
import torch
from torch import nn

from mdlm_golf.config import BOS_ID, Tokens, build_config
from mdlm_golf.diffusion import subs_log_probs
from mdlm_golf.eval import evaluate
from mdlm_golf.eval.harness import format_result, make_slices, scored_positions
from mdlm_golf.eval.planned import ORDERS, Schedule, masked_start, planned_bits, run_planned
from mdlm_golf.model import Transformer

V = 1024
TOKENS = Tokens(V)
PAD, MASK = TOKENS.pad, TOKENS.mask
CPU = torch.device("cpu")
EPS = 1e-3


class Recorder(nn.Module):
    """Wraps a model and keeps every forward's input and sigma."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model
        self.calls: list[tuple[torch.Tensor, torch.Tensor]] = []

    def forward(self, x_t, sigma, clean=None):
        self.calls.append((x_t.clone(), sigma.clone()))
        return self.model(x_t, sigma)


def small_cfg(**overrides):
    values = dict(seq_len=64, eval_batch_rows=5, noise_eps=EPS)
    values.update(overrides)
    return build_config("tiny", environ={}, overrides=values)


def tiny_model(seed: int = 0) -> Transformer:
    """The tiny transformer with every weight perturbed: context- and sigma-dependent predictions."""
    torch.manual_seed(seed)
    model = Transformer(small_cfg())
    for param in model.parameters():
        nn.init.normal_(param, std=0.2)
    nn.init.normal_(model.head.weight, std=0.5)
    return model.eval()


def reveal_sets(model, x0: torch.Tensor, mode: str, order: str, schedule: Schedule) -> list[list[list[int]]]:
    """Per pass, per row: the positions chosen (sorted), recorded through run_planned's reveal hook."""
    scored = scored_positions(x0, mode, PAD)
    passes: list[list[list[int]]] = []

    def record(rows, logits, chosen, cols):
        sets = [[] for _ in range(x0.size(0))]
        for r, row in zip(rows.tolist(), chosen):
            sets[r] = row.nonzero().squeeze(1).tolist()
        passes.append(sets)
        return x0[rows]

    with torch.no_grad():
        run_planned(model, masked_start(x0, scored, TOKENS), scored, schedule, order, EPS, TOKENS, record)
    return passes


SCHEDULES = [dict(tokens_per_pass=1), dict(tokens_per_pass=7), dict(tokens_per_pass=64),
             dict(passes=1), dict(passes=3), dict(passes=16), dict(passes=64), dict(passes=1000)]


# ---------------------------------------------------------------- exactness

@pytest.mark.parametrize("order", ORDERS)
@pytest.mark.parametrize("mode", ["strict", "anchored"])
def test_unigram_model_code_length_is_its_nll_for_every_order_and_schedule(order, mode):
    """A context-free model: however tokens are grouped and ordered, each costs -log2 p(x)."""
    p = zipf_unigram()
    model = UnigramDenoiser(p)
    val = synthetic_val(6 * 64 - 23, p)  # a ragged last slice
    slices = make_slices(val, 64, 0, synthetic_byte_table(), PAD)
    scored = scored_positions(torch.from_numpy(slices.tokens), mode, PAD).numpy()
    nll = model.nll_bits(np.where(scored, slices.tokens, 0))
    expected = (nll * scored).sum(1)
    for schedule in SCHEDULES:
        bits = planned_bits(model, slices, mode, order, eps=EPS, vocab_size=V, batch_rows=4, device=CPU,
                            **schedule)
        np.testing.assert_allclose(bits, expected, rtol=0, atol=1e-9, err_msg=str(schedule))


def test_chain_rule_left_to_right_one_token_per_pass():
    """passes = L, left to right: pass i reveals position i alone, and the bits are the sum of
    -log2 p(x_i | x_<i revealed, the rest masked) at sigma = -log((i) / L) computed directly."""
    model = tiny_model()
    slices = make_slices(synthetic_val(2 * 64, zipf_unigram(), seed=3), 64, 0, synthetic_byte_table(), PAD)
    x0 = torch.from_numpy(slices.tokens)
    sets = reveal_sets(model, x0, "strict", "left-to-right", Schedule(passes=64))
    assert len(sets) == 64
    assert all(pass_sets == [[i], [i]] for i, pass_sets in enumerate(sets))

    bits = planned_bits(model, slices, "strict", "left-to-right", passes=64, eps=EPS, vocab_size=V,
                        batch_rows=2, device=CPU)
    expected = np.zeros(2)
    with torch.no_grad():
        for i in range(64):
            x = x0.clone()
            x[:, i:] = MASK
            f = (64 - i) / 64
            sig = torch.full((2,), -math.log(max(1 - f, EPS)), dtype=torch.float32)
            log_p = subs_log_probs(model(x, sig), TOKENS, torch.float64)
            expected -= log_p[torch.arange(2), i, x0[:, i]].numpy() / math.log(2)
    np.testing.assert_allclose(bits, expected, rtol=1e-6)


# ---------------------------------------------------------------- the order is causal

@pytest.mark.parametrize("order", ORDERS)
def test_order_never_depends_on_unrevealed_tokens(order):
    """Change a token revealed at pass r: the chosen sets of passes 0..r cannot change (they were
    chosen before it was revealed); later ones may, and for a model-driven order some do."""
    model = tiny_model(1)
    schedule = Schedule(passes=16)
    rng = np.random.default_rng(0)
    x0 = torch.from_numpy(synthetic_val(64, zipf_unigram(), seed=5).astype(np.int64))[None]
    base = reveal_sets(model, x0, "strict", order, schedule)
    revealed_at = {pos: k for k, sets in enumerate(base) for pos in sets[0]}
    assert sorted(revealed_at) == list(range(64))
    later_changed = 0
    for pos in rng.choice(64, size=12, replace=False).tolist():
        r = revealed_at[pos]
        x1 = x0.clone()
        x1[0, pos] = (x1[0, pos] + 1 + int(rng.integers(V - 2))) % V
        changed = reveal_sets(model, x1, "strict", order, schedule)
        assert changed[: r + 1] == base[: r + 1], (pos, r)
        later_changed += changed[r + 1:] != base[r + 1:]
    if order == "left-to-right":
        assert later_changed == 0
    else:
        assert later_changed > 0  # the rule does look at revealed tokens: the test is not vacuous


def test_ties_go_to_the_leftmost_position():
    """A context-free model gives every position the same score: confidence and margin then reveal
    left to right, like the positional order."""
    model = UnigramDenoiser(zipf_unigram())
    x0 = torch.from_numpy(synthetic_val(64, zipf_unigram(), seed=2).astype(np.int64))[None]
    expected = reveal_sets(model, x0, "strict", "left-to-right", Schedule(tokens_per_pass=5))
    assert expected[0] == [[0, 1, 2, 3, 4]]
    for order in ("confidence", "margin"):
        assert reveal_sets(model, x0, "strict", order, Schedule(tokens_per_pass=5)) == expected


# ---------------------------------------------------------------- modes, PAD, sigma, passes

def test_anchored_never_masks_or_scores_bos_and_pad_stays_pad():
    model = Recorder(tiny_model())
    val = synthetic_val(3 * 64 - 10, zipf_unigram(), seed=4, doc_len=20)
    x0 = torch.from_numpy(make_slices(val, 64, 0, synthetic_byte_table(), PAD).tokens)
    bos, pad = x0 == BOS_ID, x0 == PAD
    assert bos.sum() > 3 and pad.sum() == 10
    sets = reveal_sets(model, x0, "anchored", "confidence", Schedule(passes=8))
    chosen = torch.zeros_like(x0)
    for pass_sets in sets:
        for row, positions in enumerate(pass_sets):
            chosen[row, positions] += 1
    assert torch.equal(chosen, (~bos & ~pad).long())  # every other position exactly once
    assert len(model.calls) == 8
    for x_in, _ in model.calls:  # anchors and PAD are visible and untouched in every forward
        assert torch.equal(x_in == BOS_ID, bos) and torch.equal(x_in == PAD, pad)
    assert torch.equal(model.calls[0][0] == MASK, ~bos & ~pad)


def test_sigma_follows_the_masked_fraction():
    """sigma = -log(1 - f) for the masked fraction f of the row's scored positions, capped at -log(eps)."""
    model = Recorder(tiny_model())
    val = synthetic_val(2 * 64, zipf_unigram(), seed=6, doc_len=20)
    x0 = torch.from_numpy(make_slices(val, 64, 0, synthetic_byte_table(), PAD).tokens)
    scored = scored_positions(x0, "anchored", PAD).sum(1)
    reveal_sets(model, x0, "anchored", "margin", Schedule(passes=8))
    assert len(model.calls) == 8
    assert torch.allclose(model.calls[0][1], torch.full((2,), -math.log(EPS)))
    for x_in, sig in model.calls:
        f = (x_in == MASK).sum(1).double() / scored.double()
        expected = -torch.log((1 - f).clamp(min=EPS))
        torch.testing.assert_close(sig.double(), expected, rtol=1e-6, atol=1e-6)


def test_schedule_counts():
    for n in (0, 1, 5, 63, 64):
        for P in (1, 3, 16, 64, 100):
            counts = Schedule(passes=P).counts(n)
            assert sum(counts) == n and len(counts) == min(P, n) and min(counts, default=1) >= 1
            assert max(counts, default=0) - min(counts, default=0) <= 1  # spread evenly
        for m in (1, 7, 64):
            counts = Schedule(tokens_per_pass=m).counts(n)
            assert sum(counts) == n and len(counts) == -(-n // m) and all(c == m for c in counts[:-1])
    for bad in (dict(), dict(passes=2, tokens_per_pass=2), dict(passes=0), dict(tokens_per_pass=1.5)):
        with pytest.raises(ValueError):
            Schedule(**bad)


@pytest.mark.parametrize("schedule, full_passes", [(dict(passes=16), 16), (dict(passes=64), 64),
                                                   (dict(tokens_per_pass=10), 7)])
def test_network_evaluations_per_slice_equal_the_passes(schedule, full_passes):
    """A full slice takes exactly P (or ceil(L / m)) forwards; the short last slice (5 tokens) drops
    out after its own schedule; evaluate reports both."""
    p = zipf_unigram()
    model = Recorder(UnigramDenoiser(p))
    cfg = small_cfg()
    val = synthetic_val(3 * 64 + 5, p, seed=7)
    results = evaluate(model, val, synthetic_byte_table(), cfg, method="planned", order="confidence", num_seqs=0,
                               modes=("strict",), device=CPU, **schedule)
    short = len(Schedule(**schedule).counts(5))
    per_slice = [full_passes] * 3 + [short]
    assert len(model.calls) == max(per_slice)  # one batch (eval_batch_rows 5)
    rows_per_call = [x.size(0) for x, _ in model.calls]
    assert rows_per_call == [sum(n > k for n in per_slice) for k in range(max(per_slice))]
    r = results["strict"]
    assert r["network_evals"] == sum(per_slice)
    assert r["passes"] == pytest.approx(sum(per_slice) / 4)


# ---------------------------------------------------------------- the evaluation record

def test_planned_evaluation_fields_bytes_and_determinism():
    p = zipf_unigram(1)
    cfg = small_cfg()
    val = synthetic_val(5 * 64 + 9, p, seed=1)
    table = synthetic_byte_table(1)
    model = tiny_model(2).train()
    results = evaluate(model, val, table, cfg, method="planned", order="margin", passes=8, num_seqs=0, device=CPU)
    assert model.training  # restored
    again = evaluate(model, val, table, cfg, method="planned", order="margin", passes=8, num_seqs=0, device=CPU)
    n_bos = int((val == BOS_ID).sum())
    for mode, r in results.items():
        assert r["method"] == "planned" and r["order"] == "margin" and r["mode"] == mode
        assert r["passes_requested"] == 8 and r["tokens_per_pass"] is None
        assert "exact code length" in r["bound"] and "elbo_steps" not in r
        assert r["tokens"] == val.size - (n_bos if mode == "anchored" else 0)
        assert r["bytes"] == int(table.stream_bytes(val).sum())
        assert r["bpb"] == pytest.approx(r["bits"] / r["bytes"], rel=1e-12)
        assert r["bpb_legacy_4p3"] == pytest.approx(r["bits"] / (r["tokens"] * 4.3), rel=1e-12)
        assert r["num_seqs"] == 6 and r["seq_len"] == 64
        assert r["bits"] == again[mode]["bits"]  # nothing random
        assert "exact planned-order code length" in format_result(r)
    first2 = evaluate(model, val, table, cfg, method="planned", order="margin", passes=8, num_seqs=2, device=CPU)
    assert first2["strict"]["num_seqs"] == 2 and first2["strict"]["tokens"] == 128


def test_batch_rows_change_rounding_only():
    model = tiny_model(3)
    slices = make_slices(synthetic_val(5 * 64, zipf_unigram(), seed=8), 64, 0, synthetic_byte_table(), PAD)
    kwargs = dict(eps=EPS, vocab_size=V, device=CPU, passes=16)
    a = planned_bits(model, slices, "strict", "left-to-right", batch_rows=5, **kwargs)
    b = planned_bits(model, slices, "strict", "left-to-right", batch_rows=2, **kwargs)
    np.testing.assert_allclose(a, b, rtol=1e-5)
    part = planned_bits(model, slices.subset(slice(1, 3)), "strict", "left-to-right", batch_rows=5, **kwargs)
    np.testing.assert_allclose(part, a[1:3], rtol=1e-5)


def test_bad_order_is_a_value_error():
    with pytest.raises(ValueError, match="order must be one of"):
        evaluate(UnigramDenoiser(zipf_unigram()), synthetic_val(64, zipf_unigram()), synthetic_byte_table(),
                 small_cfg(), method="planned", order="random", passes=4, num_seqs=0, device=CPU)


# ---------------------------------------------------------------- two processes

def _rank_main(rank: int, world: int, init_file: str, out_file: str) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    p = zipf_unigram(2)
    val = synthetic_val(5 * 64 + 3, p, seed=9)
    results = evaluate(tiny_model(4), val, synthetic_byte_table(), small_cfg(), method="planned", order="confidence",
                               tokens_per_pass=9, num_seqs=0, device=CPU)
    if rank == 0:
        torch.save(results, out_file)
    dist.destroy_process_group()


def test_two_gloo_ranks_give_the_single_process_figure(tmp_path):
    import torch.multiprocessing as mp

    out = tmp_path / "two.pt"
    mp.spawn(_rank_main, args=(2, str(tmp_path / "init"), str(out)), nprocs=2, join=True)
    two = torch.load(out, weights_only=False)
    one = evaluate(tiny_model(4), synthetic_val(5 * 64 + 3, zipf_unigram(2), seed=9), synthetic_byte_table(),
                   small_cfg(), method="planned", order="confidence", tokens_per_pass=9, num_seqs=0, device=CPU)
    for mode in one:
        assert two[mode]["world_size"] == 2 and two[mode]["num_seqs"] == one[mode]["num_seqs"] == 6
        for key in ("tokens", "bytes", "network_evals"):
            assert two[mode][key] == one[mode][key]
        assert two[mode]["bits"] == pytest.approx(one[mode]["bits"], rel=1e-5)
