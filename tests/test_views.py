import pytest
import torch

from raydd.views import View, hflip_boxes

VIEWS = [
    View(),
    View(hflip=True),
    View(scale=64),
    View(scale=200, hflip=True),
    View(scale=97),
]


@pytest.mark.parametrize("view", VIEWS, ids=lambda v: v.name)
def test_invert_undoes_apply_on_boxes(view):
    boxes = torch.tensor([[0.0, 0.0, 10.0, 20.0], [33.5, 12.25, 90.0, 70.0]])
    mapped = view.apply_boxes(boxes, 80, 120)
    back = view.invert_boxes(mapped, 80, 120)
    torch.testing.assert_close(back, boxes, atol=1e-4, rtol=0)


# A box [10, 5, 30, 25] of a 50x100 (height x width) image, worked out by hand in
# each view: a scale multiplies, a flip of a view W wide maps x to W - x.
BY_HAND = [
    (View(), [10, 5, 30, 25]),
    (View(hflip=True), [70, 5, 90, 25]),  # 100 wide
    (View(scale=100), [20, 10, 60, 50]),  # x2: 100x200
    (View(scale=100, hflip=True), [140, 10, 180, 50]),  # x2, then 200 wide
    (View(scale=25, hflip=True), [35, 2.5, 45, 12.5]),  # x0.5, then 50 wide
    (View(scale=100, max_size=150), [15, 7.5, 45, 37.5]),  # the cap: x1.5
]


@pytest.mark.parametrize("view,expected", BY_HAND, ids=[v.name for v, _ in BY_HAND])
def test_boxes_land_where_the_view_puts_them_and_come_back(view, expected):
    box = torch.tensor([[10.0, 5.0, 30.0, 25.0]])
    expected = torch.tensor([expected], dtype=torch.float32)
    torch.testing.assert_close(
        view.apply_boxes(box, 50, 100), expected, atol=1e-4, rtol=0
    )
    # a box predicted on the view at the hand-made place maps back to the original
    back = view.invert_boxes(expected, 50, 100)
    torch.testing.assert_close(back, box, atol=1e-4, rtol=0)


def test_invert_of_empty_boxes_is_empty():
    assert View(scale=64, hflip=True).invert_boxes(
        torch.zeros(0, 4), 80, 120
    ).shape == (0, 4)


@pytest.mark.parametrize("view", VIEWS, ids=lambda v: v.name)
def test_boxes_follow_the_pixels(view):
    # A bright rectangle on a black image: its box in the view must cover the bright
    # pixels of the transformed image.
    image = torch.zeros(3, 80, 120)
    image[:, 10:30, 20:50] = 1.0
    box = torch.tensor([[20.0, 10.0, 50.0, 30.0]])
    out = view.apply(image)
    assert out.shape[-2:] == view.output_size(80, 120)
    ys, xs = torch.nonzero(out[0] > 0.5, as_tuple=True)
    x0, y0, x1, y1 = view.apply_boxes(box, 80, 120)[0].tolist()
    assert abs(xs.min().item() - x0) <= 1 and abs(xs.max().item() + 1 - x1) <= 1
    assert abs(ys.min().item() - y0) <= 1 and abs(ys.max().item() + 1 - y1) <= 1


def test_scale_sets_the_shorter_side():
    assert View(scale=400).output_size(300, 600) == (400, 800)
    assert View(scale=400).output_size(600, 300) == (800, 400)
    assert View().output_size(300, 600) == (300, 600)


def test_hflip_boxes_mirrors():
    flipped = hflip_boxes(torch.tensor([[10.0, 5.0, 30.0, 25.0]]), 100)
    assert flipped.tolist() == [[70.0, 5.0, 90.0, 25.0]]
