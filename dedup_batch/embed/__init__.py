"""Embed stage: images under a root -> sharded Parquet feature files, on the Dask workers.

The optional first stage of the pipeline, for collections that have images but no features::

    from dedup_batch.embed import embed_images
    result = embed_images("s3://photos/lib", "s3://photos/features", model="pdq", client=client)

One module per concern:

* :mod:`~dedup_batch.embed.models`: the model registry (``--model NAME[:ARG]``), PDQ;
* :mod:`~dedup_batch.embed.neural`: ONNX, timm and open_clip models, their pre-processing;
* :mod:`~dedup_batch.embed.listing`: which images to embed (extensions, incremental state);
* :mod:`~dedup_batch.embed.images`: exact-path reads, guarded decoding, mode conversion;
* :mod:`~dedup_batch.embed.output`: the output folder (shards, model metadata, errors CSV);
* :mod:`~dedup_batch.embed.run`: the job (batches on Dask workers, compaction, summary), and
  ``run --embed`` (:func:`embed_for_spec`).

Pillow is imported only when images are decoded, so ``plan`` can read the shards' model
metadata (:func:`default_eps`) without the ``[embed]`` extra.
"""

from __future__ import annotations

from .listing import DEFAULT_EXTENSIONS, default_extensions, parse_extensions
from .models import MODELS, Model, PdqModel, get_model, parse_model
from .neural import OnnxModel, OpenClipModel, Preprocess, TimmModel
from .output import ERRORS_FILE, MODEL_KEY, default_eps
from .run import DEFAULT_BATCH_SIZE, SHARD_GLOB, EmbedResult, embed_for_spec, embed_images

__all__ = [
    "DEFAULT_BATCH_SIZE",
    "DEFAULT_EXTENSIONS",
    "ERRORS_FILE",
    "MODELS",
    "MODEL_KEY",
    "SHARD_GLOB",
    "EmbedResult",
    "Model",
    "OnnxModel",
    "OpenClipModel",
    "PdqModel",
    "Preprocess",
    "TimmModel",
    "default_eps",
    "default_extensions",
    "embed_for_spec",
    "embed_images",
    "get_model",
    "parse_extensions",
    "parse_model",
]
