"""bench/speed.py end to end on the CPU: a tiny run writes a JSON with every headline figure."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_speed_bench_tiny_cpu(tmp_path):
    out = tmp_path / "speed.json"
    # one thread: the run is small, and extra threads only spin when the machine is shared
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT / "src")}
    done = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "speed.py"), "--tiny", "--device", "cpu", "--steps", "2",
         "--warmup", "1", "--eval-slices", "2", "--eval-steps", "4", "--json", str(out)],
        capture_output=True, text=True, timeout=300, env=env, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    r = json.loads(out.read_text())
    assert r["tokens_per_s"] > 0 and r["useful_tokens_per_s"] > 0
    assert r["tokens_per_step"] == r["batch_rows"] * r["grad_accum"] * r["seq_len"]
    assert r["n_matmul_params"] > 0 and r["flops_per_token"] > 6 * r["n_matmul_params"]
    assert "6*N_matmul + 12*n_layers*d_model*seq_len" in r["flop_formula"]
    assert f"{r['flops_per_token']:,}" in r["flop_formula"]
    assert r["mfu"] is None  # no CPU peak unless --peak-tflops is given
    assert r["eval_token_forwards_per_s"] > 0 and r["val_projection_s"] > 0
    assert r["train_peak_memory_bytes"] > 0
    assert r["final_loss"] == r["final_loss"]  # finite: not NaN
    assert done.stdout.rstrip().splitlines()[-1].startswith("val projection")  # the table comes last


def test_flop_count_matches_the_formula():
    sys.path.insert(0, str(ROOT / "bench"))
    try:
        import speed
    finally:
        sys.path.remove(str(ROOT / "bench"))
    from mdlm_golf.config import build_config
    from mdlm_golf.model import Transformer

    cfg = build_config("tiny", environ={})
    model = Transformer(cfg)
    d, f = cfg.model_dim, cfg.mlp_mult * cfg.model_dim
    per_block = 3 * d * d + d * d + d * f + f * d  # qkv, proj, up, down; adaLN is per row
    assert model.matmul_params() == cfg.num_layers * per_block + d * cfg.embed_rows
    flops, formula = speed.flops_per_token(model, cfg)
    assert flops == 6 * model.matmul_params() + 12 * cfg.num_layers * d * cfg.seq_len
    assert formula.endswith(f"= {flops:,} FLOP/token")
