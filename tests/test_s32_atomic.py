"""One atomic write (serving.atomic) for galleries and everything training writes: a gallery whose file name the file
system accepts is saved, where the gallery's own copy of the atomic write failed on its temporary's longer name."""

import os

import pytest

from tests.test_s30_gallery_phash import _crowded


@pytest.mark.parametrize("stem", ["g" * 240, "象" * 82], ids=["ascii 244 B", "utf8 250 B"])
def test_a_gallery_with_a_long_file_name_saves_and_loads(tmp_path, stem):
    from serving.gallery import Gallery

    path = tmp_path / f"{stem}.npz"
    assert len(os.fsencode(path.name)) <= 255  # a name the file system takes
    gallery, _ = _crowded(3, exact_max=100)
    gallery.save(path)
    loaded = Gallery.load(path)
    assert loaded.header.reference_ids == gallery.header.reference_ids
    assert sorted(p.name for p in tmp_path.iterdir()) == [path.name]  # no temporary left beside it


def test_a_saved_gallery_is_as_readable_as_any_file_the_user_writes(tmp_path):
    gallery, _ = _crowded(3, exact_max=100)
    gallery.save(tmp_path / "g.npz")
    mask = os.umask(0)
    os.umask(mask)
    assert (tmp_path / "g.npz").stat().st_mode & 0o777 == 0o666 & ~mask
