"""Embedding models by name: ``--model NAME[:ARG]`` is parsed once, here.

A model turns a batch of decoded images (PIL, RGB) into one float32 vector per image. Each model
class declares what the shards record about it (``name``, ``version``, ``dim``, ``default_eps``,
``metric``) and how large the decoder should make the images it is given (``decode_px``), so
that the decoder can skip work the model would throw away (``Image.draft`` on JPEGs).

Registered: ``pdq`` (Meta's PDQ perceptual hash, no weights, here) and the neural models of
:mod:`~dedup_batch.embed.neural`: ``onnx`` (onnxruntime), ``timm`` and ``open_clip`` (torch).
Each imports its libraries only when it is built, so an unused extra costs nothing.
"""

from __future__ import annotations

import abc
import functools
import math
import threading
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np

from ..errors import ConfigError

if TYPE_CHECKING:
    from PIL import Image

__all__ = ["MODELS", "Model", "PdqModel", "get_model", "parse_model"]


class Model(abc.ABC):
    """Base class of the embedding models.

    Attributes
    ----------
    name : str
        Registry name (``pdq``); with :attr:`arg`, what ``--model`` was given.
    version : str
        Changes whenever the same image could get another vector (library release,
        pre-processing). Shards of one output folder all carry one name and version.
    dim : int
        Length of every vector.
    default_eps : float
        The DBSCAN eps (in :attr:`metric`) at which two images count as the same picture;
        ``plan`` uses it when ``--eps`` is not given.
    metric : str
        The distance the vectors are meant for (``euclidean`` or ``cosine``).
    decode_px : int or None
        The decoder hands :meth:`embed` images no larger than ``decode_px`` on either side
        (JPEGs are decoded at a reduced scale, others resized); ``None`` for full size.
    min_px : int
        Images smaller than this on a side are refused by the decoder (listed as errors).
    micro_batch : int
        Images per :meth:`embed` call: bounds the decoded pixels held at once.
    """

    name: ClassVar[str]
    version: str
    dim: int
    default_eps: float
    metric: str = "euclidean"
    decode_px: int | None = None
    min_px: int = 1
    micro_batch: int = 32
    #: Extra per-image columns the model fills (name -> Arrow type name), e.g. PDQ's quality.
    extra_columns: ClassVar[dict[str, str]] = {}

    def __init__(self, arg: str | None = None) -> None:
        self.arg = arg

    @property
    def spec(self) -> str:
        """The ``--model`` text that builds this model again."""
        return self.name if self.arg is None else f"{self.name}:{self.arg}"

    def info(self) -> dict[str, Any]:
        """What the shards record: ``{name, version, dim, default_eps, metric}`` (JSON-able)."""
        return {
            "name": self.spec,
            "version": self.version,
            "dim": self.dim,
            "default_eps": self.default_eps,
            "metric": self.metric,
        }

    def embed(self, images: Sequence[Image.Image]) -> np.ndarray:
        """Vectors of ``images`` (RGB, at most ``decode_px`` a side): ``(n, dim)`` float32."""
        return self.embed_with_extras(images)[0]

    @abc.abstractmethod
    def embed_with_extras(
        self, images: Sequence[Image.Image]
    ) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        """:meth:`embed`, plus one array of length ``n`` per :attr:`extra_columns` entry."""


class PdqModel(Model):
    """Meta's PDQ perceptual hash (PyPI ``pdqhash``, the reference C++ code; no weights).

    Each image gives 256 bits and a quality score (0-100, the image's gradient energy; flat
    images score near 0). The bits are stored as a ±1.0 vector, so that the squared euclidean
    distance of two vectors is 4 × their Hamming distance.

    ``default_eps`` is ``2·√31.5`` (≈ 11.22): squared distances are multiples of 4, so every
    pair at Hamming distance ≤ 31 (PDQ's documented match threshold; squared distance ≤ 124)
    is within it and every pair at 32 or more (≥ 128) is not. That is the same partition as
    ``2·√31``, without a pair at exactly 31 depending on how the distance was rounded.

    Pre-processing follows the reference hasher (``pdq-photo-hasher``): an image larger than
    512 px on a side is first resampled to 512 × 512 (PDQ then filters it down to 64 × 64 and
    ignores the aspect ratio). The resampling here is an area average (Pillow's BOX, after
    ``Image.draft`` on JPEGs) where the reference uses CImg's nearest neighbour: the area
    average aliases less, so resized copies stay closer to their originals.

    Notes
    -----
    Time: one 512 × 512 image takes a few ms in ``pdqhash`` (C++ filter and DCT); the luma
    conversion, in numpy, about as long. Memory: ``micro_batch`` decoded images of at most
    512 × 512 × 3 bytes, plus two float32 luma buffers (2 MB) per image while it is hashed.
    """

    name = "pdq"
    dim = 256
    default_eps = 2.0 * math.sqrt(31.5)
    decode_px = 512
    min_px = 5
    extra_columns: ClassVar[dict[str, str]] = {"quality": "int16"}
    #: The reference hasher's intermediate size (``DOWNSAMPLE_DIMS`` in pdq/cpp/io/pdqio.cpp).
    DOWNSAMPLE_DIMS = 512

    def __init__(self, arg: str | None = None) -> None:
        if arg:
            raise ConfigError(f"--model pdq takes no argument, got 'pdq:{arg}'")
        super().__init__(None)
        try:
            import pdqhash
        except ImportError:
            raise ConfigError(
                "--model pdq needs the 'pdqhash' package: pip install 'dedup-batch[embed]' "
                "(it builds from source: needs a C++ compiler)"
            ) from None
        self._compute: Callable[[np.ndarray], tuple[np.ndarray, int]] = pdqhash.compute
        # The box resampling here is part of the vector: a change to it is a new version.
        self.version = f"pdqhash-{pdqhash.__version__}+box{self.DOWNSAMPLE_DIMS}"

    def embed_with_extras(
        self, images: Sequence[Image.Image]
    ) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        """±1 vectors ``(n, 256)`` float32 and ``{"quality": (n,) int16}``.

        Raises
        ------
        ValueError
            An image smaller than :attr:`min_px` (5) pixels on a side: PDQ gives it an all-zero
            hash (``MIN_HASHABLE_DIM`` in the reference), which would match every other one.
        """
        from PIL import Image

        out = np.empty((len(images), self.dim), dtype=np.float32)
        quality = np.empty(len(images), dtype=np.int16)
        for i, img in enumerate(images):
            w, h = img.size
            if min(w, h) < self.min_px:
                raise ValueError(f"{w}x{h} px is too small for PDQ (needs >= 5 px a side)")
            if max(w, h) > self.DOWNSAMPLE_DIMS:
                size = (self.DOWNSAMPLE_DIMS, self.DOWNSAMPLE_DIMS)
                img = img.resize(size, Image.Resampling.BOX)
            rgb = np.ascontiguousarray(np.asarray(img.convert("RGB"), dtype=np.uint8))
            bits, q = self._compute(rgb)
            out[i] = bits
            quality[i] = q
        out *= 2.0
        out -= 1.0
        return out, {"quality": quality}


# The neural models subclass Model, so they are imported once it is defined.
from .neural import OnnxModel, OpenClipModel, TimmModel  # noqa: E402

#: Model classes by registry name.
MODELS: dict[str, type[Model]] = {
    "pdq": PdqModel,
    "onnx": OnnxModel,
    "timm": TimmModel,
    "open_clip": OpenClipModel,
}


def parse_model(text: str) -> tuple[str, str | None]:
    """Split ``NAME[:ARG]`` and check ``NAME`` against the registry.

    Returns
    -------
    (name, arg)
        ``arg`` is ``None`` when no ``:`` was given; everything after the first ``:`` otherwise
        (an ONNX path or a model tag may contain ``:`` or ``/``).

    Raises
    ------
    ConfigError
        An empty or unknown name.
    """
    if not isinstance(text, str) or not text.strip():
        raise ConfigError("--model is empty: give a model name, e.g. --model pdq")
    name, sep, arg = text.strip().partition(":")
    name = name.lower()
    if name in MODELS:
        return name, (arg if sep else None)
    known = ", ".join(sorted(MODELS))
    raise ConfigError(f"--model {text}: unknown model {name!r}; available: {known}")


#: Held while a model is built: a worker's threads start their first tasks together, and each
#: would otherwise load its own copy of the weights.
_BUILD_LOCK = threading.Lock()


def get_model(text: str) -> Model:
    """The model for ``--model text``, built once per process (workers cache theirs)."""
    with _BUILD_LOCK:
        return _build(text)


@functools.lru_cache(maxsize=4)
def _build(text: str) -> Model:
    name, arg = parse_model(text)
    return MODELS[name](arg)
