"""Decoding untrusted bytes: every odd-but-valid encoding works, every broken one is a clear ImageError."""

import io

import numpy as np
import pytest
from PIL import Image

from serving.imageio import ImageError, decode_image
from tests.conftest import exif_rotated_jpeg, jpeg_bytes, photo


def test_jpeg_roundtrip_keeps_size_and_format():
    img, info = decode_image(jpeg_bytes(photo(1, (200, 150))))
    assert img.mode == "RGB" and img.size == (200, 150)
    assert info.format == "JPEG" and not info.exif_rotated


def test_exif_orientation_is_applied():
    original = photo(2, (200, 120))
    img, info = decode_image(exif_rotated_jpeg(original))
    assert info.exif_rotated
    assert img.size == (200, 120)  # displayed orientation, not the stored (120 x 200)
    diff = np.abs(np.asarray(img, np.int16) - np.asarray(original, np.int16)).mean()
    assert diff < 8, f"rotated back picture differs from the original by {diff}"


def test_cmyk_16bit_palette_alpha_become_rgb(tmp_path):
    cmyk = io.BytesIO()
    photo(3).convert("CMYK").save(cmyk, "JPEG")
    img, info = decode_image(cmyk.getvalue())
    assert info.mode == "CMYK" and img.mode == "RGB"

    arr16 = np.full((40, 40), 65535, np.uint16)
    arr16[:, :20] = 0
    png16 = io.BytesIO()
    Image.fromarray(arr16).save(png16, "PNG")
    img, info = decode_image(png16.getvalue())
    assert info.mode.startswith("I")
    px = np.asarray(img)
    assert px[0, 0].tolist() == [0, 0, 0] and px[0, 39].tolist() == [255, 255, 255]  # scaled, not clipped

    rgba = Image.new("RGBA", (32, 32), (255, 0, 0, 0))  # fully transparent red
    buf = io.BytesIO()
    rgba.save(buf, "PNG")
    img, _ = decode_image(buf.getvalue())
    assert np.asarray(img)[5, 5].tolist() == [255, 255, 255]  # transparent shows as white

    pal = photo(4).convert("P")
    buf = io.BytesIO()
    pal.save(buf, "GIF")
    img, info = decode_image(buf.getvalue())
    assert img.mode == "RGB" and info.format == "GIF"


def test_animated_gif_uses_first_frame():
    frames = [Image.new("RGB", (32, 32), c) for c in ((255, 0, 0), (0, 0, 255))]
    buf = io.BytesIO()
    frames[0].save(buf, "GIF", save_all=True, append_images=frames[1:])
    img, info = decode_image(buf.getvalue())
    assert info.frames == 2
    r, g, b = np.asarray(img)[10, 10]
    assert r > 200 and b < 50


@pytest.mark.parametrize(
    "data,code",
    [
        (b"", "empty"),
        (b"hello, this is text", "not_an_image"),
        (jpeg_bytes(photo(5))[:600], "corrupt"),
    ],
)
def test_broken_inputs_raise_clear_codes(data, code):
    with pytest.raises(ImageError) as exc:
        decode_image(data)
    assert exc.value.code == code and exc.value.status == 400


def test_unsupported_format_is_415():
    buf = io.BytesIO()
    photo(6).save(buf, "ICO")
    with pytest.raises(ImageError) as exc:
        decode_image(buf.getvalue())
    assert exc.value.code == "unsupported_format" and exc.value.status == 415


def test_decompression_bomb_and_tiny_images_are_refused():
    bomb = io.BytesIO()
    Image.new("1", (9000, 9000)).save(bomb, "PNG")  # 81 Mpx, a few KB on the wire
    with pytest.raises(ImageError) as exc:
        decode_image(bomb.getvalue(), max_pixels=40_000_000)
    assert exc.value.code == "too_many_pixels"
    tiny = io.BytesIO()
    Image.new("RGB", (1, 1)).save(tiny, "PNG")
    with pytest.raises(ImageError) as exc:
        decode_image(tiny.getvalue(), min_side=16)
    assert exc.value.code == "too_small"


def test_a_sliver_is_refused_before_resizing_would_blow_it_up():
    """A 16 x 40000 PNG is 6 KB and 0.64 Mpx, under every size limit, but the shorter side scaled to 365 px made
    it 365 x 912,500 (1 GB, seconds of work) before the centre crop. Over 50:1 is refused at decode; 50:1 passes."""
    sliver = io.BytesIO()
    Image.new("RGB", (16, 40000)).save(sliver, "PNG")
    assert len(sliver.getvalue()) < 20_000
    with pytest.raises(ImageError) as exc:
        decode_image(sliver.getvalue(), min_side=1)
    assert exc.value.code == "extreme_aspect_ratio" and exc.value.status == 400 and "50:1" in str(exc.value)
    wide = io.BytesIO()
    Image.new("RGB", (1000, 20)).save(wide, "PNG")
    img, info = decode_image(wide.getvalue(), min_side=16)
    assert img.size == (1000, 20) and (info.width, info.height) == (1000, 20)


def test_jpeg_draft_decodes_smaller_but_large_enough():
    big = photo(7, (1600, 1200))
    img, info = decode_image(jpeg_bytes(big), draft_size=256)
    assert (info.width, info.height) == (1600, 1200)
    assert min(img.size) >= 256 and img.size[0] < 1600


@pytest.mark.parametrize("fmt", ["JPEG", "PNG", "WEBP", "GIF", "BMP", "TIFF"])
def test_one_format_table_decodes_types_names_and_lists_each_format(fmt, tmp_path):
    """The table (serving/imageio.IMAGE_FORMATS) is what decoding, the service's content types, folder scans and data
    check's extension check read: a file written under its table extension goes through all of them."""
    from serving.checker import content_type_info
    from serving.client import list_images
    from serving.imageio import FORMATS
    from training.data.check import check_dataset

    entry = FORMATS[fmt]
    path = tmp_path / "other" / f"a{entry.extensions[0]}"
    path.parent.mkdir()
    photo(4, (64, 48)).save(path, fmt)
    _, info = decode_image(path.read_bytes())
    assert info.format == fmt
    assert content_type_info(entry.mime, fmt)["type_mismatch"] is False
    for alias in entry.mime_aliases:
        assert content_type_info(alias, fmt) == {"declared_type": alias, "detected_type": entry.mime, "type_mismatch": False}
    assert content_type_info("image/svg+xml", fmt)["type_mismatch"] is True
    assert list_images(tmp_path) == [path]
    assert not [w for w in check_dataset([tmp_path])["warnings"] if "extension" in w["message"]]
    renamed = path.rename(path.with_name("b.png" if fmt != "PNG" else "b.jpg"))
    assert [w["message"] for w in check_dataset([tmp_path])["warnings"]] == [
        f"file extension {renamed.suffix} but the content is {fmt}"]


def test_one_folder_walk_leaves_out_hidden_files_and_folders(tmp_path):
    """Every command that takes a folder (scan, explain, traffic, galleries, datasets) lists it with
    ``images_under``: a macOS copy's ``._x.jpg`` resource forks and ``.thumbnails/`` are not photos. `wildcheck
    scan` sent ``._x.jpg`` to the server (an error line per fork) before."""
    from serving.client import list_images
    from serving.imageio import images_under, label_folders
    from serving.traffic import find_traffic
    from training.data.sources import load_samples

    shop = tmp_path / "other" / "shop"
    (tmp_path / ".ipynb_checkpoints").mkdir()  # a hidden folder beside the label folders is no label
    photo(4, (32, 32)).save(tmp_path / ".ipynb_checkpoints" / "c.png")
    (tmp_path / "other" / ".thumbnails").mkdir(parents=True)
    shop.mkdir()
    photo(1, (64, 48)).save(shop / "b.JPG")
    photo(2, (64, 48)).save(tmp_path / "other" / "a.png")
    (shop / "._b.JPG").write_bytes(b"\x00\x05\x16\x07 AppleDouble")
    photo(3, (32, 32)).save(tmp_path / "other" / ".thumbnails" / "a.png")
    (shop / "notes.txt").write_text("no")
    expected = [tmp_path / "other" / "a.png", shop / "b.JPG"]
    assert images_under(tmp_path) == list_images(tmp_path) == expected
    assert label_folders(tmp_path) == [tmp_path / "other"]
    assert [p for p, _ in find_traffic(tmp_path, ["ivory", "other"], "other")] == expected
    assert sorted(s.path for s in load_samples([tmp_path])) == expected


def test_a_missing_file_or_dangling_link_is_unreadable_not_corrupt(tmp_path):
    """`gallery add` with a missing file said "the image data is truncated or corrupt: FileNotFoundError"."""
    (tmp_path / "dangling.jpg").symlink_to(tmp_path / "gone.jpg")
    for path in (tmp_path / "missing.jpg", tmp_path / "dangling.jpg"):
        with pytest.raises(ImageError) as exc:
            decode_image(path)
        assert exc.value.code == "unreadable" and str(path) in str(exc.value) and "No such file" in str(exc.value)


def test_a_dangling_link_in_a_dataset_is_reported_not_skipped_silently(synth_root, tmp_path):
    import shutil

    from training.data.check import check_dataset

    root = tmp_path / "data"
    shutil.copytree(synth_root, root)
    link = root / "train" / "ivory" / "moved.jpg"
    link.symlink_to(tmp_path / "elsewhere.jpg")
    errors = [e for e in check_dataset([root])["errors"] if e["path"] == str(link)]
    assert [e["code"] for e in errors] == ["unreadable"]


@pytest.mark.parametrize("mode, colour, key", [("RGB", (0, 0, 0), (0, 0, 0)), ("L", 0, 0)])
def test_a_png_colour_key_is_transparent_and_shows_white(mode, colour, key):
    """A tRNS colour key (RGB or grey PNG) marks transparent pixels like a palette's; they stayed black."""
    img = Image.new(mode, (32, 32), colour)
    img.paste(200 if mode == "L" else (200, 30, 30), (16, 0, 32, 32))
    buf = io.BytesIO()
    img.save(buf, "PNG", transparency=key)
    out, info = decode_image(buf.getvalue())
    assert info.mode == mode
    assert np.asarray(out)[5, 5].tolist() == [255, 255, 255]
    assert np.asarray(out)[5, 20].tolist() == ([200] * 3 if mode == "L" else [200, 30, 30])


def test_a_float_tiff_with_an_infinite_pixel_keeps_its_picture():
    """np.nanmax kept +inf as the peak: every finite pixel scaled to 0, the whole picture black."""
    arr = np.zeros((32, 32), np.float32)
    arr[:, 16:] = 1.0
    arr[0, 0], arr[0, 1] = np.inf, np.nan
    buf = io.BytesIO()
    Image.fromarray(arr, "F").save(buf, "TIFF")
    out, _ = decode_image(buf.getvalue())
    px = np.asarray(out)
    assert px[10, 5].tolist() == [0, 0, 0] and px[10, 20].tolist() == [255, 255, 255]
    assert px[0, 0].tolist() == [255, 255, 255] and px[0, 1].tolist() == [0, 0, 0]  # +inf white, NaN black


@pytest.mark.parametrize("orientation", [0, 9, 99])
def test_an_invalid_exif_orientation_is_not_reported_as_applied(orientation):
    exif = Image.Exif()
    exif[0x0112] = orientation
    original = photo(5, (120, 80))
    out, info = decode_image(jpeg_bytes(original, exif=exif.tobytes()))
    assert not info.exif_rotated and out.size == (120, 80)
