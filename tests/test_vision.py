import torch
from PIL import Image

from model.towers.clip import CLIP_MEAN, clip_image_processor as build_image_processor
from model.vision import expand_to_square, mean_colour, preprocess_images


def test_pad_to_square_uses_clip_mean_colour_and_centres():
    processor = build_image_processor(64)
    background = mean_colour(processor)
    assert background == (122, 116, 104) == tuple(int(255 * m) for m in CLIP_MEAN)
    wide = Image.new("RGB", (100, 40), (255, 0, 0))
    square = expand_to_square(wide, background)
    assert square.size == (100, 100)
    assert square.getpixel((50, 10)) == background and square.getpixel((50, 89)) == background
    assert square.getpixel((50, 30)) == (255, 0, 0) and square.getpixel((50, 69)) == (255, 0, 0)
    tall = expand_to_square(Image.new("RGB", (30, 90), (0, 0, 255)), background)
    assert tall.size == (90, 90) and tall.getpixel((5, 45)) == background and tall.getpixel((45, 45)) == (0, 0, 255)


def test_processed_pixels_are_normalised_squares():
    processor = build_image_processor(64)
    pixels = preprocess_images([Image.new("RGB", (200, 50), (255, 0, 0)), Image.new("L", (17, 33), 128)], processor)
    assert pixels.shape == (2, 3, 64, 64) and pixels.dtype == torch.float32
    # the padded band is the mean colour, which normalises to about zero
    assert pixels[0, :, 2, 32].abs().max() < 0.02
    # the red band: (1 - 0.4815) / 0.2686 in the red channel
    assert abs(pixels[0, 0, 32, 32].item() - (1 - 0.48145466) / 0.26862954) < 0.02
