"""The one place where images enter the package from files, bytes or PIL objects.

Everything that reads user images (the processor, ``clipcap caption``, ``clipcap evaluate``,
the training data readers and the embedding cache) goes through :func:`load_image`, so every
bad file fails the same way: an :class:`ImageLoadError` (a ``ValueError``) whose message names
the file, says what is wrong with it and what to do. What a caller does with such a file is one
policy, ``on_bad_image`` (:data:`BAD_IMAGE_POLICIES`, checked by :func:`check_bad_image_policy`):
stop at it, or skip it and list it.

What :func:`load_image` guarantees
----------------------------------
* The result is a fully decoded ``PIL.Image.Image`` in mode ``"RGB"``, at least 1x1 pixels,
  not tied to any open file.
* Missing files, directories, empty (0-byte) files, truncated or corrupt files and files that
  are not images raise :class:`ImageLoadError`. The image is decoded completely
  (``Image.load()``) inside the error handling, so truncation is detected here and not later in
  some unrelated place.
* Images larger than ``max_pixels`` (default :data:`DEFAULT_MAX_PIXELS`, 89,478,485 pixels
  like PIL's own limit) are refused *before* decoding (decompression-bomb protection). PIL's
  ``DecompressionBombWarning`` / ``DecompressionBombError`` also become :class:`ImageLoadError`.
  PIL itself refuses images above twice its global ``PIL.Image.MAX_IMAGE_PIXELS``; to accept
  images larger than that, raise that global as well.
* Only common raster formats are decoded by default (:data:`DEFAULT_FORMATS`); exotic PIL
  plugins (EPS, which calls Ghostscript, scientific formats, ...) are never tried on untrusted
  input unless passed explicitly in ``formats``.
* Colour modes are converted correctly: grayscale (``L``, ``1``), grayscale + alpha, RGBA and
  palette images with transparency are composited onto a white background; CMYK and YCbCr are
  converted by PIL; 16-bit (``I;16*``) and 32-bit integer (``I``) images are scaled to 8 bits
  (``I`` images whose values fit 0..255 are kept, 0..65535 are divided by 257, wider ranges are
  min-max scaled); float (``F``) images in 0..1 are scaled by 255, others are min-max scaled.
* The EXIF orientation tag is applied (``ImageOps.exif_transpose``), so phone photos come out
  upright. An unreadable EXIF block leaves the image as stored (with a warning).
* Animated / multi-frame files give their first frame.
"""

from __future__ import annotations

import io
import os
import warnings
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any, Union

import numpy as np
from PIL import Image, ImageOps

__all__ = [
    "BAD_IMAGE_POLICIES",
    "DEFAULT_FORMATS",
    "DEFAULT_MAX_PIXELS",
    "IMAGE_EXTENSIONS",
    "ImageLoadError",
    "ImageSource",
    "check_bad_image_policy",
    "describe_source",
    "list_image_files",
    "load_image",
    "load_images",
]

#: Largest image (width * height) accepted by default: the same number as PIL's own limit.
DEFAULT_MAX_PIXELS: int = 89_478_485

#: PIL format names tried by default. Others (EPS runs Ghostscript!) only on request.
DEFAULT_FORMATS: tuple[str, ...] = (
    "JPEG",
    "MPO",
    "PNG",
    "GIF",
    "BMP",
    "DIB",
    "TIFF",
    "WEBP",
    "PPM",
    "ICO",
    "TGA",
    "JPEG2000",
    "AVIF",
    "QOI",
)

#: File name extensions (lower case) that :func:`list_image_files` treats as images.
IMAGE_EXTENSIONS: frozenset[str] = frozenset(
    {
        ".jpg",
        ".jpeg",
        ".jpe",
        ".jfif",
        ".png",
        ".gif",
        ".bmp",
        ".dib",
        ".tif",
        ".tiff",
        ".webp",
        ".ppm",
        ".pgm",
        ".pbm",
        ".pnm",
        ".ico",
        ".tga",
        ".jp2",
        ".j2k",
        ".avif",
        ".qoi",
        ".mpo",
    }
)

ImageSource = Union[str, os.PathLike, bytes, bytearray, memoryview, Image.Image, dict, Any]
"""What :func:`load_image` accepts: a path, raw encoded bytes, a binary file object, a PIL image,
or a ``datasets.Image(decode=False)`` dict ``{"bytes": ..., "path": ...}``."""


class ImageLoadError(ValueError):
    """An image could not be read. The message names the file and says what to do."""

    def __init__(self, message: str, source: str | None = None):
        super().__init__(message)
        self.source = source


#: The values of ``on_bad_image`` (the flag ``--on_bad_image`` of every command that reads images): what to do
#: with an image that cannot be read. ``"fail"`` stops with an :class:`ImageLoadError` naming it; ``"skip"``
#: leaves it out and lists it with the reason; ``"error"`` is another name for ``"fail"``.
BAD_IMAGE_POLICIES: tuple[str, ...] = ("fail", "skip", "error")
_POLICY_ALIASES: dict[str, str] = {"error": "fail"}


def check_bad_image_policy(on_bad_image: str) -> str:
    """The bad-image policy ``on_bad_image`` names, as ``"fail"`` or ``"skip"`` (``"error"`` gives ``"fail"``).

    Raises:
        ValueError: ``on_bad_image`` is not one of :data:`BAD_IMAGE_POLICIES`.
    """
    if on_bad_image not in BAD_IMAGE_POLICIES:
        raise ValueError(
            f"on_bad_image must be 'fail' (or its other name 'error') or 'skip', got {on_bad_image!r}."
        )
    return _POLICY_ALIASES.get(on_bad_image, on_bad_image)


def describe_source(source: Any) -> str:
    """A short human-readable name for an image source, used in error messages."""
    if isinstance(source, (str, os.PathLike)):
        return str(source)
    if isinstance(source, (bytes, bytearray, memoryview)):
        return f"<{len(source)} bytes of image data>"
    if isinstance(source, dict):
        if source.get("path"):
            return str(source["path"])
        data = source.get("bytes")
        return f"<{len(data) if data is not None else 0} bytes of image data>"
    if isinstance(source, Image.Image):
        name = getattr(source, "filename", "") or ""
        return name or f"<PIL image {source.mode} {source.size[0]}x{source.size[1]}>"
    name = getattr(source, "name", None)
    return str(name) if name else f"<{type(source).__name__} object>"


def _fail(name: str, problem: str, advice: str) -> ImageLoadError:
    return ImageLoadError(f"cannot read image {name}: {problem}. {advice}", source=name)


_REDOWNLOAD = "Re-download or re-export the file, or remove it (training/caching: use on_bad_image='skip')."


def _to_rgb(img: Image.Image) -> Image.Image:
    """Convert any PIL mode to RGB, compositing transparency onto white. Returns a new image."""
    mode = img.mode
    if mode == "RGB":
        return img.copy()
    if mode.startswith("I;16") or mode == "I" or mode == "F":
        arr = np.asarray(img)
        if arr.ndim != 2:  # pragma: no cover - PIL's integer modes are single-band
            arr = arr.reshape(img.size[1], img.size[0])
        arr = arr.astype(np.float64)
        finite = np.isfinite(arr)
        if not finite.all():
            arr = np.where(finite, arr, 0.0)
        lo, hi = (float(arr.min()), float(arr.max())) if arr.size else (0.0, 0.0)
        if mode == "F" and lo >= 0.0 and hi <= 1.0:
            arr = arr * 255.0
        elif mode.startswith("I;16") or (mode == "I" and lo >= 0 and hi <= 65535 and hi > 255):
            arr = arr / 257.0
        elif lo >= 0 and hi <= 255:
            pass
        else:  # signed or wider than 16 bits: stretch to 0..255
            arr = (arr - lo) * (255.0 / (hi - lo)) if hi > lo else np.zeros_like(arr)
        gray = Image.fromarray(np.clip(np.rint(arr), 0, 255).astype(np.uint8), mode="L")
        return gray.convert("RGB")
    has_alpha = mode in ("RGBA", "LA", "PA", "RGBa", "La") or (
        mode in ("P", "L", "RGB", "1") and "transparency" in img.info
    )
    if has_alpha:
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return img.convert("RGB")


def _installed(formats: Sequence[str] | None) -> list[str] | None:
    """The requested PIL format names that this PIL can open (JPEG also opens MPO files)."""
    if formats is None:
        return None
    Image.init()
    return [f for f in formats if f in Image.OPEN]


def _open_decoded(fp: Any, name: str, max_pixels: int | None, formats: Sequence[str] | None) -> Image.Image:
    """Open, bomb-check, fully decode, orient and convert one image. Errors become ImageLoadError."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            warnings.filterwarnings("error", message="Truncated File Read")  # TIFF only warns otherwise
            img = Image.open(fp, formats=_installed(formats))
            width, height = img.size
            if width < 1 or height < 1:
                raise _fail(name, f"it has an empty size {width}x{height}", _REDOWNLOAD)
            if max_pixels is not None and width * height > max_pixels:
                raise _fail(
                    name,
                    f"it is {width}x{height} = {width * height:,} pixels, more than the limit of "
                    f"{max_pixels:,} (decompression-bomb protection)",
                    "Shrink the image, or raise the limit with max_pixels=... if you trust the file.",
                )
            img.load()  # full decode here, so truncation is detected inside this try
    except ImageLoadError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as err:
        raise _fail(
            name,
            f"PIL refused it as a possible decompression bomb ({err})",
            "Shrink the image, or raise PIL.Image.MAX_IMAGE_PIXELS and max_pixels if you trust the file.",
        ) from err
    except Image.UnidentifiedImageError as err:
        allowed = ", ".join(formats) if formats is not None else "any PIL format"
        raise _fail(
            name,
            f"it is not an image in a supported format ({allowed})",
            "Check that the file is really an image (not an HTML error page or a text file); " + _REDOWNLOAD,
        ) from err
    except MemoryError as err:
        raise _fail(name, "decoding it ran out of memory", "Shrink the image or lower max_pixels.") from err
    except Exception as err:  # truncated data, corrupt headers, decoder errors of any plugin
        text = str(err) or type(err).__name__
        problem = "it is truncated" if "truncated" in text.lower() else "it is corrupt"
        raise _fail(name, f"{problem} ({type(err).__name__}: {text})", _REDOWNLOAD) from err
    return _orient_and_convert(img, name)


def _orient_and_convert(img: Image.Image, name: str) -> Image.Image:
    try:
        oriented = ImageOps.exif_transpose(img)
    except Exception as err:  # malformed EXIF: keep the pixels as stored
        warnings.warn(
            f"{name}: could not apply the EXIF orientation ({err}); using the image as stored.", stacklevel=3
        )
        oriented = img
    if oriented is None:  # pragma: no cover - only with in_place=True
        oriented = img
    try:
        rgb = _to_rgb(oriented)
    except Exception as err:
        raise _fail(
            name,
            f"its colour mode {oriented.mode!r} cannot be converted to RGB ({err})",
            "Re-save it as RGB.",
        ) from err
    if rgb.mode != "RGB":  # pragma: no cover - defensive
        raise _fail(name, f"conversion gave mode {rgb.mode!r}", "Re-save it as RGB.")
    return rgb


def load_image(
    source: ImageSource,
    *,
    max_pixels: int | None = DEFAULT_MAX_PIXELS,
    formats: Sequence[str] | None = DEFAULT_FORMATS,
    name: str | None = None,
) -> Image.Image:
    """Load one image as a fully decoded RGB ``PIL.Image.Image``.

    Args:
        source: a file path (``str`` / ``os.PathLike``), encoded bytes, a binary file object, a PIL
            image, or a ``{"bytes": ..., "path": ...}`` dict as stored by ``datasets.Image(decode=False)``.
        max_pixels: largest ``width * height`` accepted (decompression-bomb guard); ``None`` disables
            this package's check (PIL's own global limit still applies).
        formats: PIL format names to try (default :data:`DEFAULT_FORMATS`); ``None`` tries every
            installed PIL plugin, which is unsafe for untrusted files.
        name: the name to use in error messages (defaults to the path, or a description).

    Returns:
        An RGB image of size ``(width, height)`` >= ``(1, 1)``.

    Raises:
        ImageLoadError: the file is missing, empty, truncated, not an image, too large, or
            cannot be converted; the message names it and says what to do.
    """
    label = name or describe_source(source)
    if isinstance(source, dict):
        data, path = source.get("bytes"), source.get("path")
        if data is not None:
            return load_image(bytes(data), max_pixels=max_pixels, formats=formats, name=name or path or None)
        if path:
            return load_image(path, max_pixels=max_pixels, formats=formats, name=name)
        raise _fail(label, "the record has neither 'bytes' nor 'path'", "Check the dataset's image column.")
    if isinstance(source, Image.Image):
        width, height = source.size
        if max_pixels is not None and width * height > max_pixels:
            raise _fail(
                label,
                f"it is {width}x{height} = {width * height:,} pixels, more than the limit of {max_pixels:,}",
                "Shrink the image or raise max_pixels.",
            )
        try:
            source.load()
        except Exception as err:
            text = str(err) or type(err).__name__
            raise _fail(
                label, f"it could not be decoded ({type(err).__name__}: {text})", _REDOWNLOAD
            ) from err
        if width < 1 or height < 1:
            raise _fail(label, f"it has an empty size {width}x{height}", "Pass a non-empty image.")
        return _orient_and_convert(source, label)
    if isinstance(source, (bytes, bytearray, memoryview)):
        if len(source) == 0:
            raise _fail(label, "the data is empty (0 bytes)", _REDOWNLOAD)
        return _open_decoded(io.BytesIO(bytes(source)), label, max_pixels, formats)
    if isinstance(source, (str, os.PathLike)):
        path = Path(source)
        try:
            if path.is_dir():
                raise _fail(label, "it is a directory, not a file", "Pass image files, or list them first.")
            size = path.stat().st_size
        except FileNotFoundError as err:
            raise _fail(
                label, "the file does not exist", "Check the path (and the image folder option)."
            ) from err
        except PermissionError as err:
            raise _fail(label, "permission denied", "Make the file readable.") from err
        except OSError as err:
            raise _fail(label, f"the file cannot be accessed ({err})", "Check the path.") from err
        if size == 0:
            raise _fail(label, "the file is empty (0 bytes)", _REDOWNLOAD)
        try:
            with open(path, "rb") as fp:
                return _open_decoded(fp, label, max_pixels, formats)
        except PermissionError as err:
            raise _fail(label, "permission denied", "Make the file readable.") from err
        except ImageLoadError:
            raise
        except OSError as err:
            raise _fail(label, f"the file cannot be read ({err})", "Check the path and the disk.") from err
    if hasattr(source, "read"):
        return _open_decoded(source, label, max_pixels, formats)
    raise ImageLoadError(
        f"cannot read image {label}: expected a file path, bytes, a binary file object or a PIL image, "
        f"got {type(source).__name__}.",
        source=label,
    )


def load_images(
    sources: Iterable[ImageSource],
    *,
    on_bad_image: str = "fail",
    max_pixels: int | None = DEFAULT_MAX_PIXELS,
    formats: Sequence[str] | None = DEFAULT_FORMATS,
) -> tuple[list[Image.Image | None], list[tuple[str, str]]]:
    """Load several images with an explicit policy for bad ones.

    Args:
        sources: anything :func:`load_image` accepts.
        on_bad_image: ``"fail"`` raises the first :class:`ImageLoadError`; ``"skip"`` puts ``None``
            in that position and records the file.

    Returns:
        ``(images, skipped)``: ``images`` has one entry per source (``None`` where skipped);
        ``skipped`` lists ``(name, reason)`` for every bad file, in order.
    """
    on_bad_image = check_bad_image_policy(on_bad_image)
    images: list[Image.Image | None] = []
    skipped: list[tuple[str, str]] = []
    for source in sources:
        try:
            images.append(load_image(source, max_pixels=max_pixels, formats=formats))
        except ImageLoadError as err:
            if on_bad_image == "fail":
                raise
            images.append(None)
            skipped.append((err.source or describe_source(source), str(err)))
    return images, skipped


def list_image_files(
    folder: str | os.PathLike,
    *,
    recursive: bool = False,
    extensions: Iterable[str] = IMAGE_EXTENSIONS,
    include_hidden: bool = False,
) -> list[Path]:
    """The image files of a folder, chosen by extension (case-insensitive), sorted by relative path.

    Args:
        folder: the directory to list.
        recursive: also list sub-folders.
        extensions: file name endings to accept, with the dot (``".jpg"``).
        include_hidden: also list names starting with ``"."`` (e.g. macOS ``._x.jpg`` files, which
            are not images); off by default.

    Returns:
        Paths (``folder / relative``), sorted by their relative POSIX path. Files are not opened:
        a bad file is reported when :func:`load_image` reads it. An entry with an image extension
        that is not a regular file (a directory named ``x.jpg``, a broken symbolic link) is listed
        too, so the caller reports it instead of dropping it without a word.

    Raises:
        ImageLoadError: ``folder`` does not exist or is not a directory.
    """
    root = Path(folder)
    if not root.exists():
        raise ImageLoadError(f"image folder {root} does not exist. Check the path.", source=str(root))
    if not root.is_dir():
        raise ImageLoadError(f"{root} is not a folder. Pass a directory of images.", source=str(root))
    wanted = {e.lower() if e.startswith(".") else "." + e.lower() for e in extensions}
    found: list[tuple[str, Path]] = []
    walker = root.rglob("*") if recursive else root.iterdir()
    for path in walker:
        rel = path.relative_to(root)
        if not include_hidden and any(part.startswith(".") for part in rel.parts):
            continue
        if path.suffix.lower() in wanted:
            found.append((rel.as_posix(), path))
    found.sort(key=lambda item: item[0])
    return [p for _, p in found]
