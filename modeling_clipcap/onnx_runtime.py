"""Caption with an ONNX export (``clipcap export``) through ONNX Runtime, with transformers' own ``generate``.

[`ClipCapOnnxForConditionalGeneration`] is a ``PreTrainedModel`` + ``GenerationMixin`` whose ``forward`` runs the
exported decoder in an ONNX Runtime session and keeps the key/values in a transformers ``DynamicCache``; so greedy
search, beam search, sampling, ``num_return_sequences`` and every other ``generate`` option work as they do for
``ClipCapForConditionalGeneration``, from the same ``generation_config.json``. ``generate(pixel_values=...)`` runs
the exported image encoder once, then ``GenerationMixin.generate`` continues the prefix, as the PyTorch model does.
PyTorch is used for the tensors ``generate`` works on; the weights live only in the graphs.

```python
from modeling_clipcap.onnx_runtime import ClipCapOnnxForConditionalGeneration
from modeling_clipcap import ClipCapProcessor
model = ClipCapOnnxForConditionalGeneration.from_pretrained("path/to/clipcap-onnx")  # int8=True: int8 graphs
processor = ClipCapProcessor.from_pretrained("path/to/clipcap-onnx")
ids = model.generate(**processor(images=[image], return_tensors="pt"), num_beams=5, max_new_tokens=30)
```

Loading checks the folder against its ``onnx_manifest.json`` (each graph's presence, size, SHA-256 and input /
output names) and says what is wrong and what to do; the captioning path (``clipcap caption --backend onnx``,
``load_captioner``, the pipeline, ``clipcap app``) loads exported folders through here.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from transformers import DynamicCache, GenerationConfig, GenerationMixin, PreTrainedModel
from transformers.modeling_outputs import CausalLMOutputWithPast

from .compat import cache_kwargs, pop_cache_argument
from .configuration_clipcap import ClipCapConfig
from .modeling_clipcap import check_generation_kwargs, nearest_vocabulary_tokens
from .onnx_export import FORMAT, FORMAT_VERSION, GRAPHS, MANIFEST_NAME, file_sha256, require_onnx_packages
from .towers import check_pixel_values

__all__ = ["ClipCapOnnxForConditionalGeneration", "OnnxExportError", "is_onnx_export"]


class OnnxExportError(ValueError):
    """An exported folder is missing, incomplete or does not match its manifest; the message says what to do."""


def is_onnx_export(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a folder written by ``clipcap export`` (it holds ``onnx_manifest.json``)."""
    return (Path(path) / MANIFEST_NAME).is_file()


def _read_manifest(folder: Path) -> dict[str, Any]:
    path = folder / MANIFEST_NAME
    if not folder.is_dir():
        raise OnnxExportError(f"{folder} is not a folder; pass the folder written by `clipcap export`.")
    if not path.is_file():
        raise OnnxExportError(
            f"{folder} has no {MANIFEST_NAME}, so it is not an ONNX export; write one with "
            f"`clipcap export --model MODEL_DIR --output_dir {folder}`."
        )
    try:
        manifest = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise OnnxExportError(f"{path} cannot be read ({err}); export the model again.") from None
    if manifest.get("format") != FORMAT or manifest.get("format_version") != FORMAT_VERSION:
        raise OnnxExportError(
            f"{path} is not a {FORMAT} manifest of version {FORMAT_VERSION} (got format "
            f"{manifest.get('format')!r}, version {manifest.get('format_version')!r}); export the model again "
            "with this release of modeling_clipcap."
        )
    return manifest


def _check_graph_file(folder: Path, name: str, entry: dict[str, Any], verify: bool) -> Path:
    """The graph's path, after checking it exists and has the manifest's size (and SHA-256 with ``verify``)."""
    path = folder / entry["file"]
    again = f"export the model again (`clipcap export --model MODEL_DIR --output_dir {folder}`)"
    if not path.is_file():
        raise OnnxExportError(f"the {name} graph {path} is missing; {again}.")
    size = path.stat().st_size
    if size != entry["size"]:
        raise OnnxExportError(
            f"the {name} graph {path} has {size} bytes but the manifest says {entry['size']}: the file is truncated "
            f"or from another export; {again}."
        )
    if verify and file_sha256(path) != entry["sha256"]:
        raise OnnxExportError(
            f"the {name} graph {path} does not match the SHA-256 in {MANIFEST_NAME}: it was changed or comes from "
            f"another export; {again}."
        )
    return path


def _session(path: Path, name: str, entry: dict[str, Any], options: Any) -> Any:
    """An ONNX Runtime CPU session for one graph, with its input and output names checked against the manifest."""
    import onnxruntime as ort

    try:
        session = ort.InferenceSession(str(path), sess_options=options, providers=["CPUExecutionProvider"])
    except Exception as err:  # onnxruntime raises its own exception types for unreadable graphs
        raise OnnxExportError(
            f"ONNX Runtime cannot load the {name} graph {path} ({type(err).__name__}: {err}); export the model "
            "again."
        ) from err
    inputs = [i.name for i in session.get_inputs()]
    outputs = [o.name for o in session.get_outputs()]
    if inputs != entry["inputs"] or outputs != entry["outputs"]:
        raise OnnxExportError(
            f"the {name} graph {path} has inputs {inputs} and outputs {outputs}, but {MANIFEST_NAME} says "
            f"{entry['inputs']} and {entry['outputs']}: the graph does not belong to this export; export the "
            "model again."
        )
    return session


class ClipCapOnnxForConditionalGeneration(PreTrainedModel, GenerationMixin):
    """A ClipCap model exported by ``clipcap export``, run by ONNX Runtime on CPU; ``generate`` as in
    ``ClipCapForConditionalGeneration`` (images in, generated token ids out).

    Build it with [`~ClipCapOnnxForConditionalGeneration.from_pretrained`] on an exported folder.
    """

    config_class = ClipCapConfig
    main_input_name = "input_ids"

    def __init__(
        self, config: ClipCapConfig, sessions: dict[str, Any] | None = None, manifest: dict | None = None
    ):
        super().__init__(config)
        self.sessions = sessions or {}
        self.manifest = manifest or {}
        cache = self.manifest.get("cache", {})
        self._num_layers = cache.get("num_layers", 0)
        self._kv_shape = (cache.get("num_key_value_heads", 0), cache.get("head_dim", 0))
        self.int8 = False
        self.post_init()

    @property
    def device(self) -> torch.device:
        return torch.device("cpu")

    @property
    def dtype(self) -> torch.dtype:
        return torch.float32

    # ------------------------------------------------------------------ loading

    @classmethod
    def from_pretrained(
        cls,
        folder: str | os.PathLike,
        *,
        int8: bool = False,
        num_threads: int | None = None,
        verify: bool = True,
        **unused: Any,
    ) -> ClipCapOnnxForConditionalGeneration:
        """Load an exported folder.

        Args:
            folder: written by ``clipcap export`` / :func:`modeling_clipcap.onnx_export.export_onnx`.
            int8: run the int8 graphs (the folder must have been exported with ``--int8``).
            num_threads: ONNX Runtime intra-op threads (default: ``torch.get_num_threads()``).
            verify: check each graph's SHA-256 against the manifest (sizes and names are always checked).

        Raises:
            OnnxExportError: the folder is not an export, lacks a graph, a graph is truncated or does not match the
                manifest, the int8 graphs are missing, or the config does not match the graphs.
        """
        require_onnx_packages(OnnxExportError)
        import onnxruntime as ort

        # what pipeline("image-captioning", model=FOLDER) passes when it tries this class (after the PyTorch one);
        # the folder is local, so the Hub's download options do not apply
        for name in (
            "_from_pipeline",
            "_commit_hash",
            "revision",
            "token",
            "local_files_only",
            "trust_remote_code",
        ):
            unused.pop(name, None)
        if unused.pop("dtype", None) not in (None, "auto", torch.float32):
            raise ValueError("an ONNX export runs in float32 (or int8=True); drop the dtype.")
        if unused:
            raise TypeError(f"unexpected arguments for an ONNX export: {sorted(unused)}")
        folder = Path(folder)
        manifest = _read_manifest(folder)
        entries = dict(manifest["graphs"])
        if int8:
            if not manifest.get("int8_graphs"):
                raise OnnxExportError(
                    f"{folder} has no int8 graphs; export with them: `clipcap export --model MODEL_DIR "
                    f"--output_dir {folder} --int8`."
                )
            entries.update(manifest["int8_graphs"])
        missing = set(GRAPHS) - set(entries)
        if missing:
            raise OnnxExportError(
                f"{MANIFEST_NAME} of {folder} lists no {sorted(missing)} graph; export again."
            )
        paths = {name: _check_graph_file(folder, name, entries[name], verify) for name in GRAPHS}
        try:
            config = ClipCapConfig.from_pretrained(str(folder))
        except Exception as err:
            raise OnnxExportError(
                f"cannot read the config of {folder} ({err}); export the model again."
            ) from err
        if config.prefix_length != manifest.get("prefix_length"):
            raise OnnxExportError(
                f"config.json of {folder} has prefix_length {config.prefix_length} but the graphs were exported with "
                f"{manifest.get('prefix_length')}: the config belongs to another model; export the model again."
            )
        options = ort.SessionOptions()
        options.intra_op_num_threads = num_threads or torch.get_num_threads()
        options.inter_op_num_threads = 1
        sessions = {name: _session(paths[name], name, entries[name], options) for name in GRAPHS}
        model = cls(config, sessions=sessions, manifest=manifest)
        model.int8 = int8
        model.name_or_path = str(folder)
        if (folder / "generation_config.json").is_file():
            model.generation_config = GenerationConfig.from_pretrained(str(folder))
        return model.eval()

    # ------------------------------------------------------------------ graphs

    def _run(self, name: str, **feeds: torch.Tensor) -> list[torch.Tensor]:
        outputs = self.sessions[name].run(
            None, {k: v.detach().contiguous().numpy() for k, v in feeds.items()}
        )
        return [torch.from_numpy(o) for o in outputs]

    def get_prefix(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Images (B, 3, H, W) -> the prefix (B, K, E) the language model continues (the image-encoder graph)."""
        check_pixel_values(self.config.vision_config, pixel_values)  # the checks of the PyTorch model
        if pixel_values.shape[0] == 0:
            raise ValueError("Got an empty batch (0 images); pass at least one image.")
        return self._run("image_encoder", pixel_values=pixel_values.float())[0]

    def get_input_embeddings_matrix(self) -> torch.Tensor:
        """The language model's input embeddings of the whole vocabulary (V, E), computed once by the graph."""
        if getattr(self, "_vocab_embeddings", None) is None:
            vocab = self.config.text_config.vocab_size
            self._vocab_embeddings = self.embed_tokens(torch.arange(vocab).unsqueeze(0))[0]
        return self._vocab_embeddings

    @torch.no_grad()
    def interpret_prefix(
        self, pixel_values: torch.Tensor, tokenizer: Any = None, top_k: int = 1
    ) -> list[list[Any]]:
        """Nearest vocabulary tokens of each prefix vector, as ``ClipCapForConditionalGeneration.interpret_prefix``:
        one list of K entries per image of ``pixel_values`` (B, 3, H, W)."""
        if not isinstance(top_k, int) or top_k < 1:
            raise ValueError(f"`top_k` must be a positive integer, got {top_k!r}.")
        vocab = self.get_input_embeddings_matrix()
        return nearest_vocabulary_tokens(self.get_prefix(pixel_values), vocab, tokenizer, top_k)

    def embed_tokens(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Token ids (B, S) -> the language model's input embeddings (B, S, E)."""
        return self._run("embed_tokens", input_ids=input_ids.long())[0]

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Any = None,
        use_cache: bool | None = None,
        **kwargs: Any,
    ) -> CausalLMOutputWithPast:
        """One decoding step of the exported language model.

        Args:
            input_ids: (B, S) new tokens, or
            inputs_embeds: (B, S, E) their embeddings (the image prefix at the first step).
            attention_mask: (B, P + S) over the cached and the new positions (default: all attended).
            position_ids: (B, S) positions of the new tokens (default: from the mask).
            cache: a ``DynamicCache`` with the P cached positions (``past_key_values`` before transformers 5.24), or
                ``None``; it is extended in place with the new positions.
            use_cache: ``False``: no cache is returned (``generate(use_cache=False)`` re-runs the whole sequence).

        Returns:
            ``CausalLMOutputWithPast`` with ``logits`` (B, 1, V) of the last position and the cache.
        """
        cache = pop_cache_argument(cache, kwargs)
        if inputs_embeds is None:
            if input_ids is None:
                raise ValueError("pass `input_ids` or `inputs_embeds`.")
            inputs_embeds = self.embed_tokens(input_ids)
        batch, new = inputs_embeds.shape[:2]
        past = 0 if cache is None else int(cache.get_seq_length())
        if attention_mask is None:
            attention_mask = torch.ones(batch, past + new, dtype=torch.long)
        if position_ids is None:
            position_ids = (attention_mask.long().cumsum(-1) - 1).clamp_min(0)[:, -new:]
        feeds = {
            "inputs_embeds": inputs_embeds.float(),
            "attention_mask": attention_mask.long(),
            "position_ids": position_ids.long(),
        }
        empty = torch.zeros(batch, *self._kv_shape[:1], 0, self._kv_shape[1])
        for i in range(self._num_layers):
            layer = cache.layers[i] if past else None
            feeds[f"past.{i}.key"] = layer.keys if layer is not None else empty
            feeds[f"past.{i}.value"] = layer.values if layer is not None else empty
        logits, *new_kv = self._run("decoder", **feeds)
        if use_cache is False:
            return CausalLMOutputWithPast(logits=logits)
        if cache is None:
            cache = DynamicCache(config=self.config.get_text_config(decoder=True))
        for i in range(self._num_layers):
            cache.update(new_kv[2 * i], new_kv[2 * i + 1], i)
        return CausalLMOutputWithPast(logits=logits, **cache_kwargs(cache))

    @torch.no_grad()
    def generate(
        self,
        inputs: torch.Tensor | None = None,
        *,
        pixel_values: torch.FloatTensor | None = None,
        **generate_kwargs: Any,
    ) -> torch.LongTensor | Any:
        """Caption images (``pixel_values`` (B, 3, H, W)) with any ``transformers`` decoding strategy.

        ``generate_kwargs`` are ``GenerationMixin.generate``'s (``num_beams``, ``do_sample``, ``max_new_tokens``,
        ``num_return_sequences``, ``return_dict_in_generate``...). Returns the generated token ids
        (B * num_return_sequences, T), or a ``GenerateOutput`` when asked, as ``ClipCapForConditionalGeneration``.
        """
        refused = [
            k for k in ("image_embeds", "input_ids", "inputs_embeds") if generate_kwargs.get(k) is not None
        ]
        if inputs is not None or refused:
            raise ValueError(
                f"the ONNX export captions from pixel_values alone; {refused or ['a text prompt']} is not supported "
                "here (use the PyTorch model for prompts and precomputed image_embeds)."
            )
        if pixel_values is None:
            raise ValueError(
                "pass the images as `pixel_values` (B, 3, H, W), e.g. from the export's processor."
            )
        config = generate_kwargs.get("generation_config") or self.generation_config
        unsupported = {
            "use_cache": generate_kwargs.get("use_cache", getattr(config, "use_cache", True)) is False,
            "prompt_lookup_num_tokens": bool(
                generate_kwargs.get(
                    "prompt_lookup_num_tokens", getattr(config, "prompt_lookup_num_tokens", None)
                )
            ),
        }
        for name, asked in unsupported.items():
            if asked:
                raise ValueError(
                    f"the ONNX export decodes with its key/value cache, one token at a time; `{name}` is not "
                    "supported here (the PyTorch model supports it)."
                )
        check_generation_kwargs(self.config, self.generation_config, None, generate_kwargs)
        prefix = self.get_prefix(pixel_values)  # (B, K, E)
        mask = torch.ones(prefix.shape[:2], dtype=torch.long)
        return super().generate(inputs_embeds=prefix, attention_mask=mask, **generate_kwargs)
