"""Data: real text in, exact-length token blocks out, with an exact resumable cursor.

What it is: tokenizers (`tokenizer`), document sources (`sources`, `records`, the shared model in
`documents`), mixing/splitting/sharding (`mixing`), packing (`packing`) and the train/eval batch
iterators (`loader`). The names below are re-exported lazily, so `import pdt.data.sources`
(e.g. for a dataset build) does not import torch.
What it is not: the dataset-build stages or teachers, nor any synthetic text: if every source
fails, `DataSourceError` says why.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "DataSourceError": "pdt.data.documents",
    "Document": "pdt.data.documents",
    "SOURCE_TYPES": "pdt.data.sources",
    "open_sources": "pdt.data.sources",
    "Tokenizer": "pdt.data.tokenizer",
    "HFTokenizer": "pdt.data.tokenizer",
    "TokenizerError": "pdt.data.tokenizer",
    "build_tokenizer": "pdt.data.tokenizer",
    "load_tokenizer": "pdt.data.tokenizer",
    "check_identity": "pdt.data.tokenizer",
    "Mixer": "pdt.data.mixing",
    "DocStream": "pdt.data.mixing",
    "is_validation": "pdt.data.mixing",
    "Packer": "pdt.data.packing",
    "TrainBatches": "pdt.data.loader",
    "make_train_batches": "pdt.data.loader",
    "make_eval_batches": "pdt.data.loader",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'pdt.data' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)


def __dir__() -> list[str]:
    return __all__
