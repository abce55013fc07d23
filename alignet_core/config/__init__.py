"""The pipeline's config: one section per stage (`config.<stage>`), the image source's (`io.source_config`)
and the human data's (`config.human`), nested in `PipelineConfig` (`config.pipeline`), which loads from
YAML. The sections live here, below the stages, because every layer reads the config."""

from alignet_core.config.pipeline import PipelineConfig, load_config, parse_config, with_overrides

__all__ = ["PipelineConfig", "load_config", "parse_config", "with_overrides"]
