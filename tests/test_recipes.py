"""Per-module tuning recipes (TinyLLaVA Factory's): projector / LLM / tower frozen, full or (the tower) partial
from a layer on, learning rates per group; the parts trained are exactly those that reach the features."""

import pytest
import torch

from components.train.config import TrainConfig
from components.train.loop import apply_recipe, feature_depth, parameter_groups, trained_tower_parts
from model.assemble import init_model
from tests.backbone_folders import write_tower_folder


def config(**fields) -> TrainConfig:
    return TrainConfig(**{"phase": "align", "data": "d", "out": "o", "init": "i", **fields})


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    folder = write_tower_folder(str(tmp_path_factory.mktemp("tower") / "siglip"), "siglip", seed=3)
    return init_model("tiny", vision=folder)[0]  # 3 tower layers; vision_feature_layer -2 reads layer 1's output


def trainable(model) -> set[str]:
    return {name for name, p in model.named_parameters() if p.requires_grad}


def test_defaults_are_llavas_phases():
    assert (config().tune_projector, config().tune_llm, config().tune_vision) == ("full", "frozen", "frozen")
    assert config(phase="instruct").tune_llm == "full"


@pytest.mark.parametrize("fields, message", [
    ({"tune_vision": "half"}, "tune_vision must be one of"),
    ({"tune_llm": "lora"}, "tune_llm must be one of"),
    ({"tune_vision": "partial"}, "partial needs tune_vision_from_layer"),
    ({"tune_vision_from_layer": 3}, "only for tune_vision: partial"),
    ({"tune_vision": "partial", "tune_vision_from_layer": -1}, "must be >= 0"),
    ({"tune_projector": "frozen"}, "every module is frozen"),
    ({"vision_lr": "-1e-4"}, "vision_lr must be positive"),
])
def test_bad_recipes_are_named(fields, message):
    with pytest.raises(ValueError, match=message):
        config(**fields)
    assert config(vision_lr="2e-5").vision_lr == 2e-5  # YAML's 2e-5 arrives as a string


def test_the_trained_tower_parts_are_exactly_those_that_reach_the_features(model):
    assert feature_depth(model) == 2
    # every tower parameter trainable: the ones a loss on the features gives gradients are the recipe's "full"
    model.requires_grad_(False)
    model.vision_tower.requires_grad_(True)
    model.zero_grad()
    model.encode_images(torch.randn(2, 3, 60, 60)).square().sum().backward()
    reached = {f"vision_tower.{n}" for n, p in model.vision_tower.named_parameters() if p.grad is not None}
    named = {id(p): f"vision_tower.{n}" for n, p in model.vision_tower.named_parameters()}
    full = {named[id(p)] for m in trained_tower_parts(model, "full", None) for p in m.parameters()}
    assert full == reached and "vision_tower.encoder.layers.2.mlp.fc1.weight" not in full
    model.zero_grad()


def test_apply_recipe_freezes_and_trains_by_module(model):
    apply_recipe(model, config(tune_vision="partial", tune_vision_from_layer=1))
    names = trainable(model)
    assert {n.split(".")[0] for n in names} == {"multi_modal_projector", "vision_tower"}
    assert {n for n in names if n.startswith("vision_tower.")} == {
        n for n, _ in model.named_parameters() if n.startswith("vision_tower.encoder.layers.1.")}
    apply_recipe(model, config(phase="instruct", tune_projector="frozen", tune_vision="full"))
    names = trainable(model)
    assert not any(n.startswith("multi_modal_projector.") for n in names)
    assert any(n.startswith("language_model.") for n in names)
    assert "vision_tower.embeddings.patch_embedding.weight" in names
    assert "vision_tower.post_layernorm.weight" not in names  # never reaches the features
    with pytest.raises(ValueError, match="tune_vision_from_layer 2 trains no layer"):
        apply_recipe(model, config(tune_vision="partial", tune_vision_from_layer=2))


def test_each_group_gets_its_learning_rate(model):
    cfg = config(phase="instruct", lr=2e-5, projector_lr=1e-4, tune_vision="partial", tune_vision_from_layer=0,
                 vision_lr=5e-6)
    apply_recipe(model, cfg)
    groups = {g["name"]: g for g in parameter_groups(model, cfg)}
    assert {k: g["lr"] for k, g in groups.items()} == {"llm": 2e-5, "projector": 1e-4, "vision": 5e-6}
    assert sum(len(g["params"]) for g in groups.values()) == len(trainable(model))
    apply_recipe(model, config())  # align: the projector only, at lr
    assert [(g["name"], g["lr"]) for g in parameter_groups(model, config())] == [("projector", 1e-3)]
