"""Config presets, YAML recipes, key=value overrides and early validation of ctpo_lab.train."""

import pytest

from ctpo_lab.train.config import TRAIN_PRESETS, TrainConfig, parse_overrides, resolve_train_config


@pytest.mark.parametrize("name", sorted(TRAIN_PRESETS))
def test_every_preset_validates(name):
    cfg = resolve_train_config(name)
    assert cfg.preset == name
    assert cfg.updates_per_step == cfg.batch_prompts // cfg.mini_batch_prompts * cfg.ppo_epochs


def test_cpu_smoke_is_off_policy_and_evaluates_twice():
    cfg = resolve_train_config("cpu-smoke")
    assert cfg.updates_per_step >= 4
    assert cfg.eval_every and cfg.steps // cfg.eval_every >= 2


def test_parse_overrides_types_and_dotted_keys():
    ov = parse_overrides(
        [
            "lr=1e-3",
            "steps=5",
            "tensorboard=false",
            "loss_overrides.eps_high=0.28",
            "task_options.max_steps=20",
            "device=cpu",
            "max_new_tokens=null",
        ]
    )
    assert ov == {
        "lr": 1e-3,
        "steps": 5,
        "tensorboard": False,
        "loss_overrides": {"eps_high": 0.28},
        "task_options": {"max_steps": 20},
        "device": "cpu",
        "max_new_tokens": None,
    }
    with pytest.raises(ValueError, match="key=value"):
        parse_overrides(["lr"])


def test_precedence_preset_recipe_overrides_flags(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("preset: cpu-smoke\nlr: 0.002\nsteps: 7\nloss_overrides: {clip_exponent: 0.25}\n")
    cfg = resolve_train_config(
        None, recipe, ["steps=9", "loss_overrides.eps_low=0.01"], loss="ctpo_fixed", seed=3
    )
    assert (cfg.preset, cfg.lr, cfg.steps, cfg.loss, cfg.seed) == ("cpu-smoke", 0.002, 9, "ctpo_fixed", 3)
    assert cfg.loss_overrides == {"clip_exponent": 0.25, "eps_low": 0.01}
    assert isinstance(resolve_train_config("cpu-smoke", overrides=["lr=1"]).lr, float)


@pytest.mark.parametrize(
    ("overrides", "explicit", "match"),
    [
        (["learning_rate=1e-3"], {}, "learning_rate"),
        ([], {"loss": "ppo2"}, "preset"),
        (["loss_overrides.eps=0.1"], {}, "overrides"),
        (["mini_batch_prompts=3"], {}, "mini_batch_prompts"),
        (["task=sudoku"], {}, "task"),
        (["task_options.lenght=3"], {}, "task_options"),
        (["model=/no/such/model"], {}, "model"),
        (["model_options.hidden=3"], {}, "model_options"),
        (["group_size=1"], {}, "group_size"),
        (["lr=0"], {}, "lr"),
        (["device=tpu"], {}, "device"),
        (["warmstart_noise=1.5"], {}, "warmstart_noise"),
        (["eval_prompts=5000"], {}, "eval_prompts"),
    ],
)
def test_bad_config_raises_value_error_naming_it(overrides, explicit, match):
    with pytest.raises(ValueError, match=match):
        resolve_train_config("cpu-smoke", overrides=overrides, **explicit)


def test_bad_types_and_names():
    with pytest.raises(TypeError, match="steps"):
        resolve_train_config("cpu-smoke", overrides=["steps=abc"])
    with pytest.raises(ValueError, match="preset"):
        resolve_train_config("cpu-huge")
    with pytest.raises(ValueError, match="config"):
        resolve_train_config(None, "/no/such/recipe.yaml")
    with pytest.raises(TypeError, match="cfg"):
        from ctpo_lab.train.loop import Trainer

        Trainer({"lr": 1}, "/tmp/x")
    TrainConfig().validate()


def test_changing_the_task_drops_the_preset_task_options():
    cfg = resolve_train_config("cpu-tiny", overrides=["task=chain"])
    assert cfg.task == "chain" and cfg.task_options == {}
    cfg = resolve_train_config("cpu-tiny", overrides=["task=add", "task_options.digits=2"])
    assert cfg.task_options == {"digits": 2}


def test_shipped_recipes_resolve():
    from pathlib import Path

    recipes = sorted((Path(__file__).parents[1] / "recipes").glob("train-*.yaml"))
    assert recipes
    for r in recipes:
        cfg = resolve_train_config(None, r)
        assert cfg.preset in TRAIN_PRESETS


def test_cpu_preset_configuration_is_valid():
    """The README's main job: the `cpu` preset is valid and keeps the properties the grid's verdict needs."""
    from ctpo_lab import compare
    from ctpo_lab.train.tasks import make_task

    cfg = resolve_train_config("cpu")
    assert cfg.preset == "cpu" and cfg.model == "tiny-llama" and cfg.task == "chain"
    task = make_task(cfg.task, **cfg.task_options)
    assert len(task.test_set(cfg.eval_prompts)) == cfg.eval_prompts
    assert task.min_steps * 8 + 3 >= 100  # correct responses reach positions ≥ 100 (the √t range)
    assert cfg.updates_per_step >= 8  # later mini-batches genuinely off-policy (paper: 16)
    assert cfg.ppo_epochs == 1 and cfg.mini_batch_prompts * cfg.num_mini_batches == cfg.batch_prompts
    assert 0.05 <= cfg.warmstart_noise <= 0.2 and cfg.warmstart_steps >= 800  # room to improve, rule learned
    assert cfg.eval_every and cfg.steps // cfg.eval_every >= 4 and cfg.eval_prompts * cfg.eval_samples >= 256
    assert cfg.threads == 1 and cfg.device == "auto" and not cfg.track  # one core per parallel run
    # compute budget: ≈ 2.5 min per run measured on one core; 12 runs on 2 cores in ≤ 30 min with the warm start
    assert cfg.steps * cfg.rollout_batch_size * task.max_response_tokens <= 1.5e6
    for loss in compare.GridSpec().losses:
        resolve_train_config("cpu", loss=loss, seed=2)
    spec = compare.GridSpec()
    assert spec.train_preset == "cpu" and len(spec.losses) == 4 and len(spec.seeds) >= 3
    assert compare.build_parser().parse_args([]).preset == "cpu"


def test_loss_may_be_a_loss_config_or_its_field_dict(tmp_path):
    import dataclasses

    from ctpo_lab.losses import PRESETS, resolve_config

    custom = resolve_config("ctpo", clip_exponent=0.25, name="ctpo_p025")
    cfg = resolve_train_config("cpu-tiny", loss=custom, overrides=["loss_overrides.eps_low=0.03"])
    assert cfg.loss == custom and cfg.loss_name == "ctpo_p025"
    assert cfg.loss_config() == dataclasses.replace(custom, eps_low=0.03)
    assert cfg.to_dict()["loss"] == dataclasses.asdict(custom)
    assert TrainConfig.from_dict({**cfg.to_dict(), "resolved_loss": {}, "world_size": 1}) == cfg
    recipe = tmp_path / "r.yaml"
    recipe.write_text("preset: cpu-tiny\nloss: {name: seq, ratio: sequence, clip: ppo, eps_low: 0.1, eps_high: 0.1}\n")
    cfg = resolve_train_config(None, recipe)
    assert cfg.loss_config() == resolve_config("seq_is", name="seq", eps_low=0.1, eps_high=0.1, dual_clip=3.0,
                                               max_log_weight=None)
    assert resolve_train_config("cpu-tiny", loss="tis").loss_config() == PRESETS["tis"]
    with pytest.raises(ValueError, match="loss: unknown LossConfig field"):
        TrainConfig(loss={"ratio": "token", "epsilon": 0.2})
    with pytest.raises(ValueError, match="^loss: unknown preset"):
        resolve_train_config("cpu-tiny", loss="ppo9")
    with pytest.raises(TypeError, match="loss"):
        resolve_train_config("cpu-tiny", loss=3)
