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
