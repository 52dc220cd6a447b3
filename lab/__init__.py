"""deberta-lab: a research workbench for DeBERTaV3 (RTD pre-training, embedding sharing, GLUE)."""

from lab.hf import from_pretrained, save_pretrained
from lab.model import Encoder, ModelConfig, count_parameters, preset

__all__ = ["Encoder", "ModelConfig", "count_parameters", "from_pretrained", "preset", "save_pretrained"]
