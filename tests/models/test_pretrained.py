"""save_pretrained -> from_pretrained gives identical logits; pickles are refused unexecuted."""

from __future__ import annotations

import json
import pickle

import pytest
import torch

from aurl.errors import CheckpointError
from aurl.models import MusicTransformerVAEGAN


@pytest.mark.parametrize("mode", ["transformer", "vae_gan"])
def test_save_load_identical_logits(tmp_path, make_model, ids, mode):
    model = make_model(mode=mode, attention="hierarchical").eval()
    model.save_pretrained(tmp_path)
    meta = json.loads((tmp_path / "config.json").read_text())
    assert meta["model"]["mode"] == mode and meta["vocab"]["pitch_min"] == 21
    loaded = MusicTransformerVAEGAN.from_pretrained(tmp_path)
    assert loaded.config == model.config
    assert loaded.head.weight is loaded.embed.weight  # tying survives
    assert torch.equal(loaded(ids).logits, model(ids).logits)


class _Payload:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))  # unpickling would create the marker file


def test_pickle_payload_refused_without_executing(tmp_path, make_model):
    make_model().save_pretrained(tmp_path)
    marker = tmp_path / "pwned"
    (tmp_path / "model.safetensors").write_bytes(pickle.dumps(_Payload(marker), protocol=2))
    with pytest.raises(CheckpointError, match="pickle"):
        MusicTransformerVAEGAN.from_pretrained(tmp_path)
    torch.save({"x": _Payload(marker)}, tmp_path / "model.safetensors")  # zip-format pickle
    with pytest.raises(CheckpointError, match="pickle"):
        MusicTransformerVAEGAN.from_pretrained(tmp_path)
    assert not marker.exists()


def test_a_header_length_that_begins_with_0x80_is_not_a_pickle(tmp_path, make_model, ids):
    """A safetensors header of 0x..80 bytes makes the file begin with 0x80, as a pickle does:
    the float16 export of the shipped `styles` model had one (5,248 bytes) and was refused."""
    import struct

    model = make_model().eval()
    model.save_pretrained(tmp_path)
    path = tmp_path / "model.safetensors"
    data = path.read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    head = data[8 : 8 + n].rstrip(b" ")
    head += b" " * ((0x80 - len(head)) % 256)  # the format pads its header with spaces
    assert len(head) % 256 == 0x80
    path.write_bytes(struct.pack("<Q", len(head)) + head + data[8 + n :])
    assert path.read_bytes()[:1] == b"\x80"
    loaded = MusicTransformerVAEGAN.from_pretrained(tmp_path)
    assert torch.equal(loaded(ids).logits, model(ids).logits)


def test_mismatched_or_missing_files(tmp_path, make_model):
    with pytest.raises(CheckpointError, match="does not exist"):
        MusicTransformerVAEGAN.from_pretrained(tmp_path)
    make_model().save_pretrained(tmp_path / "a")
    make_model(d_model=16).save_pretrained(tmp_path / "b")
    (tmp_path / "b" / "config.json").write_text((tmp_path / "a" / "config.json").read_text())
    with pytest.raises(CheckpointError, match="shape"):
        MusicTransformerVAEGAN.from_pretrained(tmp_path / "b")


# ModelConfig's keys in an earlier Aurl (commit 4482ab1, before model.anticipation existed):
# a reader that refuses unknown keys, as every Aurl does.
EARLIER_KEYS = set(
    [
        "mode",
        "d_model",
        "n_layers",
        "n_heads",
        "ff_mult",
        "dropout",
        "max_seq_len",
        "attention",
        "local_window",
        "global_tokens",
        "summary_len",
        "musical_position",
        "grammar_features",
        "meter",
        "styles",
        "style_dropout",
        "fim",
        "latent_dim",
        "latent_levels",
        "segment_len",
        "encoder_layers",
        "disc_d_model",
        "disc_layers",
        "disc_scales",
    ]
)


def test_folders_not_using_a_newer_key_stay_readable_by_an_earlier_aurl(tmp_path, make_model):
    make_model().save_pretrained(tmp_path / "plain")
    written = json.loads((tmp_path / "plain" / "config.json").read_text())["model"]
    assert set(written) <= EARLIER_KEYS
    assert "anticipation" not in written and "fim" not in written and "styles" not in written
    assert MusicTransformerVAEGAN.from_pretrained(tmp_path / "plain").config == make_model().config
    # a folder that uses a newer feature says so, and reads back the same
    model = make_model(anticipation=4.0, fim=True, styles=("a", "b"))
    model.save_pretrained(tmp_path / "new")
    written = json.loads((tmp_path / "new" / "config.json").read_text())["model"]
    assert written["anticipation"] == 4.0 and written["fim"] is True
    assert written["styles"] == ["a", "b"]
    assert MusicTransformerVAEGAN.from_pretrained(tmp_path / "new").config == model.config
