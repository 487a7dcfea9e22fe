"""Neural models through the embed registry: ONNX (onnxruntime), timm and open_clip (torch).

Every model here is built by the test itself (a random projection written with ``onnx.helper``,
timm's ``test_vit``, an open_clip config a few kilobytes large), saved to a file, and loaded by
the same code that loads a real one: nothing is downloaded (``HF_HUB_OFFLINE=1``).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from dedup_batch.config import JobSpec
from dedup_batch.demo import photo
from dedup_batch.embed import MODEL_KEY, default_eps, embed_images, get_model, parse_model
from dedup_batch.embed.images import decode_image
from dedup_batch.embed.models import _build
from dedup_batch.embed.neural import NEURAL_EPS, Preprocess, split_options
from dedup_batch.errors import ConfigError, InputError
from dedup_batch.load import load_features
from dedup_batch.pipeline import plan
from dedup_batch.storage import Store

onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")

SIDE = 16
DIM = 64


def tiny_onnx(
    path: Path, *, nhwc: bool = False, dynamic: bool = False, seed: int = 0
) -> np.ndarray:
    """A linear image encoder (flatten, then a random 768 x 64 projection) as an ONNX file.

    Returns the projection, so a test can compute the expected vectors itself.
    """
    from onnx import TensorProto, helper, numpy_helper

    W = np.random.default_rng(seed).standard_normal((3 * SIDE * SIDE, DIM)).astype(np.float32)
    hw: list = ["H", "W"] if dynamic else [SIDE, SIDE]
    shape = ["N", *hw, 3] if nhwc else ["N", 3, *hw]
    graph = helper.make_graph(
        [
            helper.make_node("Reshape", ["image", "flat_shape"], ["flat"]),
            helper.make_node("MatMul", ["flat", "W"], ["embedding"]),
        ],
        "tiny",
        [helper.make_tensor_value_info("image", TensorProto.FLOAT, shape)],
        [helper.make_tensor_value_info("embedding", TensorProto.FLOAT, ["N", DIM])],
        initializer=[
            numpy_helper.from_array(W, "W"),
            numpy_helper.from_array(np.array([-1, 3 * SIDE * SIDE], np.int64), "flat_shape"),
        ],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8  # readable by every onnxruntime since 1.10
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return W


def expected(W: np.ndarray, images: list[Image.Image], pre: Preprocess) -> np.ndarray:
    x = pre(images).reshape(len(images), -1) @ W
    return x / np.linalg.norm(x, axis=1, keepdims=True)


# -- pre-processing ----------------------------------------------------------------------------
def test_preprocess_normalises_crops_and_lays_out() -> None:
    # a 40 x 20 image: left half red, right half blue; crop keeps the centre 20 x 20
    img = Image.new("RGB", (40, 20), (255, 0, 0))
    img.paste((0, 0, 255), (20, 0, 40, 20))
    pre = Preprocess(size=(4, 4), mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5), interpolation="box")
    x = pre([img])
    assert x.shape == (1, 3, 4, 4) and x.dtype == np.float32
    # (v / 255 - 0.5) / 0.5: 255 -> 1, 0 -> -1; centre crop columns 0-1 red, 2-3 blue
    assert np.allclose(x[0, 0, :, :2], 1) and np.allclose(x[0, 2, :, :2], -1)
    assert np.allclose(x[0, 0, :, 2:], -1) and np.allclose(x[0, 2, :, 2:], 1)
    # squash keeps the whole width: two red and two blue columns of 4 as well, but from 40 px
    sq = Preprocess(size=(4, 8), resize="squash", interpolation="box", layout="nhwc")([img])
    assert sq.shape == (1, 4, 8, 3)
    bgr = Preprocess(size=(4, 4), channels="bgr", scale=1.0, mean=(0, 0, 0), std=(1, 1, 1))
    assert np.allclose(bgr([img])[0, 2, :, 0], 255)  # red is the last channel in BGR
    # crop_pct 0.5: the image is scaled to cover 8 px, the centre 4 are all one colour each side
    half = Preprocess(size=(4, 4), crop_pct=0.5, interpolation="box")
    assert half.decode_px == 8
    with pytest.raises(ConfigError, match="resize"):
        Preprocess(size=(4, 4), resize="pad")
    with pytest.raises(ConfigError, match="mean and std"):
        Preprocess(size=(4, 4), std=(0, 1, 1))
    assert pre.digest() != Preprocess(size=(4, 4)).digest()


def test_model_options_parse_and_refuse() -> None:
    assert split_options("/m.onnx?size=32&mean=0,0,0", "onnx", ("size", "mean")) == (
        "/m.onnx",
        {"size": "32", "mean": "0,0,0"},
    )
    with pytest.raises(ConfigError, match="unknown option 'colour'"):
        split_options("/m.onnx?colour=1", "onnx", ("size",))
    with pytest.raises(ConfigError, match="given twice"):
        split_options("/m.onnx?size=1&size=2", "onnx", ("size",))
    with pytest.raises(ConfigError, match="needs a model"):
        get_model("onnx")
    assert parse_model("ONNX:/a:b/m.onnx") == ("onnx", "/a:b/m.onnx")
    with pytest.raises(ConfigError, match=r"unknown model 'clip'.*open_clip, pdq, timm"):
        parse_model("clip")


# -- ONNX --------------------------------------------------------------------------------------
def test_onnx_vectors_are_the_models_output_normalised(tmp_path: Path) -> None:
    W = tiny_onnx(tmp_path / "tiny.onnx")
    model = get_model(f"onnx:{tmp_path / 'tiny.onnx'}")
    assert (model.dim, model.metric, model.default_eps) == (DIM, "euclidean", NEURAL_EPS)
    assert model.pre.size == (SIDE, SIDE) and model.pre.layout == "nchw"
    images = [photo(s, 64, 48) for s in range(5)]
    X = model.embed(images)
    assert X.shape == (5, DIM) and X.dtype == np.float32
    assert np.allclose(np.linalg.norm(X, axis=1), 1, atol=1e-5)
    assert np.allclose(X, expected(W, images, model.pre), atol=1e-4)
    info = model.info()
    assert info["name"] == f"onnx:{tmp_path / 'tiny.onnx'}"
    assert info["version"].startswith("onnx+sha256:") and info["dim"] == DIM

    # NHWC found from the input's shape; options are part of the name and the version
    tiny_onnx(tmp_path / "nhwc.onnx", nhwc=True)
    nhwc = get_model(f"onnx:{tmp_path / 'nhwc.onnx'}?std=0.5,0.5,0.5&mean=0.5,0.5,0.5&eps=0.2")
    assert nhwc.pre.layout == "nhwc" and nhwc.default_eps == 0.2
    assert (
        nhwc.spec
        == f"onnx:{tmp_path / 'nhwc.onnx'}?eps=0.2&mean=0.5%2C0.5%2C0.5&std=0.5%2C0.5%2C0.5"
    )
    assert get_model(nhwc.spec).pre == nhwc.pre
    assert nhwc.version != model.version
    assert np.allclose(nhwc.embed(images), expected(W, images, nhwc.pre), atol=1e-4)


def test_onnx_errors_are_one_line(tmp_path: Path) -> None:
    tiny_onnx(tmp_path / "dyn.onnx", dynamic=True)
    with pytest.raises(ConfigError, match=r"input size is not fixed.*\?size=224"):
        get_model(f"onnx:{tmp_path / 'dyn.onnx'}")
    assert get_model(f"onnx:{tmp_path / 'dyn.onnx'}?size={SIDE}").dim == DIM
    with pytest.raises(ConfigError, match="no such file"):
        get_model(f"onnx:{tmp_path / 'absent.onnx'}")
    (tmp_path / "junk.onnx").write_bytes(b"not a model")
    with pytest.raises(ConfigError, match="not a model onnxruntime can load") as err:
        get_model(f"onnx:{tmp_path / 'junk.onnx'}")
    assert "\n" not in str(err.value)
    with pytest.raises(ConfigError, match="no output 'x'"):
        get_model(f"onnx:{tmp_path / 'dyn.onnx'}?size=16&output=x")


def test_onnx_embed_on_dask_loads_the_model_once_per_worker_then_plans(
    tmp_path: Path, dask_client
) -> None:
    tiny_onnx(tmp_path / "tiny.onnx")
    spec = f"onnx:{tmp_path / 'tiny.onnx'}"
    root = tmp_path / "photos"
    root.mkdir()
    for i in range(6):
        img = photo(200 + i, 96, 64)
        img.save(root / f"p{i}.jpg", quality=92)
        img.save(root / f"p{i} (copy).jpg", quality=60)
    before = dask_client.run(lambda: _build.cache_info().misses)
    out = tmp_path / "features"
    result = embed_images(str(root), str(out), model=spec, batch_size=2, client=dask_client)
    assert (result.embedded, result.errors, result.batches) == (12, 0, 6)
    after = dask_client.run(lambda: _build.cache_info().misses)
    built = {w: after[w] - before[w] for w in after}
    # 6 tasks on 2 workers: each worker that ran one built the model once, not once per task
    assert set(built.values()) <= {0, 1} and sum(built.values()) >= 1, built

    shard = pq.read_table(result.shards_written[0])
    info = json.loads(shard.schema.metadata[MODEL_KEY])
    assert info["name"] == spec and info["default_eps"] == NEURAL_EPS and info["dim"] == DIM
    eps, _ = default_eps([str(out / "*.parquet")], None)
    assert eps == NEURAL_EPS
    feats = load_features(str(out / "*.parquet"), store=Store(str(root)))
    model = get_model(spec)
    for p, x in zip(feats.paths, feats.X, strict=True):
        # as the workers decode: JPEGs drafted down to the model's input size
        dec = decode_image((root / p).read_bytes(), max_pixels=10**8, decode_px=model.decode_px)
        assert np.allclose(x, model.embed([dec.image])[0], atol=1e-4), p

    # the plan takes the model's eps, and refuses shards of another model beside these
    res = plan(
        JobSpec.from_mapping(
            {
                "features": [str(out / "*.parquet")],
                "root": str(root),
                "out": str(tmp_path / "plan"),
                "report": False,
            }
        ),
        dask_client,
    )
    assert res.summary["settings"]["eps"] == NEURAL_EPS
    deleted = sorted(res.plan.loc[~res.plan["keep"], "path"])
    assert deleted == [f"p{i} (copy).jpg" for i in range(6)]
    other = tmp_path / "other"
    embed_images(str(root), str(other), model=f"{spec}?eps=0.25", batch_size=64)
    with pytest.raises(InputError, match="different models cannot be compared"):
        default_eps([str(out / "*.parquet"), str(other / "*.parquet")], None)


# -- torch: timm and open_clip -----------------------------------------------------------------
@pytest.fixture
def offline(monkeypatch) -> None:
    """No hub: a model whose weights are not on disk must fail at once, not retry a network."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", "/nonexistent-hf-home")


def _torch_lib(name: str):
    pytest.importorskip("torch")
    try:
        return __import__(name)
    except Exception as exc:  # torchvision built for another torch fails with RuntimeError
        pytest.skip(f"{name} not importable here: {exc}")


def test_timm_model_from_a_local_weights_file(tmp_path: Path, offline) -> None:
    timm = _torch_lib("timm")
    import torch
    from safetensors.torch import save_file

    torch.manual_seed(0)
    net = timm.create_model("test_vit", pretrained=False)
    save_file(net.state_dict(), str(tmp_path / "test_vit.safetensors"))
    torch.set_num_threads(2)
    model = get_model(f"timm:test_vit?weights={tmp_path / 'test_vit.safetensors'}")
    # one torch thread per Dask worker thread, as onnxruntime's sessions: no oversubscription
    assert torch.get_num_threads() == 1
    net.reset_classifier(0)
    net.eval()
    images = [photo(s, 200, 150) for s in range(3)]
    X = model.embed(images)
    assert X.shape == (3, net.num_features) and model.dim == net.num_features
    with torch.inference_mode():
        want = net(torch.from_numpy(model.pre(images))).numpy()
    assert np.allclose(X, want / np.linalg.norm(want, axis=1, keepdims=True), atol=1e-5)
    # timm's own evaluation transform for the model: 160 px, crop_pct 0.95, mean/std 0.5
    assert model.pre.size == (160, 160) and model.pre.crop_pct == 0.95
    assert model.pre.mean == (0.5, 0.5, 0.5) and model.decode_px == 169
    assert "sha256:" in model.version

    with pytest.raises(ConfigError, match=r"cannot load the weights .*\?weights=PATH") as err:
        get_model("timm:test_vit")  # weights on the hub only: offline, so not found
    assert "\n" not in str(err.value)
    with pytest.raises(ConfigError, match="timm has no model 'no_such_net'"):
        get_model("timm:no_such_net")
    with pytest.raises(ConfigError, match=r"weights file .* not found"):
        get_model(f"timm:test_vit?weights={tmp_path / 'absent.pth'}")


#: An open_clip model a few kilobytes large: 32 px images, one layer per tower.
TINY_CLIP = {
    "embed_dim": 16,
    "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "head_width": 16, "patch_size": 8},
    "text_cfg": {"context_length": 8, "vocab_size": 64, "width": 16, "heads": 1, "layers": 1},
}


def test_open_clip_model_from_a_config_and_checkpoint(tmp_path: Path, offline) -> None:
    open_clip = _torch_lib("open_clip")
    import torch

    cfg = tmp_path / "tinyclip.json"
    cfg.write_text(json.dumps(TINY_CLIP))
    open_clip.add_model_config(str(cfg))
    torch.manual_seed(0)
    net = open_clip.create_model("tinyclip", pretrained=None).eval()
    torch.save(net.state_dict(), tmp_path / "tiny.pt")
    spec = f"open_clip:tinyclip/{tmp_path / 'tiny.pt'}?config={cfg}"
    model = get_model(spec)
    images = [photo(s, 80, 60) for s in range(3)]
    X = model.embed(images)
    assert X.shape == (3, 16) and model.dim == 16
    with torch.inference_mode():
        want = net.encode_image(torch.from_numpy(model.pre(images))).numpy()
    assert np.allclose(X, want / np.linalg.norm(want, axis=1, keepdims=True), atol=1e-5)
    # CLIP's pre-processing: 32 px, shortest side then centre crop, CLIP's mean/std
    assert model.pre.size == (32, 32) and model.pre.resize == "crop"
    assert model.pre.mean == pytest.approx(open_clip.OPENAI_DATASET_MEAN)

    with pytest.raises(ConfigError, match="cannot load the weights"):
        get_model(f"open_clip:tinyclip/laion2b_s34b_b79k?config={cfg}")  # no such tag
    with pytest.raises(ConfigError, match="ARCH/PRETRAINED"):
        get_model("open_clip:ViT-B-32")
    with pytest.raises(ConfigError, match="open_clip has no model 'NoSuchNet'"):
        get_model("open_clip:NoSuchNet/x")
