import glob

import pytest

from videodit.config import Config, ConfigError, build, load_config, save_config


def write(tmp_path, name, text):
    p = tmp_path / name
    p.write_text(text)
    return str(p)


def test_defaults_and_shipped_configs_load():
    assert isinstance(load_config(), Config)
    cfg = load_config("configs/shapes/tiny.yaml")
    assert cfg.model.preset == "tiny" and cfg.train.task == "dit"
    for path in glob.glob("configs/**/*.yaml", recursive=True):
        load_config(path)  # parses, and passes every section's checks
    stage1 = load_config("configs/shapes/minimal.yaml")  # the curriculum's first stage: same model, cut-down world
    assert stage1.model == cfg.model and stage1.text == cfg.text and stage1.data.shapes_only


def test_model_overrides_reach_the_denoiser():
    from videodit.train.models import denoiser_kwargs

    cfg = load_config("configs/shapes/tiny.yaml", ["model.qk_norm=false", "model.depth=2", "model.pooled_text=false"])
    kw = denoiser_kwargs(cfg, in_channels=8, text_dim=384)
    assert kw["local_mlp"] is True and kw["qk_norm"] is False and kw["depth"] == 2 and kw["hidden_size"] == 192
    assert kw["pooled_text"] is False  # the tiny preset's True, overridden


def test_a_bare_no_is_the_choice_no_not_false(tmp_path):
    """YAML 1.1 reads `no` as false: a choice named "no" still takes it, in a file and in --set."""
    (tmp_path / "c.yaml").write_text("train:\n  mixed_precision: no\n")
    assert load_config(str(tmp_path / "c.yaml")).train.mixed_precision == "no"
    assert load_config(None, ["train.mixed_precision=bf16", "train.mixed_precision=no"]).train.mixed_precision == "no"
    with pytest.raises(ConfigError, match="train.mixed_precision = True is not one of 'no'"):
        load_config(None, ["train.mixed_precision=yes"])


def test_base_inheritance_and_overrides(tmp_path):
    write(tmp_path, "base.yaml", "train:\n  lr: 0.001\n  max_steps: 50\ndata:\n  max_tokens: 1000\n")
    (tmp_path / "stage").mkdir()
    child = write(tmp_path, "stage/child.yaml", "base: ../base.yaml\ntrain:\n  max_steps: 80\n")
    cfg = load_config(child)
    assert cfg.train.lr == 0.001  # inherited
    assert cfg.train.max_steps == 80  # overridden by the child
    assert cfg.data.max_tokens == 1000
    cfg = load_config(child, ["train.max_steps=5", "model.patch_size=[1, 1, 1]", "sample.negative_prompt=blurry"])
    assert cfg.train.max_steps == 5 and cfg.model.patch_size == [1, 1, 1] and cfg.sample.negative_prompt == "blurry"
    assert cfg.train.lr == 0.001


def test_ints_and_exponents_are_accepted_as_floats(tmp_path):
    cfg = load_config(write(tmp_path, "c.yaml", "train:\n  lr: 1\n"))
    assert cfg.train.lr == 1.0 and isinstance(cfg.train.lr, float)
    assert load_config(overrides=["train.lr=1e-3"]).train.lr == 1e-3  # YAML 1.1 reads 1e-3 as a string


def test_saved_config_round_trips(tmp_path):
    cfg = load_config("configs/shapes/tiny.yaml", ["train.max_steps=3"])
    again = load_config(save_config(cfg, str(tmp_path / "resolved.yaml")))
    assert again == cfg


@pytest.mark.parametrize("text,words", [
    ("train:\n  max_stepz: 3\n", ["c.yaml", "train.max_stepz", "max_steps"]),
    ("trainer:\n  max_steps: 3\n", ["c.yaml", "trainer", "train"]),
    ("train:\n  max_steps: many\n", ["c.yaml", "train.max_steps", "an integer"]),
    ("train:\n  max_steps: 2.5\n", ["c.yaml", "train.max_steps", "an integer"]),
    ("train:\n  gradient_checkpointing: 1\n", ["c.yaml", "gradient_checkpointing", "true or false"]),
    ("train:\n  max_steps: 0\n", ["c.yaml", "train.max_steps", "positive"]),
    ("vae:\n  kind: sd\n", ["c.yaml", "vae.kind", "'causal'"]),
    ("vae:\n  fs: 6\n", ["c.yaml", "vae.fs", "power of two"]),
    ("data:\n  source: manifest\n", ["c.yaml", "data.manifest"]),
    ("data:\n  sizes: [[17, 64]]\n", ["c.yaml", "data.sizes", "[T, H, W]"]),
    ("flow:\n  text_dropout: 1.5\n", ["c.yaml", "flow.text_dropout", "[0, 1]"]),
    ("model:\n  hidden_size: 100\n  num_heads: 3\n", ["c.yaml", "model.num_heads", "a multiple of num_heads (3)"]),
    ("model:\n  num_heads: 5\n", ["c.yaml", "model.num_heads", "hidden_size (192) a multiple of num_heads (5)"]),
    ("model:\n  preset: XXL\n", ["c.yaml", "model.preset", "one of tiny, S, B"]),
    ("base: missing.yaml\n", ["missing.yaml", "not found", "c.yaml"]),
    ("train: 3\n", ["c.yaml", "section 'train' must be a mapping"]),
    ("- a\n- b\n", ["c.yaml", "mapping"]),
    ("train: [unclosed\n", ["c.yaml", "YAML"]),
])
def test_errors_name_file_key_and_allowed(tmp_path, text, words):
    path = write(tmp_path, "c.yaml", text)
    with pytest.raises(ConfigError) as e:
        load_config(path)
    for w in words:
        assert w in str(e.value), (w, str(e.value))


def test_circular_base(tmp_path):
    write(tmp_path, "a.yaml", "base: b.yaml\n")
    write(tmp_path, "b.yaml", "base: a.yaml\n")
    with pytest.raises(ConfigError, match="circular"):
        load_config(str(tmp_path / "a.yaml"))


@pytest.mark.parametrize("override,words", [
    ("train.max_steps", ["section.key=value"]),
    ("maxsteps=3", ["section.key=value"]),
    ("nope.key=1", ["unknown section 'nope'"]),
    ("train.nope=1", ["--set train.nope=1", "unknown key train.nope"]),
    ("train.lr=fast", ["--set train.lr=fast", "is not a finite number"]),
    ("train.lr=.nan", ["--set train.lr=.nan", "is not a finite number"]),
    ("flow.base_tokens=0", ["flow.base_tokens", "a positive number of tokens"]),
    ("model.mlp_ratio=-2", ["model.mlp_ratio", "a positive number"]),
    ("train.min_lr_ratio=2", ["train.min_lr_ratio", "a number in [0, 1]"]),
    ("train.weight_decay=-1", ["train.weight_decay", "a number >= 0"]),
    ("sample.negative_prompt=no", ["sample.negative_prompt", "quote words YAML reads as true or false"]),
    ("sample.guidance=.inf", ["sample.guidance", "is not a finite number"]),
    ("flow.cond_weights=[1,0,0]", ["flow.cond_weights", "first, first_k, last, first_last"]),
    ("flow.cond_weights=[0,0,0,0]", ["flow.cond_weights", "not all 0"]),
    ("data.image_ratio=1.5", ["data.image_ratio", "a fraction in [0, 1]"]),
    ("text.image_detailed_caption_prob=1.5", ["text.image_detailed_caption_prob", "probability in [0, 1] or null"]),
    ("sample.guidance_parallel=-1", ["sample.guidance_parallel", "a number in [0, 1]"]),
    ("flow.shared_noise=1.0", ["flow.shared_noise", "a number in [0, 1)"]),
    ("sample.size=[17,64]", ["sample.size", "[T, H, W]"]),
    ("train.output_dir=", ["train.output_dir", "a folder for the run"]),
    ("train.eval_timesteps=[0.5,0.5]", ["train.eval_timesteps", "distinct timesteps in (0, 1]"]),
    ("train.eval_timesteps=[0]", ["train.eval_timesteps", "distinct timesteps in (0, 1]"]),
    ("train.eval_clips=0", ["train.eval_clips", "a positive integer"]),
    ("vae.ft=16", ["vae.ft = 16", "at most vae.fs = 8"]),
    ("vae.fs=2", ["--set vae.fs=2: vae.ft = 4", "at most vae.fs = 2"]),  # the line that broke the rule
    ("model.num_heads=7", ["model.num_heads = 7", "hidden_size (192) a multiple of num_heads (7)"]),
    ("model.num_heads=64", ["model.num_heads = 64", "heads of an even size >= 6",
                            "in [1, 2, 3, 4, 6, 8, 12, 16, 24, 32]"]),
    ("model.patch_size=[2,4,4]", ["model.patch_size = [2, 4, 4]", "pt = 1: the causal VAE gives 1 + k latent"]),
    ("data.sizes=[[5,64,64],[5,2,2]]", ["data.sizes", "two large objects moving left do not fit a 2x2 frame"]),
    ("text.encoder=t5", ["text.path = None", "a local folder or hub id for text.encoder t5"]),
])
def test_override_errors(override, words):
    with pytest.raises(ConfigError) as e:
        load_config("configs/shapes/tiny.yaml", [override])
    for w in words:
        assert w in str(e.value)


def test_a_shortcut_vae_needs_three_latent_channels():
    with pytest.raises(ConfigError, match="vae.latent_channels = 2 is impossible; expected at least 3 with vae.sho"):
        load_config("configs/shapes/vae.yaml", ["vae.latent_channels=2"])
    assert load_config("configs/shapes/vae.yaml", ["vae.latent_channels=2", "vae.shortcut=false"]).vae.shortcut is False


def test_numbers_are_strings_where_a_string_is_due_and_an_empty_section_is_no_change(tmp_path):
    path = write(tmp_path, "c.yaml", "model:\n  # nothing changed yet\ntrain:\n  output_dir: 007\n  lr: 0.10\n")
    cfg = load_config(path, ["train.sample_prompts=[red, 0.10, 1_000]"])
    assert cfg.train.output_dir == "007" and cfg.train.sample_prompts == ["red", "0.10", "1_000"]  # as typed
    assert cfg.train.lr == 0.1 and cfg.model == Config().model
    assert load_config(None, ["train.max_steps=1_000"]).train.max_steps == 1000


def test_python_callers_get_the_same_checks():
    with pytest.raises(ConfigError, match="unknown config section 'trainn'"):
        build({"trainn": {"max_steps": 3}})
    with pytest.raises(TypeError, match="a list of 'section.key=value' strings"):
        load_config(None, "train.max_steps=3")
