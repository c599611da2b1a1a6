"""from_pretrained on hostile folders: truncated, bit-flipped and wrong-dtype safetensors, and a
config.json with absurd sizes, fail with CheckpointError before allocating the model."""

from __future__ import annotations

import json
import random
import resource

import pytest
import torch
from safetensors.torch import save_file

from aurl.data.isolate import Failed, isolated_map
from aurl.errors import CheckpointError
from aurl.models import MusicTransformerVAEGAN

from .conftest import tiny_model


@pytest.fixture
def saved(tmp_path):
    tiny_model().save_pretrained(tmp_path)
    return tmp_path


def _load(folder) -> str:
    """'loaded', or the CheckpointError's message; anything else propagates (a bug)."""
    try:
        MusicTransformerVAEGAN.from_pretrained(folder)
        return "loaded"
    except CheckpointError as e:
        return f"CheckpointError: {e}"


def test_truncated_weights_refused_at_every_cut(saved):
    data = (saved / "model.safetensors").read_bytes()
    header_end = 8 + int.from_bytes(data[:8], "little")
    for cut in [0, 4, 8, 20, header_end - 1, header_end, header_end + 100, len(data) - 1]:
        (saved / "model.safetensors").write_bytes(data[:cut])
        assert _load(saved).startswith("CheckpointError"), cut


def test_bit_flips_load_or_fail_cleanly(saved):
    """A flip in the header is caught; one in the data loads (different weights), never worse."""
    data = (saved / "model.safetensors").read_bytes()
    header_end = 8 + int.from_bytes(data[:8], "little")
    rng = random.Random(0)
    outcomes = set()
    for trial in range(16):
        flipped = bytearray(data)
        region = (0, header_end) if trial % 2 else (header_end, len(data))
        for _ in range(rng.randint(1, 4)):
            i = rng.randrange(*region)
            flipped[i] ^= 1 << rng.randrange(8)
        (saved / "model.safetensors").write_bytes(bytes(flipped))
        outcomes.add(_load(saved).split(":")[0])
    assert outcomes == {"loaded", "CheckpointError"}


def test_wrong_dtype_refused(saved):
    from safetensors.torch import load_file

    tensors = load_file(str(saved / "model.safetensors"))
    tensors["embed.weight"] = tensors["embed.weight"].to(torch.int32)
    save_file(tensors, str(saved / "model.safetensors"))
    msg = _load(saved)
    assert "embed.weight is stored as I32, the model needs F32" in msg


def test_header_lies_about_a_tensor_refused(saved):
    """A shape that claims more bytes than the file holds: refused from the header alone."""
    data = (saved / "model.safetensors").read_bytes()
    n = int.from_bytes(data[:8], "little")
    header = json.loads(data[8 : 8 + n])
    header["embed.weight"]["shape"] = [774, 10**9]
    raw = json.dumps(header).encode()
    (saved / "model.safetensors").write_bytes(len(raw).to_bytes(8, "little") + raw + data[8 + n :])
    assert "does not fit in the file" in _load(saved)


@pytest.mark.parametrize("how", ["overlap", "gap", "short"])
def test_a_header_whose_tensors_overlap_or_leave_gaps_is_refused(saved, how):
    """Every tensor's bytes where they fit, yet two of them share bytes (one tensor given
    another's offsets: the torch loader refused it, the torch-free reader that the native
    engine uses read it and generated), leave a hole, or leave bytes unindexed at the end: the
    format indexes its data whole, without holes (safetensors' own rule), so each is refused."""
    from aurl.safetensors_io import read_arrays

    data = (saved / "model.safetensors").read_bytes()
    n = int.from_bytes(data[:8], "little")
    header = json.loads(data[8 : 8 + n])
    names = sorted((k for k in header if k != "__metadata__"),
                   key=lambda k: header[k]["data_offsets"])  # fmt: skip
    tail = data[8 + n :]
    if how == "overlap":  # a tensor reads the bytes of an earlier one of its size
        size = {k: header[k]["data_offsets"][1] - header[k]["data_offsets"][0] for k in names}
        first, later = next((a, b) for i, a in enumerate(names) for b in names[i + 1 :]
                            if size[a] == size[b] > 0)  # fmt: skip
        header[later]["data_offsets"] = header[first]["data_offsets"]
    elif how == "gap":  # every tensor moved 4 bytes on: a hole at the start
        for k in names:
            header[k]["data_offsets"] = [x + 4 for x in header[k]["data_offsets"]]
        tail = b"\0" * 4 + tail
    else:  # bytes past the last tensor
        tail = tail + b"\0" * 16
    raw = json.dumps(header).encode()
    (saved / "model.safetensors").write_bytes(len(raw).to_bytes(8, "little") + raw + tail)
    assert "CheckpointError" in _load(saved)
    with pytest.raises(CheckpointError, match="model.safetensors"):
        read_arrays(saved / "model.safetensors")


@pytest.mark.parametrize("mode", ["transformer", "vae", "vae_gan"])
def test_implied_sizes_read_the_config_back(tmp_path, mode):
    """What check_sizes compares: every size it reads off a header equals the config's."""
    from aurl.models.pretrained import implied_sizes, read_header

    model = tiny_model(mode=mode, ff_mult=3, encoder_layers=2, latent_dim=6, disc_layers=3)
    model.save_pretrained(tmp_path)
    sizes = implied_sizes(read_header(tmp_path / "model.safetensors"))
    assert {k: getattr(model.config, k) for k in sizes} == sizes
    expected = {"transformer": 4, "vae": 6, "vae_gan": 8}[mode]  # fields readable in this mode
    assert len(sizes) == expected, sizes


def _absurd(folder_and_sizes) -> tuple[str, int]:
    """In a forked worker: load with absurd sizes; (outcome, KiB the peak memory grew by)."""
    folder, sizes = folder_and_sizes
    meta = json.loads((folder / "config.json").read_text())
    meta["model"].update(sizes)
    (folder / "config.json").write_text(json.dumps(meta))
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    outcome = _load(folder)
    return outcome, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before


@pytest.mark.parametrize(
    "sizes, reason",
    [
        ({"d_model": 10**9}, "model.d_model"),  # outside the config's range
        ({"d_model": 1024, "n_heads": 8}, "d_model=1024"),  # in range: 2 layers of 1024 = 400 MB
        ({"n_layers": 200}, "n_layers=200"),
        ({"ff_mult": 16}, "ff_mult=16"),
        # a discriminator of 64 layers of width 4096 (36 GB) the weights do not hold
        ({"mode": "vae_gan", "disc_d_model": 4096, "disc_layers": 64}, "mode=vae_gan"),
    ],
)
def test_absurd_config_sizes_refused_before_allocating(saved, sizes, reason):
    """Measured in a forked worker (its own peak memory): the refusal touches < 50 MB where
    building the model would take 400 MB to 36 GB."""
    [(_, res)] = list(isolated_map(_absurd, [(saved, sizes)], seconds=lambda _: 60.0))
    assert not isinstance(res, Failed), res
    outcome, grown_kib = res
    assert outcome.startswith("CheckpointError") and reason in outcome, outcome
    assert grown_kib < 50 * 1024, grown_kib


def test_finite_weights_whose_logits_overflow_are_refused(saved, tmp_path):
    """A row of 3e38 passes the NaN / infinity check of the weights, yet every logit is NaN:
    sampling from them stopped in torch.multinomial with a traceback (generate --engine torch,
    found by helper 47). One first token at load refuses it, naming the file; the command says
    it in one line."""
    from safetensors.torch import load_file

    from aurl.cli import main

    tensors = load_file(str(saved / "model.safetensors"))
    name = next(k for k in tensors if k.endswith("attn.qkv.weight"))
    tensors[name][0] = 3e38
    save_file(tensors, str(saved / "model.safetensors"))
    assert "logits for a piece's first tokens are NaN or infinite" in _load(saved)
    assert main(["generate", "--engine", "torch", "--checkpoint", str(saved), "--max-tokens",
                 "40", "--out", str(tmp_path / "out")]) == 1  # fmt: skip
