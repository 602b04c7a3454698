"""Tests for modeling_clipcap.image_io: every kind of good and bad image file."""

from __future__ import annotations

import io
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from modeling_clipcap.image_io import (
    DEFAULT_MAX_PIXELS,
    ImageLoadError,
    list_image_files,
    load_image,
    load_images,
)


def _encode(img: Image.Image, fmt: str, **kwargs) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kwargs)
    return buf.getvalue()


def _noise(size=(48, 40), seed=0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8), "RGB")


def _png_header_only(width: int, height: int) -> bytes:
    """A PNG whose header claims width x height pixels but carries almost no data."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return (
            struct.pack(">I", len(data))
            + kind
            + data
            + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)
        )

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", ihdr)
        + chunk(b"IDAT", zlib.compress(b"\x00" * 10))
        + chunk(b"IEND", b"")
    )


# ---------------------------------------------------------------- good images, all modes


def test_rgb_png_round_trip_from_path_bytes_file_and_pil(tmp_path):
    img = _noise()
    path = tmp_path / "a.png"
    img.save(path)
    expected = np.asarray(img)
    for source in (
        path,
        str(path),
        path.read_bytes(),
        open(path, "rb"),
        Image.open(path),
        {"bytes": None, "path": str(path)},
    ):
        out = load_image(source)
        assert out.mode == "RGB" and out.size == (48, 40)
        np.testing.assert_array_equal(np.asarray(out), expected)
        if hasattr(source, "close"):
            source.close()


def test_one_by_one_image(tmp_path):
    path = tmp_path / "one.png"
    Image.new("RGB", (1, 1), (10, 20, 30)).save(path)
    out = load_image(path)
    assert out.size == (1, 1) and out.getpixel((0, 0)) == (10, 20, 30)


def test_grayscale_and_bilevel_become_rgb(tmp_path):
    Image.new("L", (5, 4), 77).save(tmp_path / "g.png")
    Image.new("1", (5, 4), 1).save(tmp_path / "b.png")
    assert load_image(tmp_path / "g.png").getpixel((2, 2)) == (77, 77, 77)
    assert load_image(tmp_path / "b.png").getpixel((2, 2)) == (255, 255, 255)


def test_rgba_is_composited_on_white(tmp_path):
    img = Image.new("RGBA", (4, 2), (255, 0, 0, 255))
    img.putpixel((0, 0), (0, 0, 255, 0))  # fully transparent blue -> white
    img.putpixel((1, 0), (0, 0, 0, 128))  # half transparent black -> mid gray
    img.save(tmp_path / "a.png")
    out = load_image(tmp_path / "a.png")
    assert out.getpixel((0, 0)) == (255, 255, 255)
    assert all(abs(c - 127) <= 1 for c in out.getpixel((1, 0)))
    assert out.getpixel((3, 1)) == (255, 0, 0)
    la = Image.new("LA", (2, 2), (0, 0))
    la.save(tmp_path / "la.png")
    assert load_image(tmp_path / "la.png").getpixel((0, 0)) == (255, 255, 255)


def test_palette_with_transparency(tmp_path):
    img = Image.new("P", (4, 4), 0)
    img.putpalette([0, 255, 0] + [255, 0, 0] + [0] * (3 * 254))
    img.putpixel((3, 3), 1)
    img.save(tmp_path / "p.png", transparency=0)
    img.save(tmp_path / "p.gif", transparency=0)
    for name in ("p.png", "p.gif"):
        out = load_image(tmp_path / name)
        assert out.getpixel((0, 0)) == (255, 255, 255), name  # transparent green -> white
        assert out.getpixel((3, 3)) == (255, 0, 0), name
    plain = Image.new("P", (2, 2), 0)
    plain.putpalette([0, 0, 255] + [0] * 765)
    plain.save(tmp_path / "plain.png")
    assert load_image(tmp_path / "plain.png").getpixel((1, 1)) == (0, 0, 255)


def test_cmyk_jpeg_and_tiff(tmp_path):
    img = Image.new("CMYK", (8, 8), (0, 255, 255, 0))  # red
    img.save(tmp_path / "c.jpg", quality=95)
    img.save(tmp_path / "c.tif")
    for name in ("c.jpg", "c.tif"):
        r, g, b = load_image(tmp_path / name).getpixel((4, 4))
        assert r > 230 and g < 25 and b < 25, (name, (r, g, b))


def test_sixteen_bit_images_are_scaled(tmp_path):
    arr = np.array([[0, 257 * 128, 65535]], dtype=np.uint16)
    img = Image.fromarray(arr)
    assert img.mode.startswith("I;16")
    img.save(tmp_path / "g16.png")
    out = load_image(tmp_path / "g16.png")
    assert [out.getpixel((i, 0))[0] for i in range(3)] == [0, 128, 255]
    # 32-bit integer mode with 16-bit values (what some PNG/TIFF readers give)
    out_i = load_image(Image.fromarray(arr.astype(np.int32), mode="I"))
    assert [out_i.getpixel((i, 0))[0] for i in range(3)] == [0, 128, 255]
    # 'I' holding 8-bit values is kept as is
    out_small = load_image(Image.fromarray(np.array([[3, 200]], dtype=np.int32), mode="I"))
    assert [out_small.getpixel((i, 0))[0] for i in range(2)] == [3, 200]
    out_f = load_image(Image.fromarray(np.array([[0.0, 0.5, 1.0]], dtype=np.float32), mode="F"))
    assert [out_f.getpixel((i, 0))[0] for i in range(3)] == [0, 128, 255]


def test_exif_rotation_is_applied(tmp_path):
    # stored 4 wide x 2 high, left half red, right half blue
    arr = np.zeros((2, 4, 3), np.uint8)
    arr[:, :2] = (255, 0, 0)
    arr[:, 2:] = (0, 0, 255)
    img = Image.fromarray(arr)
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to display"
    img.save(tmp_path / "r.png", exif=exif)
    out = load_image(tmp_path / "r.png")
    assert out.size == (2, 4)
    assert out.getpixel((0, 0)) == (255, 0, 0) and out.getpixel((0, 3)) == (0, 0, 255)
    assert load_image(tmp_path / "r.png").getexif().get(0x0112) in (None, 1)


def test_animated_gif_gives_first_frame(tmp_path):
    frames = [Image.new("RGB", (4, 4), c) for c in ((255, 0, 0), (0, 255, 0))]
    frames[0].save(tmp_path / "anim.gif", save_all=True, append_images=frames[1:])
    assert load_image(tmp_path / "anim.gif").getpixel((1, 1)) == (255, 0, 0)


# ---------------------------------------------------------------- bad files


def test_missing_file(tmp_path):
    with pytest.raises(ImageLoadError, match=r"missing\.jpg.*does not exist"):
        load_image(tmp_path / "missing.jpg")


def test_directory(tmp_path):
    with pytest.raises(ImageLoadError, match="directory"):
        load_image(tmp_path)


def test_zero_byte_file_and_empty_bytes(tmp_path):
    (tmp_path / "empty.jpg").write_bytes(b"")
    with pytest.raises(ImageLoadError, match=r"empty\.jpg.*empty \(0 bytes\)"):
        load_image(tmp_path / "empty.jpg")
    with pytest.raises(ImageLoadError, match="empty"):
        load_image(b"")


@pytest.mark.parametrize("fmt,suffix", [("JPEG", "jpg"), ("PNG", "png"), ("WEBP", "webp"), ("GIF", "gif")])
def test_truncated_files(tmp_path, fmt, suffix):
    data = _encode(_noise((64, 64)), fmt)
    path = tmp_path / f"cut.{suffix}"
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ImageLoadError) as info:
        load_image(path)
    assert str(path) in str(info.value)
    assert "truncated" in str(info.value) or "corrupt" in str(info.value)
    assert "Re-download" in str(info.value)


def test_non_image_files(tmp_path):
    (tmp_path / "page.jpg").write_text("<html><body>404 Not Found</body></html>")
    with pytest.raises(ImageLoadError, match=r"page\.jpg.*not an image"):
        load_image(tmp_path / "page.jpg")
    with pytest.raises(ImageLoadError, match="not an image"):
        load_image(b"just some text, not an image")


def test_eps_is_not_tried_by_default():
    eps = b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\nshowpage\n"
    with pytest.raises(ImageLoadError, match="not an image in a supported format"):
        load_image(eps)


def test_pixel_limit_is_configurable(tmp_path):
    Image.new("RGB", (20, 20)).save(tmp_path / "big.png")
    with pytest.raises(ImageLoadError, match=r"big\.png.*400 pixels.*limit of 399"):
        load_image(tmp_path / "big.png", max_pixels=399)
    assert load_image(tmp_path / "big.png", max_pixels=400).size == (20, 20)
    with pytest.raises(ImageLoadError, match="limit"):
        load_image(Image.new("RGB", (20, 20)), max_pixels=10)


def test_decompression_bomb_header_is_refused_before_decoding():
    # just above our default limit: refused by our check (or PIL's warning), never decoded
    side = int(DEFAULT_MAX_PIXELS**0.5) + 10
    with pytest.raises(ImageLoadError, match="decompression.bomb"):
        load_image(_png_header_only(side, side))
    # far above: PIL raises DecompressionBombError itself; it must become our error
    with pytest.raises(ImageLoadError, match="decompression.bomb"):
        load_image(_png_header_only(40_000, 40_000), max_pixels=None)


def test_pil_bomb_warning_becomes_our_error(monkeypatch):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)
    data = _encode(Image.new("RGB", (12, 12)), "PNG")  # 144 > 100: PIL warns
    with pytest.raises(ImageLoadError, match="decompression bomb"):
        load_image(data, max_pixels=None)


def test_wrong_type():
    with pytest.raises(ImageLoadError, match="expected a file path"):
        load_image(12345)


def test_load_images_policy(tmp_path):
    Image.new("RGB", (3, 3), (1, 2, 3)).save(tmp_path / "ok.png")
    (tmp_path / "bad.png").write_bytes(b"nope")
    sources = [tmp_path / "ok.png", tmp_path / "bad.png", tmp_path / "gone.png"]
    with pytest.raises(ImageLoadError, match=r"bad\.png"):
        load_images(sources)
    images, skipped = load_images(sources, on_bad_image="skip")
    assert images[0].getpixel((0, 0)) == (1, 2, 3) and images[1] is None and images[2] is None
    assert [Path(name).name for name, _ in skipped] == ["bad.png", "gone.png"]
    with pytest.raises(ValueError, match="on_bad_image"):
        load_images(sources, on_bad_image="ignore")
    with pytest.raises(ImageLoadError, match=r"bad\.png"):  # "error": the other name of "fail"
        load_images(sources, on_bad_image="error")


def test_one_bad_image_policy():
    """One definition of the values of on_bad_image, with "error" as another name of "fail"."""
    from modeling_clipcap.image_io import BAD_IMAGE_POLICIES, check_bad_image_policy

    assert set(BAD_IMAGE_POLICIES) == {"fail", "skip", "error"}
    assert [check_bad_image_policy(p) for p in ("fail", "skip", "error")] == ["fail", "skip", "fail"]
    with pytest.raises(ValueError, match=r"on_bad_image must be 'fail' .*'skip', got 'drop'"):
        check_bad_image_policy("drop")


def test_list_image_files(tmp_path):
    for rel in ("b.JPG", "a.png", "notes.txt", "sub/c.webp", ".hidden.jpg", "._a.jpg", "sub/d.jpeg"):
        p = tmp_path / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(b"x")
    (tmp_path / "dir.jpg").mkdir()  # listed, so that load_image reports it instead of it vanishing
    listed = [p.relative_to(tmp_path).as_posix() for p in list_image_files(tmp_path)]
    assert listed == ["a.png", "b.JPG", "dir.jpg"]
    rec = [p.relative_to(tmp_path).as_posix() for p in list_image_files(tmp_path, recursive=True)]
    assert rec == ["a.png", "b.JPG", "dir.jpg", "sub/c.webp", "sub/d.jpeg"]
    hidden = list_image_files(tmp_path, include_hidden=True)
    assert {p.name for p in hidden} == {"a.png", "b.JPG", "dir.jpg", ".hidden.jpg", "._a.jpg"}
    with pytest.raises(ImageLoadError, match="does not exist"):
        list_image_files(tmp_path / "nope")
    with pytest.raises(ImageLoadError, match="not a folder"):
        list_image_files(tmp_path / "a.png")


def test_real_photos(real_photos):
    """Real JPEG decoding of real photographs: the as-published JPEGs, EXIF orientation, grey, CMYK, odd size."""
    by_name = {path.name: path for path in real_photos}
    for path in real_photos:
        raw = Image.open(path)
        assert raw.format == "JPEG"
        img = load_image(path)
        assert img.mode == "RGB" and min(img.size) > 16
        if path.name != "chelsea_exif_rotated.jpg":
            assert img.size == raw.size
            reference = np.asarray(raw.convert("RGB"), dtype=np.int16)
            assert np.abs(np.asarray(img, dtype=np.int16) - reference).max() <= 1, path.name
    rotated = by_name["chelsea_exif_rotated.jpg"]
    raw = Image.open(rotated)
    assert raw.getexif().get(0x0112) == 6
    shown = load_image(rotated)
    assert shown.size == raw.size[::-1]  # 451 x 300 stored, 300 x 451 displayed
    expected = np.asarray(raw.convert("RGB").transpose(Image.Transpose.ROTATE_270), dtype=np.int16)
    assert np.abs(np.asarray(shown, dtype=np.int16) - expected).max() <= 1
    assert Image.open(by_name["camera_grey.jpg"]).mode == "L"
    assert Image.open(by_name["coffee_cmyk.jpg"]).mode == "CMYK"
    assert load_image(by_name["astronaut_odd_size.jpg"]).size == (333, 197)
    coffee = np.asarray(load_image(by_name["coffee_cmyk.jpg"]), dtype=np.float32)
    assert coffee.std() > 10  # a real photograph, not a flat fill, after CMYK -> RGB


# ---------------------------------------------------------------- property-based


_MAGIC = [
    b"",
    b"\x89PNG\r\n\x1a\n",
    b"\xff\xd8\xff",
    b"GIF89a",
    b"BM",
    b"RIFF\x00\x00\x00\x00WEBPVP8 ",
    b"II*\x00",
    b"P6\n",
]


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(prefix=st.sampled_from(_MAGIC), payload=st.binary(max_size=400))
def test_random_bytes_never_raise_anything_but_image_load_error(prefix, payload):
    try:
        img = load_image(prefix + payload)
    except ImageLoadError:
        return
    assert img.mode == "RGB" and img.size[0] >= 1 and img.size[1] >= 1


_MODES = ["RGB", "RGBA", "L", "LA", "P", "1", "CMYK", "I;16", "I", "F"]
_FORMATS_FOR_MODE = {
    "RGB": ["PNG", "JPEG", "BMP", "GIF", "TIFF", "WEBP", "PPM"],
    "RGBA": ["PNG", "TIFF", "WEBP"],
    "L": ["PNG", "JPEG", "BMP", "TIFF", "PPM"],
    "LA": ["PNG"],
    "P": ["PNG", "GIF", "BMP"],
    "1": ["PNG", "BMP", "TIFF"],
    "CMYK": ["JPEG", "TIFF"],
    "I;16": ["PNG", "TIFF"],
    "I": ["TIFF"],  # Pillow 12 deprecates (13 drops) writing mode I as PNG; I;16 covers 16-bit PNG
    "F": ["TIFF"],
}


@settings(max_examples=120, deadline=None)
@given(
    mode=st.sampled_from(_MODES),
    width=st.integers(1, 40),
    height=st.integers(1, 40),
    seed=st.integers(0, 2**16),
    data=st.data(),
)
def test_random_valid_images_load_with_their_size(mode, width, height, seed, data):
    fmt = data.draw(st.sampled_from(_FORMATS_FOR_MODE[mode]))
    rng = np.random.default_rng(seed)
    base = Image.fromarray(rng.integers(0, 256, (height, width, 4), dtype=np.uint8), "RGBA")
    if mode in ("I;16", "I"):
        img = Image.fromarray(
            rng.integers(0, 65536, (height, width)).astype(np.uint16 if mode == "I;16" else np.int32)
        )
    elif mode == "F":
        img = Image.fromarray(rng.random((height, width), dtype=np.float32), "F")
    else:
        img = base.convert(mode)
    try:
        encoded = _encode(img, fmt)
    except (OSError, ValueError, KeyError):  # this PIL cannot write that mode in that format
        return
    out = load_image(encoded)
    assert out.mode == "RGB" and out.size == (width, height)
    # a cut-off copy is either still decodable or fails with our error only
    try:
        load_image(encoded[: max(1, len(encoded) * 2 // 3)])
    except ImageLoadError:
        pass


def test_truncated_tiff_is_an_error_not_a_warning(tmp_path):
    data = _encode(_noise((64, 64)), "TIFF")
    (tmp_path / "cut.tif").write_bytes(data[: len(data) // 2])
    with pytest.raises(ImageLoadError, match=r"cut\.tif.*truncated"):
        load_image(tmp_path / "cut.tif")
