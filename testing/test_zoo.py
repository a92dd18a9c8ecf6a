"""The CIFAR-10 model zoo (experiments/cv/model.py) and its benchmark script (experiments/cv/zoo_bench.py)."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, grad, vmap

from core.config import ModelSection, validate_config
from core.distributed import DistContext, Transport
from core.errors import UserError
from core.simulation import build_simulation
from core.task import load_task
from core.vectorized import check_vectorizable
from core.worker import RoundLayout, train_share
from experiments.cv import zoo_bench
from testing.conftest import SMALL_CV, read_metrics

# Parameter counts of kuangliu/pytorch-cifar's CIFAR-10 models (10 classes).
KUANGLIU = {"ResNet18": 11_173_962, "PreActResNet18": 11_171_146, "DenseNet121": 6_956_298, "VGG16": 14_728_266,
            "MobileNetV2": 2_296_922}
# Ours, by construction. PreActResNet18 has the paper's final BN-ReLU (+2 x 512 parameters). MobileNetV2 follows
# Sandler et al.: no expansion conv in the t=1 bottleneck and no 1x1 projection shortcuts, which kuangliu adds.
EXACT = {"ResNet18": 11_173_962, "PreActResNet18": 11_172_170, "DenseNet121": 6_956_298, "VGG16": 14_728_266,
         "MobileNetV2": 2_236_682, "LeNet5": 62_006, "SmallCNN": 188_810, "PflCNN": 1_626_442}
GN = ["ResNet18GN", "PreActResNet18GN", "DenseNet121GN", "VGG16GN", "MobileNetV2GN"]
ALL = sorted(EXACT) + GN


def _build(name: str, num_classes: int = 10):
    torch.manual_seed(0)
    return load_task("cv").build_model(ModelSection(model_type=name, num_classes=num_classes))


def _has_batchnorm(model: nn.Module) -> bool:
    return any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())


@pytest.mark.parametrize("name", ALL)
def test_model_maps_images_to_logits_with_its_parameter_count(name):
    model = _build(name)
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 10)
    assert isinstance(model.linear, nn.Linear) and model.linear.out_features == 10, "FedPer's personal layer"
    architecture = name.removesuffix("GN")
    assert model.num_parameters() == EXACT[architecture]
    reference = KUANGLIU.get(architecture)
    if reference and architecture != "MobileNetV2":  # see the next test
        assert abs(model.num_parameters() - reference) <= 0.01 * reference


def test_mobilenetv2_differs_from_kuangliu_by_its_extra_layers():
    """kuangliu adds a 1x1 conv + BN shortcut to the four stride-1 bottlenecks that change width
    (32->16, 16->24, 64->96, 160->320) and a 32->32 expansion conv + BN to the t=1 bottleneck."""
    shortcuts = sum(i * o + 2 * o for i, o in [(32, 16), (16, 24), (64, 96), (160, 320)])
    expansion = 32 * 32 + 2 * 32
    assert _build("MobileNetV2").num_parameters() + shortcuts + expansion == KUANGLIU["MobileNetV2"]


def test_num_classes_sets_the_linear_layer():
    model = _build("LeNet5", num_classes=100)
    assert model(torch.randn(3, 3, 32, 32)).shape == (3, 100)


@pytest.mark.parametrize("name", ALL)
def test_one_sgd_step_lowers_the_loss_on_a_fixed_batch(name):
    model = _build(name).train()
    generator = torch.Generator().manual_seed(1)
    batch = {"x": torch.randn(4, 3, 32, 32, generator=generator), "y": torch.tensor([0, 3, 7, 9])}
    torch.manual_seed(2)  # same dropout masks (PflCNN) before and after the step
    before = model.loss(batch)
    before.backward()
    norm = torch.sqrt(sum((p.grad ** 2).sum() for p in model.parameters()))
    with torch.no_grad():  # a gradient step of length 0.01 in parameter space
        for p in model.parameters():
            p -= 0.01 * p.grad / norm
    torch.manual_seed(2)
    assert model.loss(batch).item() < before.item()


@pytest.mark.parametrize("name", GN)
def test_group_norm_variant_has_no_batchnorm_and_the_same_layer_names(name):
    gn, bn = _build(name), _build(name.removesuffix("GN"))
    assert not _has_batchnorm(gn) and _has_batchnorm(bn)
    assert any(isinstance(m, nn.GroupNorm) for m in gn.modules())
    assert [n for n, _ in gn.named_parameters()] == [n for n, _ in bn.named_parameters()]
    cfg = validate_config({**SMALL_CV, "client_config": {**SMALL_CV["client_config"], "vectorize": True}}, "test")
    check_vectorizable(gn, cfg.client_config)
    with pytest.raises(UserError, match="BatchNorm"):
        check_vectorizable(bn, cfg.client_config)


@pytest.mark.parametrize("name", GN)
def test_group_norm_variant_gradients_under_vmap_equal_per_client_gradients(name):
    """The vectorized trainer's mechanism (functional_call + vmap over stacked client parameters), in
    float64 so that the comparison is exact up to rounding."""
    model = _build(name).double()
    torch.manual_seed(3)
    stacked = {k: torch.stack([v.detach(), v.detach() + 0.01 * torch.randn_like(v)]) for k, v in model.named_parameters()}
    batches = {"x": torch.randn(2, 2, 3, 32, 32, dtype=torch.float64), "y": torch.tensor([[1, 2], [3, 4]])}

    def loss(params, batch):
        return F.cross_entropy(functional_call(model, params, (batch["x"],)), batch["y"])

    together = vmap(grad(loss))(stacked, batches)
    for c in range(2):
        alone = grad(loss)({k: v[c] for k, v in stacked.items()}, {k: v[c] for k, v in batches.items()})
        scale = max(g.abs().max() for g in alone.values())
        assert max((together[k][c] - alone[k]).abs().max() for k in alone) < 1e-10 * scale


def _resnet_gn_simulation(cifar_path, vectorize: bool):
    config = {**SMALL_CV, "model_config": {"model_type": "ResNet18GN"},
              "server_config": {**SMALL_CV["server_config"], "num_clients_per_iteration": 2},
              "client_config": {"local_epochs": 1, "batch_size": 4, "augment": False, "vectorize": vectorize,
                                "vectorize_chunk": 2, "optimizer_config": {"type": "sgd", "lr": 0.01}},
              "data_config": {**SMALL_CV["data_config"], "num_clients": 5000, "partition": "iid"}}
    ctx = DistContext(0, 1, torch.device("cpu"), "gloo")
    return build_simulation(validate_config(config, "test"), load_task("cv"), str(cifar_path), ctx, Transport(ctx))


def test_resnet18gn_vectorized_round_equals_sequential(cifar_path):
    """client_config.vectorize: true through the engine: two clients of 10 images, FedPer on ``linear``."""
    seq, vec = _resnet_gn_simulation(cifar_path, False), _resnet_gn_simulation(cifar_path, True)
    assert vec.vectorized is not None and seq.vectorized is None
    start = seq.layout.flatten()
    buf = torch.cat([start, start[seq.personal_index].repeat(2), torch.ones(1)])  # ends with GO
    a, b = train_share(seq, 1, buf.clone()), train_share(vec, 1, buf.clone())
    lay = RoundLayout(seq, 1)
    (delta_a, weight_a, _, _, slots_a), (delta_b, weight_b, _, _, slots_b) = lay.reduce_parts(a), lay.reduce_parts(b)
    assert weight_a == weight_b == 20.0, "two clients of 10 samples"
    assert delta_a.abs().max() > 0.1, "clients really trained"
    assert (delta_a / weight_a - delta_b / weight_b).abs().max() < 1e-4
    assert (slots_a - slots_b).abs().max() < 1e-4, "same personal layers"


def test_unknown_model_type_is_one_line_user_error():
    with pytest.raises(UserError) as info:
        _build("ResNet1000")
    message = str(info.value)
    assert "\n" not in message and "model_config.model_type" in message and "'ResNet1000'" in message
    assert all(name in message for name in ALL), "names the known models"


def test_bench_rejects_unknown_model_before_training(tmp_path, cifar_path, capsys):
    code = zoo_bench.main(["-dataPath", str(cifar_path), "-outputPath", str(tmp_path), "--models", "LeNet5", "Nope"])
    assert code == 2 and "unknown model 'Nope'" in capsys.readouterr().err
    assert not list(tmp_path.iterdir()), "nothing trained"


def test_bench_writes_plot_and_table(tmp_path, cifar_path):
    """One federated round of LeNet5 (100 clients, 5 per round) and one centralized epoch."""
    out = tmp_path / "zoo"
    code = zoo_bench.main(["-dataPath", str(cifar_path), "-outputPath", str(out), "--models", "LeNet5",
                           "--rounds", "1", "--central-set", "client_config.batch_size=256"])
    assert code == 0
    assert (out / "zoo.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    header, rule, row = (out / "zoo.md").read_text().strip().splitlines()
    assert header.startswith("| model | parameters | global test acc (%) | personalized acc (%) | centralized acc (%)")
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert cells[:2] == ["LeNet5", "62,006"]
    fed, central = read_metrics(out / "LeNet5_fed")[-1], read_metrics(out / "LeNet5_central")[-1]
    assert cells[2:5] == [f"{100 * fed['global_test_acc']:.2f}", f"{100 * fed['personalized']['weighted_mean']:.2f}",
                          f"{100 * central['global_test_acc']:.2f}"]
    assert fed["personalized"]["clients"] == 5 and central["global_local"]["clients"] == 1
    assert central["global_test_acc"] > 0.15, "one epoch over all 50,000 images beats chance"
