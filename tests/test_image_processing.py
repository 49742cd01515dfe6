"""LOUPE's image processors (PIL and torchvision backends): any image in, a normalised square tensor
out, or a clear error; both backends agree."""

from __future__ import annotations

import numpy as np
import PIL.Image
import pytest
import torch

from loupe_hf import LoupeImageError, LoupeImageProcessor, LoupeImageProcessorTorchvision

SIZE = 32


BACKENDS = {"pil": LoupeImageProcessor, "torchvision": LoupeImageProcessorTorchvision}


@pytest.fixture(params=sorted(BACKENDS))
def image_processor(request) -> LoupeImageProcessor | LoupeImageProcessorTorchvision:
    return BACKENDS[request.param](size={"height": SIZE, "width": SIZE})


def _pixels(image_processor, images) -> torch.Tensor:
    return image_processor(images, return_tensors="pt")["pixel_values"]


def _unnormalise(image_processor, pixels: torch.Tensor) -> torch.Tensor:
    mean = torch.tensor(image_processor.image_mean).view(-1, 1, 1)
    std = torch.tensor(image_processor.image_std).view(-1, 1, 1)
    return (pixels * std + mean) * 255


def test_rgb_image_is_resized_and_normalised(image_processor):
    pixels = _pixels(image_processor, PIL.Image.new("RGB", (200, 100), (255, 0, 0)))
    assert pixels.shape == (1, 3, SIZE, SIZE) and pixels.dtype == torch.float32
    torch.testing.assert_close(
        _unnormalise(image_processor, pixels[0]).mean(dim=(1, 2)),
        torch.tensor([255.0, 0.0, 0.0]),
        atol=0.5,
        rtol=0,
    )


@pytest.mark.parametrize("mode", ["L", "LA", "P", "RGBA", "CMYK", "1", "I;16", "I", "F"])
def test_every_pil_mode_becomes_three_channels(image_processor, mode):
    image = PIL.Image.new("RGB", (40, 30), (10, 200, 30)).convert(mode)
    assert _pixels(image_processor, image).shape == (1, 3, SIZE, SIZE)


def test_sixteen_bit_greyscale_keeps_its_contrast(image_processor):
    ramp = np.tile(np.linspace(0, 65535, 64, dtype=np.uint16), (16, 1))
    pixels = _pixels(image_processor, PIL.Image.fromarray(ramp))
    values = _unnormalise(image_processor, pixels[0])[0]
    # A plain convert("RGB") would clip everything above 255 to white.
    assert values[:, :4].mean() < 30 and values[:, -4:].mean() > 225


def test_transparent_pixels_are_composited_on_white(image_processor):
    image = PIL.Image.new("RGBA", (16, 16), (0, 0, 0, 0))
    values = _unnormalise(image_processor, _pixels(image_processor, image)[0])
    torch.testing.assert_close(values.mean(dim=(1, 2)), torch.full((3,), 255.0), atol=0.5, rtol=0)


@pytest.mark.parametrize(
    "array",
    [
        np.zeros((20, 30, 3), dtype=np.uint8),
        np.zeros((3, 20, 30), dtype=np.uint8),
        np.zeros((20, 30), dtype=np.uint8),
        np.zeros((20, 30, 4), dtype=np.uint8),
        np.full((20, 30, 3), 0.5, dtype=np.float32),
        torch.zeros(3, 20, 30, dtype=torch.uint8),
        torch.rand(20, 30, 3),
    ],
    ids=["hwc", "chw", "hw", "hwc-alpha", "float", "torch-chw", "torch-float"],
)
def test_arrays_and_tensors_in_common_layouts(image_processor, array):
    assert _pixels(image_processor, array).shape == (1, 3, SIZE, SIZE)


def test_a_batch_array_gives_one_row_per_image(image_processor):
    assert _pixels(image_processor, np.zeros((4, 20, 30, 3), dtype=np.uint8)).shape == (
        4,
        3,
        SIZE,
        SIZE,
    )


def test_one_pixel_and_very_large_images_are_accepted(image_processor):
    tiny = PIL.Image.new("RGB", (1, 1), (0, 0, 255))
    huge = PIL.Image.new("RGB", (4000, 3000), (0, 0, 255))
    assert _pixels(image_processor, [tiny, huge]).shape == (2, 3, SIZE, SIZE)


def test_image_files_load_by_path(image_processor, tmp_path):
    path = tmp_path / "image.png"
    PIL.Image.new("RGB", (10, 10)).save(path)
    assert _pixels(image_processor, str(path)).shape == (1, 3, SIZE, SIZE)


@pytest.mark.parametrize(
    ("bad", "message"),
    [
        (None, "no image given"),
        ([], "empty list"),
        (42, "unsupported type int"),
        ({"image": 1}, "unsupported type dict"),
        (np.zeros((0, 10, 3), dtype=np.uint8), "empty"),
        (np.zeros((10, 10, 5), dtype=np.uint8), "shape"),
        (np.zeros((2, 2, 10, 10, 3), dtype=np.uint8), "shape"),
        (np.full((10, 10, 3), 2.0), r"must lie in \[0, 1\]"),
        (np.full((10, 10, 3), np.nan), "NaN"),
        (np.array([["a"]]), "dtype"),
        (np.zeros((10, 10, 3), dtype=np.int32) + 300, r"outside \[0, 255\]"),
        ("/no/such/image.png", "no such file"),
    ],
)
def test_unusable_input_raises_a_clear_error(image_processor, bad, message):
    with pytest.raises(LoupeImageError, match=message):
        image_processor(bad)


def test_error_names_the_offending_item_in_a_list(image_processor):
    with pytest.raises(LoupeImageError, match="image 1"):
        image_processor([PIL.Image.new("RGB", (4, 4)), "not-an-image"])


def test_corrupt_image_file_raises_a_clear_error(image_processor, tmp_path):
    path = tmp_path / "broken.jpg"
    path.write_bytes(b"\xff\xd8\xff\xe0 definitely not a jpeg")
    with pytest.raises(LoupeImageError, match="not a readable image"):
        image_processor(str(path))


def test_image_processor_round_trips_through_save_pretrained(image_processor, tmp_path):
    image_processor.save_pretrained(tmp_path)
    loaded = type(image_processor).from_pretrained(tmp_path)
    image = PIL.Image.new("RGB", (50, 40), (1, 2, 3))
    torch.testing.assert_close(_pixels(loaded, image), _pixels(image_processor, image))


def test_both_backends_give_the_same_pixels():
    rng = np.random.default_rng(0)
    images = [
        rng.integers(0, 256, (96, 80, 3), dtype=np.uint8),
        PIL.Image.new("RGBA", (50, 70), (255, 0, 0, 128)),
        rng.random((40, 30)).astype(np.float32),
    ]
    pil, tensors = (
        _pixels(backend(size={"height": SIZE, "width": SIZE}), images)
        for backend in (LoupeImageProcessor, LoupeImageProcessorTorchvision)
    )
    # Both resize bicubically with antialiasing; they differ by rounding, about one grey level.
    assert (pil - tensors).abs().max() < 0.05
    assert (pil - tensors).abs().mean() < 0.005
