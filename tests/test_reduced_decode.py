"""Decoding at the models' resolution changes nothing that matters: on full-size films saved in
every archive format, the shipped screen answers the same from a reduced decode as from a whole
one (probabilities within 0.02, same result), and the reduced decode really stops early."""

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from experiments.film_agreement import agreement
from cxr.data.decode import decode_film, decode_image
from cxr.data.transcode import FORMATS, encode, resized
from cxr.screen import Screen
from tests.conftest import SHARED_DATA
from tests.inputs import real_gray

SCREEN = Path(__file__).resolve().parents[1] / "models" / "cxr-screen"
FULLRES = SHARED_DATA / "fullres" / "jsrt"


def films(n: int, detector_shapes: bool = False) -> dict[str, np.ndarray]:
    """``n`` real 2048 px films: fullres/jsrt, or where the curated data is absent the sample's
    film brought up to 2048 px (still a chest film, at an archive's size). With
    ``detector_shapes``, the first also at two non-square detector sizes (W x H 2432 x 2048 and
    2048 x 2560), where the short side's rounding once differed between the two decodes."""
    if FULLRES.is_dir():
        files = sorted(FULLRES.glob("*.png"))[:n]
        found = {p.name: decode_image(p.read_bytes(), p.name) for p in files}
    else:
        found = {"sample.png": resized(real_gray(), 2048)}
    if detector_shapes:
        first = Image.fromarray(next(iter(found.values())))
        for w, h in ((2432, 2048), (2048, 2560)):
            found[f"{w}x{h}"] = np.asarray(first.resize((w, h), Image.Resampling.BICUBIC), dtype=np.uint8)
    return found


@pytest.fixture(scope="module")
def screen() -> Screen:
    return Screen.from_folder(SCREEN, "cpu")


def test_every_format_gives_the_screen_the_same_answer_from_a_reduced_decode(screen):
    rows = agreement(screen, films(4, detector_shapes=True))
    assert {r["format"] for r in rows} == set(FORMATS)
    worst = max(rows, key=lambda r: r["max_probability_difference"])
    assert worst["max_probability_difference"] <= 0.02, worst
    assert all(r["same_result"] for r in rows), [r for r in rows if not r["same_result"]]


@pytest.mark.parametrize("fmt", list(FORMATS))
def test_the_reduced_decode_stops_near_the_models_size_and_keeps_the_films_size(fmt, screen):
    gray = next(iter(films(1).values()))
    side = screen.preprocess.decode_side
    film = decode_film(encode(gray, fmt), f"film-{fmt}", min_side=side)
    assert (film.height, film.width) == gray.shape          # what a scores row records
    assert side <= max(film.gray.shape) < 2 * side, film.gray.shape
    assert film.gray.dtype == np.uint8


@pytest.mark.parametrize("fmt", ["png", "dicom-uncompressed-16bit", "jpeg"])
def test_a_non_square_film_fills_the_same_rows_reduced_as_whole(fmt, screen):
    """The letterbox is sized from the film's own shape, not the reduced image's: a white
    2836 x 2336 film fills the same rows either way, and a real one comes out alike."""
    white = encode(np.full((2336, 2836), 250, np.uint8), fmt)     # a shape whose reduced box rounds apart
    for a, b in zip(screen.preprocess.letterbox(decode_image(white, "w")), screen.preprocess.decoded(white, "r")):
        assert ((a[:, a.shape[1] // 2] > 200).sum() == (b[:, b.shape[1] // 2] > 200).sum())
    data = encode(films(1, detector_shapes=True)["2432x2048"], fmt)
    for a, b in zip(screen.preprocess.letterbox(decode_image(data, "w")), screen.preprocess.decoded(data, "r")):
        assert np.abs(a.astype(int) - b).mean() < 1.5


def test_a_film_smaller_than_the_models_size_is_decoded_whole():
    gray = real_gray()
    film = decode_film(encode(gray, "dicom-jpeg2000-lossless"), "small.dcm", min_side=4 * max(gray.shape))
    assert film.gray.shape == gray.shape and (film.height, film.width) == gray.shape
