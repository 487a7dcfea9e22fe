"""The embed stage: images -> PDQ shards on local folders, memory:// and S3, threads and Dask.

Images are generated here (smooth colour fields, shapes, blur, grain: photo-like enough for a
perceptual hash), with edited copies; nothing is downloaded.
"""

from __future__ import annotations

import io
import json
import os
import re
from collections import Counter
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml
from PIL import Image

from dedup_batch.cli import main
from dedup_batch.cluster import DBSCAN
from dedup_batch.config import JobSpec
from dedup_batch.demo import EDITS, photo
from dedup_batch.embed import (
    ERRORS_FILE,
    MODEL_KEY,
    PdqModel,
    default_eps,
    default_extensions,
    embed_images,
    get_model,
    parse_extensions,
    parse_model,
)
from dedup_batch.embed.images import decode_image
from dedup_batch.errors import ConfigError, InputError, StorageError
from dedup_batch.load import load_features
from dedup_batch.pipeline import plan
from dedup_batch.plandir import PlanDir
from dedup_batch.storage import Store

pdqhash = pytest.importorskip("pdqhash")

PDQ_EPS = PdqModel.default_eps


# -- generated photos --------------------------------------------------------------------------
def save(img: Image.Image, path: Path, quality: int | None = 90) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    if quality is None:
        img.save(path, format="PNG", compress_level=1)
    else:
        img.save(path, format="JPEG", quality=quality)
    return path


def jpeg_bytes(img: Image.Image, quality: int = 90) -> bytes:
    buf = io.BytesIO()
    img.convert("RGB").save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


@pytest.fixture(scope="module")
def collection(tmp_path_factory) -> tuple[Path, dict[str, str]]:
    """40 distinct photos and 5 edited copies of each (240 files); path -> (original, edit)."""
    root = tmp_path_factory.mktemp("collection") / "photos"
    truth: dict[str, tuple[str, str]] = {}
    for i in range(40):
        img = photo(1000 + i)
        name = f"album {i % 3}/IMG_{i:03d}.jpg"
        save(img, root / name, 92)
        truth[name] = (name, "original")
        for kind, (edit, suffix, quality) in EDITS.items():
            copy = f"album {i % 3}/IMG_{i:03d} ({kind}){suffix}"
            save(edit(img), root / copy, quality)
            truth[copy] = (name, kind)
    return root, truth


@pytest.fixture(scope="module")
def embedded(collection, tmp_path_factory):
    """The collection embedded once (threads), and its features loaded."""
    root, _ = collection
    out = tmp_path_factory.mktemp("features")
    result = embed_images(str(root), str(out), batch_size=64)
    feats = load_features(str(out / "*.parquet"), store=Store(str(root)))
    return result, out, feats


# -- the targets: precision and recall with the default eps -------------------------------------
def test_pdq_default_eps_separates_photos_and_joins_their_copies(collection, embedded) -> None:
    _, truth = collection
    result, _, feats = embedded
    assert result.embedded == len(truth) == 240 and result.errors == 0
    labels = DBSCAN(eps=PDQ_EPS, min_samples=1).fit(feats.X).labels_
    label = dict(zip(feats.paths.tolist(), labels.tolist(), strict=True))
    # precision: no cluster holds two different photos (or their copies)
    originals_per_cluster: dict[int, set[str]] = {}
    for path, (orig, _) in truth.items():
        originals_per_cluster.setdefault(label[path], set()).add(orig)
    assert max(len(v) for v in originals_per_cluster.values()) == 1
    # recall: copies in their original's cluster, per edit
    joined = Counter(
        kind for p, (o, kind) in truth.items() if kind != "original" and label[p] == label[o]
    )
    recall = {kind: joined[kind] / 40 for kind in EDITS}
    print("pdq recall per edit:", recall)
    assert sum(joined.values()) / (40 * len(EDITS)) >= 0.9, recall
    assert all(r >= 0.75 for r in recall.values()), recall


def test_hamming_31_is_in_and_32_is_out() -> None:
    rng = np.random.default_rng(3)
    a = rng.choice([-1.0, 1.0], size=(50, 256)).astype(np.float32)
    for h, together in ((31, True), (32, False)):
        b = a.copy()
        for i in range(len(b)):
            b[i, rng.choice(256, h, replace=False)] *= -1
        labels = DBSCAN(eps=PDQ_EPS, min_samples=1).fit(np.concatenate([a, b])).labels_
        assert bool(np.all(labels[:50] == labels[50:])) is together, h
    assert ((a[0] - a[1]) ** 2).sum() == 4 * (a[0] != a[1]).sum()


# -- the shard format ---------------------------------------------------------------------------
def test_shards_have_the_documented_columns_and_model_metadata(collection, embedded) -> None:
    root, truth = collection
    result, out, feats = embedded
    shards = sorted(out.glob("part-*.parquet"))
    assert len(shards) == result.batches == len(result.shards_written) == 4  # 240 / 64
    assert all(
        re.fullmatch(r"part-\d{8}T\d{6}Z-[0-9a-f]{6}-\d{5}\.parquet", s.name) for s in shards
    )
    table = pa.concat_tables([pq.read_table(s) for s in shards])
    schema = table.schema
    assert schema.field("embedding").type == pa.list_(pa.float32(), 256)
    assert [schema.field(c).type for c in ("path", "size", "mtime", "etag", "width", "height")] == [
        pa.string(),
        pa.int64(),
        pa.float64(),
        pa.string(),
        pa.int32(),
        pa.int32(),
    ]
    assert schema.field("quality").type == pa.int16()
    info = json.loads(schema.metadata[MODEL_KEY])
    assert info["name"] == "pdq" and info["dim"] == 256 and info["metric"] == "euclidean"
    assert info["version"].startswith(f"pdqhash-{pdqhash.__version__}")
    assert info["default_eps"] == pytest.approx(2 * np.sqrt(31.5))
    X = np.stack(table.column("embedding").to_numpy(zero_copy_only=False))
    assert set(np.unique(X)) == {-1.0, 1.0}
    df = table.drop(["embedding"]).to_pandas().set_index("path")
    assert set(df.index) == set(truth)
    some = "album 0/IMG_000 (resized).jpg"
    st = os.stat(root / some)
    assert (df.loc[some, "width"], df.loc[some, "height"]) == (256, 192)
    assert df.loc[some, "size"] == st.st_size and df.loc[some, "mtime"] == st.st_mtime
    assert df["etag"].isna().all()  # a local folder has none: size + mtime decide
    assert df["quality"].between(50, 100).all()  # photos, not flat fields
    # load reads the shards as they are, row for row
    got = dict(zip(feats.paths.tolist(), feats.X, strict=True))
    for path, vec in zip(table.column("path").to_pylist(), X, strict=True):
        np.testing.assert_array_equal(got[path], vec)


def test_vectors_are_pdqhash_of_the_image() -> None:
    """Below 512 px no resampling happens: the vector is pdqhash's bits as ±1, exactly."""
    img = photo(7, 400, 300)
    dec = decode_image(jpeg_bytes(img, 95), max_pixels=10**8, decode_px=512)
    bits, quality = pdqhash.compute(np.asarray(dec.image))
    vec = get_model("pdq").embed([dec.image])[0]
    np.testing.assert_array_equal(vec, bits * 2.0 - 1.0)
    assert vec.dtype == np.float32 and quality > 50


def test_large_jpeg_is_drafted_and_matches_a_full_decode() -> None:
    big = photo(8, 2400, 1800)
    data = jpeg_bytes(big, 90)
    drafted = decode_image(data, max_pixels=10**8, decode_px=512)
    assert (drafted.width, drafted.height) == (2400, 1800)
    assert drafted.image.size == (1200, 900)  # 1/2 scale: at 1/4 the short side would be < 512
    full = Image.open(io.BytesIO(data)).convert("RGB")
    model = get_model("pdq")
    a, b = model.embed([drafted.image, full])
    assert int((a != b).sum()) <= 10


# -- bad input ------------------------------------------------------------------------------------
def _bad_and_odd_files(root: Path) -> dict[str, str | None]:
    """Files that must be listed as errors (name -> kind) or embedded (None)."""
    good = photo(21, 200, 150)
    data = jpeg_bytes(good)
    files: dict[str, str | None] = {}
    (root / "ok.jpg").write_bytes(data)
    files["ok.jpg"] = None
    (root / "truncated.jpg").write_bytes(data[: len(data) // 2])
    files["truncated.jpg"] = "corrupt"
    (root / "not an image.jpg").write_bytes(b"%PDF-1.4 definitely not a JPEG" * 20)
    files["not an image.jpg"] = "not-image"
    (root / "zero.png").write_bytes(b"")
    files["zero.png"] = "empty"
    Image.new("L", (3000, 3000), 0).save(root / "bomb.png")  # small file, 9 MP decoded
    files["bomb.png"] = "bomb"
    Image.new("RGB", (3, 3), (9, 9, 9)).save(root / "tiny.png")
    files["tiny.png"] = "small"
    (root / "ps.jpg").write_bytes(b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\n")
    files["ps.jpg"] = "not-image"  # EPS is never opened (Ghostscript), whatever it claims
    os.symlink(root / "ok.jpg", root / "link.jpg")
    files["link.jpg"] = "link"
    # odd modes: each gets a vector
    good.convert("CMYK").save(root / "cmyk.jpg")
    good.convert("P", palette=Image.Palette.ADAPTIVE).save(root / "palette.gif")
    rgba = good.convert("RGBA")
    rgba.putalpha(200)
    rgba.save(root / "alpha.png")
    good.convert("LA").save(root / "grey alpha.png")
    good.convert("1").save(root / "bilevel.bmp")
    good.save(root / "tiff.TIF")
    good.save(root / "webp.webp")
    grey16 = (np.asarray(good.convert("L"), np.uint16) * 257).astype(np.uint16)
    Image.fromarray(grey16).save(root / "sixteen.png")
    frames = [good, good.rotate(90)]
    frames[0].save(root / "anim.gif", save_all=True, append_images=frames[1:])
    for name in ("cmyk.jpg", "palette.gif", "alpha.png", "grey alpha.png", "bilevel.bmp"):
        files[name] = None
    for name in ("tiff.TIF", "webp.webp", "sixteen.png", "anim.gif"):
        files[name] = None
    (root / "notes.txt").write_text("not listed: wrong extension")
    return files


def test_bad_objects_are_listed_and_never_stop_the_job(tmp_path: Path) -> None:
    root = tmp_path / "photos"
    root.mkdir()
    files = _bad_and_odd_files(root)
    out = tmp_path / "feat"
    result = embed_images(str(root), str(out), max_pixels=4_000_000, batch_size=5)
    errors = pd.read_csv(out / ERRORS_FILE)
    assert list(errors.columns[:2]) == ["path", "reason"]
    want = {k: v for k, v in files.items() if v is not None}
    assert dict(zip(errors["path"], errors["kind"], strict=True)) == want
    assert errors["reason"].str.len().gt(5).all()
    assert result.errors == len(want) and result.embedded == len(files) - len(want)
    feats = load_features(str(out / "*.parquet"), store=Store(str(root)))
    assert sorted(feats.paths) == sorted(k for k, v in files.items() if v is None)
    vec = dict(zip(feats.paths.tolist(), feats.X, strict=True))
    ham = lambda a, b: int((vec[a] != vec[b]).sum())  # noqa: E731
    # conversions keep the picture: 16-bit grey scaled (not clipped), CMYK, palette, alpha
    assert ham("sixteen.png", "ok.jpg") <= 31
    assert ham("alpha.png", "ok.jpg") <= 60  # composited over white: lighter, same shapes
    for name in ("cmyk.jpg", "palette.gif", "tiff.TIF", "webp.webp", "anim.gif"):
        assert ham(name, "ok.jpg") <= 40, name


# -- incremental ---------------------------------------------------------------------------------
@pytest.fixture
def count_reads(monkeypatch):
    """Counts every image read through the Store (in this process: the threads path)."""
    reads: list[str] = []
    real = Store.open_exact

    def counting(self, full):
        reads.append(full)
        return real(self, full)

    monkeypatch.setattr(Store, "open_exact", counting)
    return reads


def test_second_run_reads_no_image_and_changes_are_picked_up(tmp_path: Path, count_reads) -> None:
    root = tmp_path / "photos"
    for i in range(12):
        save(photo(300 + i, 160, 120), root / f"p{i:02d}.jpg")
    (root / "broken.jpg").write_bytes(b"\xff\xd8\xff garbage")
    out = tmp_path / "feat"
    first = embed_images(str(root), str(out), batch_size=4)
    assert (first.embedded, first.errors, len(count_reads)) == (12, 1, 13)

    count_reads.clear()
    again = embed_images(str(root), str(out), batch_size=4)
    assert count_reads == []
    assert (again.embedded, again.unchanged, again.known_bad, again.batches) == (0, 12, 1, 0)
    assert "0 images embedded, 12 skipped unchanged, 1 errors" in again.summary_line()
    assert list(pd.read_csv(out / ERRORS_FILE)["path"]) == ["broken.jpg"]

    # change one (other content, same name), add one, delete one
    save(photo(999, 160, 120), root / "p03.jpg")
    os.utime(root / "p03.jpg", (1e9, 1e9))
    save(photo(400, 160, 120), root / "new one.jpg")
    (root / "p05.jpg").unlink()
    count_reads.clear()
    third = embed_images(str(root), str(out), batch_size=4)
    assert sorted(os.path.basename(p) for p in count_reads) == ["new one.jpg", "p03.jpg"]
    assert (third.embedded, third.unchanged) == (2, 10)
    assert third.shards_compacted == 1  # p03's old row removed from its shard
    assert third.run_id in "".join(os.listdir(out))
    feats = load_features(str(out / "*.parquet"), store=Store(str(root)))
    assert len(feats.paths) == 13  # 11 listed + new + the deleted p05 (plan: missing)
    assert Counter(feats.paths.tolist())["p03.jpg"] == 1
    fresh = tmp_path / "fresh"
    embed_images(str(root), str(fresh))
    ref = load_features(str(fresh / "*.parquet"), store=Store(str(root)))
    i, j = list(feats.paths).index("p03.jpg"), list(ref.paths).index("p03.jpg")
    np.testing.assert_array_equal(feats.X[i], ref.X[j])


def test_a_crashed_run_resumes_and_a_half_compaction_heals(tmp_path: Path, monkeypatch) -> None:
    root = tmp_path / "photos"
    for i in range(8):
        save(photo(500 + i, 120, 90), root / f"q{i}.jpg")
    out = tmp_path / "feat"
    real = Store.write_bytes

    def failing(self, full, data):
        if full.endswith("-00001.parquet"):
            raise StorageError("simulated: the store went away")
        return real(self, full, data)

    monkeypatch.setattr(Store, "write_bytes", failing)
    with pytest.raises(StorageError, match="simulated"):
        embed_images(str(root), str(out), batch_size=2)
    monkeypatch.setattr(Store, "write_bytes", real)
    written = len(list(out.glob("part-*.parquet")))  # the batches that finished first
    assert written <= 3
    resumed = embed_images(str(root), str(out), batch_size=2)
    assert (resumed.embedded, resumed.unchanged) == (8 - 2 * written, 2 * written)
    # a crash between writing a compacted shard and removing the old one: a shard twice
    shard = sorted(out.glob("part-*.parquet"))[0]
    twin = shard.with_name(re.sub(r"-\d{5}\.parquet$", "-c99999.parquet", shard.name))
    twin.write_bytes(shard.read_bytes())
    healed = embed_images(str(root), str(out))
    assert (healed.embedded, healed.unchanged, healed.shards_removed) == (0, 8, 1)
    feats = load_features(str(out / "*.parquet"), store=Store(str(root)))
    assert sorted(feats.paths) == [f"q{i}.jpg" for i in range(8)]


def test_out_with_another_model_is_refused(tmp_path: Path) -> None:
    root = tmp_path / "photos"
    save(photo(1, 100, 80), root / "a.jpg")
    out = tmp_path / "feat"
    embed_images(str(root), str(out))
    shard = next(out.glob("part-*.parquet"))
    table = pq.read_table(shard)
    info = json.loads(table.schema.metadata[MODEL_KEY]) | {"version": "pdqhash-0.1+other"}
    pq.write_table(table.replace_schema_metadata({MODEL_KEY: json.dumps(info)}), shard)
    with pytest.raises(ConfigError, match=r"pdqhash-0\.1\+other.*choose another --out"):
        embed_images(str(root), str(out))


# -- backends, names, Dask ---------------------------------------------------------------------
TRICKY_NAMES = ["with space.jpg", "ünïcödé/日本.jpg", "glob[1].jpg", "star*q.jpg", "a/b?c.jpg"]


def test_tricky_names_on_memory(count_reads) -> None:
    import fsspec

    fs = fsspec.filesystem("memory")
    base = "/embed-tricky"
    for i, name in enumerate(TRICKY_NAMES):
        fs.pipe_file(f"{base}/lib/{name}", jpeg_bytes(photo(600 + i, 96, 72)))
    fs.pipe_file(f"{base}/lib/glob1.jpg", jpeg_bytes(photo(700, 96, 72)))  # the decoy of [1]
    res = embed_images(f"memory://{base}/lib", f"memory://{base}/feat")
    assert res.embedded == 6 and res.errors == 0
    feats = load_features(f"memory://{base}/feat/*.parquet", store=Store(f"memory://{base}/lib"))
    assert sorted(feats.paths) == sorted([*TRICKY_NAMES, "glob1.jpg"])
    vec = dict(zip(feats.paths.tolist(), feats.X, strict=True))
    assert int((vec["glob[1].jpg"] != vec["glob1.jpg"]).sum()) > 31  # read as itself
    count_reads.clear()
    assert embed_images(f"memory://{base}/lib", f"memory://{base}/feat").unchanged == 6
    assert count_reads == []


@pytest.mark.s3
def test_s3_on_dask_tricky_keys_incremental_by_etag(s3, s3fs_client, dask_client) -> None:
    s3fs_client.mkdir("photos")
    names = [*TRICKY_NAMES, "odd?versionId=1.jpg", "bad.jpg"]

    def put(name: str, body: bytes) -> None:  # by exact key: s3fs would parse '?versionId='
        s3fs_client.call_s3("put_object", Bucket="photos", Key=f"lib/{name}", Body=body)

    for i, name in enumerate(names[:-1]):
        put(name, jpeg_bytes(photo(800 + i, 96, 72)))
    put("bad.jpg", b"not a jpeg at all")
    res = embed_images(
        "s3://photos/lib", "s3://photos/feat", storage_options=s3, client=dask_client
    )
    assert (res.embedded, res.errors) == (6, 1)
    assert res.shards_written and all(
        u.startswith("s3://photos/feat/part-") for u in res.shards_written
    )
    feats = load_features(
        "s3://photos/feat/*.parquet", store=Store("s3://photos/lib", s3), storage_options=s3
    )
    assert sorted(feats.paths) == sorted(names[:-1])
    table = pq.read_table(io.BytesIO(s3fs_client.cat_file(res.shards_written[0][5:])))
    assert all(e and e.strip('"') for e in table.column("etag").to_pylist())
    errors = pd.read_csv(io.BytesIO(s3fs_client.cat_file("photos/feat/embed-errors.csv")))
    assert list(errors["path"]) == ["bad.jpg"]

    again = embed_images(
        "s3://photos/lib", "s3://photos/feat", storage_options=s3, client=dask_client
    )
    assert (again.embedded, again.unchanged, again.batches) == (0, 6, 0)
    put("glob[1].jpg", jpeg_bytes(photo(900, 96, 72)))  # overwritten: a new ETag
    third = embed_images(
        "s3://photos/lib", "s3://photos/feat", storage_options=s3, client=dask_client
    )
    assert (third.embedded, third.unchanged, third.batches) == (1, 5, 1)
    # plan picks the model's eps and the shards' model (footers only)
    eps, info = default_eps(["s3://photos/feat/*.parquet"], s3)
    assert eps == PDQ_EPS and info["name"] == "pdq"


def test_batches_run_on_the_dask_workers(tmp_path: Path, dask_client) -> None:
    from distributed import get_task_stream

    root = tmp_path / "photos"
    for i in range(40):
        save(photo(1100 + i, 120, 90), root / f"d{i:02d}.jpg")
    out = tmp_path / "feat"
    with get_task_stream(dask_client) as ts:
        res = embed_images(str(root), str(out), client=dask_client, batch_size=8)
    embed_tasks = [t for t in ts.data if "embed-" in str(t.get("key"))]
    assert res.embedded == 40 and res.batches == 5 == len(embed_tasks)
    assert {t["worker"] for t in embed_tasks} <= set(dask_client.scheduler_info()["workers"])
    ref = embed_images(str(root), str(tmp_path / "threads"), batch_size=8)
    a = load_features(str(out / "*.parquet"), store=Store(str(root)))
    b = load_features(str(tmp_path / "threads" / "*.parquet"), store=Store(str(root)))
    assert a.paths.tolist() == b.paths.tolist() and ref.embedded == 40
    np.testing.assert_array_equal(a.X, b.X)
    with get_task_stream(dask_client) as ts:
        again = embed_images(str(root), str(out), client=dask_client)
    assert again.batches == 0 and not [t for t in ts.data if "embed-" in str(t.get("key"))]


# -- plan reads the model ------------------------------------------------------------------------
def test_plan_takes_the_models_eps_and_refuses_mixed_models(collection, embedded, tmp_path) -> None:
    root, _ = collection
    _, out, _ = embedded
    spec = JobSpec.from_mapping(
        {
            "features": [str(out / "*.parquet")],
            "root": str(root),
            "out": str(tmp_path / "plan"),
            "report": False,
        }
    )
    result = plan(spec)
    assert result.summary["settings"]["eps"] == pytest.approx(PDQ_EPS)
    assert result.summary["counts"]["delete"] >= 0.9 * 200
    # a shard of another model in the same glob: refused, both shards named
    mixed = tmp_path / "mixed"
    mixed.mkdir()
    shards = sorted(out.glob("part-*.parquet"))
    for s in shards[:2]:
        (mixed / s.name).write_bytes(s.read_bytes())
    table = pq.read_table(shards[2])
    info = json.loads(table.schema.metadata[MODEL_KEY]) | {"name": "open_clip:ViT-B-32"}
    pq.write_table(
        table.replace_schema_metadata({MODEL_KEY: json.dumps(info)}), mixed / "z.parquet"
    )
    bad = JobSpec.from_mapping(
        {
            "features": [str(mixed / "*.parquet")],
            "root": str(root),
            "out": str(tmp_path / "plan2"),
            "report": False,
        }
    )
    with pytest.raises(InputError, match=rf"{shards[0].name}.*pdq.*z\.parquet.*open_clip"):
        plan(bad)
    # shards without model metadata: --eps stays required
    plain = tmp_path / "plain"
    plain.mkdir()
    pq.write_table(table.replace_schema_metadata({}), plain / "a.parquet")
    with pytest.raises(ConfigError, match="'eps' is required"):
        plan(
            JobSpec.from_mapping(
                {
                    "features": [str(plain / "*.parquet")],
                    "root": str(root),
                    "out": str(tmp_path / "plan3"),
                }
            )
        )
    with pytest.raises(ConfigError, match="euclidean metric, not cosine"):
        default_eps([str(out / "*.parquet")], metric="cosine")


# -- CLI and registry --------------------------------------------------------------------------
def test_cli_embed_then_plan_without_eps(tmp_path: Path, dask_client, capsys) -> None:
    root = tmp_path / "photos"
    for i in range(6):
        img = photo(1200 + i, 160, 120)
        save(img, root / f"c{i}.JPG")
        if i % 2 == 0:
            save(img, root / f"c{i} copy.png", None)
    (root / "skip.png").write_bytes(b"")
    sched = ["--scheduler", dask_client.scheduler.address]
    out = tmp_path / "feat"
    code = main(
        [
            "embed",
            "--root",
            str(root),
            "--out",
            str(out),
            "--extensions",
            "JPG,png",
            "--batch-size",
            "4",
            *sched,
        ]
    )
    line = capsys.readouterr().out.strip().splitlines()[-1]
    assert code == 0
    assert re.match(
        r"embed: 9 images embedded, 0 skipped unchanged, 1 errors; [\d.,]+ images/s", line
    )
    code = main(
        [
            "plan",
            "--features",
            str(out / "*.parquet"),
            "--root",
            str(root),
            "--out",
            str(tmp_path / "plan"),
            "--no-report",
            *sched,
        ]
    )
    assert code == 0
    assert "keep 6, delete 3" in capsys.readouterr().out
    assert (
        main(["embed", "--root", str(root), "--out", str(out), "--model", "onnx:/absent/m.onnx"])
        == 2
    )
    assert "--model onnx:/absent/m.onnx: no such file" in capsys.readouterr().err


def test_run_embed_embeds_what_is_missing_then_plans(tmp_path: Path, dask_client, capsys) -> None:
    # reads happen on the workers: the embed line's counts say what was read (the reads
    # themselves are counted in test_second_run_reads_no_image_and_changes_are_picked_up)
    root = tmp_path / "photos"
    for i in range(4):
        img = photo(1300 + i, 160, 120)
        save(img, root / f"r{i}.jpg")
        save(img, root / f"r{i} (1).jpg", 50)
    plan_dir = tmp_path / "plan"
    job = tmp_path / "job.yaml"
    job.write_text(f"root: {root}\nout: {plan_dir}\nembed_batch_size: 2\nreport: false\n")
    argv = ["run", "--config", str(job), "--embed", "pdq", "--scheduler"]
    argv.append(dask_client.scheduler.address)

    assert main(argv) == 0
    out = capsys.readouterr().out
    assert re.search(r"embed: 8 images embedded, 0 skipped unchanged, 0 errors", out)
    assert "keep 4, delete 4" in out
    shards = sorted((plan_dir / "features").glob("part-*.parquet"))
    assert len(shards) == 4  # embed_batch_size from the job spec: 2 images a shard
    planned = yaml.safe_load((plan_dir / "job.yaml").read_text())
    assert planned["embed"] == "pdq" and planned["eps"] == PDQ_EPS
    assert planned["features"] == [str(plan_dir / "features" / "part-*.parquet")]

    # unchanged: no image read, and the plan of the same features is reused
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "0 images embedded, 8 skipped unchanged" in out
    assert "plan (reused)" in out

    # one new copy: only it is read, and the plan is made again with it
    save(photo(1300, 160, 120), root / "r0 (2).png", None)
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "1 images embedded, 8 skipped unchanged" in out
    assert "plan:" in out and "keep 4, delete 5" in out

    # --features beside --embed is refused (the plan would mix two sets of vectors)
    assert main([*argv, "--features", str(tmp_path / "other/*.parquet")]) == 2
    assert "give --features or --embed, not both" in capsys.readouterr().err
    with pytest.raises(ConfigError, match="'embed' names no model"):
        JobSpec.from_mapping({"embed": "clip"})
    with pytest.raises(ConfigError, match="'embed_batch_size' must be >= 1"):
        JobSpec.from_mapping({"embed": "pdq", "embed_batch_size": 0})


def test_plan_of_a_job_spec_that_embeds_embeds_first_and_deletes_nothing(
    tmp_path: Path, dask_client, capsys
) -> None:
    # a job spec with 'embed:' (jobs/s3-bucket.yaml's commented key) given to 'plan': before,
    # plan ignored the key and failed with "'features' is required"; 'mode: apply' is run's
    root = tmp_path / "photos"
    for i in range(3):
        img = photo(1400 + i, 160, 120)
        save(img, root / f"p{i}.jpg")
        save(img, root / f"p{i} (1).jpg", 50)
    before = {p: p.read_bytes() for p in root.iterdir()}
    job = tmp_path / "job.yaml"
    plan_dir = tmp_path / "plan"
    job.write_text(f"root: {root}\nout: {plan_dir}\nembed: pdq\nmode: apply\nreport: false\n")
    argv = ["plan", "--config", str(job), "--scheduler", dask_client.scheduler.address]

    assert main(argv) == 0
    out = capsys.readouterr().out
    assert re.search(r"embed: 6 images embedded, 0 skipped unchanged, 0 errors", out)
    assert "keep 3, delete 3" in out and "dry run: nothing deleted" in out
    assert {p: p.read_bytes() for p in root.iterdir()} == before
    assert not PlanDir(str(plan_dir)).has_journal()


def test_heic_is_embedded_where_pillow_heif_is_installed(tmp_path: Path) -> None:
    pillow_heif = pytest.importorskip("pillow_heif")
    root = tmp_path / "photos"
    img = photo(1400, 320, 240)
    save(img, root / "IMG_1.jpg")
    heif = pillow_heif.from_pillow(img)
    heif.save(str(root / "IMG_1.HEIC"), quality=90)  # an iPhone's copy of the same picture
    (root / "broken.heic").write_bytes(b"not a heic file")
    assert {".heic", ".heif"} <= set(parse_extensions(default_extensions()))

    out = tmp_path / "feat"
    result = embed_images(str(root), str(out))  # default extensions
    assert (result.embedded, result.errors) == (2, 1)
    errors = pd.read_csv(out / ERRORS_FILE)
    assert list(errors["path"]) == ["broken.heic"] and errors["kind"][0] == "not-image"
    feats = load_features(str(out / "*.parquet"), store=Store(str(root)))
    assert sorted(feats.paths) == ["IMG_1.HEIC", "IMG_1.jpg"]
    assert np.linalg.norm(feats.X[0] - feats.X[1]) <= PDQ_EPS  # one picture, one cluster
    table = pq.read_table(next(out.glob("part-*.parquet")))
    assert table["width"].to_pylist() == [320, 320] and table["height"].to_pylist() == [240, 240]


def test_model_names_and_extensions() -> None:
    assert parse_model("pdq") == ("pdq", None) and parse_model(" PDQ ") == ("pdq", None)
    assert parse_model("pdq:") == ("pdq", "")
    with pytest.raises(ConfigError, match=r"unknown model 'clip'.*available: onnx, open_clip"):
        parse_model("clip")
    assert parse_model("open_clip:ViT-B-32/laion2b_s34b_b79k") == (
        "open_clip",
        "ViT-B-32/laion2b_s34b_b79k",
    )
    with pytest.raises(ConfigError, match="takes no argument"):
        get_model("pdq:16")
    m = get_model("pdq")
    assert (m.name, m.dim, m.metric, m.spec) == ("pdq", 256, "euclidean", "pdq")
    assert get_model("pdq") is m  # built once per process
    assert parse_extensions("JPG, .png,,webp") == (".jpg", ".png", ".webp")
    with pytest.raises(ConfigError):
        parse_extensions(" , ")
    with pytest.raises(ConfigError):
        parse_extensions("*.jpg")
