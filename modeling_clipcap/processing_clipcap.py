"""ClipCapProcessor: the image tower's image processor and the language model's tokenizer behind one object."""

from __future__ import annotations

import os
from typing import Any

from transformers import ProcessorMixin
from transformers.feature_extraction_utils import BatchFeature


def _prepare_images(images: Any) -> Any:
    """Decode paths/bytes and PIL images of any mode to upright RGB through ``image_io.load_image``.

    PIL images go through it too (RGB ones included): a lazily opened ``Image.open(...)`` of a
    truncated file then fails with ``ImageLoadError`` instead of an ``OSError`` deep inside the image
    processor, and a photo's EXIF orientation is applied exactly as when its path is passed.
    Arrays and tensors are passed to the image processor unchanged. Bad files raise ``ImageLoadError``
    (a ``ValueError``) naming the file.
    """
    from PIL import Image

    from .image_io import load_image

    def convert(item: Any) -> Any:
        if isinstance(item, (str, os.PathLike, bytes, bytearray, memoryview, dict, Image.Image)):
            return load_image(item)
        return item

    if isinstance(images, (list, tuple)):
        return [convert(item) for item in images]
    return convert(images)


class ClipCapProcessor(ProcessorMixin):
    """Turns images into ``pixel_values`` (B, 3, H, W) and captions/prompts into token ids, and decodes
    generated ids into clean caption strings.

    Args:
        image_processor: the image tower's own image processor (CLIP's by default; SigLIP's, DINOv2's,
            ConvNeXt's... for those towers).
        tokenizer: the language model's tokenizer. When it has no pad token, its eos token is used for padding.

    Example:

    ```python
    >>> from modeling_clipcap import ClipCapProcessor
    >>> processor = ClipCapProcessor.from_pretrained("path/to/clipcap-model")  # doctest: +SKIP
    >>> inputs = processor(images=[image], return_tensors="pt")  # doctest: +SKIP
    >>> captions = processor.batch_decode(model.generate(**inputs), skip_special_tokens=True)  # doctest: +SKIP
    ```
    """

    def __init__(self, image_processor=None, tokenizer=None, **kwargs):
        super().__init__(image_processor, tokenizer, **kwargs)
        if self.tokenizer is not None and self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token

    def __call__(
        self,
        images: Any = None,
        text: str | list[str] | None = None,
        return_tensors: str | None = "pt",
        padding_side: str = "left",
        **kwargs: Any,
    ) -> BatchFeature:
        """Process ``images`` (PIL images, file paths, encoded bytes, arrays, or a list of them) and/or ``text``.

        Returns a ``BatchFeature`` with ``pixel_values`` (B, 3, H, W) for images, and ``input_ids`` /
        ``attention_mask`` (B, L) for text. Text is a prompt for ``generate`` and is padded on the left by
        default (``padding_side="right"`` for training inputs).
        """
        if images is None and text is None:
            raise ValueError("ClipCapProcessor needs `images`, `text`, or both.")
        data: dict[str, Any] = {}
        if images is not None:
            if isinstance(images, (list, tuple)) and len(images) == 0:
                raise ValueError("`images` is an empty list; pass at least one image.")
            images = _prepare_images(images)
            image_kwargs = {
                k: v for k, v in kwargs.items() if k not in ("padding", "truncation", "max_length")
            }
            data.update(self.image_processor(images, return_tensors=return_tensors, **image_kwargs))
        if text is not None:
            text_kwargs = {k: kwargs[k] for k in ("padding", "truncation", "max_length") if k in kwargs}
            text_kwargs.setdefault("padding", True)
            previous_side = self.tokenizer.padding_side
            self.tokenizer.padding_side = padding_side
            try:
                encoded = self.tokenizer(text, return_tensors=return_tensors, **text_kwargs)
            finally:
                self.tokenizer.padding_side = previous_side
            data.update(encoded)
        return BatchFeature(data=data, tensor_type=return_tensors)

    def batch_decode(self, sequences: Any, skip_special_tokens: bool = True, **kwargs: Any) -> list[str]:
        """Decode generated ids (B, T) into captions, stripped of special tokens and surrounding spaces."""
        texts = self.tokenizer.batch_decode(sequences, skip_special_tokens=skip_special_tokens, **kwargs)
        return [t.strip() for t in texts]

    def decode(self, sequence: Any, skip_special_tokens: bool = True, **kwargs: Any) -> str:
        """Decode one generated sequence (T,) into a caption string."""
        return self.tokenizer.decode(sequence, skip_special_tokens=skip_special_tokens, **kwargs).strip()

    @classmethod
    def from_vision_text_pretrained(
        cls, vision_model_name_or_path: str, text_model_name_or_path: str, **kwargs: Any
    ) -> ClipCapProcessor:
        """The processor of ``ClipCapForConditionalGeneration.from_vision_text_pretrained(vision, text)``: the image
        processor saved with the vision checkpoint (one saved without it gets its family's own image processor,
        sized from its config: ``towers.default_image_processor``) and the tokenizer saved with the language model.
        ``kwargs`` (``revision``, ``cache_dir``, ``token``, ``local_files_only``...) go to both loaders."""
        from transformers import AutoConfig, AutoImageProcessor, AutoTokenizer
        from transformers.utils import logging as hf_logging

        from .towers import default_image_processor, vision_tower_config

        try:
            image_processor = AutoImageProcessor.from_pretrained(vision_model_name_or_path, **kwargs)
        except OSError:  # no preprocessor_config.json next to the tower
            config = vision_tower_config(AutoConfig.from_pretrained(vision_model_name_or_path, **kwargs))
            image_processor = default_image_processor(config)
            hf_logging.get_logger(__name__).warning(
                f"{vision_model_name_or_path} has no saved image processor; using {type(image_processor).__name__} "
                "sized from its config."
            )
        return cls(
            image_processor=image_processor,
            tokenizer=AutoTokenizer.from_pretrained(text_model_name_or_path, **kwargs),
        )

    @property
    def model_input_names(self) -> list[str]:
        image_names = getattr(self.image_processor, "model_input_names", None) or ["pixel_values"]
        return list(dict.fromkeys([*image_names, "input_ids", "attention_mask"]))


__all__ = ["ClipCapProcessor"]
