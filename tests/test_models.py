"""The model zoo: every registered model honours the ZooModel contract; registry and option errors."""

from __future__ import annotations

import copy
import functools
import pickle
import re

import pytest
import torch
import torchvision
from torch import nn

from fl.errors import ConfigError
from fl.models import ZooModel, describe, get_model, list_models, model_profile, register_model
from fl.models.resnet import BasicBlock
from fl.models.tv import TorchvisionClassifier
import plugins  # noqa: F401,E402  (plugins declare their models too: the list below is then complete)

ALL_MODELS = list_models()
# Models that must also run on MNIST-shaped input (plus one torchvision network, whose stem is swapped).
GRAYSCALE_MODELS = ["cnn_small", "resnet8", "vgg8", "mobilenetv2_035", "tv_resnet18"]
NUM_CLASSES = 10


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Batches of two gain nothing from intra-op threads, and spinning threads stall on a busy machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
    _pristine.cache_clear()


def _build(name: str, seed: int = 0, **kwargs) -> ZooModel:
    torch.manual_seed(seed)
    return get_model(name, num_classes=NUM_CLASSES, **kwargs)


@functools.lru_cache(maxsize=None)
def _pristine(name: str) -> ZooModel:
    return _build(name)


def _fresh(name: str) -> ZooModel:
    """A private copy of the seed-0 model, built once for this module (initialising vgg16 is slow)."""
    return copy.deepcopy(_pristine(name))


def _batch(in_channels: int = 3, image_size: int = 32, batch: int = 2) -> torch.Tensor:
    generator = torch.Generator().manual_seed(1)
    return torch.randn(batch, in_channels, image_size, image_size, generator=generator)


def test_registry_lists_the_zoo():
    expected = {"cnn_small", "vgg8", "vgg11", "vgg16", "resnet8", "resnet20", "resnet56", "mobilenetv2_035"}
    assert expected <= set(ALL_MODELS)
    assert "tv_resnet18" in ALL_MODELS and "tv_mobilenet_v3_small" in ALL_MODELS
    assert ALL_MODELS == sorted(ALL_MODELS)


# --- the contract, for every registered model -------------------------------------------------------


# AgileNN's split network combines two heads (alpha local + (1 - alpha) remote) and holds a frozen
# reference network; tests/test_agilenn.py checks its forward and where its gradients go.
PLAIN_CLASSIFIERS = [m for m in ALL_MODELS if m != "agilenn"]


@pytest.mark.parametrize("name", PLAIN_CLASSIFIERS)
def test_forward_is_classifier_of_features(name):
    model = _fresh(name).eval()
    x = _batch()
    with torch.no_grad():
        features = model.forward_features(x)
        logits = model(x)
    assert isinstance(model, ZooModel)
    assert isinstance(model.classifier, nn.Linear)
    assert model.classifier.out_features == NUM_CLASSES
    assert features.shape == (2, model.classifier.in_features)
    assert logits.shape == (2, NUM_CLASSES)
    assert torch.equal(logits, model.classifier(features))


@pytest.mark.parametrize("name", GRAYSCALE_MODELS)
def test_grayscale_28x28(name):
    model = _build(name, in_channels=1, image_size=28).eval()
    with torch.no_grad():
        logits = model(_batch(in_channels=1, image_size=28))
    assert logits.shape == (2, NUM_CLASSES)
    profile = model_profile(model, in_channels=1, image_size=28)
    assert profile["params"] == sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("name", ALL_MODELS)
def test_profile_counts_every_parameter(name):
    model = _fresh(name)
    profile = model_profile(model, in_channels=3, image_size=32)
    assert profile["params"] == sum(p.numel() for p in model.parameters()) > 0
    assert profile["macs"] > 0
    assert model.training, "profiling must not switch the caller's model to eval mode"


@pytest.mark.parametrize("name", PLAIN_CLASSIFIERS)
def test_train_step_reaches_every_parameter(name):
    model = _fresh(name).train()
    loss = nn.functional.cross_entropy(model(_batch()), torch.tensor([0, 1]))
    loss.backward()
    unused = getattr(model, "unused_in_forward", ())  # e.g. the edge model's own classifier inside delta_fused
    assert all(p.grad is not None for n, p in model.named_parameters() if not n.startswith(unused))


@pytest.mark.parametrize("name", ALL_MODELS)
def test_init_is_deterministic_and_state_dict_transfers(name):
    first, again, other = _pristine(name), _build(name, seed=0), _build(name, seed=1)
    expected = again.state_dict()
    for key, value in first.state_dict().items():
        assert torch.equal(value, expected[key]), key
    other.load_state_dict(first.state_dict())
    x = _batch()
    first = copy.deepcopy(first).eval()
    with torch.no_grad():
        assert torch.equal(first(x), other.eval()(x))


@pytest.mark.parametrize("name", ALL_MODELS)
def test_pickle_and_deepcopy_round_trip(name):
    model = _fresh(name).eval()
    x = _batch()
    with torch.no_grad():
        expected = model(x)
        for clone in (pickle.loads(pickle.dumps(model)), copy.deepcopy(model)):
            assert torch.equal(clone(x), expected)


# --- the individual networks ----------------------------------------------------------------------


def test_cnn_small_is_the_545k_benchmark():
    params = model_profile(_fresh("cnn_small"))["params"]
    assert abs(params - 545_000) / 545_000 < 0.05
    assert params == 546_238


def test_vgg16_matches_the_cifar_reference():
    profile = model_profile(_fresh("vgg16"))
    # 14,728,266 in the usual CIFAR repos, less the 4,224 conv biases that BatchNorm makes redundant.
    assert profile["params"] == 14_724_042
    assert 0.30e9 < profile["macs"] < 0.32e9


@pytest.mark.parametrize("name", ["vgg8", "vgg11", "vgg16", "resnet20", "cnn_small"])
def test_half_width_has_fewer_parameters(name):
    full = model_profile(_build(name, width=1.0))["params"]
    half = model_profile(_build(name, width=0.5))["params"]
    assert half < full


def test_resnet_depths_and_shortcuts():
    def blocks(model: nn.Module) -> int:
        return sum(isinstance(m, BasicBlock) for m in model.modules())

    assert [blocks(_build(name)) for name in ("resnet8", "resnet20", "resnet56")] == [3, 9, 27]
    option_a = _build("resnet20", shortcut="A")
    assert model_profile(option_a)["params"] == 269_722  # the paper's 0.27M
    assert model_profile(_build("resnet20"))["params"] == 272_474  # option B adds two 1x1 projections
    assert option_a.eval()(_batch()).shape == (2, NUM_CLASSES)


def test_mobilenetv2_keeps_32x32_resolution_in_the_stem():
    model = _build("mobilenetv2_035").eval()
    with torch.no_grad():
        feature_map = model.features(_batch())
    assert feature_map.shape[-2:] == (4, 4)
    assert model.classifier.in_features == 1280


@pytest.mark.parametrize("tv_name", ["resnet18", "mobilenet_v3_small"])
def test_torchvision_wrapper_computes_the_original_network(tv_name):
    torch.manual_seed(0)
    network = torchvision.models.get_model(tv_name, weights=None, num_classes=NUM_CLASSES).eval()
    wrapped = TorchvisionClassifier(copy.deepcopy(network)).eval()
    x = _batch()
    with torch.no_grad():
        assert torch.allclose(wrapped(x), network(x), atol=1e-6)


def test_describe_is_one_line():
    line = describe("cnn_small", _fresh("cnn_small"))
    assert re.fullmatch(r"cnn_small: 546,238 params, \d+\.\d [KMG]MACs", line), line


# --- registry and option errors -------------------------------------------------------------------


def test_registering_a_name_twice_is_an_error():
    with pytest.raises(ValueError, match="already registered"):
        register_model("cnn_small")(lambda *, num_classes, in_channels, image_size: None)
    assert ALL_MODELS == list_models()


def test_builder_must_take_the_common_arguments():
    with pytest.raises(TypeError, match="image_size"):
        register_model("zoo_test_bad_builder")(lambda *, num_classes, in_channels: None)
    assert "zoo_test_bad_builder" not in list_models()


def test_unknown_model_lists_the_allowed_names():
    with pytest.raises(ConfigError) as error:
        get_model("resnet9000", num_classes=NUM_CLASSES)
    assert error.value.key == "model.name"
    assert all(name in str(error.value) for name in ALL_MODELS)


def test_unknown_option_names_its_config_key():
    with pytest.raises(ConfigError) as error:
        get_model("vgg8", num_classes=NUM_CLASSES, depth=11)
    assert error.value.key == "model.depth"
    assert "width" in str(error.value)


@pytest.mark.parametrize(
    "name, kwargs, key",
    [
        ("vgg8", {"width": 0}, "model.width"),
        ("resnet8", {"width": -1.0}, "model.width"),
        ("resnet8", {"shortcut": "C"}, "model.shortcut"),
        ("cnn_small", {"hidden": 0}, "model.hidden"),
        ("cnn_small", {"image_size": 4}, "model.image_size"),
        ("mobilenetv2_035", {"dropout": 1.5}, "model.dropout"),
        ("vgg8", {"num_classes": 0}, "model.num_classes"),
        ("vgg8", {"in_channels": 0}, "model.in_channels"),
    ],
)
def test_bad_values_name_their_config_key(name, kwargs, key):
    arguments = {"num_classes": NUM_CLASSES, **kwargs}
    with pytest.raises(ConfigError) as error:
        get_model(name, **arguments)
    assert error.value.key == key
