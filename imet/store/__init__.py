"""The feature store: one HDF5 file, the contract between featurize and the heads.

Only this package knows the file's layout (docs/store.md describes it for people writing their own):
`format` the layout, the plan, `create`, `Writer` and the checksums; `reader` the `StoreReader` protocol
heads read through and `FeatureStore`, a store file; `arrays` `ArrayStore`, the same reading side over
numpy arrays; `tools` describe, verify and merge. The names below are the package's public ones.
"""

from imet.errors import ImetError
from imet.store.arrays import ArrayStore
from imet.store.format import (
                               CHECKSUMS,
                               CODEC_ARRAYS,
                               DONE,
                               ERROR_LEN,
                               FAILED,
                               FEATURE_DTYPES,
                               FEATURES,
                               LEGACY_CHECKSUM,
                               PENDING,
                               PER_VIEW,
                               PLAN_KEYS,
                               PROVENANCE,
                               REQUIRED,
                               SCHEMA,
                               VERSION,
                               WRITTEN,
                               Plan,
                               Writer,
                               array_sizes,
                               contiguous,
                               create,
                               feature_dtypes,
                               foreign_storage,
                               identity,
                               identity_diff,
                               read_header,
                               read_plan,
                               recorded_data_dir,
                               row_checksums,
                               view_checksum,
                               write_arrays,
)
from imet.store.reader import FeatureStore, StoreReader, label_problems, meta_problems
from imet.store.tools import describe, human_bytes, merge, verify

__all__ = ["CHECKSUMS", "CODEC_ARRAYS", "DONE", "ERROR_LEN", "FAILED", "FEATURE_DTYPES", "FEATURES", "LEGACY_CHECKSUM",
           "PENDING", "PER_VIEW", "PLAN_KEYS", "PROVENANCE", "REQUIRED", "SCHEMA", "VERSION", "WRITTEN", "ArrayStore",
           "FeatureStore", "ImetError", "Plan", "StoreReader", "Writer", "array_sizes", "contiguous", "create",
           "describe", "feature_dtypes", "foreign_storage", "human_bytes", "identity", "identity_diff",
           "label_problems", "merge", "meta_problems", "read_header", "read_plan", "recorded_data_dir",
           "row_checksums", "verify", "view_checksum", "write_arrays"]
