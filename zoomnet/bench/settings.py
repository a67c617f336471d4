"""The bench's settings: every preset on its stand-in (``make-data`` writes it), defined by
the preset as shipped; the bench picks only the set's size, the epochs of its short runs
and the CNN baseline's input scale.

ATS is the preset with ``model.kind=ats`` (one dense level at the preset's ``ats_scale``,
patches of the sub-tile size); the CNN is the paper's small ResNet on the whole image, at
full resolution (cost only on a CPU) or downsampled by ``cnn_scale``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from zoomnet.config import RunConfig, apply_overrides, config_from_dict, load_config
from zoomnet.errors import UserError

MODELS = ["zoomin", "ats", "ats-fullres", "cnn", "cnn-downsampled"]
TRAINED = ("zoomin", "ats", "cnn-downsampled")  # the full-resolution CNN: cost only on a CPU


@dataclass(frozen=True)
class Setting:
    """A bench setting: the preset, its stand-in and how much of it the bench trains on.

    Attributes:
        preset: the shipped preset (model and training as shipped).
        data: the ``make-data`` kind of the stand-in.
        num: images in the set (60/20/20 split).
        size: the stand-in's image side (None: the kind's default).
        epochs: epochs of the bench's runs.
        cnn_scale: input scale of the downsampled CNN.
        models: the models the bench measures by default.
        cost_images: test images the trained cost columns average (large slides: fewer).
    """

    preset: str
    data: str
    num: int
    size: int | None
    epochs: int
    cnn_scale: float
    models: tuple[str, ...] = tuple(MODELS)
    cost_images: int = 8


# presets whose images are whole slides of 50k-200k px: measured by benchmarks/slide_scale.py
# on slides make-data slides writes, not on a stand-in that trains in minutes
SLIDE_PRESETS = ("camelyon16-k3",)
SETTINGS = {
    "colon-cancer": Setting("colon-cancer", "colon-cancer", 300, 500, 10, 0.2),
    "needles": Setting("needle-camelyon", "needles", 400, 1024, 6, 0.25),
    # smaller, fainter lesions among lone nuclei: where masks can add accuracy (the paper's Table 2)
    "needles-hard": Setting("needle-camelyon", "needles-hard", 400, 1024, 6, 0.25),
    "tiny-objects": Setting("tiny-objects", "tiny-objects", 534, 512, 8, 0.25),
    "megapixel-mnist": Setting("megapixel-mnist", "megapixel-mnist", 2000, 1500, 6, 0.12),
    "traffic-signs": Setting("traffic-signs", "traffic-signs", 600, 960, 15, 0.25),
    "fmow": Setting("fmow", "fmow", 400, 1000, 16, 0.25),
    # 8192^2 slides: the full-resolution CNN and ATS holding the slide do not fit a laptop
    "camelyon16": Setting("camelyon16", "camelyon16", 24, 8192, 20, 1 / 32,
                          models=("zoomin", "ats", "cnn-downsampled"), cost_images=2),
}


def setting(name: str) -> Setting:
    """The setting ``name``.

    Raises:
        UserError: an unknown name.
    """
    if name not in SETTINGS:
        raise UserError(f"bench {name}: unknown setting; choose one of: {', '.join(SETTINGS)}")
    return SETTINGS[name]


def setting_config(name: str, kind: str, overrides: list[str] | None = None) -> RunConfig:
    """The run configuration of one model of a setting: the preset with ``overrides``
    applied, then switched to the model's kind."""
    s = setting(name)
    data = apply_overrides(load_config(s.preset).to_dict(), list(overrides or []))
    if kind in ("ats", "ats-fullres"):
        data["model"]["kind"] = "ats"
    elif kind in ("cnn", "cnn-downsampled"):
        data["model"]["kind"] = "cnn"
        data["model"]["cnn_scale"] = 1.0 if kind == "cnn" else s.cnn_scale
    return config_from_dict(data, f"bench {name}")


def bench_image(name: str, seed: int = 0) -> np.ndarray:
    """One positive image (uint8 RGB) of the setting's stand-in, drawn as ``make-data`` draws
    them (the cost columns of an untrained model)."""
    from zoomnet.data.generators import needles, standins
    from zoomnet.data.generators.mnist import megapixel_mnist_image
    from zoomnet.data.generators.textures import histology_texture, mnist_digits
    from zoomnet.data.generators.tiny_objects import TinyObjects, make_tiny_objects

    s = setting(name)
    rng = np.random.default_rng(seed)
    if s.data == "tiny-objects":
        ex = make_tiny_objects(1, TinyObjects(size=s.size), seed=seed, positive_fraction=1.0)[0]
        return ex.source.image.permute(1, 2, 0).numpy()
    if s.data in ("needles", "needles-hard"):
        return needles.needles_image(rng, histology_texture(), s.size, True, hard=s.data == "needles-hard")[0]
    if s.data == "megapixel-mnist":
        digits, labels = mnist_digits()
        img, _ = megapixel_mnist_image(rng, digits, labels, np.arange(len(labels)), s.size, 3)
        return np.repeat(img[..., None], 3, axis=2)
    if s.data == "colon-cancer":
        return standins.colon_image(rng, histology_texture(), s.size, True)[0]
    if s.data == "traffic-signs":
        return standins.traffic_scene(rng, s.size, s.size * 4 // 3, "70")[0]
    if s.data == "fmow":
        return standins.fmow_scene(rng, s.size, s.size, "airport")[0]
    from zoomnet.data.generators.slides import SlideModel

    return SlideModel(s.size, seed, lesions=2, lesion_radius=(100.0, 250.0)).render(0, 0, 0, s.size, s.size)
