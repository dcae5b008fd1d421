"""Model layer: adapter dims vs timm config, checkpoint loading, counting vs an independent counter."""
import pickle
import warnings

import pytest
import timm
import torch
from safetensors.torch import save_file
from torch.utils.flop_counter import FlopCounterMode

from p3b_deploy.errors import CheckpointError, ModelError
from p3b_deploy.models.vit import count_model, describe, load_model
from p3b_deploy.spec import attn_macs, dense_attn_dims

MODELS = {
    # name: (embed_dim, heads, mlp_hidden, prefix tokens, layer scale, dist token)
    "deit_tiny_patch16_224": (192, 3, 768, 1, False, False),
    "deit_small_patch16_224": (384, 6, 1536, 1, False, False),
    "vit_small_patch16_224": (384, 6, 1536, 1, False, False),
    "deit_tiny_distilled_patch16_224": (192, 3, 768, 2, False, True),
    "deit3_small_patch16_224": (384, 6, 1536, 1, True, False),
}


@pytest.mark.parametrize("name", MODELS)
def test_describe_matches_timm(name):
    D, H, hid, prefix, ls, dist = MODELS[name]
    m = load_model(name, img_size=64)
    s = describe(m)
    assert (s.embed_dim, s.num_heads, s.mlp_hidden, s.depth) == (D, H, hid, 12)
    assert s.head_dim == D // H and s.num_prefix_tokens == prefix
    assert s.has_dist_token is dist and all(L.layer_scale is ls for L in s.layers)
    assert s.num_patches == (64 // 16) ** 2 and s.num_tokens == 16 + prefix
    assert s.name == name and s.num_classes == 1000
    assert count_model(m).params == sum(p.numel() for p in m.parameters())


def test_any_img_and_patch_size():
    m = load_model("deit_tiny_patch16_224", img_size=48, patch_size=8, num_classes=7)
    s = describe(m)
    assert s.img_size == (48, 48) and s.patch_size == (8, 8) and s.num_patches == 36 and s.num_classes == 7
    assert m(torch.randn(1, 3, 48, 48)).shape == (1, 7)


def test_registers_counted_as_prefix_tokens():
    m = timm.create_model("vit_small_patch16_224", reg_tokens=4, img_size=32, no_embed_class=True)
    s = describe(m)
    assert s.num_reg_tokens == 4 and s.num_prefix_tokens == 5 and s.num_tokens == 9


@pytest.mark.parametrize("bad,msg", [("resnet18", "not a timm VisionTransformer"),
                                     ("no_such_model_x", "unknown model")])
def test_refuses_non_vit_and_unknown(bad, msg):
    with pytest.raises(ModelError, match=msg) as e:
        load_model(bad)
    assert "supported:" in str(e.value) and "\n" not in str(e.value)


@pytest.mark.parametrize("name", ["deit_tiny_patch16_224", "deit_tiny_distilled_patch16_224", "vit_pico_patch4_32"])
def test_macs_match_flop_counter(name):
    m = load_model(name, img_size=64) if name != "vit_pico_patch4_32" else load_model(name)
    for blk in m.blocks:
        blk.attn.fused_attn = False  # CPU SDPA may be counted as zero
    s = describe(m)
    x = torch.randn(1, 3, *s.img_size)
    with FlopCounterMode(display=False) as fc:
        m(x)
    ours = count_model(m).macs
    theirs = fc.get_total_flops() / 2
    assert abs(ours - theirs) / theirs < 0.01
    # closed form for the attention matmuls: 2 * L * N^2 * d
    N, D, L = s.num_tokens, s.embed_dim, s.depth
    attn_mm = sum(attn_macs(s, i, dense_attn_dims(s, i)) for i in range(L)) - L * 4 * N * D * D
    assert attn_mm == 2 * L * N * N * D


def _save_pth(path, obj):
    torch.save(obj, path)
    return path


def test_checkpoint_formats(tmp_path):
    src = load_model("vit_pico_patch4_32")
    torch.nn.init.normal_(src.blocks[0].mlp.fc1.weight)
    sd = src.state_dict()
    x = torch.randn(2, 3, 32, 32)
    ref = src(x)
    save_file(sd, tmp_path / "w.safetensors")
    nested = {"model": {f"module.{k}": v for k, v in sd.items()}, "epoch": 3}
    _save_pth(tmp_path / "nested.pth", nested)
    _save_pth(tmp_path / "sd.bin", {"state_dict": sd})
    for f in ("w.safetensors", "nested.pth", "sd.bin"):
        m = load_model("vit_pico_patch4_32", checkpoint=tmp_path / f)
        assert torch.equal(m(x), ref), f


def test_head_reinitialised_with_warning(tmp_path):
    src = load_model("vit_pico_patch4_32")
    save_file(src.state_dict(), tmp_path / "w.safetensors")
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        m = load_model("vit_pico_patch4_32", checkpoint=tmp_path / "w.safetensors", num_classes=4)
    assert any("head re-initialised" in str(x.message) for x in w)
    assert m.head.out_features == 4
    assert torch.equal(m.blocks[3].mlp.fc1.weight, src.blocks[3].mlp.fc1.weight)


class _Bomb:
    def __reduce__(self):
        import os
        return (os.system, ("echo pwned > /dev/null",))


def test_pickle_bomb_refused(tmp_path):
    p = tmp_path / "bomb.pth"
    with open(p, "wb") as f:
        pickle.dump({"model": _Bomb()}, f)
    with pytest.raises(CheckpointError, match="unsafe"):
        load_model("vit_pico_patch4_32", checkpoint=p)


def test_corrupt_and_mismatched_checkpoints(tmp_path):
    (tmp_path / "bad.safetensors").write_bytes(b"\x00\x01garbage")
    with pytest.raises(CheckpointError, match="corrupt"):
        load_model("vit_pico_patch4_32", checkpoint=tmp_path / "bad.safetensors")
    with pytest.raises(CheckpointError, match="not found"):
        load_model("vit_pico_patch4_32", checkpoint=tmp_path / "missing.pth")
    other = load_model("deit_tiny_patch16_224", img_size=32)
    save_file(other.state_dict(), tmp_path / "other.safetensors")
    with pytest.raises(CheckpointError, match="does not fit"):
        load_model("vit_pico_patch4_32", checkpoint=tmp_path / "other.safetensors")


def test_pretrained_offline_names_checkpoint(monkeypatch, tmp_path):
    import huggingface_hub.constants as hf
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(hf, "HF_HUB_OFFLINE", True)  # read at import time: set the constant too
    monkeypatch.setenv("HF_HOME", str(tmp_path))  # an empty cache
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    with pytest.raises(ModelError, match="--checkpoint"):
        load_model("deit_tiny_patch16_224", pretrained=True)
