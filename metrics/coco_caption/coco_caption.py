"""`evaluate` module: COCO caption metrics (BLEU-1..4, METEOR, ROUGE-L, CIDEr-D; SPICE when asked) via pycocoevalcap.

A thin wrapper over :func:`modeling_clipcap.caption_metrics.compute_caption_metrics`; load it
offline from this folder::

    import evaluate
    coco = evaluate.load("path/to/metrics/coco_caption")
    coco.compute(predictions=["a dog runs."], references=[["A dog is running.", "a running dog"]])
"""

from __future__ import annotations

import datasets
import evaluate

from modeling_clipcap.caption_metrics import compute_caption_metrics

_DESCRIPTION = """\
The COCO caption evaluation protocol: captions and references are tokenized with the
Stanford PTB tokenizer (lowercased, punctuation removed) and scored by pycocoevalcap's BLEU-1..4,
METEOR 1.5, ROUGE-L and CIDEr-D, and SPICE when asked for (spice=True or None): SPICE is off by
default because it needs the Stanford CoreNLP 3.6.0 jars, which pycocoevalcap downloads from the
Stanford NLP site at first use (no package archive ships them), and a Java <= 11. Keys are
pycocoevalcap's (Bleu_1 .. Bleu_4, METEOR, ROUGE_L, CIDEr, SPICE); scores are 0-1 (CIDEr 0-10) and
papers print them x100. Metrics not computed (SPICE unless asked; METEOR and the tokenizer need
Java) are listed under "skipped" with the reason and never reported as 0.
"""

_CITATION = """\
@inproceedings{chen2015microsoft,
  title={Microsoft COCO Captions: Data Collection and Evaluation Server},
  author={Chen, Xinlei and Fang, Hao and Lin, Tsung-Yi and Vedantam, Ramakrishna and Gupta, Saurabh and Doll{\\'a}r, Piotr and Zitnick, C. Lawrence},
  journal={arXiv preprint arXiv:1504.00325},
  year={2015}
}
"""

_KWARGS_DESCRIPTION = """
Args:
    predictions (list of str): one generated caption per image.
    references (list of list of str): the reference captions of each image (any number >= 1),
        raw text; a single string per image is accepted too.
    image_ids (list, optional): ids of the images, in the order of predictions (default 0..N-1);
        they key "per_image".
    spice (bool or None, optional): False (default) skips SPICE (listed under "skipped" with why);
        True requires it (an error when it cannot run); None computes it when it can run and otherwise
        reports it under "skipped" with what is missing.
    meteor (bool, optional): False skips METEOR (about 10 s of java start-up). Default True.
    per_image (bool, optional): also return per-image scores under "per_image". Default False.
Returns:
    dict: Bleu_1..Bleu_4, METEOR, ROUGE_L, CIDEr, SPICE (those computed), "skipped" ({metric: reason}),
    "tokenizer" ("ptb", or "simple" without java), "num_images", "num_references".
Examples:
    >>> coco = evaluate.load("metrics/coco_caption")
    >>> out = coco.compute(predictions=["a man riding a horse"], references=[["A man riding a horse."]])
    >>> round(out["Bleu_4"], 6)
    1.0
"""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class CocoCaption(evaluate.Metric):
    """COCO caption metrics (pycocoevalcap after the PTB tokenizer)."""

    def _info(self) -> evaluate.MetricInfo:
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            features=[
                datasets.Features(
                    {
                        "predictions": datasets.Value("string"),
                        "references": datasets.Sequence(datasets.Value("string")),
                    }
                ),
                datasets.Features(
                    {"predictions": datasets.Value("string"), "references": datasets.Value("string")}
                ),
            ],
            reference_urls=["https://github.com/salaniz/pycocoevalcap", "https://arxiv.org/abs/1504.00325"],
        )

    def _compute(
        self,
        predictions: list[str],
        references: list,
        image_ids: list | None = None,
        spice: bool | None = False,
        meteor: bool = True,
        per_image: bool = False,
    ) -> dict:
        if image_ids is None:
            image_ids = list(range(len(predictions)))
        image_ids = list(image_ids)
        if len(image_ids) != len(predictions):
            raise ValueError(f"image_ids has {len(image_ids)} entries for {len(predictions)} predictions")
        if len(set(image_ids)) != len(image_ids):
            raise ValueError("image_ids must be unique: give one prediction per image")
        refs = [[r] if isinstance(r, str) else list(r) for r in references]
        return compute_caption_metrics(
            dict(zip(image_ids, predictions)),
            dict(zip(image_ids, refs)),
            spice=spice,
            meteor=meteor,
            per_image=per_image,
        )
