"""`evaluate` module: CLIPScore and RefCLIPScore (Hessel et al., 2021) with a local CLIP model.

A thin wrapper over :func:`modeling_clipcap.clip_score.compute_clip_score`; load it offline
from this folder::

    import evaluate
    clipscore = evaluate.load("path/to/metrics/clipscore", clip_model="path/to/clip-vit-base-patch32")
    clipscore.compute(predictions=["a dog runs."], references=[["a running dog"]], images=["dog.jpg"])
"""

from __future__ import annotations

from typing import Any

import datasets
import evaluate

from modeling_clipcap.clip_score import CLIPSCORE_PROMPT, CLIPSCORE_W, compute_clip_score, load_clip

_DESCRIPTION = """\
CLIPScore is a reference-free caption metric: CLIP-S(c, v) = w * max(cos(E_image(v), E_text(c)), 0)
with w = 2.5 and the caption prefixed with "A photo depicts". RefCLIP-S is the harmonic mean of
CLIP-S and max(max_r cos(E_text(c), E_text(r)), 0) over the references r. The corpus score is the
mean over images; papers print it x100. The paper used OpenAI's CLIP ViT-B/32: pass a local copy
of it (e.g. a saved openai/clip-vit-base-patch32) to compare with published numbers.
"""

_CITATION = """\
@inproceedings{hessel2021clipscore,
  title={{CLIPScore}: A Reference-free Evaluation Metric for Image Captioning},
  author={Hessel, Jack and Holtzman, Ari and Forbes, Maxwell and Le Bras, Ronan and Choi, Yejin},
  booktitle={EMNLP},
  year={2021}
}
"""

_KWARGS_DESCRIPTION = """
Args:
    predictions (list of str): one caption per image.
    references (list of list of str): reference captions per image, used for RefCLIP-S; pass
        empty lists for CLIP-S only.
    images (list of PIL images or paths): the images, in the order of predictions.
    clip_model (str, optional): local directory of a transformers CLIPModel + CLIPProcessor; may
        also be given once to evaluate.load(..., clip_model=...).
    model, processor (optional): an already loaded CLIPModel and CLIPProcessor instead of clip_model.
    batch_size (int, optional): images/texts per forward pass. Default 32.
    per_image (bool, optional): also return per-image scores. Default False.
Returns:
    dict: "CLIP-S", "RefCLIP-S" (with references), "num_images" (+ "*_per_image" lists).
"""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class Clipscore(evaluate.Metric):
    """CLIP-S and RefCLIP-S with a local CLIP model."""

    def __init__(self, clip_model: str | None = None, device: str | None = None, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._clip_model_path = clip_model
        self._device = device
        self._loaded: dict[str, tuple[Any, Any]] = {}

    def _info(self) -> evaluate.MetricInfo:
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features(
                {
                    "predictions": datasets.Value("string"),
                    "references": datasets.Sequence(datasets.Value("string")),
                }
            ),
            reference_urls=["https://arxiv.org/abs/2104.08718"],
        )

    def _compute(
        self,
        predictions: list[str],
        references: list[list[str]],
        images: list | None = None,
        clip_model: str | None = None,
        model: Any = None,
        processor: Any = None,
        batch_size: int = 32,
        w: float = CLIPSCORE_W,
        prompt: str | None = CLIPSCORE_PROMPT,
        per_image: bool = False,
    ) -> dict:
        if images is None:
            raise ValueError(
                "clipscore needs the images: compute(predictions=..., references=..., images=[...])"
            )
        if model is None or processor is None:
            path = clip_model or self._clip_model_path
            if path is None:
                raise ValueError(
                    "clipscore needs a CLIP model: evaluate.load(..., clip_model=DIR) or compute(..., clip_model=DIR) "
                    "with DIR a local CLIPModel folder, or compute(..., model=CLIPModel, processor=CLIPProcessor)"
                )
            if str(path) not in self._loaded:
                self._loaded[str(path)] = load_clip(path, device=self._device)
            model, processor = self._loaded[str(path)]
        return compute_clip_score(
            model,
            processor,
            images,
            predictions,
            references,
            batch_size=batch_size,
            w=w,
            prompt=prompt,
            per_image=per_image,
        )
