"""Reading and decoding images once: every bad input becomes a reject reason, every odd good one RGB."""

from __future__ import annotations

import pytest
from fixtures_images import GOOD, write_image_zoo

from clipaudit.io.images import ImageRejected, decode_image, read_image_bytes, to_rgb

MAX_PIXELS = 64_000_000


@pytest.fixture(scope="module")
def zoo(tmp_path_factory):
    return write_image_zoo(tmp_path_factory.mktemp("zoo"))


def _outcome(path, max_pixels=MAX_PIXELS):
    try:
        return GOOD, decode_image(read_image_bytes(str(path)), max_pixels)
    except ImageRejected as exc:
        return exc.reason, str(exc)


def test_every_case_gets_its_expected_outcome(zoo):
    outcomes = {name: _outcome(path)[0] for name, (path, _) in zoo.items()}
    assert outcomes == {name: expected for name, (_, expected) in zoo.items()}


def test_good_images_come_out_as_8bit_rgb(zoo):
    for name, (path, expected) in zoo.items():
        if expected == GOOD:
            status, image = _outcome(path)
            assert image.mode == "RGB", name


def test_exif_orientation_is_applied(zoo):
    _, image = _outcome(zoo["exif_rotated.jpg"][0])
    assert image.size == (30, 60)


def test_transparent_pixels_are_composited_on_white(zoo):
    _, image = _outcome(zoo["alpha.png"][0])
    assert image.getpixel((5, 5)) == (255, 255, 255)


def test_sixteen_bit_range_is_scaled_not_clipped(zoo):
    _, image = _outcome(zoo["gray16.png"][0])
    values = [image.getpixel((0, y))[0] for y in range(40)]
    assert max(values) > 200 and len(set(values)) > 10


def test_pixel_bound_is_checked_before_decoding(zoo):
    status, detail = _outcome(zoo["plain.jpg"][0], max_pixels=100)
    assert status == "too_large" and "48x40" in detail


def test_reject_details_name_the_file_where_reading_fails(zoo):
    status, detail = _outcome(zoo["missing.jpg"][0])
    assert status == "missing" and "missing.jpg" in detail


def test_to_rgb_keeps_rgb_untouched():
    from PIL import Image

    image = Image.new("RGB", (4, 4), (1, 2, 3))
    assert to_rgb(image) is image
