"""The AR yardstick and the recipe levers: AR eval is the chain rule, Muon is its formula, time_cond
false drops adaLN, masked BOS leaks nothing, EMA and Muon resume exactly, the wall-clock schedule, the race."""
from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import numpy as np
import pytest
from conftest import small_data, synthetic_byte_table, synthetic_val, zipf_unigram
import torch

import mdlm_golf.train.loop
from mdlm_golf.artifact.export import AUTO_MIN_MARGIN, export_artifact
from mdlm_golf.artifact.size import LIMIT_BYTES
from mdlm_golf.checkpoint import save_checkpoint
from mdlm_golf.cli import main
from mdlm_golf.config import BEST_RECIPE, BOS_ID, EARLY_RECIPE, Tokens, build_config
from mdlm_golf.diffusion import Noise
from mdlm_golf.objective import diffusion_loss
from mdlm_golf.eval import evaluate
from mdlm_golf.experiments.race_recipes import RECIPES, recipe_configs
from mdlm_golf.model import Transformer, document_ids, document_mask
from mdlm_golf.train.optim import Muon, WeightEMA, lr_factor
from mdlm_golf.sampling import generate
from mdlm_golf.submission import script_bytes
from mdlm_golf.train.loop import train

CPU = torch.device("cpu")


def tiny(**overrides):
    return build_config("tiny", environ={}, overrides=overrides)


def perturbed(model: Transformer, seed: int = 0) -> Transformer:
    """A model whose head is not zero, so its predictions depend on the input."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=generator))
    return model.eval()


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory, shared_docs_path, shared_tokenizer_path) -> Path:
    """The first 300 documents of the shared corpus, 30 of them val."""
    return small_data(tmp_path_factory.mktemp("recipes"), shared_docs_path, shared_tokenizer_path, 300,
                      val_docs=30)


# ---------------------------------------------------------------- the AR yardstick

def test_ar_eval_equals_a_direct_chain_rule_computation():
    cfg = tiny(objective="ar", eval_batch_rows=3)
    torch.manual_seed(0)
    model = perturbed(Transformer(cfg))
    val = synthetic_val(7 * cfg.seq_len + 5, zipf_unigram(), seed=1)
    table = synthetic_byte_table()
    result = evaluate(model, val, table, cfg, steps=1, num_seqs=5, seed=0)["ar"]

    bits, num_bytes = 0.0, 0
    per_token = table.stream_bytes(val[: 5 * cfg.seq_len + 1].astype(np.int64))
    for i in range(5):  # the challenge's windows: inputs val[iL:iL+L], targets val[iL+1:iL+L+1]
        window = torch.from_numpy(val[i * cfg.seq_len: (i + 1) * cfg.seq_len + 1].astype(np.int64))
        with torch.no_grad():
            logits = model(window[None, :-1])[0, :, : cfg.vocab_size].double()
        for j in range(cfg.seq_len):  # one target at a time, no vectorization shared with the code
            bits -= torch.log_softmax(logits[j], -1)[window[j + 1]].item() / math.log(2)
        num_bytes += int(per_token[i * cfg.seq_len + 1: (i + 1) * cfg.seq_len + 1].sum())
    assert result["tokens"] == 5 * cfg.seq_len and result["bytes"] == num_bytes
    assert result["bpb"] == pytest.approx(bits / num_bytes, rel=1e-6)
    assert result["kind"].startswith("exact")


def test_ar_model_is_causal_and_unconditioned():
    cfg = tiny(objective="ar", time_cond=True)  # an AR model never sees a noise level
    model = perturbed(Transformer(cfg))
    assert model.noise is None and all(b.adaln is None for b in model.blocks)
    assert all(b.modulation is not None for b in model.blocks)  # the same blocks as time_cond false
    x = torch.randint(4, cfg.vocab_size, (2, 20))
    changed = x.clone()
    changed[:, 12:] = torch.randint(4, cfg.vocab_size, (2, 8))
    with torch.no_grad():
        a, b = model(x), model(changed)
    torch.testing.assert_close(a[:, :12], b[:, :12])  # the future does not reach the past
    assert not torch.allclose(a[:, 12:], b[:, 12:])


def test_ar_samples_left_to_right_and_stop_at_a_document_boundary():
    cfg = tiny(objective="ar")
    model = perturbed(Transformer(cfg), seed=3)
    first = generate(model, cfg, num=3, length=40, steps=1, seed=5)
    again = generate(model, cfg, num=3, length=40, steps=1, seed=5)
    assert first.rows == again.rows  # a seed fixes the samples
    for row in first.rows:
        assert row[0] == BOS_ID and BOS_ID not in row[1:] and 2 not in row[1:]
        assert all(0 <= t < cfg.vocab_size for t in row) and 1 < len(row) <= 40
    with torch.no_grad():  # each token came from the next-token law of its prefix: it has probability > 0
        row = torch.tensor(first.rows[0])
        logits = model(row[None, :-1])[0, :, : cfg.vocab_size]
        assert torch.isfinite(torch.log_softmax(logits, -1).gather(-1, row[1:, None])).all()


def test_an_ar_run_goes_through_export_artifact_eval_and_sample(data_dir, tmp_path, capsys):
    """The AR yardstick ships like an MDLM: the artifact's eval is the exact chain rule on the same
    windows (int8 costs almost nothing), it samples left to right from the artifact, and it compresses
    (left to right, its own order by default)."""
    run, artifact = tmp_path / "AR", tmp_path / "ar.mdz"
    assert main(["train", "--data", str(data_dir), "--out", str(run), "--preset", "tiny", "--objective", "ar",
                 "--steps", "30", "--eval-num-seqs", "4", "--log-every", "30"]) == 0
    assert main(["export", "--run", str(run), "--out", str(artifact), "--quant", "int8",
                 "--compressor", "zlib"]) == 0
    assert main(["eval", "--artifact", str(artifact), "--data", str(data_dir), "--num-seqs", "4",
                 "--json", str(tmp_path / "eval.json")]) == 0
    trained = json.loads((run / "eval.json").read_text())["ar"]
    shipped = json.loads((tmp_path / "eval.json").read_text())["ar"]
    assert (shipped["tokens"], shipped["bytes"]) == (trained["tokens"], trained["bytes"])
    assert shipped["bpb"] == pytest.approx(trained["bpb"], abs=0.01) and shipped["bpb"] != trained["bpb"]
    capsys.readouterr()
    assert main(["sample", "--artifact", str(artifact), "--length", "24", "--num", "2", "--seed", "1"]) == 0
    out = capsys.readouterr()
    assert out.out.strip() and "Traceback" not in out.err
    text = tmp_path / "text.txt"  # every command takes every kind: compress codes it left to right
    text.write_bytes("An AR model compresses left to right, in the evaluator's windows. Zoë.".encode())
    assert main(["compress", "--run", str(run), str(text), str(tmp_path / "t.mdz")]) == 0
    assert main(["decompress", "--run", str(run), str(tmp_path / "t.mdz"), str(tmp_path / "back.txt")]) == 0
    assert (tmp_path / "back.txt").read_bytes() == text.read_bytes()
    assert main(["compress", "--run", str(run), "--order", "margin", str(text), str(tmp_path / "u.mdz")]) == 2
    assert "left to right" in capsys.readouterr().err


# ---------------------------------------------------------------- levers

def newton_schulz_reference(g: torch.Tensor) -> torch.Tensor:
    """The published quintic iteration, written out independently, in float64."""
    x = g.double()
    transposed = x.shape[0] > x.shape[1]
    if transposed:
        x = x.T
    x = x / (x.norm() + 1e-7)
    for _ in range(5):
        a = x @ x.T
        x = 3.4445 * x + (-4.7750 * a + 2.0315 * a @ a) @ x
    return x.T if transposed else x


@pytest.mark.parametrize("shape", [(4, 6), (6, 4)])
def test_muon_step_equals_the_reference_formula(shape):
    generator = torch.Generator().manual_seed(0)
    w0 = torch.randn(shape, generator=generator)
    grads = [torch.randn(shape, generator=generator) for _ in range(2)]
    p = torch.nn.Parameter(w0.clone())
    opt = Muon([p], lr=0.1, momentum=0.9)
    want, buf = w0.double(), torch.zeros(shape, dtype=torch.float64)
    for g in grads:
        p.grad = g.clone()
        opt.step()
        buf = 0.9 * buf + g.double()
        update = newton_schulz_reference(g.double() + 0.9 * buf)  # Nesterov
        want = want - 0.1 * max(1.0, shape[0] / shape[1]) ** 0.5 * update
    torch.testing.assert_close(p.detach().double(), want, rtol=1e-4, atol=1e-5)
    singular = torch.linalg.svdvals(newton_schulz_reference(torch.randn(32, 16, generator=generator)))
    assert singular.min() > 0.5 and singular.max() < 1.3  # about orthogonal: what makes it Muon


def test_time_cond_false_drops_exactly_the_adaln_parameters():
    cfg = build_config(environ={})  # the reference shape
    with_cond, without = Transformer(cfg).num_params(), Transformer(dataclasses.replace(cfg, time_cond=False)).num_params()
    d, c, layers = cfg.model_dim, cfg.cond_dim, cfg.num_layers
    noise_mlp = (256 * c + c) + (c * c + c)
    adaln = layers * (c * 6 * d + 6 * d) + (c * 2 * d + 2 * d)
    constants = layers * 6 * d + 2 * d  # adaLN-zero's shift/scale/gate, learned without a noise input
    assert with_cond - without == noise_mlp + adaln - constants
    assert with_cond - without > 4_000_000  # the ~4.5M the issue names, free for depth or width


def test_with_every_bos_masked_attention_is_full():
    x0 = torch.tensor([[BOS_ID, 5, 6, BOS_ID, 7, 8, BOS_ID, 9]])
    visible = document_mask(document_ids(x0, "packed", 1025), use_flex=False)
    assert not visible.all()  # with the BOS visible, attention stays inside each document
    x_t = torch.where(x0 == BOS_ID, 1024, x0)
    assert document_mask(document_ids(x_t, "packed", 1025), use_flex=False).all()


def test_a_masked_bos_does_not_leak_through_attention():
    """Two rows that differ only in where their (masked) BOS was see the same x_t: same predictions."""
    cfg = tiny(anchor_mask_prob=1.0)
    model = perturbed(Transformer(cfg))
    seen = []
    forward = model.forward
    model.forward = lambda x_t, sigma=None, doc_ids=None: seen.append(forward(x_t, sigma, doc_ids)) or seen[-1]
    a = torch.randint(4, cfg.vocab_size, (1, 16))
    a[0, 0], b = BOS_ID, a.clone()
    a[0, 5], b[0, 9] = BOS_ID, BOS_ID
    noise = Noise(torch.tensor([0.5]), torch.ones(1, 16), torch.zeros(1, 16))  # mask nothing ...
    noise.mask_u[0, [0, 5, 9]] = 0.0  # ... but positions 0, 5 and 9
    for x0 in (a, b):
        diffusion_loss(model, x0, Tokens(cfg.vocab_size), cfg.noise_eps, "packed", noise, anchor_mask_prob=1.0)
    torch.testing.assert_close(seen[0], seen[1])


def test_lr_schedule_follows_the_wallclock_budget():
    cfg = tiny(steps=10_000, warmup_steps=0, warmdown_steps=2_500, max_wallclock=100.0)
    assert lr_factor(10, cfg, elapsed=50.0) == 1.0  # 50% of the time, 0.1% of the steps
    assert lr_factor(10, cfg, elapsed=87.5) == pytest.approx(0.55)  # half-way through the last 25%
    assert lr_factor(10, cfg, elapsed=100.0) == pytest.approx(0.1)  # the warmdown is complete
    uncapped = dataclasses.replace(cfg, max_wallclock=0.0)
    assert lr_factor(10, uncapped, elapsed=100.0) == 1.0  # without a cap, steps alone


def test_weight_ema_tracks_the_average():
    p = torch.nn.Parameter(torch.zeros(3))
    model = torch.nn.Module()
    model.w = p
    ema = WeightEMA(model, decay=0.5)
    values = [4.0, 8.0, 2.0]
    want = 0.0
    for n, v in enumerate(values, 1):
        p.data.fill_(v)
        ema.update()
        decay = min(0.5, (1 + n) / (10 + n))
        want = decay * want + (1 - decay) * v
    assert ema.averaged_state(model)["w"].tolist() == pytest.approx([want] * 3)


@pytest.mark.slow
def test_ema_and_muon_resume_exactly(data_dir, shared_tokenizer_path, tmp_path, monkeypatch):
    cfg = tiny(steps=8, log_every=1, checkpoint_every=4, ema=0.9, optimizer="muon", time_cond=False)
    original = mdlm_golf.train.loop.train_step

    def crash_at_step_5(*args, **kwargs):
        if args[6] == 5:
            raise RuntimeError("simulated crash")
        return original(*args, **kwargs)

    monkeypatch.setattr(mdlm_golf.train.loop, "train_step", crash_at_step_5)
    with pytest.raises(RuntimeError, match="simulated"):
        train(cfg, data_dir, tmp_path / "RUN", shared_tokenizer_path, run_eval=False, device=CPU)
    monkeypatch.setattr(mdlm_golf.train.loop, "train_step", original)
    train(cfg, data_dir, tmp_path / "RUN", shared_tokenizer_path, run_eval=False, resume=True, device=CPU)
    train(cfg, data_dir, tmp_path / "REF", shared_tokenizer_path, run_eval=False, device=CPU)
    got, want = torch.load(tmp_path / "RUN" / "model.pt"), torch.load(tmp_path / "REF" / "model.pt")
    live = Transformer(cfg).state_dict()
    for name, tensor in want["model"].items():
        assert torch.equal(got["model"][name], tensor), name
    assert set(want["model"]) == set(live)
    checkpoint = torch.load(tmp_path / "RUN" / "checkpoint.pt", weights_only=True)
    assert checkpoint["ema"]["updates"] == 8 and set(checkpoint["optimizer"]) == {"adamw", "muon"}
    assert not torch.equal(checkpoint["ema"]["shadow"]["head.weight"], checkpoint["model"]["head.weight"])


# ---------------------------------------------------------------- the race

@pytest.mark.slow
def test_race_trains_each_recipe_and_tables_the_gap_to_the_yardstick(data_dir, tmp_path, capsys):
    out = tmp_path / "RACE"
    common = ["race", "--data", str(data_dir), "--out", str(out), "--preset", "tiny", "--steps", "6",
              "--val-every", "3", "--elbo-steps", "2", "--eval-num-seqs", "2", "--seeds", "1,2"]
    args = [*common, "--recipes", "today,ar-best", "--recipe", "wide:model_dim=96,num_heads=2"]
    assert main(args) == 0
    result = json.loads((out / "race.json").read_text())
    rows = {r["recipe"]: r for r in result["summary"]}
    assert set(rows) == {"today", "ar-best", "wide"} and len(result["runs"]) == 6
    assert result["yardstick"] == "ar-best" and result["equal"] == "tokens"
    assert rows["ar-best"]["gap"] == 0.0 and rows["ar-best"]["kind"].startswith("exact")
    assert rows["today"]["gap"] == pytest.approx(rows["today"]["bpb_mean"] - rows["ar-best"]["bpb_mean"])
    assert rows["today"]["tokens"] == rows["ar-best"]["tokens"] == 6 * 8 * 64  # equal tokens
    assert rows["wide"]["num_params"] > rows["today"]["num_params"] and rows["wide"]["flops"] > rows["today"]["flops"]
    for run in result["runs"]:
        assert [c["step"] for c in run["curve"]] == [3, 6] and [c["tokens"] for c in run["curve"]] == [1536, 3072]
        assert run["curve"][-1]["flops"] == run["flops"]  # logged in metrics.jsonl, the same formula
        if run["value"] == "ar-best":  # exact, so the curve's last point is the table's figure
            assert run["curve"][-1]["bpb"] == pytest.approx(run["strict_bpb"], rel=1e-9)
    assert (out / "race.png").stat().st_size > 10_000
    assert "| today |" in (out / "race.md").read_text() and "gap to ar-best" in (out / "race.md").read_text()
    assert main(args) == 0  # a rerun reuses every finished run
    assert "(reused)" in capsys.readouterr().out

    # equal FLOPs: the costlier model trains fewer steps, the same-cost ones reuse their equal-token runs
    assert main([*common, "--recipes", "today,ar-best,block2", "--equal", "flops"]) == 0
    result = json.loads((out / "race.json").read_text())
    rows = {r["recipe"]: r for r in result["summary"]}
    assert rows["block2"]["steps"] == 3 and rows["today"]["steps"] == 6  # [x_t ; x_0] costs 2x per token
    assert rows["block2"]["flops"] == pytest.approx(rows["ar-best"]["flops"], rel=0.01)
    assert "today_seed=1" in {Path(r["run_dir"]).name for r in result["runs"]}


@pytest.mark.parametrize("preset", ["demo", "record"])
def test_named_recipes_mean_the_same_under_a_preset_that_carries_a_recipe(preset):
    """'today' and 'best' are the same runs whatever recipe a preset carries; 'best-early' is what the
    preset itself trains (so a race at the preset compares its training against the recipes before it)."""
    base, carried = build_config("seed", environ={}), build_config(preset, environ={})
    # the preset without the recipe it carries: what the named recipes must see whatever the preset
    plain = dataclasses.replace(carried, **{name: getattr(base, name) for name in {**BEST_RECIPE, **EARLY_RECIPE}})
    for name in ("today", "best", "best-flat"):
        recipe = {name: RECIPES[name]}
        assert recipe_configs(carried, recipe)[name] == recipe_configs(plain, recipe)[name]
    early = recipe_configs(carried, {"best-early": RECIPES["best-early"]})["best-early"]
    # the record preset also drops time conditioning (its size), which every named recipe sets
    assert early == (carried if preset == "demo" else dataclasses.replace(carried, time_cond=True))
    assert carried.time_warmup_steps > 0 and carried.loss_weight == "flat"


def test_equal_seconds_give_every_run_the_yardsticks_clock(data_dir, tmp_path):
    out = tmp_path / "SECONDS"
    assert main(["race", "--data", str(data_dir), "--out", str(out), "--preset", "tiny", "--steps", "4",
                 "--elbo-steps", "2", "--eval-num-seqs", "2", "--seeds", "1", "--recipes", "ar-best,today",
                 "--equal", "seconds"]) == 0
    result = json.loads((out / "race.json").read_text())
    yardstick, other = (next(r for r in result["runs"] if r["value"] == name) for name in ("ar-best", "today"))
    assert other["run_dir"].endswith(f"today_{yardstick['train_seconds']:.0f}s_seed=1")
    config = json.loads((out / other["run_dir"] / "config.json").read_text())
    assert config["max_wallclock"] == pytest.approx(yardstick["train_seconds"])
    assert main(["race", "--data", str(data_dir), "--out", str(tmp_path / "X"), "--preset", "tiny",
                 "--recipes", "today", "--equal", "seconds"]) == 2  # no yardstick: nothing to equal


@pytest.mark.slow
def test_record_preset_default_export_fits(tmp_path):
    """With zlib alone, one code per byte: the default (best of every compressor and layout) is never
    larger for any spec, so if this fits, the default export fits at a spec at least as precise."""
    cfg = build_config("record", environ={})
    torch.manual_seed(0)
    model = Transformer(cfg)
    with torch.no_grad():  # trained-like: the zero-initialized head would compress to nothing
        model.head.weight.normal_(std=0.02)
    save_checkpoint(tmp_path / "model.pt", model, cfg)
    report = export_artifact(tmp_path / "model.pt", tmp_path / "record.mdz", "auto", compressor="zlib",
                             packed=False, code_bytes=script_bytes())
    assert report["total_bytes"] <= LIMIT_BYTES - AUTO_MIN_MARGIN
    assert (tmp_path / "record.mdz").stat().st_size == report["artifact_bytes"]
    assert report["spec"] != "int4"  # the shape leaves room for more than the last resort
