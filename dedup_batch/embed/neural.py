"""Neural embedding models: an ONNX file (onnxruntime), timm and open_clip models (torch).

``--model`` takes ``NAME:TARGET`` and, after a ``?``, options as ``key=value`` pairs joined by
``&`` (a URL's query string)::

    onnx:/models/dino-s16.onnx?size=224&mean=0.485,0.456,0.406&std=0.229,0.224,0.225
    timm:vit_small_patch14_dinov2.lvd142m            (weights from the Hugging Face cache/hub)
    timm:resnet50?weights=/models/resnet50.safetensors
    open_clip:ViT-B-32/laion2b_s34b_b79k
    open_clip:ViT-B-32//models/open_clip_vit_b32.bin (ARCH, then a local checkpoint path)

Every model here gives L2-normalised vectors, so euclidean distance and cosine distance rank
pairs alike (``d² = 2 (1 - cos)``); the default eps :data:`NEURAL_EPS` (0.3, cosine similarity
0.955 and up) is a starting point for near-identical copies, to be checked with
``dedup-batch sweep``; ``?eps=`` records another one in the shards.

A model is built once per process (:func:`~dedup_batch.embed.models.get_model` caches it), so a
Dask worker loads the weights once, not once per task; each task then runs its images through
it in batches of ``micro_batch`` (``?batch=``).
"""

from __future__ import annotations

import abc
import hashlib
import json
import math
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any, ClassVar
from urllib.parse import parse_qsl, urlencode

import numpy as np

from ..errors import ConfigError, one_line
from .models import Model

if TYPE_CHECKING:
    from PIL import Image

__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "NEURAL_EPS",
    "OnnxModel",
    "OpenClipModel",
    "Preprocess",
    "TimmModel",
]

#: Default eps of the neural models, on L2-normalised vectors: d = 0.3 is cosine similarity
#: 1 - 0.3²/2 = 0.955. Re-encodes and resizes of one photo typically stay above 0.97 with
#: CLIP/DINO-style models; different photos of one scene can reach 0.9 (kept apart).
NEURAL_EPS = 0.3
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
#: Images per model call: 32 × 3 × 224 × 224 float32 is 19 MB of input.
NEURAL_MICRO_BATCH = 32
_RESIZE_MODES = ("crop", "squash")
_INTERPOLATIONS = ("bicubic", "bilinear", "nearest", "box", "lanczos")


@dataclass(frozen=True)
class Preprocess:
    """How images become a model's input tensor (the usual ImageNet-style evaluation transform).

    Parameters
    ----------
    size : (height, width)
        Input size in pixels.
    mean, std : 3 floats each
        Per-channel normalisation, in the order of ``channels``, applied after dividing the
        8-bit values by ``scale``: ``(v / scale - mean) / std``.
    resize : {"crop", "squash"}
        ``crop``: scale the image so that it covers ``size / crop_pct`` (the shorter side
        fits), then take the centre ``size`` (timm's and open_clip's evaluation transform);
        ``squash``: resize to ``size`` ignoring the aspect ratio.
    crop_pct : float
        Fraction of the scaled image kept by ``crop`` (timm's ``crop_pct``; 1.0 for CLIP).
    interpolation : str
        Pillow resampling filter: bicubic, bilinear, nearest, box or lanczos.
    channels : {"rgb", "bgr"}
        Channel order of the tensor.
    layout : {"nchw", "nhwc"}
        Tensor layout.
    scale : float
        8-bit values are divided by this first (255: inputs in [0, 1]; 1: in [0, 255]).

    Notes
    -----
    One Pillow resampling per image (crop and resize in one call, from the decoded image, which
    ``Image.draft`` already made no larger than needed); the batch is ``n × 3 × H × W`` float32
    (n = 32, 224²: 19 MB).
    """

    size: tuple[int, int]
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    resize: str = "crop"
    crop_pct: float = 1.0
    interpolation: str = "bicubic"
    channels: str = "rgb"
    layout: str = "nchw"
    scale: float = 255.0

    def __post_init__(self) -> None:
        h, w = self.size
        if not (isinstance(h, int) and isinstance(w, int) and h > 0 and w > 0):
            raise ConfigError(f"model input size must be two positive integers, got {self.size}")
        if len(self.mean) != 3 or len(self.std) != 3 or not all(s > 0 for s in self.std):
            raise ConfigError("model mean and std need 3 values each (std > 0)")
        checks = (
            ("resize", self.resize, _RESIZE_MODES),
            ("interpolation", self.interpolation, _INTERPOLATIONS),
            ("channels", self.channels, ("rgb", "bgr")),
            ("layout", self.layout, ("nchw", "nhwc")),
        )
        for key, value, allowed in checks:
            if value not in allowed:
                raise ConfigError(f"model option {key}={value!r}: one of {', '.join(allowed)}")
        if not (0 < self.crop_pct <= 1) or not self.scale > 0:
            raise ConfigError("model option crop_pct must be in (0, 1] and scale > 0")

    @property
    def decode_px(self) -> int:
        """The side the decoder must keep (JPEG draft): the scaled size before the crop."""
        return math.ceil(max(self.size) / self.crop_pct)

    def digest(self) -> str:
        """8 hex digits naming these settings (part of a model's version)."""
        text = json.dumps(asdict(self), sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()[:8]

    def __call__(self, images: Sequence[Image.Image]) -> np.ndarray:
        """The input tensor of ``images`` (RGB): ``(n, 3, H, W)`` or ``(n, H, W, 3)`` float32."""
        from PIL import Image

        h, w = self.size
        resample = Image.Resampling[self.interpolation.upper()]
        out = np.empty((len(images), h, w, 3), dtype=np.float32)
        for i, img in enumerate(images):
            iw, ih = img.size
            box = None
            if self.resize == "crop":
                # the source window that scales onto the centre crop: one resampling, no
                # intermediate image
                s = max(h / self.crop_pct / ih, w / self.crop_pct / iw)
                cw, ch = w / s, h / s
                x0, y0 = (iw - cw) / 2, (ih - ch) / 2
                box = (x0, y0, x0 + cw, y0 + ch)
            out[i] = np.asarray(img.convert("RGB").resize((w, h), resample, box=box))
        if self.channels == "bgr":
            out = out[..., ::-1]
        mean = np.asarray(self.mean, dtype=np.float32)
        std = np.asarray(self.std, dtype=np.float32)
        out = (out / np.float32(self.scale) - mean) / std
        if self.layout == "nchw":
            out = out.transpose(0, 3, 1, 2)
        return np.ascontiguousarray(out, dtype=np.float32)


def split_options(arg: str | None, model: str, allowed: Sequence[str]) -> tuple[str, dict]:
    """``TARGET?k=v&k=v`` -> ``(TARGET, {k: v})``; unknown or repeated keys are errors."""
    if not arg:
        raise ConfigError(f"--model {model} needs a model after the ':' (see --help)")
    target, sep, query = arg.partition("?")
    options: dict[str, str] = {}
    if sep:
        for key, value in parse_qsl(query, keep_blank_values=True, strict_parsing=False):
            if key not in allowed:
                raise ConfigError(
                    f"--model {model}:{arg}: unknown option {key!r}; options: {', '.join(allowed)}"
                )
            if key in options:
                raise ConfigError(f"--model {model}:{arg}: option {key!r} given twice")
            options[key] = value
    if not target:
        raise ConfigError(f"--model {model}:{arg}: no model before the '?'")
    return target, options


def _floats(text: str, key: str, n: int) -> tuple[float, ...]:
    try:
        values = tuple(float(v) for v in text.split(","))
    except ValueError:
        raise ConfigError(f"model option {key}={text!r}: {n} comma-separated numbers") from None
    if len(values) != n or not all(math.isfinite(v) for v in values):
        raise ConfigError(f"model option {key}={text!r}: {n} comma-separated numbers")
    return values


def _positive(text: str, key: str, kind: Callable[[str], Any] = float) -> Any:
    try:
        value = kind(text)
    except ValueError:
        raise ConfigError(f"model option {key}={text!r}: a positive number") from None
    if not (value > 0 and math.isfinite(value)):
        raise ConfigError(f"model option {key}={text!r}: a positive number")
    return value


def file_digest(path: str) -> str:
    """``sha256:`` + 16 hex digits of a local file (the weights' identity in a version)."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return "sha256:" + h.hexdigest()[:16]


class _Neural(Model):
    """A model whose vectors are a network's output for a pre-processed batch, L2-normalised.

    Subclasses load the network in :meth:`_load` (and set :attr:`pre` and :attr:`version`) and
    run a batch in :meth:`_forward`.
    """

    metric = "euclidean"
    default_eps = NEURAL_EPS
    micro_batch = NEURAL_MICRO_BATCH
    min_px = 2
    #: Options every neural model takes: ``eps`` (the default eps recorded in the shards) and
    #: ``batch`` (images per model call).
    COMMON_OPTIONS: ClassVar[tuple[str, ...]] = ("eps", "batch")
    OPTIONS: ClassVar[tuple[str, ...]] = ()
    pre: Preprocess

    def __init__(self, arg: str | None = None) -> None:
        target, options = split_options(arg, self.name, self.COMMON_OPTIONS + self.OPTIONS)
        self.target = target
        self.options = options
        super().__init__(arg)
        if "eps" in options:
            self.default_eps = _positive(options["eps"], "eps")
        if "batch" in options:
            self.micro_batch = _positive(options["batch"], "batch", int)
        self._load(target, options)
        self.decode_px = self.pre.decode_px
        # One blank image through the network: its output size is the vector's dimension
        # (ONNX and torch models rarely declare it), and a model that cannot run fails here, on
        # the client, before any task starts.
        from PIL import Image

        probe = self._forward(self.pre([Image.new("RGB", self.pre.size[::-1])]))
        self.dim = int(probe.reshape(1, -1).shape[1])

    @property
    def spec(self) -> str:
        """``NAME:TARGET`` plus the options sorted by key: one text per model and options."""
        if not self.options:
            return f"{self.name}:{self.target}"
        return f"{self.name}:{self.target}?{urlencode(sorted(self.options.items()))}"

    @abc.abstractmethod
    def _load(self, target: str, options: Mapping[str, str]) -> None:
        """Load the network from ``target``; set :attr:`pre` and :attr:`version`."""

    @abc.abstractmethod
    def _forward(self, batch: np.ndarray) -> np.ndarray:
        """The network's output for a pre-processed batch: ``(n, ...)``."""

    def embed_with_extras(
        self, images: Sequence[Image.Image]
    ) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        """Unit vectors ``(n, dim)`` float32; no extra columns.

        Raises
        ------
        ValueError
            The network gave a zero or non-finite vector (it cannot be normalised; the image
            gets no vector and is listed as an error).
        """
        y = self._forward(self.pre(images)).reshape(len(images), -1).astype(np.float32)
        norms = np.linalg.norm(y, axis=1, keepdims=True)
        if not np.all(np.isfinite(norms)) or np.any(norms == 0):
            raise ValueError("the model gave a zero or non-finite vector")
        return y / norms, {}


class OnnxModel(_Neural):
    """An ONNX image encoder run by onnxruntime (extra ``[embed-onnx]``): ``onnx:PATH[?...]``.

    ``PATH`` is a local file (every Dask worker must be able to read it: ship it in the image or
    mount it) or any fsspec URL. The first input takes the image batch; the first output (or
    ``?output=NAME``) is the vector, flattened per image.

    Options (``?key=value&...``; the defaults fit most ImageNet-trained encoders):

    ``size``
        ``H`` or ``H,W``; default: the input's static shape.
    ``layout``
        ``nchw`` or ``nhwc``; default: from the input's shape (3 channels first or last).
    ``mean``, ``std``
        3 numbers each, default ImageNet's (0.485,0.456,0.406 / 0.229,0.224,0.225).
    ``scale``
        255 (pixels in [0, 1] before mean/std, the default) or 1 (in [0, 255]).
    ``channels``
        ``rgb`` (default) or ``bgr``.
    ``resize``, ``crop_pct``, ``interpolation``
        ``crop`` (default: cover, then centre crop) or ``squash``; 1.0; ``bicubic``.
    ``input``, ``output``
        Tensor names, when the model has several.
    ``eps``, ``batch``
        Default eps recorded in the shards (0.3); images per call (32).

    ``version`` is the file's SHA-256 and the pre-processing's digest (not onnxruntime's
    release: runtimes differ in the last bits of a float, far below any eps).
    """

    name = "onnx"
    OPTIONS: ClassVar[tuple[str, ...]] = (
        "size",
        "layout",
        "mean",
        "std",
        "scale",
        "channels",
        "resize",
        "crop_pct",
        "interpolation",
        "input",
        "output",
    )

    def _load(self, target: str, options: Mapping[str, str]) -> None:
        try:
            import onnxruntime as ort
        except ImportError:
            raise ConfigError(
                f"--model onnx:{target} needs onnxruntime: pip install 'dedup-batch[embed-onnx]'"
            ) from None
        from ..storage import read_url

        try:
            data = read_url(target)
        except FileNotFoundError:
            raise ConfigError(f"--model onnx:{target}: no such file") from None
        except Exception as exc:
            raise ConfigError(f"--model onnx:{target}: cannot read it ({one_line(exc)})") from None
        so = ort.SessionOptions()
        # Dask already runs one batch per worker thread; onnxruntime's own pool (a thread per
        # core) inside each of them would put cores × threads runnable threads on the machine.
        so.intra_op_num_threads = 1
        try:
            self._session = ort.InferenceSession(data, so, providers=["CPUExecutionProvider"])
        except Exception as exc:
            raise ConfigError(
                f"--model onnx:{target}: not a model onnxruntime can load ({one_line(exc)})"
            ) from None
        inputs = {i.name: i for i in self._session.get_inputs()}
        outputs = [o.name for o in self._session.get_outputs()]
        inp = inputs.get(options.get("input", ""), self._session.get_inputs()[0])
        if "input" in options and options["input"] not in inputs:
            raise ConfigError(f"--model onnx:{target}: no input {options['input']!r}")
        if inp.type != "tensor(float)":
            raise ConfigError(
                f"--model onnx:{target}: input {inp.name!r} is {inp.type}; a float32 image "
                "tensor is needed"
            )
        self._input = inp.name
        self._output = options.get("output", outputs[0])
        if self._output not in outputs:
            raise ConfigError(f"--model onnx:{target}: no output {self._output!r}")
        shape = list(inp.shape)
        if len(shape) != 4:
            raise ConfigError(
                f"--model onnx:{target}: input {inp.name!r} has shape {shape}; an image "
                "batch (N,3,H,W or N,H,W,3) is needed"
            )
        layout = options.get("layout") or ("nhwc" if shape[3] == 3 and shape[1] != 3 else "nchw")
        hw = shape[2:4] if layout == "nchw" else shape[1:3]
        if "size" in options:
            try:
                sides = [int(v) for v in options["size"].split(",")]
            except ValueError:
                sides = []
            if len(sides) not in (1, 2) or min(sides) < 1:
                raise ConfigError(f"model option size={options['size']!r}: H or H,W in pixels")
            size = (sides[0], sides[-1])
        elif all(isinstance(s, int) and s > 0 for s in hw):
            size = (int(hw[0]), int(hw[1]))
        else:
            raise ConfigError(
                f"--model onnx:{target}: the input size is not fixed in the model ({shape}): "
                "give it, e.g. onnx:PATH?size=224"
            )
        self.pre = Preprocess(
            size=size,
            mean=_floats(options["mean"], "mean", 3) if "mean" in options else IMAGENET_MEAN,
            std=_floats(options["std"], "std", 3) if "std" in options else IMAGENET_STD,
            resize=options.get("resize", "crop"),
            crop_pct=_positive(options["crop_pct"], "crop_pct") if "crop_pct" in options else 1.0,
            interpolation=options.get("interpolation", "bicubic"),
            channels=options.get("channels", "rgb"),
            layout=layout,
            scale=_positive(options["scale"], "scale") if "scale" in options else 255.0,
        )
        digest = "sha256:" + hashlib.sha256(data).hexdigest()[:16]
        self.version = f"onnx+{digest}+pre{self.pre.digest()}"

    def _forward(self, batch: np.ndarray) -> np.ndarray:
        return np.asarray(self._session.run([self._output], {self._input: batch})[0])


class _Torch(_Neural):
    """A torch image encoder on the CPU (extra ``[embed-torch]``)."""

    #: The library besides torch that the model comes from.
    LIBRARY: ClassVar[str]

    def _import(self) -> Any:
        try:
            import torch

            lib = __import__(self.LIBRARY)
        except ImportError as exc:
            raise ConfigError(
                f"--model {self.name}:{self.target} needs torch and {self.LIBRARY} "
                f"({one_line(exc)}): pip install 'dedup-batch[embed-torch]'"
            ) from None
        # As onnxruntime's intra_op_num_threads = 1 above: Dask already runs one batch per
        # worker thread, and torch's own pool (a thread per core, process-wide) inside each of
        # them put cores x threads runnable threads on the machine.
        torch.set_num_threads(1)
        self._torch = torch
        return lib

    def _weights_error(self, exc: BaseException, hint: str) -> ConfigError:
        return ConfigError(
            f"--model {self.name}:{self.target}: cannot load the weights ({one_line(exc)}); {hint}"
        )

    def _forward(self, batch: np.ndarray) -> np.ndarray:
        torch = self._torch
        with torch.inference_mode():
            y = self._encode(torch.from_numpy(batch))
        return y.float().cpu().numpy()

    @abc.abstractmethod
    def _encode(self, x: Any) -> Any:
        """The image embedding of the tensor batch ``x`` (torch, ``(n, 3, H, W)``)."""


class TimmModel(_Torch):
    """A timm model's pooled features: ``timm:NAME[?weights=PATH]``.

    Weights come from ``?weights=`` (a local ``.safetensors``/``.pth`` file), else the Hugging
    Face cache (``HF_HOME``; set ``HF_HUB_OFFLINE=1`` on machines without network), else the
    hub. The classifier is dropped (``num_classes=0``: the pooled features). Pre-processing is
    the model's own evaluation transform (``timm.data.resolve_model_data_config``: input size,
    mean/std, ``crop_pct``, interpolation). ``version``: the weights (tag or file digest) and
    the pre-processing digest.
    """

    name = "timm"
    LIBRARY = "timm"
    OPTIONS: ClassVar[tuple[str, ...]] = ("weights",)

    def _load(self, target: str, options: Mapping[str, str]) -> None:
        timm = self._import()
        if not timm.is_model(target.split(".")[0]):
            raise ConfigError(f"--model timm:{target}: timm has no model {target!r}")
        weights = options.get("weights")
        overlay = {"file": weights} if weights else None
        if weights and not os.path.isfile(weights):
            raise ConfigError(f"--model timm:{target}: weights file {weights!r} not found")
        try:
            model = timm.create_model(
                target, pretrained=True, num_classes=0, pretrained_cfg_overlay=overlay
            )
        except Exception as exc:
            raise self._weights_error(
                exc,
                "give a local file with ?weights=PATH, fill the Hugging Face cache, or "
                "allow this machine to reach the hub",
            ) from None
        self._model = model.eval()
        cfg = timm.data.resolve_model_data_config(model)
        self.pre = Preprocess(
            size=(int(cfg["input_size"][1]), int(cfg["input_size"][2])),
            mean=tuple(float(v) for v in cfg["mean"]),  # type: ignore[arg-type]
            std=tuple(float(v) for v in cfg["std"]),  # type: ignore[arg-type]
            resize="crop" if cfg.get("crop_mode", "center") == "center" else "squash",
            crop_pct=float(cfg.get("crop_pct") or 1.0),
            interpolation=cfg.get("interpolation") or "bicubic",
        )
        pc = model.pretrained_cfg or {}
        source = file_digest(weights) if weights else (pc.get("hf_hub_id") or pc.get("tag"))
        self.version = f"timm+{source}+pre{self.pre.digest()}"

    def _encode(self, x: Any) -> Any:
        return self._model(x)


class OpenClipModel(_Torch):
    """An open_clip image tower: ``open_clip:ARCH/PRETRAINED[?config=PATH]``.

    ``PRETRAINED`` is a tag open_clip knows (``laion2b_s34b_b79k``; weights from the Hugging
    Face cache, or the hub) or a local checkpoint path (``open_clip:ViT-B-32//models/b32.pt``);
    ``ARCH`` may be ``hf-hub:ORG/REPO`` (model and weights from that repository).
    ``?config=PATH`` registers a model config JSON first (``ARCH`` is then its file name
    without ``.json``). Pre-processing is the model's own (``open_clip.get_model_preprocess_cfg``:
    size, mean/std, interpolation; ``shortest`` -> crop, ``squash`` -> squash).
    ``version``: the weights (tag or file digest) and the pre-processing digest.
    """

    name = "open_clip"
    LIBRARY = "open_clip"
    OPTIONS: ClassVar[tuple[str, ...]] = ("config",)

    def _load(self, target: str, options: Mapping[str, str]) -> None:
        open_clip = self._import()
        if target.startswith("hf-hub:"):
            arch, pretrained = target, None
        else:
            arch, _, pretrained = target.partition("/")
            if not pretrained:
                raise ConfigError(
                    f"--model open_clip:{target}: give the weights as ARCH/PRETRAINED "
                    "(a tag or a local checkpoint path), e.g. open_clip:ViT-B-32/laion2b_s34b_b79k"
                )
        if "config" in options:
            if not os.path.isfile(options["config"]):
                raise ConfigError(
                    f"--model open_clip:{target}: config {options['config']!r} not found"
                )
            open_clip.add_model_config(options["config"])
        if not arch.startswith("hf-hub:") and arch not in open_clip.list_models():
            raise ConfigError(f"--model open_clip:{target}: open_clip has no model {arch!r}")
        try:
            model = open_clip.create_model(arch, pretrained=pretrained, device="cpu")
        except Exception as exc:
            raise self._weights_error(
                exc,
                "give a local checkpoint path (ARCH//path/file.pt), fill the Hugging Face "
                "cache, or allow this machine to reach the hub",
            ) from None
        self._model = model.eval()
        cfg = open_clip.get_model_preprocess_cfg(model)
        size = cfg.get("size", 224)
        size = (size, size) if isinstance(size, int) else tuple(int(s) for s in size)
        mode = cfg.get("resize_mode", "shortest")
        if mode not in ("shortest", "squash"):
            raise ConfigError(f"--model open_clip:{target}: resize mode {mode!r} is not supported")
        self.pre = Preprocess(
            size=size,  # type: ignore[arg-type]
            mean=tuple(float(v) for v in cfg.get("mean", IMAGENET_MEAN)),  # type: ignore[arg-type]
            std=tuple(float(v) for v in cfg.get("std", IMAGENET_STD)),  # type: ignore[arg-type]
            resize="crop" if mode == "shortest" else "squash",
            interpolation=cfg.get("interpolation", "bicubic"),
        )
        local = pretrained is not None and os.path.isfile(pretrained)
        source = file_digest(pretrained) if local else (pretrained or arch)
        self.version = f"open_clip+{source}+pre{self.pre.digest()}"

    def _encode(self, x: Any) -> Any:
        return self._model.encode_image(x)
