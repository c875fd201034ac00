"""The fresh-machine demo: its own corpus and tokenizer, a run, a summary with both bpb figures, two
seeded samples and a PNG of the loss curve."""
from __future__ import annotations

import json

from mdlm_golf.demo import run_demo


def test_demo_end_to_end_and_reuses_its_data(tmp_path, capsys):
    summary = run_demo(tmp_path, steps=4, elbo_steps=2, eval_num_seqs=2, log_every=2)
    out = capsys.readouterr().out
    manifest = json.loads((tmp_path / "data" / "manifest.json").read_text())
    assert manifest["train"]["tokens"] > 300_000 and manifest["val"]["docs"] == 400
    assert (tmp_path / "data" / "sp1024_bpe.model").is_file()  # its own SP-1024, no download
    assert summary["steps"] == 4 and (tmp_path / "run" / "model.pt").is_file()
    for mode in ("strict", "anchored"):
        assert f"{summary['eval'][mode]['bpb']:.4f}" in out
    assert "upper bound" in out and "== mdlm-golf demo ==" in out
    assert out.count("\nsample ") == 2  # two seeded samples of the model it trained
    assert f"curve {tmp_path / 'loss.png'}" in out
    assert "(flat-weighted, every masked token weighs 1; not a bound)" in out  # the preset's loss, named
    assert "loss: flat-weighted" in (tmp_path / "run" / "train.log").read_text()  # and the run log's
    assert (tmp_path / "loss.png").read_bytes().startswith(b"\x89PNG\r\n\x1a\n")

    run_demo(tmp_path, steps=2, elbo_steps=2, eval_num_seqs=2, log_every=1)
    assert "reusing prepared data" in capsys.readouterr().out
