"""Config validation: errors name the field and what was expected."""

import pytest

from alignet_core.config import PipelineConfig, load_config, parse_config, with_overrides
from alignet_core.errors import ConfigError
from alignet_core.io.sources import demo_data_dir


def test_defaults_are_the_demo():
    cfg = parse_config({})
    assert cfg.source.kind == "demo" and cfg.embed.model == "tf_efficientnet_lite2"
    assert cfg == PipelineConfig()


def test_shipped_demo_yaml_loads(tmp_path):
    cfg = load_config(demo_data_dir() / "demo.yaml")
    assert cfg.cluster.k == 12 and cfg.sample.strategies == ["cluster_border", "between_class"]


@pytest.mark.parametrize(
    "data, field",
    [
        ({"clustr": {"k": 3}}, "clustr"),
        ({"cluster": {"k": -3}}, "cluster.k"),
        ({"cluster": {"k": "many"}}, "cluster.k"),
        ({"sample": {"strategies": ["random"]}}, "sample.strategies"),
        ({"transform": {"alpha": 1.5}}, "transform.alpha"),
        ({"source": {"kind": "folder"}}, "source.path"),
        ({"device": "tpu"}, "device"),
        ({"embed": {"store_dtype": "int8"}}, "embed.store_dtype"),
    ],
)
def test_bad_fields_are_named(data, field):
    with pytest.raises(ConfigError) as err:
        parse_config(data)
    assert field.split(".")[-1] in str(err.value)


def test_missing_and_malformed_files(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("cluster: [unclosed")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)


def test_overrides_revalidate():
    cfg = with_overrides(parse_config({}), {"cluster.k": 20, "sample.n_train": 10})
    assert cfg.cluster.k == 20 and cfg.sample.n_train == 10
    with pytest.raises(ConfigError, match="cluster.k"):
        with_overrides(cfg, {"cluster.k": 0})
    with pytest.raises(ConfigError, match="not a config section"):
        with_overrides(cfg, {"root.x": 1})


def test_file_url_roots_are_local_paths():
    from alignet_core.config import parse_config

    assert parse_config({"root": "file:///data/alignet"}).root == "/data/alignet"
    assert parse_config({"root": "s3://bucket/alignet"}).root == "s3://bucket/alignet"


def test_the_config_reference_page_is_generated_from_the_models():
    """docs/config.md is `python -m alignet_core.config.reference`'s output (regenerate it after a field changes)."""
    from pathlib import Path

    from alignet_core.config.reference import reference_markdown

    page = Path(__file__).resolve().parents[2] / "docs" / "config.md"
    assert page.read_text() == reference_markdown()
    assert "| `n_workers` | `int` | `2` | no |" in page.read_text()


def test_fields_marked_out_of_the_key_leave_the_key_dump():
    from alignet_core.config import parse_config

    cfg = parse_config({"sample": {"n_workers": 7}, "embed": {"max_skipped_fraction": 0.5}})
    assert "n_workers" not in cfg.sample.key_dump() and "n_train" in cfg.sample.key_dump()
    assert cfg.embed.key_dump() == parse_config({}).embed.key_dump()
    assert cfg.sample.key_dump() == parse_config({}).sample.key_dump()
    assert cfg.distill.key_dump(exclude={"harmonize"}).keys() == cfg.distill.model_dump().keys() - {
        "devices", "nodes", "harmonize"}


def test_the_old_level_names_are_refused_naming_the_new_ones():
    """Issue 30: `global` and `local` invited a comparison with the paper's human-judged Levels; the taxonomy
    levels are named for what they are, and a config with the old names says which names replace them."""
    from alignet_core.config import parse_config

    with pytest.raises(ConfigError, match=r"human.proxy_mix.*global → category_boundary.*local → sibling_boundary"):
        parse_config({"human": {"proxy_mix": {"global": 0.5, "local": 0.5}}})
    with pytest.raises(ConfigError, match=r"evaluate.levels.*local → sibling_boundary"):
        parse_config({"evaluate": {"levels": ["class_boundary", "local"]}})
    cfg = parse_config({"human": {"proxy_mix": {"category_boundary": 1.0}},
                        "evaluate": {"levels": ["sibling_boundary", "class_boundary"]}})
    assert cfg.evaluate.levels == ["sibling_boundary", "class_boundary"]
    # the paper's Levels figures need the per-triplet response distributions they are agreement with
    with pytest.raises(ConfigError, match=r"paper_level.*response distributions"):
        parse_config({"evaluate": {"sets": [{"name": "levels", "triplets": "t.txt", "paper_level": "global"}]}})
