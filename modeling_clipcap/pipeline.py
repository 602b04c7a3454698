"""``pipeline("image-captioning", model=DIR)``: caption PIL images, paths or URLs-free inputs.

transformers 5 sends ``"image-to-text"`` to ``"image-text-to-text"``, which needs a text prompt and a
chat-style processor. ClipCap captions from the image alone, so this package registers its own task,
``"image-captioning"``, when ``modeling_clipcap`` is imported.
"""

from __future__ import annotations

from typing import Any

from transformers import Pipeline
from transformers.pipelines import PIPELINE_REGISTRY

TASK = "image-captioning"


class ClipCapCaptioningPipeline(Pipeline):
    """Caption images with a ClipCap model.

    Example:

    ```python
    >>> import modeling_clipcap
    >>> from transformers import pipeline
    >>> captioner = pipeline("image-captioning", model="path/to/clipcap-model")  # doctest: +SKIP
    >>> captioner([image1, image2], num_beams=5, max_new_tokens=30)  # doctest: +SKIP
    [{'generated_text': 'a dog runs on the grass.'}, {'generated_text': '...'}]
    ```
    """

    _load_processor = False
    _load_image_processor = True
    _load_feature_extractor = False
    _load_tokenizer = True

    def _sanitize_parameters(self, **kwargs: Any) -> tuple[dict, dict, dict]:
        forward_kwargs = {k: v for k, v in kwargs.items() if k != "timeout"}
        return {}, forward_kwargs, {}

    def preprocess(self, image: Any) -> dict[str, Any]:
        from .image_io import load_image

        pil = load_image(image)
        return self.image_processor(images=[pil], return_tensors="pt")

    def _forward(self, model_inputs: dict[str, Any], **generate_kwargs: Any) -> Any:
        # pixel_values (1, 3, H, W) and any other tensor the tower takes (SigLIP2's mask and spatial shapes)
        inputs = {k: v.to(self.model.device) for k, v in model_inputs.items() if hasattr(v, "to")}
        return self.model.generate(**inputs, **generate_kwargs)

    def postprocess(self, model_outputs: Any) -> list[dict[str, str]]:
        texts = self.tokenizer.batch_decode(model_outputs, skip_special_tokens=True)
        return [{"generated_text": t.strip()} for t in texts]


def register_pipeline() -> None:
    """Register the ``image-captioning`` task (idempotent)."""
    if TASK in PIPELINE_REGISTRY.supported_tasks:
        return
    from .modeling_clipcap import ClipCapForConditionalGeneration

    PIPELINE_REGISTRY.register_pipeline(
        TASK,
        pipeline_class=ClipCapCaptioningPipeline,
        pt_model=ClipCapForConditionalGeneration,
        type="multimodal",
    )
