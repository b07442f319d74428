import pytest
import torch

from transferlab.backbones import (
    BACKBONES,
    check_backbone_name,
    load_backbone,
    map_lukemelas_state_dict,
    package_weights_path,
)


def test_packaged_weights_map_one_to_one_onto_timm():
    import timm

    source = torch.load(package_weights_path(BACKBONES["efficientnet_lite0"]), weights_only=True)
    target = timm.create_model("tf_efficientnet_lite0").state_dict()
    mapped = map_lukemelas_state_dict(source, target)
    assert len(mapped) == len(target) == 296
    assert list(mapped) == list(target)
    # spot-check the documented renames
    pairs = dict(zip(source, target, strict=True))
    assert pairs["_conv_stem.weight"] == "conv_stem.weight"
    assert pairs["_bn0.weight"] == "bn1.weight"
    assert pairs["_conv_head.weight"] == "conv_head.weight"
    assert pairs["_fc.bias"] == "classifier.bias"


def test_mapping_rejects_misaligned_weights():
    a = {"x.weight": torch.zeros(2, 3)}
    with pytest.raises(ValueError, match="do not line up"):
        map_lukemelas_state_dict(a, {"y.weight": torch.zeros(3, 2)})


@pytest.mark.slow
def test_real_weights_classify_imagenet_photos(lite0, imagenet_photos):
    x, y = imagenet_photos
    with torch.inference_mode():
        top5 = lite0(x).topk(5).indices
    top1 = int((top5[:, 0] == y).sum())
    in_top5 = int((top5 == y[:, None]).any(1).sum())
    assert in_top5 >= 18, in_top5
    assert top1 >= 15, top1


def test_backbone_is_frozen_and_in_eval(lite0):
    assert not lite0.training
    assert all(not p.requires_grad for p in lite0.parameters())
    assert lite0.feature_dim == 1280
    assert lite0.spec.mean == (0.5, 0.5, 0.5)
    feats = lite0.features(torch.rand(2, 3, 224, 224))
    assert feats.shape == (2, 1280)


@pytest.mark.parametrize("name", ["timm:resnet18", "torchvision:resnet18", "efficientnet_lite0"])
def test_names_accepted(name):
    check_backbone_name(name)


def test_unknown_name_lists_allowed():
    with pytest.raises(ValueError, match="allowed values"):
        check_backbone_name("vgg99")


def test_random_init_torchvision_backbone_splits_head():
    b = load_backbone("torchvision:resnet18", "none")
    assert b.feature_dim == 512
    assert b(torch.rand(1, 3, 64, 64)).shape == (1, 1000)
    assert b.features(torch.rand(1, 3, 64, 64)).shape == (1, 512)


def _foolbox_photos(spec):
    import re
    from importlib import resources
    from pathlib import Path

    from transferlab.features import load_images

    files = sorted(Path(str(resources.files("foolbox") / "data")).glob("imagenet_*"))
    labels = [int(re.match(r"imagenet_\d+_(\d+)", f.name).group(1)) for f in files]
    return load_images(files, spec), torch.tensor(labels)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["efficientnet_lite1", "efficientnet_lite2"])
def test_offline_lite1_lite2_classify_imagenet_photos(name):
    """The packaged weights, at timm's preprocessing for them: measured 18/20 top-1 each."""
    backbone = load_backbone(name, "package")
    x, y = _foolbox_photos(backbone.spec)
    assert x.shape[-1] == backbone.spec.input_size == {"efficientnet_lite1": 240}.get(name, 260)
    with torch.inference_mode():
        top1 = int((backbone(x).argmax(1) == y).sum())
    assert top1 >= 17, top1


def test_file_weights_in_package_key_names_pass_the_strict_load(tmp_path):
    """A ``file:`` copy of the packaged Lite1 weights maps like ``package`` and loads strictly."""
    import shutil

    copy = tmp_path / "lite1.pth"
    shutil.copy(package_weights_path(BACKBONES["efficientnet_lite1"]), copy)
    from_file = load_backbone("efficientnet_lite1", f"file:{copy}")
    from_package = load_backbone("efficientnet_lite1", "package")
    assert from_file.weights_digest == from_package.weights_digest
    for a, b in zip(
        from_file.state_dict().values(), from_package.state_dict().values(), strict=True
    ):
        assert torch.equal(a, b)


def test_file_weights_that_do_not_fit_name_the_file(tmp_path):
    bad = tmp_path / "bad.pth"
    torch.save({"conv.weight": torch.zeros(1)}, bad)
    with pytest.raises(ValueError, match="weights do not fit") as info:
        load_backbone("efficientnet_lite1", f"file:{bad}")
    assert str(bad) in str(info.value)


def test_timm_names_use_timms_pretrained_data_config():
    import timm

    from transferlab.backbones import get_spec

    spec = get_spec("timm:tf_efficientnet_lite1")
    cfg = timm.models.get_pretrained_cfg("tf_efficientnet_lite1")
    assert spec.mean == spec.std == (0.5, 0.5, 0.5) == tuple(cfg.mean)
    assert (spec.input_size, spec.resize, spec.interpolation) == (240, 272, "bicubic")
    # the registry entry and the timm: name read the same pixels
    assert spec.preprocessing_signature == BACKBONES["efficientnet_lite1"].preprocessing_signature
    resnet = get_spec("timm:resnet18")
    assert (resnet.input_size, resnet.resize) == (224, 235)  # crop_pct 0.95
