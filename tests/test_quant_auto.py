"""export --quant auto: the most precise spec that fits with a margin; models with an empty group."""
from __future__ import annotations

import pytest
import torch

from mdlm_golf.artifact import OversizeError, export_artifact, format_size_table, load_artifact
from mdlm_golf.artifact.export import AUTO_SPECS, build_artifact, choose_spec
from mdlm_golf.artifact.fileformat import ArtifactError, read_artifact
from mdlm_golf.artifact.quant import FORMAT_BITS, param_group, parse_spec, spec_quantizer
from mdlm_golf.checkpoint import save_checkpoint
from mdlm_golf.config import build_config
from mdlm_golf.files import write_bytes_atomic
from mdlm_golf.model import Transformer
from test_artifact import checkpoint, trained_like  # noqa: F401 (checkpoint is a fixture)

SMALL = 1000  # small_numel low enough that the tiny model's block matrices get quantized too
MARGIN = 500
CODE = 15  # bytes of a stand-in record script


def test_auto_specs_descend():
    """Each candidate lowers some groups and raises none, from int8 down to int4."""
    bits = [[FORMAT_BITS[f] for f in parse_spec(s).values()] for s in AUTO_SPECS]
    assert AUTO_SPECS[0] == "int8" and AUTO_SPECS[-1] == "int4" and 8 <= len(AUTO_SPECS) <= 10
    for hi, lo in zip(bits, bits[1:]):
        assert all(a >= b for a, b in zip(hi, lo)) and hi != lo


def spec_totals(checkpoint_path, tmp_path) -> dict[str, int]:
    """Each candidate's total bytes, exported on its own."""
    return {spec: export_artifact(checkpoint_path, tmp_path / "each.mdlm", spec, "zlib", small_numel=SMALL,
                                  code_bytes=CODE, allow_oversize=True, attribute=False)["total_bytes"]
            for spec in AUTO_SPECS}


def test_auto_picks_first_spec_that_fits(tmp_path, checkpoint):
    totals = spec_totals(checkpoint, tmp_path)
    assert totals["int8"] > totals["int4"]
    limit = sorted(set(totals.values()))[len(set(totals.values())) // 2] + MARGIN  # int8 does not fit
    expected = next(s for s in AUTO_SPECS if totals[s] + MARGIN <= limit)
    assert expected != "int8"
    out = tmp_path / "auto.mdlm"
    report = export_artifact(checkpoint, out, "auto", "zlib", small_numel=SMALL, code_bytes=CODE,
                             limit=limit, min_margin=MARGIN)
    assert report["spec"] == expected and report["spec_requested"] == "auto"
    assert report["margin_bytes"] >= MARGIN and report["total_bytes"] == totals[expected]
    tried = report["auto_tried"]
    assert [t["spec"] for t in tried] == [s for s in AUTO_SPECS[:AUTO_SPECS.index(expected) + 1]
                                          if s not in report["auto_skipped"]]
    assert all(t["margin"] == limit - t["total_bytes"] < MARGIN for t in tried[:-1])
    assert tried[-1] == {"spec": expected, "total_bytes": totals[expected], "margin": report["margin_bytes"]}
    assert all(r["compressed_bytes"] >= 0 for r in report["groups"])  # the chosen spec's attribution
    assert f"quant auto chose {expected} (tried: int8 {totals['int8']:,}" in format_size_table(report)
    model, _, meta = load_artifact(out)
    assert meta["spec"] == expected and out.stat().st_size == report["artifact_bytes"]
    assert isinstance(model, Transformer)


def test_auto_oversize(tmp_path, checkpoint):
    out = tmp_path / "auto.mdlm"
    with pytest.raises(OversizeError, match="no spec leaves 100,000 bytes under the 1,000-byte limit") as e:
        export_artifact(checkpoint, out, "auto", "zlib", small_numel=SMALL, code_bytes=CODE, limit=1000)
    report = e.value.report
    assert not out.exists() and report["spec"] == AUTO_SPECS[-1] == report["auto_tried"][-1]["spec"]
    assert f"totals code {report['code_bytes']:,} + artifact" in str(e.value)
    assert f"{report['total_bytes']:,} bytes" in str(e.value)
    assert len(report["auto_tried"]) + len(report["auto_skipped"]) == len(AUTO_SPECS)
    # margin, not just the limit: fits, yet short of the required spare bytes
    limit = report["total_bytes"] + 10
    with pytest.raises(OversizeError, match="no spec leaves 100,000"):
        export_artifact(checkpoint, out, "auto", "zlib", small_numel=SMALL, code_bytes=CODE, limit=limit)
    report = export_artifact(checkpoint, out, "auto", "zlib", small_numel=SMALL, code_bytes=CODE, limit=limit,
                             allow_oversize=True)
    assert out.exists() and report["spec"] == AUTO_SPECS[-1] and report["fits"]


def test_state_without_adaln_group(tmp_path):
    model = trained_like()
    state = {k: v for k, v in model.state_dict().items() if param_group(k) != "adaln"}
    quantize = spec_quantizer(state, model.cfg, small_numel=SMALL)
    options = dict(compressor="zlib", small_numel=SMALL, code_bytes=CODE)
    data, report = build_artifact(quantize, model.cfg, "embed=int8,head=int8,attn=int6,mlp=int5,adaln=int8",
                                  **options)
    groups = {r["group"]: r for r in report["groups"]}
    assert groups["adaln"]["tensors"] == groups["adaln"]["params"] == groups["adaln"]["compressed_bytes"] == 0
    assert "adaln" in format_size_table(report)
    data, report = choose_spec(quantize, model.cfg, limit=10**9, **options)
    assert report["spec"] == "int8"
    # candidates that differ only in adaln are skipped, not compressed again
    _, report = choose_spec(quantize, model.cfg, limit=1000, specs=AUTO_SPECS[1:3], **options)
    assert [t["spec"] for t in report["auto_tried"]] == [AUTO_SPECS[1]] and report["auto_skipped"] == [AUTO_SPECS[2]]
    path = tmp_path / "no_adaln.mdlm"
    write_bytes_atomic(path, data)
    with pytest.raises(ArtifactError, match="weights do not match its config"):  # its config has adaLN weights
        read_artifact(path)


def test_export_model_without_time_cond(tmp_path):
    """Without time conditioning the adaln group holds the learned constant modulations (small: fp16)."""
    cfg = build_config("tiny", environ={}, overrides={"time_cond": False})
    torch.manual_seed(0)
    model = Transformer(cfg)
    adaln = {k for k in model.state_dict() if param_group(k) == "adaln"}
    assert adaln == {f"blocks.{i}.modulation" for i in range(cfg.num_layers)} | {"final_modulation"}
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.05)
    path = tmp_path / "model.pt"
    save_checkpoint(path, model, cfg)
    for spec in ("embed=int8,head=int8,attn=int6,mlp=int6,adaln=int8", "auto"):
        report = export_artifact(path, tmp_path / "a.mdlm", spec, "zlib", small_numel=SMALL, code_bytes=CODE)
        assert report["fits"]
        groups = {r["group"]: r for r in report["groups"]}
        assert groups["adaln"]["formats"] == ["fp16"] and groups["adaln"]["tensors"] == len(adaln)
        loaded, loaded_cfg, _ = load_artifact(tmp_path / "a.mdlm")
        assert loaded_cfg.time_cond is False and loaded.state_dict().keys() == model.state_dict().keys()
        for name in adaln:
            torch.testing.assert_close(loaded.state_dict()[name], model.state_dict()[name], atol=1e-3, rtol=1e-3)
