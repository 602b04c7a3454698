"""ClipCapProcessor: the image tower's image processor and the language model's tokenizer behind one object."""

from __future__ import annotations

import os
from typing import Any

from transformers import ProcessorMixin
from transformers.feature_extraction_utils import BatchFeature


def _to_rgb(image: Any) -> Any:
    """A PIL image upright (its EXIF orientation applied) and in RGB, transparency composited onto white (as
    transformers' ``convert_to_rgb`` does from 5.25 on; before, it dropped the alpha channel)."""
    from PIL import Image, ImageOps

    image = ImageOps.exif_transpose(image)
    if "A" in image.getbands() or "transparency" in image.info:
        background = Image.new("RGBA", image.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, image.convert("RGBA")).convert("RGB")
    return image.convert("RGB")


def _prepare_images(images: Any) -> Any:
    """Images as the image processor takes them: a file path or encoded bytes opened with PIL, and every PIL image
    made upright RGB (:func:`_to_rgb`); arrays and tensors unchanged.

    A file that cannot be read (or a lazily opened PIL image that cannot be decoded, or one over PIL's pixel limit)
    raises a ``ValueError`` naming it. The package's commands read files with ``modeling_clipcap.image_io`` first
    (a format allow-list, a pixel limit of its own, 16-bit images scaled, bad files skipped on request); this code
    travels with saved models, which load without the package.
    """
    import io
    import warnings

    from PIL import Image

    def convert(item: Any) -> Any:
        if not isinstance(item, (str, os.PathLike, bytes, bytearray, memoryview, Image.Image)):
            return item
        if isinstance(item, Image.Image):
            name = getattr(item, "filename", "") or "the PIL image"
        else:
            name = os.fspath(item) if isinstance(item, (str, os.PathLike)) else f"<{len(item)} bytes>"
        try:
            # PIL only warns between its pixel limit and twice that: refuse those bombs too
            with warnings.catch_warnings():
                warnings.simplefilter("error", Image.DecompressionBombWarning)
                if isinstance(item, Image.Image):
                    return _to_rgb(item)
                source = io.BytesIO(bytes(item)) if isinstance(item, (bytes, bytearray, memoryview)) else name
                with Image.open(source) as opened:
                    return _to_rgb(opened)  # a new, fully decoded image: the file can close
        except Exception as err:  # missing, empty, truncated, not an image, a bomb: any decoder's error
            raise ValueError(
                f"cannot read image {name}: {type(err).__name__}: {str(err).rstrip('.')}. Pass an image file PIL "
                "can open, or the decoded image."
            ) from err

    if isinstance(images, (list, tuple)):
        return [convert(item) for item in images]
    return convert(images)


DEFAULT_RETRIEVAL_TEMPLATE = "Similar images show {captions} This image shows"


def retrieval_prompt(captions: list[str], template: str = DEFAULT_RETRIEVAL_TEMPLATE) -> str:
    """The text prompt of a retrieval-augmented model (``ClipCapConfig.retrieval_k > 0``): ``template`` with
    ``{captions}`` replaced by the retrieved captions, each stripped, joined by single spaces (best first)."""
    if "{captions}" not in template:
        raise ValueError(f"retrieval_template must contain '{{captions}}', got {template!r}.")
    return template.replace("{captions}", " ".join(" ".join(str(c).split()) for c in captions))


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
        retrieved_captions: list[list[str]] | None = None,
        datastore: Any = None,
        retrieval_k: int = 4,
        retrieval_template: str = DEFAULT_RETRIEVAL_TEMPLATE,
        **kwargs: Any,
    ) -> BatchFeature:
        """Process ``images`` (PIL images, file paths, encoded bytes, arrays, or a list of them) and/or ``text``.

        Returns a ``BatchFeature`` with ``pixel_values`` (B, 3, H, W) for images, and ``input_ids`` /
        ``attention_mask`` (B, L) for text. Text is a prompt for ``generate`` and is padded on the left by
        default (``padding_side="right"`` for training inputs).

        Retrieval augmentation (a model with ``config.retrieval_k > 0``): ``retrieved_captions`` (per image a list
        of captions) become the prompt :func:`retrieval_prompt` (``retrieval_template``); or give a ``datastore``
        (``modeling_clipcap.retrieval.Datastore``, anything with ``retrieve(images, k)``) and the ``retrieval_k``
        nearest captions of each image are retrieved first. Pass the model's ``config.retrieval_k`` and
        ``config.retrieval_template``.
        """
        if images is None and text is None and retrieved_captions is None:
            raise ValueError("ClipCapProcessor needs `images`, `text`, or both.")
        data: dict[str, Any] = {}
        if images is not None:
            if isinstance(images, (list, tuple)) and len(images) == 0:
                raise ValueError("`images` is an empty list; pass at least one image.")
            images = _prepare_images(images)
            if datastore is not None and retrieved_captions is None:
                retrieved_captions = datastore.retrieve(
                    images if isinstance(images, list) else [images], retrieval_k
                )
            image_kwargs = {
                k: v for k, v in kwargs.items() if k not in ("padding", "truncation", "max_length")
            }
            data.update(self.image_processor(images, return_tensors=return_tensors, **image_kwargs))
        if retrieved_captions is not None:
            if text is not None:
                raise ValueError("Pass `text` or `retrieved_captions` (which make the prompt), not both.")
            text = [retrieval_prompt(list(captions), retrieval_template) for captions in retrieved_captions]
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


__all__ = ["ClipCapProcessor", "DEFAULT_RETRIEVAL_TEMPLATE", "retrieval_prompt"]
