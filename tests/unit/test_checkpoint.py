"""Own-format round trip; timm DeiT and official SuperViT imports; bad checkpoints."""

import argparse
import collections
import pickle

import pytest
import timm
import torch

from supervit import (
    CheckpointError,
    SubnetConfig,
    SuperViT,
    get_arch,
    load_checkpoint,
    load_pretrained,
    save_checkpoint,
)
from supervit.checkpoint import read_checkpoint_metadata


def _perturbed(model: torch.nn.Module) -> torch.nn.Module:
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    return model.eval()


def test_round_trip(tmp_path):
    torch.manual_seed(0)
    model = _perturbed(SuperViT(get_arch("tiny"), num_classes=10))
    path = save_checkpoint(tmp_path / "m.safetensors", model, extra={"epoch": 3})
    assert [p.name for p in tmp_path.iterdir()] == ["m.safetensors"]  # no temp file left behind
    meta = read_checkpoint_metadata(path)
    assert meta["arch"] == get_arch("tiny") and meta["num_classes"] == 10 and meta["extra"] == {"epoch": 3}
    loaded = load_checkpoint(path).eval()
    x = torch.randn(4, 1, 32, 32)
    for subnet in (None, SubnetConfig(4, 0.5), SubnetConfig(6, (1.0, 0.7, 0.5))):
        with torch.no_grad():
            assert torch.equal(model(x, subnet), loaded(x, subnet))


def test_timm_deit_import_resamples_pos_embed_to_every_grid(tmp_path):
    torch.manual_seed(0)
    ref = _perturbed(timm.create_model("deit_small_patch16_224", pretrained=False))
    torch.save({"model": ref.state_dict()}, tmp_path / "deit_s.pth")
    model = load_checkpoint(tmp_path / "deit_s.pth").eval()  # architecture inferred: deit_s
    assert model.arch == get_arch("deit_s")
    assert [pe.shape[1] for pe in model.pos_embed_list] == [65, 101, 145, 197]
    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        torch.testing.assert_close(model(x), ref(x), atol=1e-4, rtol=0)
        assert model(x, SubnetConfig(8, 0.5)).shape == (2, 1000)


def test_official_supervit_checkpoint_import(tmp_path):
    """The official file, built from timm's names (not from this project's model): timm DeiT-S weights, one
    position embedding per grid as ``pos_embed_list.{i}`` (smallest first), and the training state beside them.
    Every grid at keep 1 must then be exactly timm's DeiT-S at that input size with that position embedding."""
    torch.manual_seed(0)
    ref = _perturbed(timm.create_model("deit_small_patch16_224", pretrained=False))
    grids = (8, 10, 12, 14)
    weights = {k: v for k, v in ref.state_dict().items() if k != "pos_embed"}
    weights |= {f"pos_embed_list.{i}": torch.randn(1, g * g + 1, 384) * 0.02 for i, g in enumerate(grids)}
    args = argparse.Namespace(model="deit_small_patch16_224", lr=5e-4, keep_rate=[0.5, 0.7, 1.0])
    official = {
        "model": weights,
        "optimizer": {"state": {}, "param_groups": [{"lr": 1e-4}]},
        "lr_scheduler": {"last_epoch": 299},
        "epoch": 299,
        "model_ema": collections.OrderedDict((k, v.clone()) for k, v in weights.items()),
        "scaler": {"scale": 65536.0},
        "args": args,
    }
    path = tmp_path / "supervit_deit_s.pth"
    torch.save(official, path)
    with pytest.raises(pickle.UnpicklingError):  # a plain weights-only load refuses the Namespace
        torch.load(path, weights_only=True)
    model = load_checkpoint(path, arch="deit_s").eval()
    x = torch.randn(2, 3, 224, 224)
    for i, g in enumerate(grids):
        at_grid = timm.create_model("deit_small_patch16_224", pretrained=False, img_size=g * 16).eval()
        timm_names = {k: v for k, v in weights.items() if not k.startswith("pos_embed_list.")}
        at_grid.load_state_dict(timm_names | {"pos_embed": weights[f"pos_embed_list.{i}"]})
        small = torch.nn.functional.interpolate(x, size=(g * 16, g * 16), mode="bilinear", align_corners=True)
        with torch.no_grad():
            torch.testing.assert_close(model(x, SubnetConfig(g, 1.0)), at_grid(small), atol=1e-4, rtol=0, msg=str(g))
            assert model(x, SubnetConfig(g, 0.5)).shape == (2, 1000)


def test_load_pretrained_keeps_a_new_head(tmp_path):
    torch.manual_seed(0)
    ref = _perturbed(timm.create_model("deit_small_patch16_224", pretrained=False))
    torch.save(ref.state_dict(), tmp_path / "deit.pth")
    model = SuperViT(get_arch("deit_s"), num_classes=10)
    head_before = model.head.weight.clone()
    assert load_pretrained(model, tmp_path / "deit.pth") == ["head.weight", "head.bias"]
    assert torch.equal(model.head.weight, head_before)
    assert torch.equal(model.blocks[5].mlp.fc1.weight, ref.blocks[5].mlp.fc1.weight)


def test_checkpoint_of_another_architecture(tmp_path):
    save_checkpoint(tmp_path / "tiny.safetensors", SuperViT(get_arch("tiny"), num_classes=10))
    with pytest.raises(CheckpointError, match="checkpoint of architecture tiny .* expected deit_ti"):
        load_checkpoint(tmp_path / "tiny.safetensors", arch="deit_ti")
    with pytest.raises(CheckpointError, match="expected deit_s"):
        load_pretrained(SuperViT(get_arch("deit_s"), num_classes=10), tmp_path / "tiny.safetensors")
    ti = timm.create_model("deit_tiny_patch16_224", pretrained=False)
    torch.save(ti.state_dict(), tmp_path / "deit_ti.pth")
    with pytest.raises(CheckpointError, match="another architecture"):
        load_checkpoint(tmp_path / "deit_ti.pth", arch="deit_s")
    with pytest.raises(CheckpointError, match="checkpoint has 10 classes, expected 1000"):
        load_checkpoint(tmp_path / "tiny.safetensors", num_classes=1000)


class _Evil:
    def __reduce__(self):
        return (print, ("unpickled!",))


def test_damaged_missing_and_unsafe_files(tmp_path):
    with pytest.raises(CheckpointError, match="no such checkpoint file"):
        load_checkpoint(tmp_path / "absent.safetensors")
    good = save_checkpoint(tmp_path / "m.safetensors", SuperViT(get_arch("tiny"), num_classes=10))
    damaged = tmp_path / "damaged.safetensors"
    damaged.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    with pytest.raises(CheckpointError, match="damaged.safetensors"):
        load_checkpoint(damaged)
    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"this is not a checkpoint at all")
    with pytest.raises(CheckpointError, match="garbage.pth: not a readable checkpoint"):
        load_checkpoint(garbage)
    evil = tmp_path / "evil.pth"
    torch.save({"model": {"w": torch.zeros(1)}, "x": _Evil()}, evil)
    with pytest.raises(CheckpointError, match="evil.pth: not a readable checkpoint"):
        load_checkpoint(evil)
    no_tensors = tmp_path / "empty.pth"
    torch.save({"epoch": 1}, no_tensors)
    with pytest.raises(CheckpointError, match="no state dict of tensors"):
        load_checkpoint(no_tensors)
