"""ClipCap (CLIP prefix captioning) as a first-class transformers model.

Importing this package registers ``clipcap`` with ``AutoConfig``, ``AutoModel``,
``AutoModelForImageTextToText`` and ``AutoProcessor``, and marks the classes for remote code so that
``save_pretrained`` writes ``auto_map`` plus the code files (``trust_remote_code=True`` loading works
without this package).
"""

from transformers import AutoConfig, AutoModel, AutoModelForImageTextToText, AutoProcessor

from .configuration_clipcap import ClipCapConfig
from .modeling_clipcap import (
    ClipCapForConditionalGeneration,
    ClipCapMLPMapper,
    ClipCapOutput,
    ClipCapPreTrainedModel,
    ClipCapTransformerMapper,
)
from .processing_clipcap import ClipCapProcessor

__version__ = "0.2.0"

AutoConfig.register("clipcap", ClipCapConfig, exist_ok=True)
AutoModel.register(ClipCapConfig, ClipCapForConditionalGeneration, exist_ok=True)
AutoModelForImageTextToText.register(ClipCapConfig, ClipCapForConditionalGeneration, exist_ok=True)
AutoProcessor.register(ClipCapConfig, ClipCapProcessor, exist_ok=True)

ClipCapConfig.register_for_auto_class()
ClipCapForConditionalGeneration.register_for_auto_class("AutoModel")
ClipCapProcessor.register_for_auto_class("AutoProcessor")

from .pipeline import register_pipeline  # noqa: E402

register_pipeline()

__all__ = [
    "ClipCapConfig",
    "ClipCapForConditionalGeneration",
    "ClipCapMLPMapper",
    "ClipCapOutput",
    "ClipCapPreTrainedModel",
    "ClipCapProcessor",
    "ClipCapTransformerMapper",
]
