"""MDZ1 files are lossless for any bytes: the model codes what the tokenizer rebuilds, escapes the rest."""
from __future__ import annotations

import math
import tempfile
import zlib
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

from mdlm_golf.coder import (CoderError, Header, apply_edits, compress_file, decompress_file, pack_edits,
                             split_input, text_tokens, unpack_edits)
from mdlm_golf.config import build_config
from mdlm_golf.data import load_tokenizer
from mdlm_golf.model import Transformer

TOKENIZER = Path(__file__).parent / "fixtures" / "fineweb_1024_bpe.model"  # the challenge's, copied
PARAGRAPH = (
    "Masked diffusion language models learn to fill in hidden words from the words around them. "
    "At test time they can reveal a text in any order, a few positions at a time, and an arithmetic "
    "coder turns the probabilities they give into a compressed file. The better the model predicts "
    "ordinary English, the fewer bits each byte of it costs, and nothing else has to be stored.")
CASES = {"empty": b"", "invalid utf-8": b"\xff\xfe abc", "snake case": b"snake_case_names\n\n  indented",
         "accents and emoji": "café naïve — emoji 🎉".encode("utf-8"), "crlf": b"one\r\ntwo\r\n",
         "only whitespace": b" \n\t  \n", "nul and control": b"a\x00b\x1cc\x7f d",
         "binary": bytes(range(256)),
         "lone surrogate encoded": b"x \xed\xa0\x80 y", "leading and trailing": b"  hello world  \n"}
SETTINGS = settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
WORDS = ["the", "model", "snake_case", "naïve", "🎉", "42", "—", "x", "東京", "a_b", "“quoted”"]
GAPS = st.text(alphabet=" \t\n\r\x0b\x0c\u00a0\u2028_", min_size=1, max_size=4)
MESSY_TEXT = st.lists(st.one_of(st.sampled_from(WORDS), GAPS), max_size=20).map("".join)


@pytest.fixture(scope="module")
def sp():
    return load_tokenizer(TOKENIZER)


@pytest.fixture(scope="module")
def cfg():
    return build_config("tiny", environ={})


@pytest.fixture(scope="module")
def model(cfg):
    torch.manual_seed(0)
    model = Transformer(cfg)
    for param in model.parameters():  # perturbed: context-dependent predictions, not all zeros
        nn.init.normal_(param, std=0.1)
    return model.eval()


@pytest.fixture(scope="module")
def workdir():
    with tempfile.TemporaryDirectory() as folder:
        yield Path(folder)


def round_trip(model, cfg, sp, folder: Path, data: bytes, **schedule) -> dict:
    """Compress and decompress `data`; asserts the bytes come back and the size accounting."""
    path = folder / "x.mdz"
    info = compress_file(model, cfg, sp, data, path, order="confidence", **(schedule or {"passes": 4}))
    assert decompress_file(model, cfg, sp, path) == data
    assert info["file_bytes"] == path.stat().st_size == (info["header_bytes"] + info["escape_section_bytes"]
                                                         + info["code_bytes"])
    assert info["input_bytes"] == len(data) and 0 <= info["escaped_bytes"] <= len(data)
    expected = 8 * info["file_bytes"] / len(data) if data else math.inf
    assert info["bits_per_byte"] == expected
    return info


# ---------------------------------------------------------------- the split, without the model

@SETTINGS
@given(data=st.one_of(st.binary(max_size=300), st.text(max_size=200).map(str.encode),
                     MESSY_TEXT.map(str.encode)))
def test_split_rebuilds_any_bytes_and_its_model_text_round_trips(sp, data):
    model_text, edits = split_input(sp, data)
    assert sp.decode(sp.encode(model_text)) == model_text
    assert apply_edits(model_text.encode("utf-8"), unpack_edits(pack_edits(edits))) == data


def test_ordinary_text_goes_through_the_model(sp):
    assert split_input(sp, PARAGRAPH.encode()) == (PARAGRAPH, [])
    lines = PARAGRAPH.replace(". ", ".\n").encode()  # newlines: one byte each in the escape channel
    model_text, edits = split_input(sp, lines)
    assert model_text == PARAGRAPH and sum(len(e[2]) for e in edits) == lines.count(b"\n")


def test_mostly_unmodelable_input_is_all_escaped(sp):
    for data in (bytes(range(256)), "東京は日本の首都です".encode()):
        assert split_input(sp, data) == ("", [(0, 0, data)])


def test_corrupted_escape_sections_are_detected():
    edits = [(3, 1, b"\n\n"), (0, 0, b"_"), (7, 0, b"\xff")]
    section = pack_edits(edits)
    assert unpack_edits(section) == edits
    for bad in (b"\x07" + section[1:], section[:-1], b"\x00\x05\x01"):
        with pytest.raises(CoderError, match="escape section"):
            unpack_edits(bad)
    with pytest.raises(CoderError, match="past the end"):
        apply_edits(b"ab", edits)


# ---------------------------------------------------------------- files, with a tiny model

@pytest.mark.parametrize("name", sorted(CASES))
def test_files_round_trip(model, cfg, sp, workdir, name):
    info = round_trip(model, cfg, sp, workdir, CASES[name])
    if name == "empty":
        assert info["tokens"] == 1 and info["escaped_bytes"] == 0 and info["bits_per_byte"] == math.inf
    if name == "binary":  # nothing for the model: BOS alone
        assert info["tokens"] == 1 and info["escaped_bytes"] == 256
    if name == "snake case":
        assert info["escaped_bytes"] == len(b"__\n\n  ")


@SETTINGS
@given(text=st.text(max_size=60))
def test_any_unicode_text_round_trips(model, cfg, sp, workdir, text):
    round_trip(model, cfg, sp, workdir, text.encode("utf-8"))


@SETTINGS
@given(data=st.binary(max_size=120))
def test_any_bytes_round_trip(model, cfg, sp, workdir, data):
    round_trip(model, cfg, sp, workdir, data)


@SETTINGS
@given(text=MESSY_TEXT)
def test_whitespace_and_unknown_characters_round_trip(model, cfg, sp, workdir, text):
    round_trip(model, cfg, sp, workdir, text.encode("utf-8"), tokens_per_pass=3)


def test_ordinary_english_is_coded_by_the_model(model, cfg, sp, workdir):
    """A paragraph in paragraphs: the model codes the tokenizer's own tokens, the escapes are its newlines."""
    data = (PARAGRAPH + "\n\n" + PARAGRAPH + "\n").encode()
    info = round_trip(model, cfg, sp, workdir, data, passes=8)
    assert info["tokens"] == text_tokens(sp, PARAGRAPH + " " + PARAGRAPH).size
    assert info["escaped_bytes"] == 3 and info["escape_section_bytes"] <= 16


def test_files_carry_the_crc_of_the_original_bytes(model, cfg, sp, workdir):
    data = b"tabs\tand_underscores \xff"
    path = workdir / "crc.mdz"
    compress_file(model, cfg, sp, data, path, passes=2)
    blob = path.read_bytes()
    header, _ = Header.decode(blob)
    assert header.data_crc == zlib.crc32(data) and header.escape_len > 0
    start = len(header.encode())
    flipped = blob[:start] + bytes([blob[start] ^ 3]) + blob[start + 1:]  # the method byte
    for bad in (blob[:start + header.escape_len // 2], flipped):  # and truncated in the escape section
        path.write_bytes(bad)
        with pytest.raises(CoderError, match=r"crc\.mdz: .*(escape section|CRC)") as error:
            decompress_file(model, cfg, sp, path)
        assert "\n" not in str(error.value)


def test_compress_file_takes_bytes(model, cfg, sp, workdir):
    with pytest.raises(TypeError, match="bytes"):
        compress_file(model, cfg, sp, "text", workdir / "t.mdz")


# ---------------------------------------------------------------- the command line

def test_cli_round_trips_any_file_and_reports_on_stderr(tmp_path, cfg, capsys):
    from mdlm_golf import cli
    from mdlm_golf.checkpoint import run_checkpoint, save_checkpoint

    run = tmp_path / "run"
    run.mkdir()
    torch.manual_seed(1)
    save_checkpoint(run_checkpoint(run), Transformer(cfg), cfg, tokenizer=str(TOKENIZER))
    src, packed, out = tmp_path / "in.bin", tmp_path / "in.mdz", tmp_path / "out.bin"
    data = b"line one\nline_two\t\xff\xfe\n\ncaf\xc3\xa9 \xf0\x9f\x8e\x89\n"
    src.write_bytes(data)
    assert cli.main(["compress", "--run", str(run), str(src), str(packed), "--passes", "4"]) == 0
    captured = capsys.readouterr()
    bits = 8 * packed.stat().st_size / len(data)
    assert captured.out == "" and f"({bits:.4f} bits/byte" in captured.err and "escaped" in captured.err
    assert cli.main(["decompress", "--run", str(run), str(packed), str(out)]) == 0
    assert out.read_bytes() == data and capsys.readouterr().out == ""
    src.write_bytes(b"")  # an empty file round-trips and reports no rate (not "inf bits/byte")
    assert cli.main(["compress", "--run", str(run), str(src), str(packed)]) == 2  # written before: kept
    assert "exists; pass --overwrite" in capsys.readouterr().err
    assert cli.main(["compress", "--run", str(run), str(src), str(packed), "--overwrite"]) == 0
    assert "empty input: no bits/byte" in capsys.readouterr().err
    assert cli.main(["decompress", "--run", str(run), str(packed), str(out), "--overwrite"]) == 0
    assert out.read_bytes() == b""
    capsys.readouterr()
    assert cli.main(["compress", "--run", str(run), str(tmp_path / "missing.txt"), str(packed)]) == 2
    error = capsys.readouterr().err.strip()
    assert "missing.txt: cannot read" in error and "\n" not in error
