"""``pipeline("image-captioning", model=DIR)``: caption PIL images, paths or URLs-free inputs.

transformers 5 sends ``"image-to-text"`` to ``"image-text-to-text"``, which needs a text prompt and a
chat-style processor. ClipCap captions from the image alone, so this package registers its own task,
``"image-captioning"``, when ``modeling_clipcap`` is imported. The pipeline captions through the library's one
captioning path (:func:`modeling_clipcap.captioning.caption_items`): a list of images is batched by
``batch_size``, and an image that cannot be read raises its ``ImageLoadError``. ``model`` may also be a folder
written by ``clipcap export`` (ONNX Runtime).
"""

from __future__ import annotations

import types
from collections.abc import Iterable, Iterator
from typing import Any

import torch
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
    [[{'generated_text': 'a dog runs on the grass.'}], [{'generated_text': '...'}]]
    ```
    """

    _load_processor = False
    _load_image_processor = True
    _load_feature_extractor = False
    _load_tokenizer = True

    def __call__(self, inputs: Any, *args: Any, batch_size: int | None = None, **kwargs: Any) -> Any:
        """Captions of one image (a list of ``{"generated_text"}``, one per returned sequence), of a list of images
        (a list of those), or of a generator / torch ``Dataset`` of images (an iterator of those)."""
        if args:
            raise TypeError(f"pass generation settings by keyword, not {args!r}")
        _, generate_kwargs, _ = self._sanitize_parameters(**kwargs)
        generate_kwargs = {**self._forward_params, **generate_kwargs}
        batch_size = batch_size or self._batch_size or 1
        if isinstance(inputs, list):
            return list(self._captions(inputs, batch_size, generate_kwargs))
        if isinstance(inputs, (types.GeneratorType, torch.utils.data.Dataset)):  # streamed lazily
            return self._captions(inputs, batch_size, generate_kwargs)
        return next(self._captions([inputs], 1, generate_kwargs))

    def _captions(
        self, images: Iterable[Any], batch_size: int, generate_kwargs: dict[str, Any]
    ) -> Iterator[list[dict[str, str]]]:
        from .captioning import caption_items
        from .processing_clipcap import ClipCapProcessor

        processor = ClipCapProcessor(image_processor=self.image_processor, tokenizer=self.tokenizer)
        for _, captions, _ in caption_items(
            self.model, processor, images, batch_size=batch_size, on_bad_image="fail", **generate_kwargs
        ):
            yield [{"generated_text": caption} for caption in captions]

    # Pipeline's per-input steps, for code that calls them directly; __call__ batches through the same path.
    def _sanitize_parameters(self, **kwargs: Any) -> tuple[dict, dict, dict]:
        forward_kwargs = {k: v for k, v in kwargs.items() if k not in ("timeout", "num_workers")}
        return {}, forward_kwargs, {}

    def preprocess(self, image: Any) -> dict[str, Any]:
        return {"image": image}

    def _forward(self, model_inputs: dict[str, Any], **generate_kwargs: Any) -> list[dict[str, str]]:
        return next(self._captions([model_inputs["image"]], 1, generate_kwargs))

    def postprocess(self, model_outputs: list[dict[str, str]]) -> list[dict[str, str]]:
        return model_outputs


def register_pipeline() -> None:
    """Register the ``image-captioning`` task (idempotent)."""
    if TASK in PIPELINE_REGISTRY.supported_tasks:
        return
    from .modeling_clipcap import ClipCapForConditionalGeneration
    from .onnx_runtime import ClipCapOnnxForConditionalGeneration

    PIPELINE_REGISTRY.register_pipeline(
        TASK,
        pipeline_class=ClipCapCaptioningPipeline,
        # a folder is loaded by the first class that can: a saved model, else a `clipcap export` folder
        pt_model=(ClipCapForConditionalGeneration, ClipCapOnnxForConditionalGeneration),
        type="multimodal",
    )
